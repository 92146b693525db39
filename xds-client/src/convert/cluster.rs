//! `envoy.config.cluster.v3.Cluster`: discovery type, DNS settings, upstream
//! TLS and transport socket matches, connection options, upstream network
//! filters and the rest of the cluster's own fields. Its parts live beside
//! it: `lb_config` (policies, common and slow start settings),
//! `outlier_detection`, `circuit_breakers` and `upstream_protocol`
//! (HTTP protocol options).

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as core_pb;
use ferry_model as m;

use super::circuit_breakers::circuit_breakers;
use super::core_types::value_string;
use super::coverage::{fields, path};
use super::endpoint::{dns_endpoints, endpoints, overprovisioning_factor};
use super::health_check;
use super::istio::{ISTIO_TOLERATED, METADATA_EXCHANGE_TYPE, metadata_exchange};
use super::lb_config::lb_config;
use super::outlier_detection::outlier_detection;
use super::tls::upstream_transport;
use super::upstream_protocol::{ProtocolOptions, protocol_options};
use super::{ConvertError, Ctx, Typed, Warnings, duration};

fields!(pub(super) static CLUSTER = "envoy.config.cluster.v3.Cluster" {
    "name": applied,
    "type": applied "STATIC (none: BlackHole), STRICT_DNS, LOGICAL_DNS (resolved as STRICT_DNS), EDS, ORIGINAL_DST",
    "cluster_type": refused "custom cluster types are not supported",
    "eds_cluster_config": applied,
    "connect_timeout": applied,
    "per_connection_buffer_limit_bytes": warned "upstream reads are bounded by the HTTP codec's own buffers",
    "per_connection_buffer_high_watermark_timeout": warned "upstream reads are bounded by the HTTP codec's own buffers",
    "lb_policy": applied "ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV, CLUSTER_PROVIDED",
    "load_balancing_policy": refused "typed load balancing policies are not supported (use lb_policy)",
    "health_checks": applied "one check (HTTP, TCP or gRPC); see HealthCheck",
    "max_requests_per_connection": applied,
    "circuit_breakers": applied,
    "http_protocol_options": applied "see Http1ProtocolOptions (upstream)",
    "http2_protocol_options": applied "HTTP/2 upstream; see Http2ProtocolOptions (upstream)",
    "common_http_protocol_options": applied "see HttpProtocolOptions (upstream)",
    "upstream_http_protocol_options": applied,
    "protocol_selection": applied "USE_DOWNSTREAM_PROTOCOL speaks the downstream's version",
    "typed_extension_protocol_options": applied "envoy.extensions.upstreams.http.v3.HttpProtocolOptions (others refused)",
    "dns_refresh_rate": applied,
    "dns_lookup_family": applied,
    "dns_resolvers": refused "custom DNS resolvers are not supported (the system's resolver is used)",
    "dns_resolution_config": refused "custom DNS resolvers are not supported (the system's resolver is used)",
    "typed_dns_resolver_config": refused "custom DNS resolvers are not supported (the system's resolver is used)",
    "use_tcp_for_dns_lookups": warned "the system's resolver decides its transport",
    "respect_dns_ttl": warned "the system's resolver gives no TTL; dns_refresh_rate applies",
    "dns_failure_refresh_rate": warned "a failed resolution is retried at dns_refresh_rate",
    "dns_jitter": warned "resolutions are not jittered",
    "outlier_detection": applied,
    "cleanup_interval": warned "unused hosts are dropped with each endpoint update",
    "upstream_bind_config": applied,
    "lb_subset_config": refused "subset load balancing (subset_selectors) is not supported",
    "ring_hash_lb_config": applied,
    "maglev_lb_config": applied,
    "original_dst_lb_config": applied,
    "least_request_lb_config": applied,
    "round_robin_lb_config": applied,
    "common_lb_config": applied,
    "transport_socket": applied,
    "transport_socket_matches": applied,
    "transport_socket_matcher": refused "matcher-based transport socket selection is not supported (use transport_socket_matches)",
    "metadata": applied "istio.services (metrics) and ferry.lb; other metadata is read only by extensions Ferry does not run",
    "alt_stat_name": warned "statistics are named after the cluster",
    "upstream_connection_options": applied,
    "close_connections_on_host_health_failure": refused "closing a host's connections when its health check fails is not supported",
    "ignore_health_on_host_removal": applied,
    "load_assignment": applied,
    "filters": applied "Istio's metadata exchange skipped with a warning; others (Wasm included) refused",
    "lrs_server": refused "load reporting (LRS) is not supported",
    "lrs_report_endpoint_metrics": inert "read only with load reporting, which is refused",
    "track_timeout_budgets": warned "timeout budget histograms are not kept",
    "track_cluster_stats": warned "the extra cluster statistics are not kept",
    "upstream_config": refused "custom upstreams are not supported",
    "preconnect_policy": warned "connections are opened on demand",
    "connection_pool_per_downstream_connection": refused "connection pools per downstream connection are not supported",
    "wait_for_warm_on_init": warned "clusters always warm until their endpoints and secrets arrive",
    "stats_matcher": warned "every cluster statistic is kept",
    "queuing_policies": refused "queuing policies are not supported",
});

