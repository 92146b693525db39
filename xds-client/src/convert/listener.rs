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
use super::coverage::{fields, path};
use super::istio::{
    self, ISTIO_STATS_TYPE, ISTIO_TOLERATED, METADATA_EXCHANGE_TYPE, WASM_TYPES, istio_stats,
    metadata_exchange,
};
use super::tls::downstream_tls;
use super::{
    ConvertError, Ctx, Typed, Warnings, duration, fingerprint, http_connection_manager, tcp_proxy,
    timeout_or,
};
use super::{ext_authz, rbac};

fields!(pub(super) static LISTENER = "envoy.config.listener.v3.Listener" {
    "name": applied,
    "address": applied "a TCP socket address",
    "additional_addresses": applied,
    "stat_prefix": warned "statistics are named after the listener",
    "stats_matcher": warned "every listener statistic is kept",
    "filter_chains": applied,
    "fcds_config": refused "filter chain discovery (FCDS) is not supported",
    "filter_chain_matcher": applied "replaces filter_chain_match selection: every chain needs a unique name; see the xds.type.matcher.v3 lists",
    "use_original_dst": applied,
    "default_filter_chain": applied,
    "per_connection_buffer_limit_bytes": applied "the most request body kept for retries and mirrors when the route sets no request_body_buffer_limit (Ferry's default: 64 KiB); reads are bounded by the codec's own buffers",
    "per_connection_buffer_high_watermark_timeout": warned "downstream reads are bounded by the codec's buffers",
    "metadata": inert "listener metadata is read only by extensions Ferry does not run",
    "deprecated_v1": refused "use bind_to_port",
    "drain_type": warned "listeners drain on shutdown and on modification alike",
    "listener_filters": applied "original_dst, tls_inspector, http_inspector (others refused)",
    "listener_filters_timeout": applied "as Envoy: 15 s when unset, no limit for 0s (a client that stays silent, as a server-first protocol's does, is waited for; the proxy's --protocol-detection-timeout can cap that)",
    "continue_on_listener_filters_timeout": applied "without it, an explicit listener_filters_timeout closes the connection when it runs out",
    "transparent": refused "IP_TRANSPARENT listeners (TPROXY) are not supported",
    "freebind": refused "IP_FREEBIND listeners are not supported",
    "socket_options": refused "listener socket options are not supported",
    "tcp_fast_open_queue_length": warned "TCP Fast Open is not enabled",
    "traffic_direction": applied "picks the reporter of Istio's metrics",
    "udp_listener_config": refused "UDP listeners are not supported",
    "api_listener": refused "API listeners are not supported",
    "connection_balance_config": warned "the kernel balances connections across workers",
    "reuse_port": warned "the socket is not shared across processes",
    "enable_reuse_port": warned "the socket is not shared across processes",
    "access_log": applied "connections no filter chain takes",
    "tcp_backlog_size": warned "the default backlog applies",
    "max_connections_to_accept_per_socket_event": warned "connections are accepted one at a time",
    "bind_to_port": applied,
    "enable_mptcp": refused "MPTCP is not supported",
    "ignore_global_conn_limit": inert "there is no global connection limit to ignore",
    "bypass_overload_manager": inert "there is no overload manager to bypass",
    "tcp_keepalive": applied "on accepted connections",
    "internal_listener": applied "an in-process listener without a socket: connections to an envoy_internal_address endpoint naming it are handed over as in-memory streams (original_dst, tls_inspector and http_inspector run on the first bytes; TLS on its chains is refused)",
});

