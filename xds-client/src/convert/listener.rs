//! `envoy.config.listener.v3`: `Listener`, `FilterChain`,
//! `FilterChainMatch` and the listener filters (`original_dst`,
//! `tls_inspector`, `http_inspector`).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;
use ferry_model as m;

use super::core_types::{cidr, ip_socket};
use super::istio::{ISTIO_STATS_TYPE, ISTIO_TOLERATED, istio_stats};
use super::rbac;
use super::tls::downstream_tls;
use super::{
    ConvertError, Ctx, Typed, Warnings, duration, fingerprint, http_connection_manager, tcp_proxy,
    timeout_or,
};

/// The fingerprint of a listener's settings: the listener without its
/// filter chains, as Envoy's `filterChainOnlyChange` compares them.
fn settings_fingerprint(l: &listener_pb::Listener) -> u64 {
    let settings = listener_pb::Listener {
        filter_chains: Vec::new(),
        default_filter_chain: None,
        filter_chain_matcher: None,
        ..l.clone()
    };
    fingerprint(&settings)
}

pub fn listener(
    l: &listener_pb::Listener,
    warnings: &mut Warnings,
) -> Result<m::Listener, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("listener {:?}", l.name),
        warnings,
        inbound: l.traffic_direction == core_pb::TrafficDirection::Inbound as i32,
    };
    if l.name.is_empty() {
        return Err(ctx.err("name", "a listener needs a name"));
    }
    let address = ip_socket(&ctx, "address", &l.address)?;
    let mut additional_addresses = Vec::with_capacity(l.additional_addresses.len());
    for (i, a) in l.additional_addresses.iter().enumerate() {
        additional_addresses.push(ip_socket(
            &ctx,
            &format!("additional_addresses[{i}].address"),
            &a.address,
        )?);
    }
    let mut filters = m::ListenerFilters::default();
    for (i, lf) in l.listener_filters.iter().enumerate() {
        let field = format!("listener_filters[{i}]");
        let type_name = match &lf.config_type {
            Some(listener_pb::listener_filter::ConfigType::TypedConfig(any)) => {
                Typed::from_any(any)
                    .map_err(|e| ctx.err(format!("{field}.typed_config"), e))?
                    .type_name()
                    .to_string()
            }
            _ => String::new(),
        };
        match (type_name.as_str(), lf.name.as_str()) {
            ("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", _)
            | ("", "envoy.filters.listener.original_dst") => filters.original_dst = true,
            ("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", _)
            | ("", "envoy.filters.listener.tls_inspector") => filters.tls_inspector = true,
            ("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", _)
            | ("", "envoy.filters.listener.http_inspector") => filters.http_inspector = true,
            _ => {
                return Err(ctx.err(
                    field,
                    format!("unsupported listener filter {:?} ({type_name})", lf.name),
                ));
            }
        }
    }
    let mut chains = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        chains.push(Arc::new(filter_chain(
            &mut ctx,
            &format!("filter_chains[{i}]"),
            fc,
        )?));
    }
    let default_chain = match &l.default_filter_chain {
        Some(fc) => Some(Arc::new(filter_chain(
            &mut ctx,
            "default_filter_chain",
            fc,
        )?)),
        None => None,
    };
    if chains.is_empty() && default_chain.is_none() {
        return Err(ctx.err(
            "filter_chains",
            "a listener needs at least one filter chain",
        ));
    }
    let detection_timeout = timeout_or(&l.listener_filters_timeout, None);
    Ok(m::Listener {
        name: l.name.clone(),
        fingerprint: fingerprint(l),
        settings_fingerprint: settings_fingerprint(l),
        address,
        additional_addresses,
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|v| v.value),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|v| v.value),
        listener_filters: filters,
        detection_timeout,
        filter_chains: chains,
        default_chain,
    })
}

