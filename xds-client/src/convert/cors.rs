//! `envoy.filters.http.cors`: the filter's per-route `CorsPolicy` and the
//! deprecated inline `cors` of routes and virtual hosts.

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use ferry_model as m;

use super::core_types::{NEVER, fraction, runtime_fraction};
use super::coverage::fields;
use super::matcher::string_matcher;
use super::{ConvertError, Ctx};

fields!(pub(super) static CORS_POLICY = "envoy.extensions.filters.http.cors.v3.CorsPolicy" {
    "allow_origin_string_match": applied,
    "allow_methods": applied,
    "allow_headers": applied,
    "expose_headers": applied,
    "max_age": applied,
    "allow_credentials": applied,
    "filter_enabled": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "shadow_enabled": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "allow_private_network_access": applied,
    "forward_not_matching_preflights": applied,
});

fields!(pub(super) static ROUTE_CORS_POLICY = "envoy.config.route.v3.CorsPolicy" {
    "allow_origin_string_match": applied,
    "allow_methods": applied,
    "allow_headers": applied,
    "expose_headers": applied,
    "max_age": applied,
    "allow_credentials": applied,
    "filter_enabled": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "shadow_enabled": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "allow_private_network_access": applied,
    "forward_not_matching_preflights": applied,
});

pub(super) const CORS_TYPE: &str = "envoy.extensions.filters.http.cors.v3.Cors";

pub(super) const CORS_POLICY_TYPE: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";

pub(super) fn disabled_cors() -> m::cors::CorsPolicy {
    m::cors::CorsPolicy {
        filter_enabled: Some(NEVER),
        ..Default::default()
    }
}

fn origin_matchers(
    ctx: &Ctx<'_>,
    field: &str,
    ms: &[matcher_pb::StringMatcher],
) -> Result<Vec<(m::StringMatcher, bool)>, ConvertError> {
    ms.iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((
                string_matcher(ctx, &format!("{field}.allow_origin_string_match[{i}]"), s)?,
                s.ignore_case,
            ))
        })
        .collect()
}

pub(super) fn cors_policy(
    ctx: &Ctx<'_>,
    field: &str,
    p: &cors_pb::CorsPolicy,
) -> Result<m::cors::CorsPolicy, ConvertError> {
    let cors_pb::CorsPolicy {
        allow_origin_string_match,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        filter_enabled,
        shadow_enabled,
        allow_private_network_access,
        forward_not_matching_preflights,
    } = p;
    Ok(m::cors::CorsPolicy {
        allow_origins: origin_matchers(ctx, field, allow_origin_string_match)?,
        allow_methods: allow_methods.clone(),
        allow_headers: allow_headers.clone(),
        expose_headers: expose_headers.clone(),
        max_age: max_age.clone(),
        allow_credentials: allow_credentials.as_ref().map(|v| v.value),
        allow_private_network_access: allow_private_network_access.as_ref().map(|v| v.value),
        filter_enabled: runtime_fraction(filter_enabled),
        shadow_enabled: runtime_fraction(shadow_enabled),
        forward_not_matching_preflights: forward_not_matching_preflights.as_ref().map(|v| v.value),
    })
}

/// The deprecated `cors` of a route action or virtual host.
pub(super) fn inline_cors(
    ctx: &Ctx<'_>,
    field: &str,
    p: &route_pb::CorsPolicy,
) -> Result<m::cors::CorsPolicy, ConvertError> {
    use route_pb::cors_policy::EnabledSpecifier;
    let route_pb::CorsPolicy {
        allow_origin_string_match,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        shadow_enabled,
        allow_private_network_access,
        forward_not_matching_preflights,
        enabled_specifier,
    } = p;
    Ok(m::cors::CorsPolicy {
        allow_origins: origin_matchers(ctx, field, allow_origin_string_match)?,
        allow_methods: allow_methods.clone(),
        allow_headers: allow_headers.clone(),
        expose_headers: expose_headers.clone(),
        max_age: max_age.clone(),
        allow_credentials: allow_credentials.as_ref().map(|v| v.value),
        allow_private_network_access: allow_private_network_access.as_ref().map(|v| v.value),
        filter_enabled: enabled_specifier
            .as_ref()
            .map(|EnabledSpecifier::FilterEnabled(f)| fraction(&f.default_value)),
        shadow_enabled: runtime_fraction(shadow_enabled),
        forward_not_matching_preflights: forward_not_matching_preflights.as_ref().map(|v| v.value),
    })
}
