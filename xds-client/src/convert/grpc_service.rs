//! `envoy.config.core.v3.GrpcService` as the span exporters and ext_authz
//! read it: Envoy's own gRPC client (`envoy_grpc`) to a cluster, with its
//! timeout and initial metadata. Google's client and retries are refused;
//! each user classifies the fields in its own lists (the wording of a
//! refusal names what the calls are for).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;

use super::coverage::{Coverage, path};
use super::{ConvertError, Ctx, duration};

/// Where and how the gRPC calls go.
pub(super) struct GrpcTarget {
    pub cluster: String,
    /// `authority`, else the cluster's name (as Envoy's client sends it).
    pub authority: String,
    /// The call timeout; `None` when unset.
    pub timeout: Option<Duration>,
    pub metadata: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Reads `g` at `field`, classified by `service` (the `GrpcService` list)
/// and `envoy` (the `GrpcService.EnvoyGrpc` list) of the caller.
pub(super) fn grpc_target(
    ctx: &mut Ctx<'_>,
    field: &str,
    g: &core_pb::GrpcService,
    service: &Coverage,
    envoy: &Coverage,
) -> Result<GrpcTarget, ConvertError> {
    use core_pb::grpc_service::TargetSpecifier;
    let core_pb::GrpcService {
        timeout,
        initial_metadata,
        retry_policy,
        target_specifier,
    } = g;
    ctx.refuse(service, field, "retry_policy", retry_policy.is_some())?;
    let e = match target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(e)) => e,
        Some(TargetSpecifier::GoogleGrpc(_)) => {
            return Err(ctx.refused(service, field, "google_grpc"));
        }
        None => return Err(ctx.err(path(field, "envoy_grpc"), "envoy_grpc is required")),
    };
    let at = path(field, "envoy_grpc");
    let core_pb::grpc_service::EnvoyGrpc {
        cluster_name,
        authority,
        retry_policy,
        max_receive_message_length,
        skip_envoy_headers,
    } = e;
    ctx.refuse(envoy, &at, "retry_policy", retry_policy.is_some())?;
    ctx.knob(
        envoy,
        &at,
        "max_receive_message_length",
        max_receive_message_length.is_some(),
    );
    // The calls carry no x-envoy-* headers either way (the lists say so).
    let _ = skip_envoy_headers;
    if cluster_name.is_empty() {
        return Err(ctx.err(path(&at, "cluster_name"), "a cluster is required"));
    }
    let mut metadata = Vec::with_capacity(initial_metadata.len());
    for (i, hv) in initial_metadata.iter().enumerate() {
        match (
            http::HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes()),
            http::HeaderValue::from_str(&hv.value),
        ) {
            (Ok(n), Ok(v)) => metadata.push((n, v)),
            _ => {
                return Err(ctx.err(
                    format!("{field}.initial_metadata[{i}]"),
                    format!("invalid metadata {:?}", hv.key),
                ));
            }
        }
    }
    Ok(GrpcTarget {
        authority: if authority.is_empty() {
            cluster_name.clone()
        } else {
            authority.clone()
        },
        cluster: cluster_name.clone(),
        timeout: duration(timeout),
        metadata,
    })
}
