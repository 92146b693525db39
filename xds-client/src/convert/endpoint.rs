//! `envoy.config.endpoint.v3`: `ClusterLoadAssignment` and its endpoints,
//! as EDS delivers them or a static or DNS cluster inlines them.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use ferry_model as m;

use super::core_types::{ip_socket, socket_address, value_string};
use super::{ConvertError, Ctx, Warnings};

fn lb_endpoints(
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> impl Iterator<Item = (usize, usize, &endpoint_pb::LbEndpoint)> {
    cla.into_iter().flat_map(|cla| {
        cla.endpoints.iter().enumerate().flat_map(|(i, lle)| {
            lle.lb_endpoints
                .iter()
                .enumerate()
                .map(move |(j, e)| (i, j, e))
        })
    })
}

fn endpoint_address<'a>(
    ctx: &Ctx<'_>,
    field: &str,
    e: &'a endpoint_pb::LbEndpoint,
) -> Result<&'a Option<core_pb::Address>, ConvertError> {
    use endpoint_pb::lb_endpoint::HostIdentifier;
    match &e.host_identifier {
        Some(HostIdentifier::Endpoint(ep)) => Ok(&ep.address),
        _ => Err(ctx.err(field, "only inline endpoints are supported")),
    }
}

pub(super) fn endpoints(
    ctx: &Ctx<'_>,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Vec<m::Endpoint>, ConvertError> {
    // Unhealthy endpoints are kept (marked): they count towards their
    // priority's size when Envoy computes the healthy share.
    let mut out = Vec::new();
    for (i, j, e) in lb_endpoints(cla) {
        let field = format!("endpoints[{i}].lb_endpoints[{j}].endpoint.address");
        let addr = endpoint_address(ctx, &field, e)?;
        let address = ip_socket(ctx, &field, addr)?;
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
        let lle = cla.and_then(|c| c.endpoints.get(i));
        let priority = lle.map_or(0, |l| l.priority);
        let locality_weight = lle
            .and_then(|l| l.load_balancing_weight.as_ref())
            .map_or(1, |v| v.value);
        use endpoint_pb::lb_endpoint::HostIdentifier;
        let hostname = match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) if !ep.hostname.is_empty() => {
                Some(Arc::from(ep.hostname.as_str()))
            }
            _ => None,
        };
        out.push(m::Endpoint {
            address,
            hostname,
            weight: e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |v| v.value)
                .max(1),
            transport_socket_match,
            priority,
            locality: u32::try_from(i).unwrap_or(u32::MAX),
            locality_weight,
            // HealthStatus: UNHEALTHY 2, DRAINING 3, TIMEOUT 4, DEGRADED 5.
            health: match e.health_status {
                2..=4 => m::cluster::EndpointHealth::Unhealthy,
                5 => m::cluster::EndpointHealth::Degraded,
                _ => m::cluster::EndpointHealth::Healthy,
            },
        });
    }
    // Every priority is kept: the balancer fails over from one level to the
    // next as the healthy share of the preferred ones shrinks.
    out.sort_by_key(|e| e.priority);
    Ok(out)
}

/// The endpoints of an EDS assignment.
pub fn cluster_load_assignment(
    cla: &endpoint_pb::ClusterLoadAssignment,
    warnings: &mut Warnings,
) -> Result<Vec<m::Endpoint>, ConvertError> {
    let ctx = Ctx {
        resource: format!("cluster_load_assignment {:?}", cla.cluster_name),
        warnings,
        inbound: false,
    };
    endpoints(&ctx, Some(cla))
}

pub(super) fn dns_endpoints(
    ctx: &Ctx<'_>,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Vec<m::cluster::DnsEndpoint>, ConvertError> {
    let mut out = Vec::new();
    for (i, j, e) in lb_endpoints(cla) {
        let field = format!("load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address");
        let (host, port) = socket_address(ctx, &field, endpoint_address(ctx, &field, e)?)?;
        out.push(m::cluster::DnsEndpoint {
            host,
            port,
            weight: e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |v| v.value)
                .max(1),
        });
    }
    if out.is_empty() {
        return Err(ctx.err("load_assignment", "a DNS cluster needs at least one host"));
    }
    Ok(out)
}
