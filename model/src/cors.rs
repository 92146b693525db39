//! The settings of a CORS policy (`envoy.extensions.filters.http.cors.v3.CorsPolicy`,
//! or the deprecated inline `cors` of a route or virtual host). The
//! decisions per request live in `ferry-filters`.

use crate::route::{Fraction, StringMatcher};

#[derive(Debug, Default)]
pub struct CorsPolicy {
    /// `allow_origin_string_match`, each with its `ignore_case`.
    pub allow_origins: Vec<(StringMatcher, bool)>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    pub max_age: String,
    pub allow_credentials: Option<bool>,
    pub allow_private_network_access: Option<bool>,
    /// `filter_enabled.default_value`; unset means every request.
    pub filter_enabled: Option<Fraction>,
    /// `shadow_enabled.default_value`; unset means none.
    pub shadow_enabled: Option<Fraction>,
    /// `forward_not_matching_preflights` (default true): a preflight from
    /// an origin that is not allowed goes on to the upstream.
    pub forward_not_matching_preflights: Option<bool>,
}
