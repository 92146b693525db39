//! `envoy.filters.http.local_ratelimit` (`LocalRateLimit`, token buckets,
//! descriptors) and the route and virtual host `rate_limits` actions that
//! build its descriptors.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use ferry_model as m;

use super::core_types::{NEVER, runtime_fraction};
use super::coverage::{fields, path};
use super::header_mutation::header_mutations;
use super::matcher::{header_matcher, query_parameter_matcher};
use super::{ConvertError, Ctx, duration};

pub(super) const RATELIMIT_TYPE: &str =
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

fields!(pub(super) static LOCAL_RATE_LIMIT = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit" {
    "stat_prefix": applied,
    "status": applied,
    "token_bucket": applied,
    "filter_enabled": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "filter_enforced": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "request_headers_to_add_when_not_enforced": applied,
    "response_headers_to_add": applied,
    "descriptors": applied,
    "stage": applied,
    "local_rate_limit_per_downstream_connection": applied,
    "local_cluster_rate_limit": refused "cluster-wide local rate limits are not supported",
    "enable_x_ratelimit_headers": applied,
    "vh_rate_limits": applied,
    "always_consume_default_token_bucket": applied,
    "rate_limited_as_resource_exhausted": applied,
    "rate_limits": refused "rate limit actions in the filter's configuration are not supported (set them on the route or virtual host)",
    "max_dynamic_descriptors": refused "dynamic (wildcard) descriptors are not supported",
    "enable_retry_after_header": refused "the Retry-After header is not added",
});

fields!(pub(super) static LOCAL_RATE_LIMIT_DESCRIPTOR = "envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor" {
    "entries": applied "keys and values (wildcard values refused)",
    "token_bucket": applied,
    "shadow_mode": refused "shadow-mode descriptors are not supported",
});

fields!(pub(super) static TOKEN_BUCKET = "envoy.type.v3.TokenBucket" {
    "max_tokens": applied,
    "tokens_per_fill": applied,
    "fill_interval": applied,
});

fields!(pub(super) static RATE_LIMIT = "envoy.config.route.v3.RateLimit" {
    "stage": applied,
    "disable_key": inert "there is no runtime layer to disable the limit with",
    "actions": applied,
    "limit": refused "dynamic limit overrides are not supported",
    "hits_addend": refused "hits addends are not supported",
    "apply_on_stream_done": refused "applying limits when the stream ends is not supported",
    "x_ratelimit_option": refused "per-limit X-RateLimit header options are not supported",
});

fields!(pub(super) static RATE_LIMIT_ACTION = "envoy.config.route.v3.RateLimit.Action" {
    "source_cluster": refused "the source_cluster action is not supported",
    "destination_cluster": applied,
    "request_headers": applied,
    "remote_address": applied,
    "generic_key": applied "default_value refused",
    "header_value_match": applied "default_value refused",
    "dynamic_metadata": refused "metadata actions are not supported",
    "metadata": refused "metadata actions are not supported",
    "extension": refused "rate limit descriptor extensions are not supported",
    "masked_remote_address": applied,
    "query_parameter_value_match": applied "default_value refused",
    "query_parameters": applied,
    "remote_address_match": refused "the remote_address_match action is not supported",
});

fields!(pub(super) static GENERIC_KEY = "envoy.config.route.v3.RateLimit.Action.GenericKey" {
    "descriptor_value": applied,
    "descriptor_key": applied "generic_key when empty",
    "default_value": refused "default values are not supported yet",
});

fields!(pub(super) static REQUEST_HEADERS = "envoy.config.route.v3.RateLimit.Action.RequestHeaders" {
    "header_name": applied,
    "descriptor_key": applied,
    "skip_if_absent": applied,
});

fields!(pub(super) static HEADER_VALUE_MATCH = "envoy.config.route.v3.RateLimit.Action.HeaderValueMatch" {
    "descriptor_value": applied,
    "expect_match": applied,
    "headers": applied,
    "descriptor_key": applied "header_match when empty",
    "default_value": refused "default values are not supported yet",
});

