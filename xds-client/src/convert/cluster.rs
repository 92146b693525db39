//! `envoy.config.cluster.v3.Cluster`: discovery type, upstream TLS,
//! protocol options, load-balancer settings, outlier detection and
//! circuit breakers.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http_pb;
use ferry_model as m;

use super::core_types::value_string;
use super::endpoint::{dns_endpoints, endpoints};
use super::istio::ISTIO_TOLERATED;
use super::tls::upstream_tls;
use super::{ConvertError, Ctx, Typed, Warnings, duration, timeout_or};

#[allow(deprecated)] // Cluster-level protocol options are deprecated but still sent.
pub fn cluster(
    c: &cluster_pb::Cluster,
    warnings: &mut Warnings,
) -> Result<m::Cluster, ConvertError> {
    use cluster_pb::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let mut ctx = Ctx {
        resource: format!("cluster {:?}", c.name),
        warnings,
        inbound: false,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "a cluster needs a name"));
    }
    let discovery = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
            .map_err(|_| ctx.err("type", format!("unknown discovery type {t}")))?,
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(ctx.err(
                "cluster_type",
                format!("custom cluster type {:?} is not supported", ct.name),
            ));
        }
    };
    let kind = match discovery {
        DiscoveryType::Static => {
            let eps = endpoints(&ctx, c.load_assignment.as_ref())?;
            if eps.is_empty() {
                m::ClusterKind::BlackHole
            } else {
                m::ClusterKind::Static(eps)
            }
        }
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
            m::ClusterKind::StrictDns(dns_endpoints(&ctx, c.load_assignment.as_ref())?)
        }
        DiscoveryType::OriginalDst => m::ClusterKind::OriginalDst,
        DiscoveryType::Eds => {
            let service_name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone());
            m::ClusterKind::Eds { service_name }
        }
    };
    let tls = match &c.transport_socket {
        Some(ts) => upstream_tls(&mut ctx, "transport_socket", ts)?,
        None => None,
    };
    let mut transport_socket_matches = Vec::with_capacity(c.transport_socket_matches.len());
    for (i, tsm) in c.transport_socket_matches.iter().enumerate() {
        let field = format!("transport_socket_matches[{i}]");
        let criteria = tsm
            .r#match
            .as_ref()
            .map(|st| {
                st.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_string(v)))
                    .collect()
            })
            .unwrap_or_default();
        let tls = match &tsm.transport_socket {
            Some(ts) => upstream_tls(&mut ctx, &format!("{field}.transport_socket"), ts)?,
            None => None,
        };
        transport_socket_matches.push(m::cluster::TransportSocketMatch {
            name: tsm.name.clone(),
            criteria,
            tls,
        });
    }
    for (i, f) in c.filters.iter().enumerate() {
        let type_name = match &f.typed_config {
            Some(any) => Typed::from_any(any)
                .map_err(|e| ctx.err(format!("filters[{i}].typed_config"), e))?
                .type_name()
                .to_string(),
            None => String::new(),
        };
        if !ISTIO_TOLERATED.contains(&type_name.as_str()) {
            return Err(ctx.err(
                format!("filters[{i}]"),
                format!(
                    "unsupported upstream network filter {:?} ({type_name})",
                    f.name
                ),
            ));
        }
    }
    let lb_policy = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => m::LbPolicy::RoundRobin,
        Ok(LbPolicy::LeastRequest) => m::LbPolicy::LeastRequest,
        Ok(LbPolicy::Random) => m::LbPolicy::Random,
        Ok(LbPolicy::RingHash) => m::LbPolicy::RingHash,
        Ok(LbPolicy::Maglev) => m::LbPolicy::Maglev,
        Ok(LbPolicy::ClusterProvided) => m::LbPolicy::ClusterProvided,
        _ => {
            return Err(ctx.err(
                "lb_policy",
                format!("unsupported lb_policy {}", c.lb_policy),
            ));
        }
    };
    let mut protocol = if c.http2_protocol_options.is_some() {
        m::UpstreamProtocol::Http2
    } else {
        m::UpstreamProtocol::Http1
    };
    let mut idle_timeout = c
        .common_http_protocol_options
        .as_ref()
        .map(|o| timeout_or(&o.idle_timeout, Some(Duration::from_secs(3600))))
        .unwrap_or(Some(Duration::from_secs(3600)));
    let mut max_requests = c.max_requests_per_connection.as_ref().map(|v| v.value);
    let mut max_concurrent_streams = c
        .http2_protocol_options
        .as_ref()
        .and_then(|o| o.max_concurrent_streams.as_ref())
        .map(|v| v.value);
    #[allow(deprecated)]
    let mut auto_sni = match &c.upstream_http_protocol_options {
        Some(u) => upstream_http_protocol_options(&ctx, "upstream_http_protocol_options", u)?,
        None => m::cluster::AutoSni::default(),
    };
    for (key, any) in &c.typed_extension_protocol_options {
        let field = format!("typed_extension_protocol_options[{key:?}]");
        let typed = Typed::from_any(any).map_err(|e| ctx.err(&field, e))?;
        if typed.type_name() != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
            return Err(ctx.err(
                &field,
                format!("unsupported protocol options {}", typed.type_name()),
            ));
        }
        let o: upstream_http_pb::HttpProtocolOptions =
            typed.decode().map_err(|e| ctx.err(&field, e))?;
        use upstream_http_pb::http_protocol_options::UpstreamProtocolOptions as U;
        use upstream_http_pb::http_protocol_options::explicit_http_config::ProtocolConfig as P;
        protocol = match &o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(P::Http2ProtocolOptions(h2)) => {
                    if let Some(v) = &h2.max_concurrent_streams {
                        max_concurrent_streams = Some(v.value);
                    }
                    m::UpstreamProtocol::Http2
                }
                Some(P::HttpProtocolOptions(_)) | None => m::UpstreamProtocol::Http1,
                Some(P::Http3ProtocolOptions(_)) => {
                    return Err(ctx.err(&field, "HTTP/3 upstreams are not supported"));
                }
            },
            Some(U::UseDownstreamProtocolConfig(_)) => m::UpstreamProtocol::UseDownstream,
            Some(U::AutoConfig(_)) => m::UpstreamProtocol::Http1,
            None => protocol,
        };
        if let Some(u) = &o.upstream_http_protocol_options {
            auto_sni = upstream_http_protocol_options(
                &ctx,
                &format!("{field}.upstream_http_protocol_options"),
                u,
            )?;
        }
        if let Some(common) = &o.common_http_protocol_options {
            idle_timeout = timeout_or(&common.idle_timeout, Some(Duration::from_secs(3600)));
            if let Some(mr) = common.max_requests_per_connection.as_ref().map(|v| v.value) {
                max_requests = Some(mr);
            }
        }
    }
    let bind_source = match &c.upstream_bind_config {
        Some(b) => {
            let addr = b.source_address.as_ref().ok_or_else(|| {
                ctx.err(
                    "upstream_bind_config.source_address",
                    "source_address is required",
                )
            })?;
            let ip = addr.address.parse().map_err(|_| {
                ctx.err(
                    "upstream_bind_config.source_address.address",
                    format!("{:?} is not an IP address", addr.address),
                )
            })?;
            Some(ip)
        }
        None => None,
    };
    Ok(m::Cluster {
        name: c.name.clone(),
        kind,
        bind_source,
        tls,
        transport_socket_matches,
        connect_timeout: duration(&c.connect_timeout).unwrap_or(Duration::from_secs(5)),
        lb_policy,
        protocol,
        idle_timeout,
        max_requests_per_connection: max_requests.filter(|v| *v > 0),
        lb: lb_config(&ctx, c)?,
        outlier_detection: c.outlier_detection.as_ref().map(outlier_detection),
        circuit_breakers: circuit_breakers(&ctx, "circuit_breakers", c.circuit_breakers.as_ref())?,
        max_concurrent_streams,
        istio_service: istio_service(c),
        auto_sni,
    })
}

