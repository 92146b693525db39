//! `envoy.config.route.v3.RetryPolicy` of a route or virtual host.

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use ferry_model as m;

use super::{ConvertError, Ctx, duration, timeout_or};

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";

pub(super) fn retry_policy(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &route_pb::RetryPolicy,
) -> Result<m::RetryPolicy, ConvertError> {
    let (retry_on, unknown) = m::RetryOn::parse(&p.retry_on);
    if !unknown.is_empty() {
        ctx.warn(
            &format!("{field}.retry_on"),
            format!("unknown retry conditions {unknown:?} are ignored"),
        );
    }
    let mut out = m::RetryPolicy {
        retry_on,
        num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
        per_try_timeout: timeout_or(&p.per_try_timeout, None),
        ..Default::default()
    };
    for (i, code) in p.retriable_status_codes.iter().enumerate() {
        let code = u16::try_from(*code)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.retriable_status_codes[{i}]"),
                    format!("{code} is not an HTTP status"),
                )
            })?;
        out.retriable_status_codes.push(code);
    }
    if let Some(b) = &p.retry_back_off {
        let base = duration(&b.base_interval).ok_or_else(|| {
            ctx.err(
                format!("{field}.retry_back_off.base_interval"),
                "base_interval is required",
            )
        })?;
        if base.is_zero() {
            return Err(ctx.err(
                format!("{field}.retry_back_off.base_interval"),
                "base_interval must be greater than zero",
            ));
        }
        let max = duration(&b.max_interval).unwrap_or(base * 10);
        if max < base {
            return Err(ctx.err(
                format!("{field}.retry_back_off.max_interval"),
                "max_interval must not be less than base_interval",
            ));
        }
        out.backoff_base = base;
        out.backoff_max = max;
    }
    for (i, pred) in p.retry_host_predicate.iter().enumerate() {
        if pred.name == PREVIOUS_HOSTS {
            out.previous_hosts = true;
        } else {
            ctx.warn(
                &format!("{field}.retry_host_predicate[{i}]"),
                format!(
                    "retry host predicate {:?} is not supported; ignored",
                    pred.name
                ),
            );
        }
    }
    if p.host_selection_retry_max_attempts > 0 {
        out.host_selection_max_attempts =
            u32::try_from(p.host_selection_retry_max_attempts).unwrap_or(u32::MAX);
    }
    Ok(out)
}
