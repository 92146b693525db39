//! `envoy.config.route.v3.RetryPolicy` of a route or virtual host.

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use ferry_model as m;

use super::coverage::{fields, path};
use super::matcher::header_matcher;
use super::{ConvertError, Ctx, Typed, duration, timeout_or};

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str =
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

fields!(pub(super) static RETRY_POLICY = "envoy.config.route.v3.RetryPolicy" {
    "retry_on": applied "5xx, gateway-error, reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, refused-stream, retriable-status-codes, retriable-headers and the gRPC conditions; unknown names warned and ignored, as Envoy ignores them",
    "num_retries": applied,
    "per_try_timeout": applied,
    "per_try_idle_timeout": refused "per-try idle timeouts are not supported",
    "retry_priority": refused "retry priority extensions are not supported",
    "retry_host_predicate": applied "previous_hosts (other predicates refused)",
    "retry_options_predicates": refused "retry options predicates are not supported",
    "host_selection_retry_max_attempts": applied,
    "retriable_status_codes": applied,
    "retry_back_off": applied,
    "rate_limited_retry_back_off": warned "Retry-After and X-RateLimit-Reset are not read; the regular back-off applies",
    "retriable_headers": applied,
    "retriable_request_headers": applied "only matching requests are retried",
    "refresh_cluster_on_retry": warned "clusters are looked up once per request",
});

pub(super) fn retry_policy(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &route_pb::RetryPolicy,
) -> Result<m::RetryPolicy, ConvertError> {
    let cov = &RETRY_POLICY;
    let route_pb::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        retry_options_predicates,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    } = p;
    ctx.refuse(
        cov,
        field,
        "per_try_idle_timeout",
        per_try_idle_timeout.is_some(),
    )?;
    ctx.refuse(cov, field, "retry_priority", retry_priority.is_some())?;
    ctx.refuse(
        cov,
        field,
        "retry_options_predicates",
        !retry_options_predicates.is_empty(),
    )?;
    ctx.knob(
        cov,
        field,
        "rate_limited_retry_back_off",
        rate_limited_retry_back_off.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "refresh_cluster_on_retry",
        *refresh_cluster_on_retry,
    );
    let (on, unknown) = m::RetryOn::parse(retry_on);
    if !unknown.is_empty() {
        ctx.warn(
            &path(field, "retry_on"),
            format!("unknown retry conditions {unknown:?} are ignored"),
        );
    }
    let mut out = m::RetryPolicy {
        retry_on: on,
        num_retries: num_retries.as_ref().map_or(1, |v| v.value),
        per_try_timeout: timeout_or(per_try_timeout, None),
        ..Default::default()
    };
    for (i, code) in retriable_status_codes.iter().enumerate() {
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
    if let Some(b) = retry_back_off {
        let route_pb::retry_policy::RetryBackOff {
            base_interval,
            max_interval,
        } = b;
        let base = duration(base_interval).ok_or_else(|| {
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
        let max = duration(max_interval).unwrap_or(base * 10);
        if max < base {
            return Err(ctx.err(
                format!("{field}.retry_back_off.max_interval"),
                "max_interval must not be less than base_interval",
            ));
        }
        out.backoff_base = base;
        out.backoff_max = max;
    }
    for (i, pred) in retry_host_predicate.iter().enumerate() {
        let route_pb::retry_policy::RetryHostPredicate { name, config_type } = pred;
        use route_pb::retry_policy::retry_host_predicate::ConfigType;
        let type_name = match config_type {
            Some(ConfigType::TypedConfig(any)) => Typed::from_any(any)
                .map_err(|e| ctx.err(format!("{field}.retry_host_predicate[{i}]"), e))?
                .type_name()
                .to_string(),
            None => String::new(),
        };
        if name == PREVIOUS_HOSTS || type_name == PREVIOUS_HOSTS_TYPE {
            out.previous_hosts = true;
        } else {
            return Err(ctx.err(
                format!("{field}.retry_host_predicate[{i}]"),
                format!("retry host predicate {name:?} ({type_name}) is not supported"),
            ));
        }
    }
    if *host_selection_retry_max_attempts > 0 {
        out.host_selection_max_attempts =
            u32::try_from(*host_selection_retry_max_attempts).unwrap_or(u32::MAX);
    }
    for (i, h) in retriable_headers.iter().enumerate() {
        out.retriable_headers.push(header_matcher(
            ctx,
            &format!("{field}.retriable_headers[{i}]"),
            h,
        )?);
    }
    for (i, h) in retriable_request_headers.iter().enumerate() {
        out.retriable_request_headers.push(header_matcher(
            ctx,
            &format!("{field}.retriable_request_headers[{i}]"),
            h,
        )?);
    }
    Ok(out)
}