/// `UpstreamHttpProtocolOptions`: SNI and server-name validation from each
/// request's host.
fn upstream_http_protocol_options(
    ctx: &Ctx<'_>,
    field: &str,
    u: &core_pb::UpstreamHttpProtocolOptions,
) -> Result<m::cluster::AutoSni, ConvertError> {
    let core_pb::UpstreamHttpProtocolOptions {
        auto_sni,
        auto_san_validation,
        override_auto_sni_header,
    } = u;
    let header = if override_auto_sni_header.is_empty() {
        None
    } else {
        let h = override_auto_sni_header.to_ascii_lowercase();
        http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
            ctx.err(
                format!("{field}.override_auto_sni_header"),
                format!("{override_auto_sni_header:?} is not a header name"),
            )
        })?;
        Some(h)
    };
    Ok(m::cluster::AutoSni {
        sni: *auto_sni,
        san_validation: *auto_san_validation,
        header,
    })
}

/// `metadata.filter_metadata.istio.services[0].host`, as istiod sets it.
fn istio_service(c: &cluster_pb::Cluster) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let istio = c.metadata.as_ref()?.filter_metadata.get("istio")?;
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

fn lb_config(ctx: &Ctx<'_>, c: &cluster_pb::Cluster) -> Result<m::cluster::LbConfig, ConvertError> {
    use cluster_pb::cluster::LbConfig as L;
    use cluster_pb::cluster::common_lb_config::LocalityConfigSpecifier;
    let mut lb = m::cluster::LbConfig::default();
    match &c.lb_config {
        Some(L::LeastRequestLbConfig(lr)) => {
            if let Some(n) = &lr.choice_count {
                if n.value < 2 {
                    return Err(
                        ctx.err("least_request_lb_config.choice_count", "must be at least 2")
                    );
                }
                lb.choice_count = n.value;
            }
        }
        Some(L::RingHashLbConfig(rh)) => {
            if let Some(v) = &rh.minimum_ring_size {
                lb.min_ring_size = v.value;
            }
            if let Some(v) = &rh.maximum_ring_size {
                lb.max_ring_size = v.value;
            }
            if lb.min_ring_size > lb.max_ring_size {
                return Err(ctx.err(
                    "ring_hash_lb_config",
                    "minimum_ring_size exceeds maximum_ring_size",
                ));
            }
            if lb.max_ring_size > 8 * 1024 * 1024 {
                return Err(ctx.err("ring_hash_lb_config.maximum_ring_size", "at most 8M"));
            }
        }
        Some(L::MaglevLbConfig(mg)) => {
            if let Some(v) = &mg.table_size {
                if !is_prime(v.value) || v.value > 5_000_011 {
                    return Err(ctx.err(
                        "maglev_lb_config.table_size",
                        format!("{} is not a prime up to 5000011", v.value),
                    ));
                }
                lb.maglev_table_size = v.value;
            }
        }
        _ => {}
    }
    if let Some(common) = &c.common_lb_config {
        lb.locality_weighted = matches!(
            common.locality_config_specifier,
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        );
    }
    if let Some(p) = c.load_assignment.as_ref().and_then(|a| a.policy.as_ref())
        && let Some(f) = &p.overprovisioning_factor
    {
        lb.overprovisioning_factor = f.value;
    }
    lb.peak_ewma = c
        .metadata
        .as_ref()
        .and_then(|md| md.filter_metadata.get("ferry"))
        .and_then(|st| st.fields.get("lb"))
        .is_some_and(|v| value_string(v) == "peak_ewma");
    Ok(lb)
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn outlier_detection(o: &cluster_pb::OutlierDetection) -> m::cluster::OutlierDetection {
    let d = m::cluster::OutlierDetection::default();
    let u = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, dflt: u32| {
        v.as_ref().map_or(dflt, |v| v.value)
    };
    let base_ejection_time = duration(&o.base_ejection_time).unwrap_or(d.base_ejection_time);
    m::cluster::OutlierDetection {
        consecutive_5xx: u(&o.consecutive_5xx, d.consecutive_5xx),
        consecutive_gateway_failure: u(
            &o.consecutive_gateway_failure,
            d.consecutive_gateway_failure,
        ),
        consecutive_local_origin_failure: u(
            &o.consecutive_local_origin_failure,
            d.consecutive_local_origin_failure,
        ),
        enforcing_consecutive_5xx: u(&o.enforcing_consecutive_5xx, d.enforcing_consecutive_5xx),
        enforcing_consecutive_gateway_failure: u(
            &o.enforcing_consecutive_gateway_failure,
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: u(
            &o.enforcing_consecutive_local_origin_failure,
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_success_rate: u(&o.enforcing_success_rate, d.enforcing_success_rate),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        interval: duration(&o.interval).unwrap_or(d.interval),
        // Envoy: the cap is never below the base time.
        max_ejection_time: duration(&o.max_ejection_time)
            .unwrap_or(d.max_ejection_time)
            .max(base_ejection_time),
        base_ejection_time,
        max_ejection_percent: u(&o.max_ejection_percent, d.max_ejection_percent).min(100),
        success_rate_minimum_hosts: u(&o.success_rate_minimum_hosts, d.success_rate_minimum_hosts),
        success_rate_request_volume: u(
            &o.success_rate_request_volume,
            d.success_rate_request_volume,
        ),
        success_rate_stdev_factor: u(&o.success_rate_stdev_factor, d.success_rate_stdev_factor),
    }
}

fn circuit_breakers(
    ctx: &Ctx<'_>,
    field: &str,
    cb: Option<&cluster_pb::CircuitBreakers>,
) -> Result<m::cluster::CircuitBreakers, ConvertError> {
    let mut out = m::cluster::CircuitBreakers::default();
    for (i, t) in cb
        .into_iter()
        .flat_map(|cb| cb.thresholds.iter())
        .enumerate()
    {
        let d = m::cluster::Thresholds::default();
        let u = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, dflt: u32| {
            v.as_ref().map_or(dflt, |v| v.value)
        };
        let th = m::cluster::Thresholds {
            max_connections: u(&t.max_connections, d.max_connections),
            max_pending_requests: u(&t.max_pending_requests, d.max_pending_requests),
            max_requests: u(&t.max_requests, d.max_requests),
            max_retries: u(&t.max_retries, d.max_retries),
            retry_budget: match &t.retry_budget {
                None => None,
                Some(b) => {
                    let dflt = m::cluster::RetryBudget::default();
                    let budget_ppm = match &b.budget_percent {
                        None => dflt.budget_ppm,
                        Some(p) if (0.0..=100.0).contains(&p.value) => {
                            (p.value * 10_000.0).round() as u32
                        }
                        Some(p) => {
                            return Err(ctx.err(
                                format!("{field}.thresholds[{i}].retry_budget.budget_percent"),
                                format!("{} is not a percentage (0 to 100)", p.value),
                            ));
                        }
                    };
                    Some(m::cluster::RetryBudget {
                        budget_ppm,
                        min_retry_concurrency: u(
                            &b.min_retry_concurrency,
                            dflt.min_retry_concurrency,
                        ),
                    })
                }
            },
        };
        // RoutingPriority: DEFAULT = 0, HIGH = 1.
        if t.priority == 1 {
            out.high = th;
        } else {
            out.default = th;
        }
    }
    Ok(out)
}