/// The address of an internal listener: unset, or an
/// `envoy_internal_address` naming the listener itself (a placeholder
/// socket address is kept in the model; nothing binds it).
fn internal_listener_address(
    ctx: &Ctx<'_>,
    name: &str,
    address: Option<&core_pb::Address>,
) -> Result<std::net::SocketAddr, ConvertError> {
    use core_pb::address::Address as A;
    match address.and_then(|a| a.address.as_ref()) {
        None => {}
        Some(A::EnvoyInternalAddress(ia)) => {
            let core_pb::EnvoyInternalAddress {
                endpoint_id: _,
                address_name_specifier,
            } = ia;
            let named = match address_name_specifier {
                Some(
                    core_pb::envoy_internal_address::AddressNameSpecifier::ServerListenerName(n),
                ) => n.as_str(),
                None => "",
            };
            if named != name {
                return Err(ctx.err(
                    "address.envoy_internal_address.server_listener_name",
                    format!(
                        "an internal listener's address must name it ({name:?}), not {named:?}"
                    ),
                ));
            }
        }
        Some(_) => {
            return Err(ctx.err(
                "address",
                "an internal listener has no socket address (unset, or an envoy_internal_address)",
            ));
        }
    }
    Ok(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
}

fields!(pub(super) static ADDITIONAL_ADDRESS = "envoy.config.listener.v3.AdditionalAddress" {
    "address": applied,
    "socket_options": refused "listener socket options are not supported",
    "tcp_keepalive": warned "the listener's tcp_keepalive applies to every address",
});

fields!(pub(super) static LISTENER_FILTER = "envoy.config.listener.v3.ListenerFilter" {
    "name": applied,
    "typed_config": applied,
    "config_discovery": refused "filter discovery (ECDS) is not supported",
    "filter_disabled": applied,
});

fields!(pub(super) static LISTENER_FILTER_PREDICATE = "envoy.config.listener.v3.ListenerFilterChainMatchPredicate" {
    "or_match": applied,
    "and_match": applied,
    "not_match": applied,
    "any_match": applied,
    "destination_port_range": applied,
});

fields!(pub(super) static FILTER_CHAIN = "envoy.config.listener.v3.FilterChain" {
    "filter_chain_match": applied "ignored when the listener has a filter_chain_matcher, as Envoy ignores it",
    "filters": applied "tcp_proxy, http_connection_manager, network RBAC, istio.stats; Istio's metadata exchange and authn skipped with a warning; Wasm: Istio's built-in plugins done natively, plugins that fail open skipped with a warning, others refused; others refused",
    "use_proxy_proto": refused "the PROXY protocol is not supported",
    "metadata": inert "filter chain metadata is read only by extensions Ferry does not run",
    "transport_socket": applied,
    "transport_socket_connect_timeout": applied "the TLS handshake deadline",
    "name": applied,
});

fields!(pub(super) static FILTER_CHAIN_MATCH = "envoy.config.listener.v3.FilterChainMatch" {
    "destination_port": applied,
    "prefix_ranges": applied,
    "address_suffix": inert "not implemented by Envoy either",
    "suffix_len": inert "not implemented by Envoy either",
    "direct_source_prefix_ranges": applied,
    "source_type": applied,
    "source_prefix_ranges": applied,
    "source_ports": applied,
    "server_names": applied,
    "transport_protocol": applied,
    "application_protocols": applied,
});

fields!(pub(super) static NETWORK_FILTER = "envoy.config.listener.v3.Filter" {
    "name": applied,
    "typed_config": applied,
    "config_discovery": refused "filter discovery (ECDS) is not supported",
});

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

#[allow(deprecated)] // `deprecated_v1` and `reuse_port` are still accepted by Envoy.
pub fn listener(
    l: &listener_pb::Listener,
    warnings: &mut Warnings,
) -> Result<m::Listener, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("listener {:?}", l.name),
        warnings,
        inbound: l.traffic_direction == core_pb::TrafficDirection::Inbound as i32,
        outbound: l.traffic_direction == core_pb::TrafficDirection::Outbound as i32,
    };
    let cov = &LISTENER;
    let listener_pb::Listener {
        name,
        address,
        additional_addresses,
        stat_prefix,
        stats_matcher,
        filter_chains,
        fcds_config,
        filter_chain_matcher,
        use_original_dst,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        metadata,
        deprecated_v1,
        drain_type,
        listener_filters,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        transparent,
        freebind,
        socket_options,
        tcp_fast_open_queue_length,
        traffic_direction: _,
        udp_listener_config,
        api_listener,
        connection_balance_config,
        reuse_port,
        enable_reuse_port,
        access_log,
        tcp_backlog_size,
        max_connections_to_accept_per_socket_event,
        bind_to_port,
        enable_mptcp,
        ignore_global_conn_limit,
        bypass_overload_manager,
        tcp_keepalive,
        listener_specifier,
    } = l;
    let _ = (metadata, ignore_global_conn_limit, bypass_overload_manager);
    if name.is_empty() {
        return Err(ctx.err("name", "a listener needs a name"));
    }
    ctx.refuse(cov, "", "fcds_config", fcds_config.is_some())?;
    ctx.refuse(cov, "", "deprecated_v1", deprecated_v1.is_some())?;
    ctx.refuse(
        cov,
        "",
        "transparent",
        transparent.as_ref().is_some_and(|v| v.value),
    )?;
    ctx.refuse(
        cov,
        "",
        "freebind",
        freebind.as_ref().is_some_and(|v| v.value),
    )?;
    ctx.refuse(cov, "", "socket_options", !socket_options.is_empty())?;
    ctx.refuse(
        cov,
        "",
        "udp_listener_config",
        udp_listener_config.is_some(),
    )?;
    ctx.refuse(cov, "", "api_listener", api_listener.is_some())?;
    ctx.refuse(cov, "", "enable_mptcp", *enable_mptcp)?;
    let internal = match listener_specifier {
        None => false,
        Some(listener_pb::listener::ListenerSpecifier::InternalListener(il)) => {
            let listener_pb::listener::InternalListenerConfig {} = il;
            true
        }
    };
    ctx.knob(cov, "", "stat_prefix", !stat_prefix.is_empty());
    ctx.knob(cov, "", "stats_matcher", stats_matcher.is_some());
    ctx.knob(
        cov,
        "",
        "per_connection_buffer_high_watermark_timeout",
        per_connection_buffer_high_watermark_timeout.is_some(),
    );
    // DrainType: DEFAULT = 0, MODIFY_ONLY = 1.
    ctx.knob(cov, "", "drain_type", *drain_type != 0);
    ctx.knob(
        cov,
        "",
        "tcp_fast_open_queue_length",
        tcp_fast_open_queue_length.is_some(),
    );
    ctx.knob(
        cov,
        "",
        "connection_balance_config",
        connection_balance_config.is_some(),
    );
    ctx.knob(cov, "", "reuse_port", *reuse_port);
    ctx.knob(
        cov,
        "",
        "enable_reuse_port",
        enable_reuse_port.as_ref().is_some_and(|v| v.value),
    );
    ctx.knob(cov, "", "tcp_backlog_size", tcp_backlog_size.is_some());
    ctx.knob(
        cov,
        "",
        "max_connections_to_accept_per_socket_event",
        max_connections_to_accept_per_socket_event.is_some(),
    );
    // An internal listener has no socket: its address is unset or an
    // internal one naming it.
    let bound = if internal {
        internal_listener_address(&ctx, name, address.as_ref())?
    } else {
        ip_socket(&ctx, "address", address)?
    };
    let mut more = Vec::with_capacity(additional_addresses.len());
    for (i, a) in additional_addresses.iter().enumerate() {
        let af = format!("additional_addresses[{i}]");
        let listener_pb::AdditionalAddress {
            address,
            socket_options,
            tcp_keepalive,
        } = a;
        ctx.refuse(
            &ADDITIONAL_ADDRESS,
            &af,
            "socket_options",
            socket_options.is_some(),
        )?;
        ctx.knob(
            &ADDITIONAL_ADDRESS,
            &af,
            "tcp_keepalive",
            tcp_keepalive.is_some(),
        );
        more.push(ip_socket(&ctx, &path(&af, "address"), address)?);
    }
    let mut filters = m::ListenerFilters::default();
    for (i, lf) in listener_filters.iter().enumerate() {
        listener_filter(
            &mut ctx,
            &format!("listener_filters[{i}]"),
            lf,
            &mut filters,
        )?;
    }
    let buffer_limit = per_connection_buffer_limit_bytes.as_ref().map(|v| v.value);
    let mut chains = Vec::with_capacity(filter_chains.len());
    for (i, fc) in filter_chains.iter().enumerate() {
        chains.push(Arc::new(filter_chain(
            &mut ctx,
            &format!("filter_chains[{i}]"),
            fc,
            buffer_limit,
        )?));
    }
    let chain_matcher = match filter_chain_matcher {
        Some(fcm) => {
            let names: Vec<&str> = filter_chains.iter().map(|c| c.name.as_str()).collect();
            Some(Arc::new(super::filter_chain_matcher::filter_chain_matcher(
                &mut ctx,
                "filter_chain_matcher",
                fcm,
                &names,
            )?))
        }
        None => None,
    };
    let default_chain = match default_filter_chain {
        Some(fc) => Some(Arc::new(filter_chain(
            &mut ctx,
            "default_filter_chain",
            fc,
            buffer_limit,
        )?)),
        None => None,
    };
    if chains.is_empty() && default_chain.is_none() {
        return Err(ctx.err(
            "filter_chains",
            "a listener needs at least one filter chain",
        ));
    }
    if internal
        && let Some(i) = chains
            .iter()
            .chain(&default_chain)
            .position(|c| c.tls.is_some())
    {
        // Connections handed over in process are served as plain streams.
        let at = if i < chains.len() {
            format!("filter_chains[{i}].transport_socket")
        } else {
            "default_filter_chain.transport_socket".to_string()
        };
        return Err(ctx.err(
            &at,
            "TLS on an internal listener's filter chain is not supported",
        ));
    }
    // Envoy's: 15 s when unset, none at all for 0s (istiod's setting, as
    // meshConfig protocolDetectionTimeout defaults to 0s).
    let detection_timeout = timeout_or(
        listener_filters_timeout,
        Some(std::time::Duration::from_secs(15)),
    );
    let access_logs = super::access_log::access_logs(&ctx, "access_log", access_log)?;
    Ok(m::Listener {
        access_logs,
        name: name.clone(),
        fingerprint: fingerprint(l),
        settings_fingerprint: settings_fingerprint(l),
        address: bound,
        additional_addresses: more,
        bind_to_port: !internal && bind_to_port.as_ref().is_none_or(|v| v.value),
        internal,
        use_original_dst: use_original_dst.as_ref().is_some_and(|v| v.value),
        listener_filters: filters,
        close_on_detection_timeout: detection_timeout.is_some()
            && !continue_on_listener_filters_timeout,
        detection_timeout,
        filter_chains: chains,
        default_chain,
        filter_chain_matcher: chain_matcher,
        tcp_keepalive: tcp_keepalive.as_ref().map(|k| {
            let core_pb::TcpKeepalive {
                keepalive_probes,
                keepalive_time,
                keepalive_interval,
            } = k;
            m::cluster::TcpKeepalive {
                probes: keepalive_probes.as_ref().map(|v| v.value),
                time: keepalive_time
                    .as_ref()
                    .map(|v| std::time::Duration::from_secs(u64::from(v.value))),
                interval: keepalive_interval
                    .as_ref()
                    .map(|v| std::time::Duration::from_secs(u64::from(v.value))),
            }
        }),
    })
}

