//! `envoy.config.endpoint.v3`: `ClusterLoadAssignment` and its endpoints,
//! as EDS delivers them or a static or DNS cluster inlines them.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use ferry_model as m;

use super::core_types::{host_addr, socket_address, value_string};
use super::coverage::{fields, path};
use super::{ConvertError, Ctx, Warnings, duration};

fields!(pub(super) static CLUSTER_LOAD_ASSIGNMENT = "envoy.config.endpoint.v3.ClusterLoadAssignment" {
    "cluster_name": applied "the EDS resource name",
    "endpoints": applied,
    "named_endpoints": refused "named endpoints are not supported",
    "policy": applied,
});

fields!(pub(super) static POLICY = "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy" {
    "drop_overloads": refused "dropping a share of the requests is not supported",
    "overprovisioning_factor": applied "default 140; over EDS only the default is accepted (set it in an inline load_assignment)",
    "endpoint_stale_after": warned "endpoints are kept until the next assignment",
    "weighted_priority_health": refused "weighing priority health by endpoint weights is not supported",
});

fields!(pub(super) static LOCALITY_LB_ENDPOINTS = "envoy.config.endpoint.v3.LocalityLbEndpoints" {
    "locality": inert "names the locality (zone-aware routing needs the bootstrap's local_cluster_name, which Ferry does not read)",
    "metadata": inert "read only by extensions Ferry does not run",
    "lb_endpoints": applied,
    "load_balancer_endpoints": refused "use lb_endpoints",
    "leds_cluster_locality_config": refused "LEDS is not supported",
    "load_balancing_weight": applied "with locality-weighted load balancing",
    "priority": applied,
    "proximity": inert "Envoy's load balancers do not read it",
});

fields!(pub(super) static LB_ENDPOINT = "envoy.config.endpoint.v3.LbEndpoint" {
    "endpoint": applied,
    "endpoint_name": refused "named endpoints are not supported",
    "health_status": applied "UNHEALTHY, DRAINING and TIMEOUT get no traffic outside panic; DEGRADED only without healthy ones",
    "metadata": applied "envoy.transport_socket_match, and envoy.filters.listener.original_dst (local, waypoint) passed to an internal listener by internal_upstream; other metadata is read only by extensions Ferry does not run",
    "load_balancing_weight": applied,
});

fields!(pub(super) static ENDPOINT = "envoy.config.endpoint.v3.Endpoint" {
    "address": applied "a TCP socket address, or a Unix socket (pipe) in STATIC and EDS clusters",
    "health_check_config": applied "see HealthCheckConfig",
    "hostname": applied "auto_host_sni and auto_host_rewrite",
    "additional_addresses": warned "connections use the endpoint's address only",
    "observability_name": warned "statistics name the endpoint by its address",
});

/// Envoy's default `overprovisioning_factor`.
const OVERPROVISIONING: u32 = 140;

/// The overprovisioning factor of an inline assignment, if it sets one.
pub(super) fn overprovisioning_factor(
    ctx: &mut Ctx<'_>,
    field: &str,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Option<u32>, ConvertError> {
    let Some(p) = cla.and_then(|c| c.policy.as_ref()) else {
        return Ok(None);
    };
    policy(ctx, &path(field, "policy"), p)
}

fn policy(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &endpoint_pb::cluster_load_assignment::Policy,
) -> Result<Option<u32>, ConvertError> {
    let cov = &POLICY;
    let endpoint_pb::cluster_load_assignment::Policy {
        drop_overloads,
        overprovisioning_factor,
        endpoint_stale_after,
        weighted_priority_health,
    } = p;
    ctx.refuse(cov, field, "drop_overloads", !drop_overloads.is_empty())?;
    ctx.refuse(
        cov,
        field,
        "weighted_priority_health",
        *weighted_priority_health,
    )?;
    ctx.knob(
        cov,
        field,
        "endpoint_stale_after",
        duration(endpoint_stale_after).is_some_and(|d| !d.is_zero()),
    );
    match overprovisioning_factor {
        Some(v) if v.value == 0 => Err(ctx.err(
            path(field, "overprovisioning_factor"),
            "must be greater than zero",
        )),
        v => Ok(v.as_ref().map(|v| v.value)),
    }
}

/// One endpoint as read, with where it sits in the assignment.
struct Entry<'a> {
    field: String,
    locality: usize,
    lle: &'a endpoint_pb::LocalityLbEndpoints,
    address: &'a Option<core_pb::Address>,
    hostname: &'a str,
    e: &'a endpoint_pb::LbEndpoint,
    health_check: m::health_check::EndpointCheck,
}