fields!(pub(super) static MASKED_REMOTE_ADDRESS = "envoy.config.route.v3.RateLimit.Action.MaskedRemoteAddress" {
    "v4_prefix_mask_len": applied,
    "v6_prefix_mask_len": applied,
});

fields!(pub(super) static QUERY_PARAMETERS = "envoy.config.route.v3.RateLimit.Action.QueryParameters" {
    "query_parameter_name": applied "required",
    "descriptor_key": applied "required",
    "skip_if_absent": applied,
});

fields!(pub(super) static QUERY_PARAMETER_VALUE_MATCH = "envoy.config.route.v3.RateLimit.Action.QueryParameterValueMatch" {
    "descriptor_value": applied,
    "expect_match": applied,
    "query_parameters": applied,
    "descriptor_key": applied "query_match when empty",
    "default_value": refused "default values are not supported yet",
});

pub(super) fn disabled_ratelimit() -> m::ratelimit::LocalRateLimit {
    m::ratelimit::LocalRateLimit {
        stat_prefix: String::new(),
        status: http::StatusCode::TOO_MANY_REQUESTS,
        bucket: None,
        filter_enabled: NEVER,
        filter_enforced: NEVER,
        response_headers: m::HeaderMutations::default(),
        request_headers_when_not_enforced: m::HeaderMutations::default(),
        grpc_resource_exhausted: false,
        descriptors: Vec::new(),
        stage: 0,
        always_consume_default: true,
        vh_rate_limits: m::ratelimit::VhRateLimits::Override,
        x_ratelimit_headers: false,
        per_connection: false,
    }
}