const ORIGINAL_DST_TYPE: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TLS_INSPECTOR_TYPE: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const HTTP_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";

fn listener_filter(
    ctx: &mut Ctx<'_>,
    field: &str,
    lf: &listener_pb::ListenerFilter,
    filters: &mut m::ListenerFilters,
) -> Result<(), ConvertError> {
    use listener_pb::listener_filter::ConfigType;
    let listener_pb::ListenerFilter {
        name,
        filter_disabled,
        config_type,
    } = lf;
    let type_name = match config_type {
        Some(ConfigType::TypedConfig(any)) => Typed::from_any(any)
            .map_err(|e| ctx.err(path(field, "typed_config"), e))?
            .type_name()
            .to_string(),
        Some(ConfigType::ConfigDiscovery(_)) => {
            ctx.refuse(&LISTENER_FILTER, field, "config_discovery", true)?;
            String::new()
        }
        None => String::new(),
    };
    let disabled = filter_disabled
        .as_ref()
        .map(|p| predicate(ctx, &path(field, "filter_disabled"), p))
        .transpose()?;
    match (type_name.as_str(), name.as_str()) {
        (ORIGINAL_DST_TYPE, _) | ("", "envoy.filters.listener.original_dst") => {
            filters.original_dst = true;
            filters.original_dst_disabled = disabled;
        }
        (TLS_INSPECTOR_TYPE, _) | ("", "envoy.filters.listener.tls_inspector") => {
            filters.tls_inspector = true;
            filters.tls_inspector_disabled = disabled;
        }
        (HTTP_INSPECTOR_TYPE, _) | ("", "envoy.filters.listener.http_inspector") => {
            filters.http_inspector = true;
            filters.http_inspector_disabled = disabled;
        }
        _ => {
            return Err(ctx.err(
                field,
                format!("unsupported listener filter {name:?} ({type_name})"),
            ));
        }
    }
    Ok(())
}

