//! `envoy.filters.http.fault` (`HTTPFault`): delays and aborts.

use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use ferry_model as m;

use super::core_types::fraction;
use super::matcher::header_matcher;
use super::{ConvertError, Ctx, duration};

pub(super) const FAULT_TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

pub(super) fn fault_config(
    ctx: &mut Ctx<'_>,
    field: &str,
    hf: &fault_pb::HttpFault,
) -> Result<m::fault::FaultConfig, ConvertError> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier as D;
    use fault_pb::fault_abort::ErrorType as E;
    let delay = match &hf.delay {
        None => None,
        Some(d) => Some(m::fault::FaultDelay {
            source: match &d.fault_delay_secifier {
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
            percentage: fraction(&d.percentage),
        }),
    };
    let abort = match &hf.abort {
        None => None,
        Some(a) => Some(m::fault::FaultAbort {
            source: match &a.error_type {
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
            percentage: fraction(&a.percentage),
        }),
    };
    let mut headers = Vec::with_capacity(hf.headers.len());
    for (i, h) in hf.headers.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{field}.headers[{i}]"), h)?);
    }
    if hf.response_rate_limit.is_some() {
        ctx.warn(
            &format!("{field}.response_rate_limit"),
            "response rate limiting is not supported; ignored".into(),
        );
    }
    Ok(m::fault::FaultConfig {
        delay,
        abort,
        headers,
        upstream_cluster: (!hf.upstream_cluster.is_empty()).then(|| hf.upstream_cluster.clone()),
        downstream_nodes: hf.downstream_nodes.clone(),
        max_active_faults: hf.max_active_faults.as_ref().map(|v| v.value),
    })
}