pub(super) fn local_ratelimit(
    ctx: &Ctx<'_>,
    field: &str,
    p: &ratelimit_pb::LocalRateLimit,
) -> Result<m::ratelimit::LocalRateLimit, ConvertError> {
    let cov = &LOCAL_RATE_LIMIT;
    let ratelimit_pb::LocalRateLimit {
        stat_prefix,
        status: status_pb,
        token_bucket: token_bucket_pb,
        filter_enabled,
        filter_enforced,
        request_headers_to_add_when_not_enforced,
        response_headers_to_add,
        descriptors: descriptors_pb,
        stage,
        local_rate_limit_per_downstream_connection,
        local_cluster_rate_limit,
        enable_x_ratelimit_headers,
        vh_rate_limits,
        always_consume_default_token_bucket,
        rate_limited_as_resource_exhausted,
        rate_limits: filter_rate_limits,
        max_dynamic_descriptors,
        enable_retry_after_header,
    } = p;
    ctx.refuse(cov, field, "rate_limits", !filter_rate_limits.is_empty())?;
    ctx.refuse(
        cov,
        field,
        "max_dynamic_descriptors",
        max_dynamic_descriptors.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "enable_retry_after_header",
        *enable_retry_after_header,
    )?;
    if stat_prefix.is_empty() {
        return Err(ctx.err(format!("{field}.stat_prefix"), "a stat_prefix is required"));
    }
    ctx.refuse(
        cov,
        field,
        "local_cluster_rate_limit",
        local_cluster_rate_limit.is_some(),
    )?;
    if *enable_x_ratelimit_headers > 1 {
        return Err(ctx.err(
            format!("{field}.enable_x_ratelimit_headers"),
            format!(
                "unknown X-RateLimit header version {}",
                enable_x_ratelimit_headers
            ),
        ));
    }
    let status = match status_pb.as_ref() {
        None => http::StatusCode::TOO_MANY_REQUESTS,
        Some(s) => u16::try_from(s.code)
            .ok()
            .filter(|c| (200..600).contains(c))
            .and_then(|c| http::StatusCode::from_u16(c).ok())
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.status.code"),
                    format!("{} is not an HTTP status in [200, 600)", s.code),
                )
            })?,
    };
    let bucket = token_bucket_pb
        .as_ref()
        .map(|tb| token_bucket(ctx, &format!("{field}.token_bucket"), tb))
        .transpose()?;
    let mut descriptors = Vec::with_capacity(descriptors_pb.len());
    for (i, d) in descriptors_pb.iter().enumerate() {
        let df = format!("{field}.descriptors[{i}]");
        let envoy_types::pb::envoy::extensions::common::ratelimit::v3::LocalRateLimitDescriptor {
            entries: entries_pb,
            token_bucket: descriptor_bucket,
            shadow_mode,
        } = d;
        ctx.refuse(
            &LOCAL_RATE_LIMIT_DESCRIPTOR,
            &df,
            "shadow_mode",
            *shadow_mode,
        )?;
        if entries_pb.is_empty() {
            return Err(ctx.err(format!("{df}.entries"), "a descriptor needs entries"));
        }
        let mut entries = Vec::with_capacity(entries_pb.len());
        for (j, e) in entries_pb.iter().enumerate() {
            if e.key.is_empty() || e.value.is_empty() {
                return Err(ctx.err(
                    format!("{df}.entries[{j}]"),
                    "entries need a key and a value (wildcard values are not supported yet)",
                ));
            }
            entries.push((e.key.clone(), e.value.clone()));
        }
        let tb = descriptor_bucket.as_ref().ok_or_else(|| {
            ctx.err(
                format!("{df}.token_bucket"),
                "a descriptor needs a token_bucket",
            )
        })?;
        descriptors.push(m::ratelimit::Descriptor {
            entries,
            bucket: token_bucket(ctx, &format!("{df}.token_bucket"), tb)?,
        });
    }
    if *stage > 10 {
        return Err(ctx.err(format!("{field}.stage"), "stage must be 0 to 10"));
    }
    Ok(m::ratelimit::LocalRateLimit {
        stat_prefix: stat_prefix.clone(),
        status,
        bucket,
        filter_enabled: runtime_fraction(filter_enabled).unwrap_or(NEVER),
        filter_enforced: runtime_fraction(filter_enforced).unwrap_or(NEVER),
        response_headers: header_mutations(
            ctx,
            &format!("{field}.response_headers_to_add"),
            response_headers_to_add,
            "",
            &[],
        )?,
        request_headers_when_not_enforced: header_mutations(
            ctx,
            &format!("{field}.request_headers_to_add_when_not_enforced"),
            request_headers_to_add_when_not_enforced,
            "",
            &[],
        )?,
        grpc_resource_exhausted: *rate_limited_as_resource_exhausted,
        descriptors,
        stage: *stage,
        always_consume_default: always_consume_default_token_bucket
            .as_ref()
            .is_none_or(|v| v.value),
        vh_rate_limits: match *vh_rate_limits {
            1 => m::ratelimit::VhRateLimits::Include,
            2 => m::ratelimit::VhRateLimits::Ignore,
            _ => m::ratelimit::VhRateLimits::Override,
        },
        x_ratelimit_headers: *enable_x_ratelimit_headers == 1,
        per_connection: *local_rate_limit_per_downstream_connection,
    })
}

fn token_bucket(
    ctx: &Ctx<'_>,
    tf: &str,
    tb: &envoy_types::pb::envoy::r#type::v3::TokenBucket,
) -> Result<m::ratelimit::TokenBucket, ConvertError> {
    let envoy_types::pb::envoy::r#type::v3::TokenBucket {
        max_tokens,
        tokens_per_fill,
        fill_interval,
    } = tb;
    let interval = duration(fill_interval)
        .ok_or_else(|| ctx.err(format!("{tf}.fill_interval"), "fill_interval is required"))?;
    if interval < Duration::from_millis(50) {
        return Err(ctx.err(
            format!("{tf}.fill_interval"),
            "fill_interval must be at least 50ms",
        ));
    }
    if *max_tokens == 0 {
        return Err(ctx.err(
            format!("{tf}.max_tokens"),
            "max_tokens must be greater than zero",
        ));
    }
    let per_fill = tokens_per_fill.as_ref().map_or(1, |v| v.value);
    if per_fill == 0 {
        return Err(ctx.err(
            format!("{tf}.tokens_per_fill"),
            "tokens_per_fill must be greater than zero",
        ));
    }
    Ok(m::ratelimit::TokenBucket::new(
        *max_tokens,
        per_fill,
        interval,
    ))
}