/// Every endpoint of an assignment, each message checked field by field.
fn entries<'a>(
    ctx: &mut Ctx<'_>,
    field: &str,
    cla: &'a endpoint_pb::ClusterLoadAssignment,
) -> Result<Vec<Entry<'a>>, ConvertError> {
    use endpoint_pb::lb_endpoint::HostIdentifier;
    let endpoint_pb::ClusterLoadAssignment {
        cluster_name,
        endpoints,
        named_endpoints,
        policy: _,
    } = cla;
    let _ = cluster_name;
    ctx.refuse(
        &CLUSTER_LOAD_ASSIGNMENT,
        field,
        "named_endpoints",
        !named_endpoints.is_empty(),
    )?;
    let mut out = Vec::new();
    for (i, lle) in endpoints.iter().enumerate() {
        let lf = path(field, &format!("endpoints[{i}]"));
        let endpoint_pb::LocalityLbEndpoints {
            locality,
            metadata,
            lb_endpoints,
            load_balancing_weight: _,
            priority: _,
            proximity,
            lb_config,
        } = lle;
        let _ = (locality, metadata, proximity);
        use endpoint_pb::locality_lb_endpoints::LbConfig;
        #[allow(deprecated)]
        match lb_config {
            None => {}
            Some(LbConfig::LoadBalancerEndpoints(_)) => {
                ctx.refuse(&LOCALITY_LB_ENDPOINTS, &lf, "load_balancer_endpoints", true)?;
            }
            Some(LbConfig::LedsClusterLocalityConfig(_)) => {
                ctx.refuse(
                    &LOCALITY_LB_ENDPOINTS,
                    &lf,
                    "leds_cluster_locality_config",
                    true,
                )?;
            }
        }
        for (j, e) in lb_endpoints.iter().enumerate() {
            let ef = format!("{lf}.lb_endpoints[{j}]");
            let endpoint_pb::LbEndpoint {
                health_status: _,
                metadata: _,
                load_balancing_weight: _,
                host_identifier,
            } = e;
            let ep = match host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => ep,
                Some(HostIdentifier::EndpointName(_)) => {
                    ctx.refuse(&LB_ENDPOINT, &ef, "endpoint_name", true)?;
                    continue;
                }
                None => return Err(ctx.err(path(&ef, "endpoint"), "an endpoint is required")),
            };
            let epf = path(&ef, "endpoint");
            let endpoint_pb::Endpoint {
                address,
                health_check_config,
                hostname,
                additional_addresses,
                observability_name,
            } = ep;
            let health_check = super::health_check::endpoint_check(
                ctx,
                &path(&epf, "health_check_config"),
                health_check_config.as_ref(),
            )?;
            ctx.knob(
                &ENDPOINT,
                &epf,
                "additional_addresses",
                !additional_addresses.is_empty(),
            );
            ctx.knob(
                &ENDPOINT,
                &epf,
                "observability_name",
                !observability_name.is_empty(),
            );
            out.push(Entry {
                field: path(&epf, "address"),
                locality: i,
                lle,
                address,
                hostname,
                e,
                health_check,
            });
        }
    }
    Ok(out)
}