fields!(pub(super) static EDS_CLUSTER_CONFIG = "envoy.config.cluster.v3.Cluster.EdsClusterConfig" {
    "eds_config": applied "ADS (the only config source)",
    "service_name": applied,
});

fields!(pub(super) static TRANSPORT_SOCKET_MATCH = "envoy.config.cluster.v3.Cluster.TransportSocketMatch" {
    "name": inert "names the match in statistics only",
    "match": applied,
    "transport_socket": applied,
});

fields!(pub(super) static UPSTREAM_CONNECTION_OPTIONS = "envoy.config.cluster.v3.UpstreamConnectionOptions" {
    "tcp_keepalive": applied,
    "set_local_interface_name_on_upstream_connections": warned "the interface name is not recorded",
    "happy_eyeballs_config": warned "addresses are tried one at a time",
});

fields!(pub(super) static TCP_KEEPALIVE = "envoy.config.core.v3.TcpKeepalive" {
    "keepalive_probes": applied,
    "keepalive_time": applied,
    "keepalive_interval": applied,
});

fields!(pub(super) static BIND_CONFIG = "envoy.config.core.v3.BindConfig" ("upstream_bind_config") {
    "source_address": applied "its address (a port refused)",
    "freebind": refused "IP_FREEBIND on upstream sockets is not supported",
    "socket_options": refused "upstream socket options are not supported",
    "additional_source_addresses": refused "several source addresses are not supported",
    "extra_source_addresses": refused "several source addresses are not supported",
    "local_address_selector": refused "local address selectors are not supported",
    "validate_network_namespaces": inert "network namespaces of source addresses are not supported (refused with them)",
});

fields!(pub(super) static CLUSTER_FILTER = "envoy.config.cluster.v3.Filter" {
    "name": applied,
    "typed_config": applied,
    "config_discovery": refused "filter discovery (ECDS) is not supported",
});

