//! `envoy.filters.http.fault` (`HTTPFault`): delays and aborts.

use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use ferry_model as m;

use super::core_types::fraction;
use super::coverage::{fields, path};
use super::matcher::header_matcher;
use super::{ConvertError, Ctx, duration};

pub(super) const FAULT_TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

fields!(pub(super) static HTTP_FAULT = "envoy.extensions.filters.http.fault.v3.HTTPFault" {
    "delay": applied,
    "abort": applied,
    "upstream_cluster": applied,
    "headers": applied,
    "downstream_nodes": applied,
    "max_active_faults": applied,
    "response_rate_limit": refused "throttling responses is not supported",
    "delay_percent_runtime": inert "there is no runtime layer: the configured percentage applies, as in Envoy without runtime overrides",
    "abort_percent_runtime": inert "there is no runtime layer: the configured percentage applies, as in Envoy without runtime overrides",
    "delay_duration_runtime": inert "there is no runtime layer: the configured delay applies, as in Envoy without runtime overrides",
    "abort_http_status_runtime": inert "there is no runtime layer: the configured status applies, as in Envoy without runtime overrides",
    "max_active_faults_runtime": inert "there is no runtime layer: the configured maximum applies, as in Envoy without runtime overrides",
    "response_rate_limit_percent_runtime": inert "read only with response_rate_limit, which is refused",
    "abort_grpc_status_runtime": inert "there is no runtime layer: the configured status applies, as in Envoy without runtime overrides",
    "disable_downstream_cluster_stats": warned "fault statistics per downstream cluster are not kept either way",
    "filter_metadata": refused "dynamic metadata from the fault filter is not supported",
});

fields!(pub(super) static FAULT_DELAY = "envoy.extensions.filters.common.fault.v3.FaultDelay" {
    "fixed_delay": applied,
    "header_delay": applied "x-envoy-fault-delay-request",
    "percentage": applied,
});

fields!(pub(super) static FAULT_ABORT = "envoy.extensions.filters.http.fault.v3.FaultAbort" {
    "http_status": applied,
    "grpc_status": applied,
    "header_abort": applied "x-envoy-fault-abort-request and -grpc-request",
    "percentage": applied,
    "response_body": refused "a custom body for injected aborts is not supported",
});

pub(super) fn fault_config(
    ctx: &mut Ctx<'_>,
    field: &str,
    hf: &fault_pb::HttpFault,
) -> Result<m::fault::FaultConfig, ConvertError> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier as D;
    use fault_pb::fault_abort::ErrorType as E;
    let cov = &HTTP_FAULT;
    let fault_pb::HttpFault {
        delay: delay_pb,
        abort: abort_pb,
        upstream_cluster,
        headers: headers_pb,
        downstream_nodes,
        max_active_faults,
        response_rate_limit,
        delay_percent_runtime,
        abort_percent_runtime,
        delay_duration_runtime,
        abort_http_status_runtime,
        max_active_faults_runtime,
        response_rate_limit_percent_runtime,
        abort_grpc_status_runtime,
        disable_downstream_cluster_stats,
        filter_metadata,
    } = hf;
    // Runtime keys: without a runtime layer the configured values apply.
    let _ = (
        delay_percent_runtime,
        abort_percent_runtime,
        delay_duration_runtime,
        abort_http_status_runtime,
        max_active_faults_runtime,
        response_rate_limit_percent_runtime,
        abort_grpc_status_runtime,
    );
    ctx.refuse(
        cov,
        field,
        "response_rate_limit",
        response_rate_limit.is_some(),
    )?;
    ctx.refuse(cov, field, "filter_metadata", filter_metadata.is_some())?;
    ctx.knob(
        cov,
        field,
        "disable_downstream_cluster_stats",
        *disable_downstream_cluster_stats,
    );
    let delay = match delay_pb {
        None => None,
        Some(envoy_types::pb::envoy::extensions::filters::common::fault::v3::FaultDelay {
            fault_delay_secifier,
            percentage,
        }) => Some(m::fault::FaultDelay {
            source: match fault_delay_secifier {
                Some(D::FixedDelay(fd)) => {
                    m::fault::DelaySource::Fixed(duration(&Some(*fd)).unwrap_or_default())
                }
                Some(D::HeaderDelay(_)) => m::fault::DelaySource::Header,
                None => {
                    return Err(ctx.err(
                        format!("{field}.delay"),
                        "fixed_delay or header_delay is required",
                    ));
                }
            },
            percentage: fraction(percentage),
        }),
    };
    let abort = match abort_pb {
        None => None,
        Some(fault_pb::FaultAbort {
            percentage,
            response_body,
            error_type,
        }) => Some(m::fault::FaultAbort {
            source: match error_type {
                Some(E::HttpStatus(s)) => {
                    let s = u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| {
                            ctx.err(
                                format!("{field}.abort.http_status"),
                                format!("{s} is not in [200, 600)"),
                            )
                        })?;
                    m::fault::AbortSource::Http(s)
                }
                Some(E::GrpcStatus(s)) => m::fault::AbortSource::Grpc(*s),
                Some(E::HeaderAbort(_)) => m::fault::AbortSource::Header,
                None => {
                    return Err(ctx.err(
                        format!("{field}.abort"),
                        "http_status, grpc_status or header_abort is required",
                    ));
                }
            },
            percentage: {
                ctx.refuse(
                    &FAULT_ABORT,
                    &path(field, "abort"),
                    "response_body",
                    !response_body.is_empty(),
                )?;
                fraction(percentage)
            },
        }),
    };
    let mut headers = Vec::with_capacity(headers_pb.len());
    for (i, h) in headers_pb.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{field}.headers[{i}]"), h)?);
    }
    Ok(m::fault::FaultConfig {
        delay,
        abort,
        headers,
        upstream_cluster: (!upstream_cluster.is_empty()).then(|| upstream_cluster.clone()),
        downstream_nodes: downstream_nodes.clone(),
        max_active_faults: max_active_faults.as_ref().map(|v| v.value),
    })
}