pub(super) fn endpoints(
    ctx: &mut Ctx<'_>,
    field: &str,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Vec<m::Endpoint>, ConvertError> {
    let Some(cla) = cla else {
        return Ok(Vec::new());
    };
    // Unhealthy endpoints are kept (marked): they count towards their
    // priority's size when Envoy computes the healthy share.
    let mut out = Vec::new();
    for entry in entries(ctx, field, cla)? {
        let address = host_addr(ctx, &entry.field, entry.address)?;
        let e = entry.e;
        let transport_socket_match = e
            .metadata
            .as_ref()
            .and_then(|md| md.filter_metadata.get("envoy.transport_socket_match"))
            .map(|st| {
                st.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_string(v)))
                    .collect()
            })
            .unwrap_or_default();
        let original_dst_meta = original_dst_meta(ctx, &entry.field, e.metadata.as_ref())?;
        out.push(m::Endpoint {
            address,
            weight: e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |v| v.value)
                .max(1),
            priority: entry.lle.priority,
            locality: u32::try_from(entry.locality).unwrap_or(u32::MAX),
            locality_weight: entry
                .lle
                .load_balancing_weight
                .as_ref()
                .map_or(1, |v| v.value),
            // HealthStatus: UNHEALTHY 2, DRAINING 3, TIMEOUT 4, DEGRADED 5.
            health: match e.health_status {
                2..=4 => m::cluster::EndpointHealth::Unhealthy,
                5 => m::cluster::EndpointHealth::Degraded,
                _ => m::cluster::EndpointHealth::Healthy,
            },
            extras: m::cluster::EndpointExtras {
                hostname: (!entry.hostname.is_empty()).then(|| Arc::from(entry.hostname)),
                transport_socket_match,
                original_dst_meta,
                health_check: entry.health_check,
            }
            .boxed(),
        });
    }
    // Every priority is kept: the balancer fails over from one level to the
    // next as the healthy share of the preferred ones shrinks.
    out.sort_by_key(|e| e.priority);
    // Held as long as the assignment, by the hundred thousand in a large
    // mesh: no room left over from growing it.
    out.shrink_to_fit();
    Ok(out)
}

/// An endpoint's `envoy.filters.listener.original_dst` metadata (`local`,
/// `waypoint`): where the internal listener it leads to sends the
/// connection. Values that are not `ip:port` are refused, as the
/// connection could not go where they say.
fn original_dst_meta(
    ctx: &Ctx<'_>,
    field: &str,
    md: Option<&core_pb::Metadata>,
) -> Result<m::cluster::OriginalDstMeta, ConvertError> {
    let mut out = m::cluster::OriginalDstMeta::default();
    let Some(st) = md.and_then(|md| {
        md.filter_metadata
            .get("envoy.filters.listener.original_dst")
    }) else {
        return Ok(out);
    };
    for (k, v) in &st.fields {
        let slot = match k.as_str() {
            "local" => &mut out.local,
            "waypoint" => &mut out.waypoint,
            _ => continue,
        };
        let text = value_string(v);
        let addr = text.parse().map_err(|_| {
            ctx.err(
                format!(
                    "{field}.metadata.filter_metadata[envoy.filters.listener.original_dst].{k}"
                ),
                format!("{text:?} is not an ip:port"),
            )
        })?;
        *slot = Some(addr);
    }
    Ok(out)
}

/// The endpoints of an EDS assignment.
pub fn cluster_load_assignment(
    cla: &endpoint_pb::ClusterLoadAssignment,
    warnings: &mut Warnings,
) -> Result<Vec<m::Endpoint>, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("cluster_load_assignment {:?}", cla.cluster_name),
        warnings,
        inbound: false,
        outbound: false,
    };
    // The balancer's overprovisioning factor is the cluster's: an EDS
    // assignment may only keep Envoy's default.
    if let Some(f) = overprovisioning_factor(&mut ctx, "", Some(cla))?
        && f != OVERPROVISIONING
    {
        return Err(ctx.err(
            "policy.overprovisioning_factor",
            "an overprovisioning factor over EDS is not supported (set it in an inline load_assignment)",
        ));
    }
    endpoints(&mut ctx, "", Some(cla))
}

pub(super) fn dns_endpoints(
    ctx: &mut Ctx<'_>,
    field: &str,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Vec<m::cluster::DnsEndpoint>, ConvertError> {
    let mut out = Vec::new();
    if let Some(cla) = cla {
        for entry in entries(ctx, field, cla)? {
            let (host, port) = socket_address(ctx, &entry.field, entry.address)?;
            out.push(m::cluster::DnsEndpoint {
                host,
                port,
                health_check: entry.health_check,
                weight: entry
                    .e
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |v| v.value)
                    .max(1),
            });
        }
    }
    if out.is_empty() {
        return Err(ctx.err(field, "a DNS cluster needs at least one host"));
    }
    Ok(out)
}