#[allow(deprecated)] // Cluster-level protocol and DNS options are deprecated but still sent.
pub fn cluster(
    c: &cluster_pb::Cluster,
    warnings: &mut Warnings,
) -> Result<m::Cluster, ConvertError> {
    use cluster_pb::cluster::{
        ClusterDiscoveryType, ClusterProtocolSelection, DiscoveryType, DnsLookupFamily, LbPolicy,
    };
    let mut ctx = Ctx {
        resource: format!("cluster {:?}", c.name),
        warnings,
        inbound: false,
        outbound: false,
    };
    let cov = &CLUSTER;
    let cluster_pb::Cluster {
        name,
        alt_stat_name,
        eds_cluster_config,
        connect_timeout,
        per_connection_buffer_limit_bytes,
        lb_policy,
        load_assignment,
        health_checks,
        max_requests_per_connection,
        circuit_breakers: cb,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        http2_protocol_options,
        typed_extension_protocol_options,
        dns_refresh_rate,
        dns_jitter,
        dns_failure_refresh_rate,
        respect_dns_ttl,
        dns_lookup_family,
        dns_resolvers,
        use_tcp_for_dns_lookups,
        dns_resolution_config,
        typed_dns_resolver_config,
        wait_for_warm_on_init,
        outlier_detection: od,
        cleanup_interval,
        upstream_bind_config,
        lb_subset_config,
        common_lb_config,
        transport_socket,
        metadata,
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        filters,
        load_balancing_policy,
        lrs_server,
        lrs_report_endpoint_metrics,
        track_timeout_budgets,
        upstream_config,
        track_cluster_stats,
        preconnect_policy,
        connection_pool_per_downstream_connection,
        transport_socket_matches,
        transport_socket_matcher,
        per_connection_buffer_high_watermark_timeout,
        stats_matcher,
        queuing_policies,
        cluster_discovery_type,
        lb_config: lb_specific,
    } = c;
    // Only load reporting, which is refused, reads it.
    let _ = lrs_report_endpoint_metrics;
    if name.is_empty() {
        return Err(ctx.err("name", "a cluster needs a name"));
    }
    ctx.refuse(
        cov,
        "",
        "load_balancing_policy",
        load_balancing_policy.is_some(),
    )?;
    ctx.refuse(
        cov,
        "",
        "close_connections_on_host_health_failure",
        *close_connections_on_host_health_failure,
    )?;
    let health_check = health_check::health_checks(&mut ctx, "health_checks", health_checks)?;
    ctx.refuse(cov, "", "dns_resolvers", !dns_resolvers.is_empty())?;
    ctx.refuse(
        cov,
        "",
        "dns_resolution_config",
        dns_resolution_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        "",
        "typed_dns_resolver_config",
        typed_dns_resolver_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        "",
        "lb_subset_config",
        lb_subset_config
            .as_ref()
            .is_some_and(|s| !s.subset_selectors.is_empty()),
    )?;
    ctx.refuse(
        cov,
        "",
        "transport_socket_matcher",
        transport_socket_matcher.is_some(),
    )?;
    ctx.refuse(cov, "", "lrs_server", lrs_server.is_some())?;
    ctx.refuse(cov, "", "upstream_config", upstream_config.is_some())?;
    ctx.refuse(
        cov,
        "",
        "connection_pool_per_downstream_connection",
        *connection_pool_per_downstream_connection,
    )?;
    ctx.refuse(cov, "", "queuing_policies", queuing_policies.is_some())?;
    ctx.knob(cov, "", "alt_stat_name", !alt_stat_name.is_empty());
    ctx.knob(
        cov,
        "",
        "per_connection_buffer_limit_bytes",
        per_connection_buffer_limit_bytes.is_some(),
    );
    ctx.knob(
        cov,
        "",
        "per_connection_buffer_high_watermark_timeout",
        per_connection_buffer_high_watermark_timeout.is_some(),
    );
    ctx.knob(cov, "", "use_tcp_for_dns_lookups", *use_tcp_for_dns_lookups);
    ctx.knob(cov, "", "respect_dns_ttl", *respect_dns_ttl);
    ctx.knob(
        cov,
        "",
        "dns_failure_refresh_rate",
        dns_failure_refresh_rate.is_some(),
    );
    ctx.knob(cov, "", "dns_jitter", dns_jitter.is_some());
    ctx.knob(cov, "", "cleanup_interval", cleanup_interval.is_some());
    ctx.knob(cov, "", "track_timeout_budgets", *track_timeout_budgets);
    ctx.knob(
        cov,
        "",
        "track_cluster_stats",
        track_cluster_stats.is_some(),
    );
    ctx.knob(cov, "", "preconnect_policy", preconnect_policy.is_some());
    ctx.knob(
        cov,
        "",
        "wait_for_warm_on_init",
        wait_for_warm_on_init.as_ref().is_some_and(|v| !v.value),
    );
    ctx.knob(cov, "", "stats_matcher", stats_matcher.is_some());

    let discovery = match cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
            .map_err(|_| ctx.err("type", format!("unknown discovery type {t}")))?,
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            ctx.refuse(cov, "", "cluster_type", true)?;
            DiscoveryType::Static
        }
    };
    let kind = match discovery {
        DiscoveryType::Static => {
            let eps = endpoints(&mut ctx, "load_assignment", load_assignment.as_ref())?;
            if eps.is_empty() {
                m::ClusterKind::BlackHole
            } else {
                m::ClusterKind::Static(std::sync::Arc::new(eps))
            }
        }
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns => m::ClusterKind::StrictDns(
            dns_endpoints(&mut ctx, "load_assignment", load_assignment.as_ref())?,
        ),
        DiscoveryType::OriginalDst => m::ClusterKind::OriginalDst,
        DiscoveryType::Eds => {
            let mut service_name = String::new();
            if let Some(e) = eds_cluster_config {
                let cluster_pb::cluster::EdsClusterConfig {
                    eds_config,
                    service_name: sn,
                } = e;
                config_source(&ctx, "eds_cluster_config.eds_config", eds_config.as_ref())?;
                service_name.clone_from(sn);
            }
            if service_name.is_empty() {
                service_name.clone_from(name);
            }
            m::ClusterKind::Eds { service_name }
        }
    };
    let (tls, internal_upstream) = match transport_socket {
        Some(ts) => upstream_transport(&mut ctx, "transport_socket", ts)?,
        None => (None, false),
    };
    let mut socket_matches = Vec::with_capacity(transport_socket_matches.len());
    for (i, tsm) in transport_socket_matches.iter().enumerate() {
        let field = format!("transport_socket_matches[{i}]");
        let cluster_pb::cluster::TransportSocketMatch {
            name: match_name,
            r#match,
            transport_socket,
        } = tsm;
        let criteria = r#match
            .as_ref()
            .map(|st| {
                st.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_string(v)))
                    .collect()
            })
            .unwrap_or_default();
        let (tls, internal_upstream) = match transport_socket {
            Some(ts) => upstream_transport(&mut ctx, &path(&field, "transport_socket"), ts)?,
            None => (None, false),
        };
        socket_matches.push(m::cluster::TransportSocketMatch {
            name: match_name.clone(),
            criteria,
            tls,
            internal_upstream,
        });
    }
    let mut exchange = None;
    for (i, f) in filters.iter().enumerate() {
        let ff = format!("filters[{i}]");
        let cluster_pb::Filter {
            name: filter_name,
            typed_config,
            config_discovery,
        } = f;
        ctx.refuse(
            &CLUSTER_FILTER,
            &ff,
            "config_discovery",
            config_discovery.is_some(),
        )?;
        let typed = match typed_config {
            Some(any) => {
                Some(Typed::from_any(any).map_err(|e| ctx.err(path(&ff, "typed_config"), e))?)
            }
            None => None,
        };
        let type_name = typed
            .as_ref()
            .map(|t| t.type_name().to_string())
            .unwrap_or_default();
        if let Some(typed) = typed
            && type_name == METADATA_EXCHANGE_TYPE
        {
            exchange = Some(metadata_exchange(&ctx, &ff, typed)?);
            continue;
        }
        if !ISTIO_TOLERATED.contains(&type_name.as_str()) {
            return Err(ctx.err(
                ff,
                format!("unsupported upstream network filter {filter_name:?} ({type_name})"),
            ));
        }
        ctx.warn(
            &ff,
            format!(
                "upstream network filter {filter_name:?} ({type_name}) is recognised but not implemented; skipped"
            ),
        );
    }
    let policy = match LbPolicy::try_from(*lb_policy) {
        Ok(LbPolicy::RoundRobin) => m::LbPolicy::RoundRobin,
        Ok(LbPolicy::LeastRequest) => m::LbPolicy::LeastRequest,
        Ok(LbPolicy::Random) => m::LbPolicy::Random,
        Ok(LbPolicy::RingHash) => m::LbPolicy::RingHash,
        Ok(LbPolicy::Maglev) => m::LbPolicy::Maglev,
        Ok(LbPolicy::ClusterProvided) => m::LbPolicy::ClusterProvided,
        _ => {
            return Err(ctx.err(
                "lb_policy",
                format!("unsupported lb_policy {lb_policy} (LOAD_BALANCING_POLICY_CONFIG is not supported)"),
            ));
        }
    };
    let mut options = ProtocolOptions {
        protocol: if http2_protocol_options.is_some() {
            m::UpstreamProtocol::Http2
        } else {
            m::UpstreamProtocol::Http1
        },
        ..ProtocolOptions::default()
    };
    // The deprecated cluster-level forms first; the typed extension wins.
    if let Ok(ClusterProtocolSelection::UseDownstreamProtocol) =
        ClusterProtocolSelection::try_from(*protocol_selection)
    {
        options.protocol = m::UpstreamProtocol::UseDownstream;
    }
    options.max_requests = max_requests_per_connection.as_ref().map(|v| v.value);
    protocol_options(
        &mut ctx,
        &mut options,
        common_http_protocol_options.as_ref(),
        http_protocol_options.as_ref(),
        http2_protocol_options.as_ref(),
        upstream_http_protocol_options.as_ref(),
        typed_extension_protocol_options,
    )?;
    let bind_source = match upstream_bind_config {
        Some(b) => Some(bind_config(&ctx, "upstream_bind_config", b)?),
        None => None,
    };
    let tcp_keepalive = match upstream_connection_options {
        None => None,
        Some(o) => {
            let cluster_pb::UpstreamConnectionOptions {
                tcp_keepalive,
                set_local_interface_name_on_upstream_connections,
                happy_eyeballs_config,
            } = o;
            let f = "upstream_connection_options";
            ctx.knob(
                &UPSTREAM_CONNECTION_OPTIONS,
                f,
                "set_local_interface_name_on_upstream_connections",
                *set_local_interface_name_on_upstream_connections,
            );
            ctx.knob(
                &UPSTREAM_CONNECTION_OPTIONS,
                f,
                "happy_eyeballs_config",
                happy_eyeballs_config.is_some(),
            );
            tcp_keepalive.as_ref().map(|k| {
                let core_pb::TcpKeepalive {
                    keepalive_probes,
                    keepalive_time,
                    keepalive_interval,
                } = k;
                m::cluster::TcpKeepalive {
                    probes: keepalive_probes.as_ref().map(|v| v.value),
                    time: keepalive_time
                        .as_ref()
                        .map(|v| Duration::from_secs(u64::from(v.value))),
                    interval: keepalive_interval
                        .as_ref()
                        .map(|v| Duration::from_secs(u64::from(v.value))),
                }
            })
        }
    };
    let family = match DnsLookupFamily::try_from(*dns_lookup_family) {
        Ok(DnsLookupFamily::Auto) => m::cluster::DnsLookupFamily::Auto,
        Ok(DnsLookupFamily::V4Only) => m::cluster::DnsLookupFamily::V4Only,
        Ok(DnsLookupFamily::V6Only) => m::cluster::DnsLookupFamily::V6Only,
        Ok(DnsLookupFamily::V4Preferred) => m::cluster::DnsLookupFamily::V4Preferred,
        Ok(DnsLookupFamily::All) => m::cluster::DnsLookupFamily::All,
        Err(_) => {
            return Err(ctx.err(
                "dns_lookup_family",
                format!("unknown DNS lookup family {dns_lookup_family}"),
            ));
        }
    };
    let refresh_rate = match duration(dns_refresh_rate) {
        // Envoy requires at least 1 ms.
        Some(d) if d < Duration::from_millis(1) => {
            return Err(ctx.err("dns_refresh_rate", "must be at least 1ms"));
        }
        Some(d) => d,
        None => Duration::from_secs(5),
    };
    let mut lb = lb_config(
        &mut ctx,
        common_lb_config.as_ref(),
        lb_specific.as_ref(),
        policy,
    )?;
    if let Some(f) = overprovisioning_factor(&mut ctx, "load_assignment", load_assignment.as_ref())?
    {
        lb.overprovisioning_factor = f;
    }
    lb.peak_ewma = metadata
        .as_ref()
        .and_then(|md| md.filter_metadata.get("ferry"))
        .and_then(|st| st.fields.get("lb"))
        .is_some_and(|v| value_string(v) == "peak_ewma");
    Ok(m::Cluster {
        name: name.clone(),
        kind,
        bind_source,
        tls: tls.map(Box::new),
        internal_upstream,
        transport_socket_matches: socket_matches,
        connect_timeout: duration(connect_timeout).unwrap_or(Duration::from_secs(5)),
        lb_policy: policy,
        protocol: options.protocol,
        idle_timeout: options.idle_timeout,
        max_requests_per_connection: options.max_requests.filter(|v| *v > 0),
        header_case: options.header_case,
        lb,
        outlier_detection: od
            .as_ref()
            .map(|o| outlier_detection(&ctx, "outlier_detection", o).map(Box::new))
            .transpose()?,
        circuit_breakers: circuit_breakers(&mut ctx, "circuit_breakers", cb.as_ref())?,
        max_concurrent_streams: options.max_concurrent_streams,
        istio_service: istio_service(metadata.as_ref()),
        metadata_exchange: exchange,
        auto_sni: options.auto_sni,
        tcp_keepalive,
        max_connection_duration: options.max_connection_duration,
        dns: m::cluster::DnsSettings {
            lookup_family: family,
            refresh_rate,
        },
        ignore_health_on_host_removal: *ignore_health_on_host_removal,
        health_check: health_check.map(Box::new),
    })
}