fn filter_chain(
    ctx: &mut Ctx<'_>,
    field: &str,
    fc: &listener_pb::FilterChain,
) -> Result<m::FilterChain, ConvertError> {
    let mut fcm = m::FilterChainMatch::default();
    if let Some(mm) = &fc.filter_chain_match {
        let f = format!("{field}.filter_chain_match");
        fcm.destination_port = mm
            .destination_port
            .as_ref()
            .map(|p| p.value)
            .map(|p| {
                u16::try_from(p).map_err(|_| {
                    ctx.err(
                        format!("{f}.destination_port"),
                        format!("{p} is not a port"),
                    )
                })
            })
            .transpose()?;
        for (i, r) in mm.prefix_ranges.iter().enumerate() {
            fcm.prefix_ranges
                .push(cidr(ctx, &format!("{f}.prefix_ranges[{i}]"), r)?);
        }
        for (i, r) in mm.source_prefix_ranges.iter().enumerate() {
            fcm.source_prefix_ranges
                .push(cidr(ctx, &format!("{f}.source_prefix_ranges[{i}]"), r)?);
        }
        fcm.source_ports = mm
            .source_ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        fcm.server_names = mm.server_names.clone();
        fcm.transport_protocol =
            (!mm.transport_protocol.is_empty()).then(|| mm.transport_protocol.clone());
        fcm.application_protocols = mm.application_protocols.clone();
    }
    let mut tls = match &fc.transport_socket {
        Some(ts) => downstream_tls(ctx, &format!("{field}.transport_socket"), ts)?,
        None => None,
    };
    if let Some(t) = &mut tls {
        t.handshake_timeout = duration(&fc.transport_socket_connect_timeout);
    }
    let mut terminal = None;
    let mut network_rbac = Vec::new();
    let mut rbac_at = Vec::new();
    let mut stats = None;
    for (i, f) in fc.filters.iter().enumerate() {
        let ff = format!("{field}.filters[{i}]");
        let typed = match &f.config_type {
            Some(listener_pb::filter::ConfigType::TypedConfig(any)) => {
                Typed::from_any(any).map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?
            }
            _ => return Err(ctx.err(&ff, format!("filter {:?} has no typed_config", f.name))),
        };
        if terminal.is_some() {
            return Err(ctx.err(
                &ff,
                format!("filter {:?} follows a terminal filter", f.name),
            ));
        }
        match typed.type_name() {
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => {
                let tp: tcp_pb::TcpProxy = typed
                    .decode()
                    .map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?;
                terminal = Some(m::ChainKind::Tcp(tcp_proxy(ctx, &ff, &tp)?));
            }
            rbac::NETWORK_RBAC_TYPE => {
                let tf = format!("{ff}.typed_config");
                let r = typed.decode().map_err(|e| ctx.err(&tf, e))?;
                network_rbac.push(Arc::new(rbac::network_rbac(ctx, &tf, &r)?));
                rbac_at.push(i);
            }
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
                let h: hcm_pb::HttpConnectionManager = typed
                    .decode()
                    .map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?;
                let hcm = http_connection_manager(ctx, &ff, &h)?;
                stats = stats.or_else(|| {
                    hcm.http_filters.iter().find_map(|f| match f.config {
                        m::HttpFilterConfig::IstioStats(s) => Some(s),
                        _ => None,
                    })
                });
                terminal = Some(m::ChainKind::Http(hcm));
            }
            ISTIO_STATS_TYPE => stats = Some(istio_stats(ctx, typed)),
            t if ISTIO_TOLERATED.contains(&t) => {
                ctx.warn(
                    &ff,
                    format!(
                        "network filter {:?} ({t}) is recognised but not implemented; skipped",
                        f.name
                    ),
                );
            }
            t => {
                return Err(ctx.err(
                    format!("{ff}.typed_config"),
                    format!("unsupported network filter {:?} ({t})", f.name),
                ));
            }
        }
    }
    let kind = terminal.ok_or_else(|| {
        ctx.err(
            format!("{field}.filters"),
            "the chain has no terminal filter (tcp_proxy or http_connection_manager)",
        )
    })?;
    let whole = fingerprint(fc);
    let fingerprint_without_network_rbac = if rbac_at.is_empty() {
        whole
    } else {
        let mut bare = fc.clone();
        let mut i = 0;
        bare.filters.retain(|_| {
            i += 1;
            !rbac_at.contains(&(i - 1))
        });
        fingerprint(&bare)
    };
    Ok(m::FilterChain {
        fingerprint: whole,
        fingerprint_without_network_rbac,
        name: if fc.name.is_empty() {
            field.to_string()
        } else {
            fc.name.clone()
        },
        filter_chain_match: fcm,
        tls,
        rbac: network_rbac,
        kind,
        istio_stats: stats,
    })
}