/// A route's or virtual host's `rate_limits`.
pub(super) fn rate_limits(
    ctx: &Ctx<'_>,
    field: &str,
    rls: &[route_pb::RateLimit],
) -> Result<Vec<m::ratelimit::RateLimitPolicy>, ConvertError> {
    use m::ratelimit::RateLimitAction as R;
    use route_pb::rate_limit::action::ActionSpecifier as A;
    let mut out = Vec::with_capacity(rls.len());
    for (i, rl) in rls.iter().enumerate() {
        let rf = format!("{field}[{i}]");
        let route_pb::RateLimit {
            stage,
            disable_key,
            actions: actions_pb,
            limit,
            hits_addend,
            apply_on_stream_done,
            x_ratelimit_option,
        } = rl;
        let _ = disable_key;
        ctx.refuse(&RATE_LIMIT, &rf, "limit", limit.is_some())?;
        ctx.refuse(&RATE_LIMIT, &rf, "hits_addend", hits_addend.is_some())?;
        ctx.refuse(
            &RATE_LIMIT,
            &rf,
            "apply_on_stream_done",
            *apply_on_stream_done,
        )?;
        ctx.refuse(
            &RATE_LIMIT,
            &rf,
            "x_ratelimit_option",
            *x_ratelimit_option != 0,
        )?;
        let mut actions = Vec::with_capacity(actions_pb.len());
        for (j, a) in actions_pb.iter().enumerate() {
            let af = format!("{rf}.actions[{j}]");
            let key_or = |k: &str, d: &str| {
                if k.is_empty() {
                    d.to_string()
                } else {
                    k.to_string()
                }
            };
            actions.push(match &a.action_specifier {
                Some(A::RemoteAddress(_)) => R::RemoteAddress,
                Some(A::DestinationCluster(_)) => R::DestinationCluster,
                Some(A::GenericKey(g)) => {
                    let route_pb::rate_limit::action::GenericKey {
                        descriptor_value,
                        descriptor_key,
                        default_value,
                    } = g;
                    let gf = path(&af, "generic_key");
                    ctx.refuse(
                        &GENERIC_KEY,
                        &gf,
                        "default_value",
                        !default_value.is_empty(),
                    )?;
                    R::GenericKey {
                        key: key_or(descriptor_key, "generic_key"),
                        value: descriptor_value.clone(),
                    }
                }
                Some(A::RequestHeaders(h)) => {
                    let route_pb::rate_limit::action::RequestHeaders {
                        header_name,
                        descriptor_key,
                        skip_if_absent,
                    } = h;
                    R::RequestHeaders {
                        header: m::HeaderKey::parse(header_name).ok_or_else(|| {
                            ctx.err(
                                format!("{af}.request_headers.header_name"),
                                format!("{header_name:?} is not a valid header name"),
                            )
                        })?,
                        key: descriptor_key.clone(),
                        skip_if_absent: *skip_if_absent,
                    }
                }
                Some(A::HeaderValueMatch(h)) => {
                    let route_pb::rate_limit::action::HeaderValueMatch {
                        descriptor_value,
                        expect_match,
                        headers: headers_pb,
                        descriptor_key,
                        default_value,
                    } = h;
                    let hf = path(&af, "header_value_match");
                    ctx.refuse(
                        &HEADER_VALUE_MATCH,
                        &hf,
                        "default_value",
                        !default_value.is_empty(),
                    )?;
                    let mut headers = Vec::with_capacity(headers_pb.len());
                    for (k, hm) in headers_pb.iter().enumerate() {
                        headers.push(header_matcher(ctx, &format!("{hf}.headers[{k}]"), hm)?);
                    }
                    R::HeaderValueMatch {
                        key: key_or(descriptor_key, "header_match"),
                        value: descriptor_value.clone(),
                        expect_match: expect_match.as_ref().is_none_or(|v| v.value),
                        headers,
                    }
                }
                Some(A::MaskedRemoteAddress(mr)) => {
                    let route_pb::rate_limit::action::MaskedRemoteAddress {
                        v4_prefix_mask_len,
                        v6_prefix_mask_len,
                    } = mr;
                    let len = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>,
                               max: u32,
                               name: &str| {
                        let n = v.as_ref().map_or(max, |v| v.value);
                        if n > max {
                            return Err(ctx.err(
                                format!("{af}.masked_remote_address.{name}"),
                                format!("{n} is more than {max}"),
                            ));
                        }
                        Ok(n as u8)
                    };
                    R::MaskedRemoteAddress {
                        v4_len: len(v4_prefix_mask_len, 32, "v4_prefix_mask_len")?,
                        v6_len: len(v6_prefix_mask_len, 128, "v6_prefix_mask_len")?,
                    }
                }
                Some(A::QueryParameters(q)) => {
                    let route_pb::rate_limit::action::QueryParameters {
                        query_parameter_name,
                        descriptor_key,
                        skip_if_absent,
                    } = q;
                    if query_parameter_name.is_empty() || descriptor_key.is_empty() {
                        return Err(ctx.err(
                            format!("{af}.query_parameters"),
                            "query_parameter_name and descriptor_key are required",
                        ));
                    }
                    R::QueryParameter {
                        name: query_parameter_name.clone(),
                        key: descriptor_key.clone(),
                        skip_if_absent: *skip_if_absent,
                    }
                }
                Some(A::QueryParameterValueMatch(q)) => {
                    let route_pb::rate_limit::action::QueryParameterValueMatch {
                        descriptor_value,
                        expect_match,
                        query_parameters,
                        descriptor_key,
                        default_value,
                    } = q;
                    let qf = path(&af, "query_parameter_value_match");
                    ctx.refuse(
                        &QUERY_PARAMETER_VALUE_MATCH,
                        &qf,
                        "default_value",
                        !default_value.is_empty(),
                    )?;
                    let mut matchers = Vec::with_capacity(query_parameters.len());
                    for (k, qm) in query_parameters.iter().enumerate() {
                        matchers.push(query_parameter_matcher(
                            ctx,
                            &format!("{qf}.query_parameters[{k}]"),
                            qm,
                        )?);
                    }
                    R::QueryParameterValueMatch {
                        key: key_or(descriptor_key, "query_match"),
                        value: descriptor_value.clone(),
                        expect_match: expect_match.as_ref().is_none_or(|v| v.value),
                        matchers,
                    }
                }
                Some(A::SourceCluster(_)) => {
                    ctx.refuse(&RATE_LIMIT_ACTION, &af, "source_cluster", true)?;
                    continue;
                }
                #[allow(deprecated)]
                Some(A::DynamicMetadata(_)) => {
                    ctx.refuse(&RATE_LIMIT_ACTION, &af, "dynamic_metadata", true)?;
                    continue;
                }
                Some(A::Metadata(_)) => {
                    ctx.refuse(&RATE_LIMIT_ACTION, &af, "metadata", true)?;
                    continue;
                }
                Some(A::Extension(_)) => {
                    ctx.refuse(&RATE_LIMIT_ACTION, &af, "extension", true)?;
                    continue;
                }
                Some(A::RemoteAddressMatch(_)) => {
                    ctx.refuse(&RATE_LIMIT_ACTION, &af, "remote_address_match", true)?;
                    continue;
                }
                None => return Err(ctx.err(&af, "an action is required")),
            });
        }
        out.push(m::ratelimit::RateLimitPolicy {
            stage: stage.as_ref().map_or(0, |v| v.value),
            actions,
        });
    }
    Ok(out)
}