/// A resource's config source: ADS (or unset, which is ADS here too).
fn config_source(
    ctx: &Ctx<'_>,
    field: &str,
    cs: Option<&core_pb::ConfigSource>,
) -> Result<(), ConvertError> {
    use core_pb::config_source::ConfigSourceSpecifier as S;
    match cs.and_then(|c| c.config_source_specifier.as_ref()) {
        None | Some(S::Ads(_)) => Ok(()),
        Some(_) => Err(ctx.err(
            field,
            "only ADS is supported as a config source (the bootstrap's ads_config)",
        )),
    }
}

#[allow(deprecated)] // `additional_source_addresses` is still accepted by Envoy.
fn bind_config(
    ctx: &Ctx<'_>,
    field: &str,
    b: &core_pb::BindConfig,
) -> Result<std::net::IpAddr, ConvertError> {
    let cov = &BIND_CONFIG;
    let core_pb::BindConfig {
        source_address,
        freebind,
        socket_options,
        additional_source_addresses,
        extra_source_addresses,
        local_address_selector,
        validate_network_namespaces,
    } = b;
    let _ = validate_network_namespaces;
    ctx.refuse(
        cov,
        field,
        "freebind",
        freebind.as_ref().is_some_and(|v| v.value),
    )?;
    ctx.refuse(cov, field, "socket_options", !socket_options.is_empty())?;
    ctx.refuse(
        cov,
        field,
        "additional_source_addresses",
        !additional_source_addresses.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "extra_source_addresses",
        !extra_source_addresses.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "local_address_selector",
        local_address_selector.is_some(),
    )?;
    let addr = source_address
        .as_ref()
        .ok_or_else(|| ctx.err(path(field, "source_address"), "source_address is required"))?;
    use core_pb::socket_address::PortSpecifier;
    if let Some(PortSpecifier::PortValue(p)) = addr.port_specifier
        && p != 0
    {
        return Err(ctx.err(
            path(field, "source_address.port_value"),
            "binding upstream connections to a source port is not supported",
        ));
    }
    addr.address.parse().map_err(|_| {
        ctx.err(
            path(field, "source_address.address"),
            format!("{:?} is not an IP address", addr.address),
        )
    })
}

/// `metadata.filter_metadata.istio.services[0].host`, as istiod sets it.
fn istio_service(md: Option<&core_pb::Metadata>) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let istio = md?.filter_metadata.get("istio")?;
    let Some(Kind::ListValue(list)) = istio.fields.get("services")?.kind.as_ref() else {
        return None;
    };
    let Some(Kind::StructValue(svc)) = list.values.first()?.kind.as_ref() else {
        return None;
    };
    match svc.fields.get("host")?.kind.as_ref() {
        Some(Kind::StringValue(h)) if !h.is_empty() => Some(h.clone()),
        _ => None,
    }
}
