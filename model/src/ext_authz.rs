//! `envoy.filters.http.ext_authz`: the configuration of the external
//! authorization filter (the authorizer it asks, over gRPC or plain HTTP,
//! what it sends and what it does with the answer) and its per-route
//! override (`ExtAuthzPerRoute`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::route::{Fraction, HeaderMutations, StringMatcher};

/// One `StringMatcher` over header names, with its `ignore_case`.
#[derive(Debug, Clone)]
pub struct NameMatcher {
    pub matcher: StringMatcher,
    pub ignore_case: bool,
}

/// A `ListStringMatcher` over header names: any pattern matching is a match.
#[derive(Debug, Clone, Default)]
pub struct NameList(pub Vec<NameMatcher>);

impl NameList {
    pub fn matches(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|m| m.matcher.matches(name, m.ignore_case))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `envoy.extensions.filters.http.ext_authz.v3.ExtAuthz`.
#[derive(Debug)]
pub struct ExtAuthz {
    pub service: Service,
    /// The authorizer's answer must come within this (the service's
    /// `timeout`; Envoy's default 200 ms).
    pub timeout: Duration,
    /// `failure_mode_allow`: a failed check lets the request through.
    pub failure_mode_allow: bool,
    /// `failure_mode_allow_header_add`: such a request carries
    /// `x-envoy-auth-failure-mode-allowed: true`.
    pub failure_mode_allow_header_add: bool,
    /// `status_on_error` (403 by default).
    pub status_on_error: http::StatusCode,
    /// `filter_enabled` (every request when unset).
    pub filter_enabled: Option<Fraction>,
    /// `filter_enabled_metadata`: the filter only runs on requests whose
    /// dynamic metadata matches (istiod's CUSTOM shape).
    pub filter_enabled_metadata: Option<crate::rbac::MetadataMatcher>,
    /// `deny_at_disable`: a request the filter is disabled for is answered
    /// with `status_on_error`.
    pub deny_at_disable: bool,
    /// The request headers put in the check (all when `None`), then
    /// without `disallowed_headers`: the top-level `allowed_headers`, or for
    /// an HTTP service its `authorization_request.allowed_headers`, plus
    /// `authorization`, `:method`, `:path` and `:authority`.
    pub allowed_headers: Option<NameList>,
    pub disallowed_headers: NameList,
    /// `include_tls_session`: the SNI goes into the check.
    pub include_tls_session: bool,
    /// `stat_prefix`: the counters are `ext_authz.<prefix>.*`.
    pub stat_prefix: String,
    /// `clear_route_cache`: the route is chosen again when the authorizer
    /// changed the request's headers.
    pub clear_route_cache: bool,
    /// `encode_raw_headers`: the check's headers go into `header_map`.
    pub encode_raw_headers: bool,
    /// `max_denied_response_body_bytes` (0: no limit).
    pub max_denied_response_body_bytes: u32,
    /// `with_request_body`: the request body (its first bytes) goes into
    /// the check.
    pub with_request_body: Option<BufferSettings>,
}

/// `BufferSettings`: how much of the request body the check waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSettings {
    /// `max_request_bytes`: the most body held for the check.
    pub max_request_bytes: u32,
    /// `allow_partial_message`: a longer body is checked on its first
    /// `max_request_bytes` instead of being answered with 413.
    pub allow_partial_message: bool,
    /// `pack_as_bytes`: a gRPC check carries the body in `raw_body`
    /// instead of the UTF-8 `body`.
    pub pack_as_bytes: bool,
}

/// The authorizer.
#[derive(Debug)]
pub enum Service {
    /// `grpc_service.envoy_grpc`: `envoy.service.auth.v3.Authorization/Check`.
    Grpc {
        cluster: String,
        authority: String,
        metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// `http_service`: the request's headers, as allowed, to
    /// `path_prefix` + its path; 200 allows, 5xx is an error, anything else
    /// denies.
    Http(HttpService),
}

/// `http_service`.
#[derive(Debug)]
pub struct HttpService {
    pub cluster: String,
    /// `server_uri.uri`'s authority (the check keeps the request's own
    /// host; this is for logs).
    pub uri: String,
    pub path_prefix: String,
    /// `authorization_request.headers_to_add`.
    pub headers_to_add: HeaderMutations,
    /// `authorization_response.allowed_upstream_headers`: set on the request.
    pub upstream_headers: NameList,
    /// `allowed_upstream_headers_to_append`: added to the request.
    pub upstream_headers_to_append: NameList,
    /// `allowed_client_headers`: on a denial, to the client (all but
    /// `host` when empty).
    pub client_headers: NameList,
    /// `allowed_client_headers_on_success`: added to the response of an
    /// allowed request.
    pub client_headers_on_success: NameList,
}

/// `ExtAuthzPerRoute`.
#[derive(Debug, Clone, Default)]
pub struct ExtAuthzPerRoute {
    /// `disabled`: the route's requests are not checked.
    pub disabled: bool,
    /// `check_settings.context_extensions`, merged from the least to the
    /// most specific level.
    pub context_extensions: BTreeMap<String, String>,
    /// `check_settings.disable_request_body_buffering`: the route's
    /// requests are checked without their body.
    pub disable_request_body_buffering: bool,
    /// `check_settings.with_request_body`: the route's own buffer settings.
    pub with_request_body: Option<BufferSettings>,
}

/// `envoy.extensions.filters.network.ext_authz.v3.ExtAuthz`: a TCP
/// connection is checked on its first bytes; a denial closes it.
#[derive(Debug)]
pub struct NetworkExtAuthz {
    pub stat_prefix: String,
    pub cluster: String,
    pub authority: String,
    pub metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The gRPC service's `timeout` (200 ms by default).
    pub timeout: Duration,
    pub failure_mode_allow: bool,
    /// Matched against the connection's dynamic metadata (the network
    /// RBAC filters' shadow results, istiod's CUSTOM shape).
    pub filter_enabled_metadata: Option<crate::rbac::MetadataMatcher>,
    pub include_tls_session: bool,
}