/// `ListenerFilterChainMatchPredicate`.
fn predicate(
    ctx: &Ctx<'_>,
    field: &str,
    p: &listener_pb::ListenerFilterChainMatchPredicate,
) -> Result<m::PortPredicate, ConvertError> {
    use listener_pb::listener_filter_chain_match_predicate::{MatchSet, Rule};
    let listener_pb::ListenerFilterChainMatchPredicate { rule } = p;
    let set = |name: &str, s: &MatchSet| -> Result<Vec<m::PortPredicate>, ConvertError> {
        let MatchSet { rules } = s;
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| predicate(ctx, &format!("{field}.{name}.rules[{i}]"), r))
            .collect()
    };
    Ok(match rule {
        Some(Rule::OrMatch(s)) => m::PortPredicate::Or(set("or_match", s)?),
        Some(Rule::AndMatch(s)) => m::PortPredicate::And(set("and_match", s)?),
        Some(Rule::NotMatch(n)) => {
            m::PortPredicate::Not(Box::new(predicate(ctx, &path(field, "not_match"), n)?))
        }
        Some(Rule::AnyMatch(true)) => m::PortPredicate::Any,
        Some(Rule::AnyMatch(false)) | None => {
            return Err(ctx.err(field, "a rule is required (any_match must be true)"));
        }
        Some(Rule::DestinationPortRange(r)) => {
            let envoy_types::pb::envoy::r#type::v3::Int32Range { start, end } = r;
            let start = u32::try_from(*start).unwrap_or(0);
            let end = u32::try_from(*end).unwrap_or(0);
            m::PortPredicate::Range(start, end)
        }
    })
}

