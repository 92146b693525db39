//! `envoy.filters.http.local_ratelimit` (`LocalRateLimit`, token buckets,
//! descriptors) and the route and virtual host `rate_limits` actions that
//! build its descriptors.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use ferry_model as m;

use super::core_types::{NEVER, runtime_fraction};
use super::header_mutation::header_mutations;
use super::matcher::{header_matcher, query_parameter_matcher};
use super::{ConvertError, Ctx, duration};

pub(super) const RATELIMIT_TYPE: &str =
    "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

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
    if p.stat_prefix.is_empty() {
        return Err(ctx.err(format!("{field}.stat_prefix"), "a stat_prefix is required"));
    }
    if p.local_cluster_rate_limit.is_some() {
        return Err(ctx.err(
            format!("{field}.local_cluster_rate_limit"),
            "cluster-wide local rate limits are not supported",
        ));
    }
    if p.enable_x_ratelimit_headers > 1 {
        return Err(ctx.err(
            format!("{field}.enable_x_ratelimit_headers"),
            format!(
                "unknown X-RateLimit header version {}",
                p.enable_x_ratelimit_headers
            ),
        ));
    }
    let status = match p.status.as_ref() {
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
    let bucket = p
        .token_bucket
        .as_ref()
        .map(|tb| token_bucket(ctx, &format!("{field}.token_bucket"), tb))
        .transpose()?;
    let mut descriptors = Vec::with_capacity(p.descriptors.len());
    for (i, d) in p.descriptors.iter().enumerate() {
        let df = format!("{field}.descriptors[{i}]");
        if d.entries.is_empty() {
            return Err(ctx.err(format!("{df}.entries"), "a descriptor needs entries"));
        }
        let mut entries = Vec::with_capacity(d.entries.len());
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() || e.value.is_empty() {
                return Err(ctx.err(
                    format!("{df}.entries[{j}]"),
                    "entries need a key and a value (wildcard values are not supported yet)",
                ));
            }
            entries.push((e.key.clone(), e.value.clone()));
        }
        let tb = d.token_bucket.as_ref().ok_or_else(|| {
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
    if p.stage > 10 {
        return Err(ctx.err(format!("{field}.stage"), "stage must be 0 to 10"));
    }
    Ok(m::ratelimit::LocalRateLimit {
        stat_prefix: p.stat_prefix.clone(),
        status,
        bucket,
        filter_enabled: runtime_fraction(&p.filter_enabled).unwrap_or(NEVER),
        filter_enforced: runtime_fraction(&p.filter_enforced).unwrap_or(NEVER),
        response_headers: header_mutations(
            ctx,
            &format!("{field}.response_headers_to_add"),
            &p.response_headers_to_add,
            "",
            &[],
        )?,
        request_headers_when_not_enforced: header_mutations(
            ctx,
            &format!("{field}.request_headers_to_add_when_not_enforced"),
            &p.request_headers_to_add_when_not_enforced,
            "",
            &[],
        )?,
        grpc_resource_exhausted: p.rate_limited_as_resource_exhausted,
        descriptors,
        stage: p.stage,
        always_consume_default: p
            .always_consume_default_token_bucket
            .as_ref()
            .is_none_or(|v| v.value),
        vh_rate_limits: match p.vh_rate_limits {
            1 => m::ratelimit::VhRateLimits::Include,
            2 => m::ratelimit::VhRateLimits::Ignore,
            _ => m::ratelimit::VhRateLimits::Override,
        },
        x_ratelimit_headers: p.enable_x_ratelimit_headers == 1,
        per_connection: p.local_rate_limit_per_downstream_connection,
    })
}

fn token_bucket(
    ctx: &Ctx<'_>,
    tf: &str,
    tb: &envoy_types::pb::envoy::r#type::v3::TokenBucket,
) -> Result<m::ratelimit::TokenBucket, ConvertError> {
    let interval = duration(&tb.fill_interval)
        .ok_or_else(|| ctx.err(format!("{tf}.fill_interval"), "fill_interval is required"))?;
    if interval < Duration::from_millis(50) {
        return Err(ctx.err(
            format!("{tf}.fill_interval"),
            "fill_interval must be at least 50ms",
        ));
    }
    if tb.max_tokens == 0 {
        return Err(ctx.err(
            format!("{tf}.max_tokens"),
            "max_tokens must be greater than zero",
        ));
    }
    let per_fill = tb.tokens_per_fill.as_ref().map_or(1, |v| v.value);
    if per_fill == 0 {
        return Err(ctx.err(
            format!("{tf}.tokens_per_fill"),
            "tokens_per_fill must be greater than zero",
        ));
    }
    Ok(m::ratelimit::TokenBucket::new(
        tb.max_tokens,
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
        if rl.limit.is_some() {
            return Err(ctx.err(
                format!("{rf}.limit"),
                "dynamic limit overrides are not supported",
            ));
        }
        let mut actions = Vec::with_capacity(rl.actions.len());
        for (j, a) in rl.actions.iter().enumerate() {
            let af = format!("{rf}.actions[{j}]");
            let no_default = |name: &str, d: &str| {
                if d.is_empty() {
                    Ok(())
                } else {
                    Err(ctx.err(
                        format!("{af}.{name}.default_value"),
                        "default values are not supported yet",
                    ))
                }
            };
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
                    no_default("generic_key", &g.default_value)?;
                    R::GenericKey {
                        key: key_or(&g.descriptor_key, "generic_key"),
                        value: g.descriptor_value.clone(),
                    }
                }
                Some(A::RequestHeaders(h)) => R::RequestHeaders {
                    header: m::HeaderKey::parse(&h.header_name).ok_or_else(|| {
                        ctx.err(
                            format!("{af}.request_headers.header_name"),
                            format!("{:?} is not a valid header name", h.header_name),
                        )
                    })?,
                    key: h.descriptor_key.clone(),
                    skip_if_absent: h.skip_if_absent,
                },
                Some(A::HeaderValueMatch(h)) => {
                    no_default("header_value_match", &h.default_value)?;
                    let mut headers = Vec::with_capacity(h.headers.len());
                    for (k, hm) in h.headers.iter().enumerate() {
                        headers.push(header_matcher(
                            ctx,
                            &format!("{af}.header_value_match.headers[{k}]"),
                            hm,
                        )?);
                    }
                    R::HeaderValueMatch {
                        key: key_or(&h.descriptor_key, "header_match"),
                        value: h.descriptor_value.clone(),
                        expect_match: h.expect_match.as_ref().is_none_or(|v| v.value),
                        headers,
                    }
                }
                Some(A::MaskedRemoteAddress(mr)) => {
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
                        v4_len: len(&mr.v4_prefix_mask_len, 32, "v4_prefix_mask_len")?,
                        v6_len: len(&mr.v6_prefix_mask_len, 128, "v6_prefix_mask_len")?,
                    }
                }
                Some(A::QueryParameters(q)) => {
                    if q.query_parameter_name.is_empty() || q.descriptor_key.is_empty() {
                        return Err(ctx.err(
                            format!("{af}.query_parameters"),
                            "query_parameter_name and descriptor_key are required",
                        ));
                    }
                    R::QueryParameter {
                        name: q.query_parameter_name.clone(),
                        key: q.descriptor_key.clone(),
                        skip_if_absent: q.skip_if_absent,
                    }
                }
                Some(A::QueryParameterValueMatch(q)) => {
                    no_default("query_parameter_value_match", &q.default_value)?;
                    let mut matchers = Vec::with_capacity(q.query_parameters.len());
                    for (k, qm) in q.query_parameters.iter().enumerate() {
                        matchers.push(query_parameter_matcher(
                            ctx,
                            &format!("{af}.query_parameter_value_match.query_parameters[{k}]"),
                            qm,
                        )?);
                    }
                    R::QueryParameterValueMatch {
                        key: key_or(&q.descriptor_key, "query_match"),
                        value: q.descriptor_value.clone(),
                        expect_match: q.expect_match.as_ref().is_none_or(|v| v.value),
                        matchers,
                    }
                }
                _ => {
                    return Err(ctx.err(
                        &af,
                        "only remote_address, masked_remote_address, destination_cluster, generic_key, request_headers, query_parameters, header_value_match and query_parameter_value_match actions are supported",
                    ));
                }
            });
        }
        out.push(m::ratelimit::RateLimitPolicy {
            stage: rl.stage.as_ref().map_or(0, |v| v.value),
            actions,
        });
    }
    Ok(out)
}