fn filter_chain_match(
    ctx: &Ctx<'_>,
    f: &str,
    mm: &listener_pb::FilterChainMatch,
) -> Result<m::FilterChainMatch, ConvertError> {
    use listener_pb::filter_chain_match::ConnectionSourceType as S;
    let listener_pb::FilterChainMatch {
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
        transport_protocol,
        application_protocols,
    } = mm;
    // Not implemented by Envoy either.
    let _ = (address_suffix, suffix_len);
    let ranges = |name: &str, rs: &[core_pb::CidrRange]| {
        rs.iter()
            .enumerate()
            .map(|(i, r)| cidr(ctx, &format!("{f}.{name}[{i}]"), r))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut ports = Vec::with_capacity(source_ports.len());
    for (i, p) in source_ports.iter().enumerate() {
        ports.push(u16::try_from(*p).map_err(|_| {
            ctx.err(
                format!("{f}.source_ports[{i}]"),
                format!("{p} is not a port"),
            )
        })?);
    }
    Ok(m::FilterChainMatch {
        destination_port: destination_port
            .as_ref()
            .map(|p| {
                u16::try_from(p.value).map_err(|_| {
                    ctx.err(
                        path(f, "destination_port"),
                        format!("{} is not a port", p.value),
                    )
                })
            })
            .transpose()?,
        prefix_ranges: ranges("prefix_ranges", prefix_ranges)?,
        server_names: server_names.clone(),
        transport_protocol: (!transport_protocol.is_empty()).then(|| transport_protocol.clone()),
        application_protocols: application_protocols.clone(),
        direct_source_prefix_ranges: ranges(
            "direct_source_prefix_ranges",
            direct_source_prefix_ranges,
        )?,
        source_type: match S::try_from(*source_type) {
            Ok(S::Any) => m::SourceType::Any,
            Ok(S::SameIpOrLoopback) => m::SourceType::SameIpOrLoopback,
            Ok(S::External) => m::SourceType::External,
            Err(_) => {
                return Err(ctx.err(
                    path(f, "source_type"),
                    format!("unknown source type {source_type}"),
                ));
            }
        },
        source_prefix_ranges: ranges("source_prefix_ranges", source_prefix_ranges)?,
        source_ports: ports,
    })
}

#[allow(deprecated)] // `use_proxy_proto` is deprecated but still accepted.
fn filter_chain(
    ctx: &mut Ctx<'_>,
    field: &str,
    fc: &listener_pb::FilterChain,
    request_buffer_limit: Option<u32>,
) -> Result<m::FilterChain, ConvertError> {
    let listener_pb::FilterChain {
        filter_chain_match: fcm_pb,
        filters,
        use_proxy_proto,
        metadata,
        transport_socket,
        transport_socket_connect_timeout,
        name,
    } = fc;
    let _ = metadata;
    ctx.refuse(
        &FILTER_CHAIN,
        field,
        "use_proxy_proto",
        use_proxy_proto.as_ref().is_some_and(|v| v.value),
    )?;
    let fcm = match fcm_pb {
        Some(mm) => filter_chain_match(ctx, &path(field, "filter_chain_match"), mm)?,
        None => m::FilterChainMatch::default(),
    };
    let mut tls = match transport_socket {
        Some(ts) => downstream_tls(ctx, &path(field, "transport_socket"), ts)?,
        None => None,
    };
    if let Some(t) = &mut tls {
        t.handshake_timeout = duration(transport_socket_connect_timeout);
    }
    let mut terminal = None;
    let mut network_rbac = Vec::new();
    let mut rbac_at = Vec::new();
    let mut network_ext_authz = Vec::new();
    let mut ext_authz_at: Vec<usize> = Vec::new();
    let mut stats = None;
    let mut exchange = None;
    let mut set_filter_state = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let ff = format!("{field}.filters[{i}]");
        let listener_pb::Filter {
            name: filter_name,
            config_type,
        } = f;
        let typed = match config_type {
            Some(listener_pb::filter::ConfigType::TypedConfig(any)) => {
                Typed::from_any(any).map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?
            }
            Some(listener_pb::filter::ConfigType::ConfigDiscovery(_)) => {
                ctx.refuse(&NETWORK_FILTER, &ff, "config_discovery", true)?;
                continue;
            }
            None => {
                return Err(ctx.err(&ff, format!("filter {filter_name:?} has no typed_config")));
            }
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
            super::set_filter_state::NETWORK_SET_FILTER_STATE_TYPE => {
                let tf = format!("{ff}.typed_config");
                let c = typed.decode().map_err(|e| ctx.err(&tf, e))?;
                set_filter_state.extend(super::set_filter_state::network_set_filter_state(
                    ctx, &tf, &c,
                )?);
            }
            ext_authz::NETWORK_EXT_AUTHZ_TYPE => {
                let tf = format!("{ff}.typed_config");
                let r = typed.decode().map_err(|e| ctx.err(&tf, e))?;
                network_ext_authz.push(Arc::new(ext_authz::network_ext_authz(ctx, &tf, &r)?));
                ext_authz_at.push(i);
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
            t if WASM_TYPES.contains(&t) => istio::wasm(ctx, &ff, "network", filter_name, typed)?,
            METADATA_EXCHANGE_TYPE => exchange = Some(metadata_exchange(ctx, &ff, typed)?),
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
    // The network check is done for TCP proxying only (where istiod puts
    // it); before a connection manager the HTTP filter is the one to use.
    if let (Some(i), m::ChainKind::Http(_)) = (ext_authz_at.first(), &kind) {
        return Err(ctx.err(
            format!("{field}.filters[{i}]"),
            "envoy.filters.network.ext_authz is supported before tcp_proxy only; use envoy.filters.http.ext_authz in the connection manager",
        ));
    }
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
        name: if name.is_empty() {
            field.to_string()
        } else {
            name.clone()
        },
        filter_chain_match: fcm,
        tls,
        rbac: network_rbac,
        ext_authz: network_ext_authz,
        set_filter_state,
        kind,
        istio_stats: stats,
        metadata_exchange: exchange,
        request_buffer_limit,
    })
}
