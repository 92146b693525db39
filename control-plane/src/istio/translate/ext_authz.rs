//! The CUSTOM action of AuthorizationPolicy, as istiod builds it: an RBAC
//! filter that only evaluates (its matching rules are shadow rules whose
//! names start with `istio-ext-authz-PROVIDER`) followed by an `ext_authz`
//! filter enabled by that shadow result in the dynamic metadata, so the
//! external authorizer (a MeshConfig extension provider) is only asked
//! about the requests the policy selects. A provider that cannot be used
//! (unknown, invalid, or several providers on one workload) turns the
//! policies into a DENY filter instead, failing closed.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    ApiVersion, GrpcService, HeaderValue, HttpUri,
    grpc_service::{EnvoyGrpc, TargetSpecifier},
    http_uri::HttpUpstreamType,
};
use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::config::rbac::v3::{Rbac as RbacRules, rbac::Action as RbacAction};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    AuthorizationRequest, AuthorizationResponse, BufferSettings, ExtAuthz as HttpExtAuthz,
    HttpService, ext_authz::Services,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz as NetworkExtAuthz;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListStringMatcher, MetadataMatcher, StringMatcher, ValueMatcher, metadata_matcher,
    string_matcher::MatchPattern, value_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};

use super::Mesh;
use super::authz::{Built, HTTP_RBAC, NETWORK_RBAC, PolicyRef, TCP_STAT_PREFIX, build};
use super::listener::{http_filter, typed_filter};
use super::util::{any, duration, seconds};
use crate::istio::names;
use crate::istio::types::mesh::{ExtAuthzGrpc, ExtAuthzHttp, ExtensionProvider, RequestBody};

pub const HTTP_EXT_AUTHZ: &str = "envoy.filters.http.ext_authz";
pub const NETWORK_EXT_AUTHZ: &str = "envoy.filters.network.ext_authz";
const SHADOW_PREFIX: &str = "istio_ext_authz_";
const MATCH_PREFIX: &str = "istio-ext-authz";
const BAD_SUFFIX: &str = "-deny-due-to-bad-CUSTOM-action";

/// Why an extension provider cannot serve a CUSTOM policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    #[error("extension provider {0:?} is not defined in meshConfig.extensionProviders")]
    Unknown(String),
    #[error("extension provider {0:?} is not an envoyExtAuthzHttp or envoyExtAuthzGrpc provider")]
    Unsupported(String),
    #[error("extension provider {name:?}: port must be in [1, 65535], found {port}")]
    Port { name: String, port: u32 },
    #[error("extension provider {name:?}: service {service:?} not found")]
    Service { name: String, service: String },
    #[error("extension provider {name:?}: unsupported statusOnError {status:?}")]
    Status { name: String, status: String },
    #[error("extension provider {name:?}: pathPrefix must begin with '/', found {path:?}")]
    PathPrefix { name: String, path: String },
}

/// A provider turned into filter configs; `tcp` only for gRPC providers.
struct Resolved {
    http: HttpExtAuthz,
    tcp: Option<NetworkExtAuthz>,
}

/// The CUSTOM policies of one proxy by provider name, sorted.
fn by_provider<'a>(custom: &[PolicyRef<'a>]) -> BTreeMap<String, Vec<PolicyRef<'a>>> {
    let mut out: BTreeMap<String, Vec<PolicyRef<'a>>> = BTreeMap::new();
    for p in custom {
        let name = p
            .spec
            .provider
            .as_ref()
            .map(|pr| pr.name.clone())
            .unwrap_or_default();
        out.entry(name).or_default().push(*p);
    }
    out
}

/// DENY rules standing in for policies whose provider is unusable.
fn bad_rules(built: &Built) -> RbacRules {
    let mut rbac = RbacRules {
        action: RbacAction::Deny as i32,
        ..Default::default()
    };
    if let Some(rules) = &built.rules {
        for (k, v) in &rules.policies {
            rbac.policies.insert(format!("{k}{BAD_SUFFIX}"), v.clone());
        }
    }
    rbac
}

/// The filters for `custom` policies on an HTTP chain.
pub(super) fn http_filters(
    mesh: &Mesh,
    custom: &[PolicyRef<'_>],
    tds: &[String],
) -> Vec<HttpFilter> {
    let groups = by_provider(custom);
    let several = groups.len() > 1;
    let mut out = Vec::new();
    for (provider, policies) in &groups {
        let Some(built) = build(policies, RbacAction::Deny, false, tds, Some(provider)) else {
            continue;
        };
        let resolved = if several {
            None
        } else {
            match resolve(mesh, provider) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(authz.provider = %provider, error = %e, "CUSTOM policies deny instead");
                    None
                }
            }
        };
        let Some(mut resolved) = resolved else {
            let cfg = HttpRbac {
                rules: Some(bad_rules(&built)),
                ..Default::default()
            };
            out.push(http_filter(HTTP_RBAC, any(&cfg)));
            continue;
        };
        resolved.http.filter_enabled_metadata = Some(enabled_by(HTTP_RBAC, provider));
        out.push(http_filter(HTTP_RBAC, any(&evaluate_only_http(built))));
        out.push(http_filter(HTTP_EXT_AUTHZ, any(&resolved.http)));
    }
    out
}

/// The filters for `custom` policies on a TCP chain; HTTP providers have
/// nothing to say there.
pub(super) fn network_filters(
    mesh: &Mesh,
    custom: &[PolicyRef<'_>],
    tds: &[String],
) -> Vec<Filter> {
    let groups = by_provider(custom);
    let several = groups.len() > 1;
    let mut out = Vec::new();
    for (provider, policies) in &groups {
        let Some(built) = build(policies, RbacAction::Deny, true, tds, Some(provider)) else {
            continue;
        };
        let resolved = if several {
            None
        } else {
            resolve(mesh, provider).ok()
        };
        let Some(resolved) = resolved else {
            let cfg = NetworkRbac {
                rules: Some(bad_rules(&built)),
                stat_prefix: TCP_STAT_PREFIX.into(),
                ..Default::default()
            };
            out.push(typed_filter(NETWORK_RBAC, any(&cfg)));
            continue;
        };
        let Some(mut tcp) = resolved.tcp else {
            continue;
        };
        tcp.filter_enabled_metadata = Some(enabled_by(NETWORK_RBAC, provider));
        let (rules, shadow) = split(built);
        let cfg = NetworkRbac {
            rules,
            shadow_rules: shadow,
            stat_prefix: TCP_STAT_PREFIX.into(),
            shadow_rules_stat_prefix: SHADOW_PREFIX.into(),
            ..Default::default()
        };
        out.push(typed_filter(NETWORK_RBAC, any(&cfg)));
        out.push(typed_filter(NETWORK_EXT_AUTHZ, any(&tcp)));
    }
    out
}

/// Enforced CUSTOM policies become shadow rules (they only mark requests
/// for the authorizer); dry-run ones land in the rules, as istiod has it.
fn split(built: Built) -> (Option<RbacRules>, Option<RbacRules>) {
    let rules = built.shadow.filter(|s| !s.policies.is_empty());
    (rules, built.rules)
}

fn evaluate_only_http(built: Built) -> HttpRbac {
    let (rules, shadow) = split(built);
    HttpRbac {
        rules,
        shadow_rules: shadow,
        shadow_rules_stat_prefix: SHADOW_PREFIX.into(),
        ..Default::default()
    }
}

/// Enables `ext_authz` when the RBAC filter `filter` recorded a shadow
/// match of one of `provider`'s policies.
fn enabled_by(filter: &str, provider: &str) -> MetadataMatcher {
    MetadataMatcher {
        filter: filter.into(),
        path: vec![metadata_matcher::PathSegment {
            segment: Some(metadata_matcher::path_segment::Segment::Key(format!(
                "{SHADOW_PREFIX}shadow_effective_policy_id"
            ))),
        }],
        value: Some(ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Prefix(format!("{MATCH_PREFIX}-{provider}"))),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

fn resolve(mesh: &Mesh, name: &str) -> Result<Resolved, ProviderError> {
    let p: &ExtensionProvider = mesh
        .options
        .extension_providers
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ProviderError::Unknown(name.into()))?;
    if let Some(h) = &p.envoy_ext_authz_http {
        return http_provider(mesh, name, h);
    }
    if let Some(g) = &p.envoy_ext_authz_grpc {
        return grpc_provider(mesh, name, g);
    }
    Err(ProviderError::Unsupported(name.into()))
}

/// Checks a provider's port and finds its service: `namespace/host` or a
/// bare host name, fully qualified; returns the host and its outbound
/// cluster.
pub(super) fn target(
    mesh: &Mesh,
    name: &str,
    service: &str,
    port: u32,
) -> Result<(String, String), ProviderError> {
    if !(1..=65535).contains(&port) {
        return Err(ProviderError::Port {
            name: name.into(),
            port,
        });
    }
    let not_found = || ProviderError::Service {
        name: name.into(),
        service: service.into(),
    };
    let (ns, host) = match service.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, service),
    };
    let svc = mesh
        .registry
        .services
        .iter()
        // istiod looks the host name up as written: a short name is not
        // resolved.
        .find(|s| ns.is_none_or(|n| n == s.namespace) && s.host == host)
        .ok_or_else(not_found)?;
    Ok((
        svc.host.clone(),
        names::outbound_cluster(port, "", &svc.host),
    ))
}

fn status(name: &str, s: &str) -> Result<Option<HttpStatus>, ProviderError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || ProviderError::Status {
        name: name.into(),
        status: s.into(),
    };
    let code: i32 = s.parse().map_err(|_| bad())?;
    StatusCode::try_from(code).map_err(|_| bad())?;
    Ok(Some(HttpStatus { code }))
}

fn body(b: &Option<RequestBody>) -> Option<BufferSettings> {
    b.as_ref().map(|b| BufferSettings {
        max_request_bytes: b.max_request_bytes,
        allow_partial_message: b.allow_partial_message,
        pack_as_bytes: b.pack_as_bytes,
    })
}

fn timeout(
    t: &Option<crate::istio::types::Duration>,
) -> envoy_types::pb::google::protobuf::Duration {
    // Required by Envoy; istiod's placeholder lets a DestinationRule's
    // timeout govern.
    t.map_or_else(|| seconds(600), |d| duration(d.0))
}

/// Header names in Istio's syntax (`x-prefix-*`, `*-suffix`, exact),
/// matched case-insensitively.
fn headers(list: &[String]) -> Option<ListStringMatcher> {
    if list.is_empty() {
        return None;
    }
    let patterns = list
        .iter()
        .map(|h| {
            let p = if let Some(rest) = h.strip_suffix('*').filter(|r| !r.is_empty()) {
                MatchPattern::Prefix(rest.into())
            } else if let Some(rest) = h.strip_prefix('*').filter(|r| !r.is_empty()) {
                MatchPattern::Suffix(rest.into())
            } else {
                MatchPattern::Exact(h.clone())
            };
            StringMatcher {
                ignore_case: true,
                match_pattern: Some(p),
            }
        })
        .collect();
    Some(ListStringMatcher { patterns })
}

fn http_provider(mesh: &Mesh, name: &str, h: &ExtAuthzHttp) -> Result<Resolved, ProviderError> {
    let (host, cluster) = target(mesh, name, &h.service, h.port)?;
    let status_on_error = status(name, &h.status_on_error)?;
    if !h.path_prefix.is_empty() && !h.path_prefix.starts_with('/') {
        return Err(ProviderError::PathPrefix {
            name: name.into(),
            path: h.path_prefix.clone(),
        });
    }
    let request_headers = if h.include_request_headers_in_check.is_empty() {
        &h.include_headers_in_check
    } else {
        &h.include_request_headers_in_check
    };
    let headers_to_add: Vec<HeaderValue> = h
        .include_additional_headers_in_check
        .iter()
        .map(|(k, v)| HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        })
        .collect();
    let authorization_request = (!headers_to_add.is_empty()).then(|| AuthorizationRequest {
        headers_to_add,
        ..Default::default()
    });
    let response = AuthorizationResponse {
        allowed_upstream_headers: headers(&h.headers_to_upstream_on_allow),
        allowed_client_headers: headers(&h.headers_to_downstream_on_deny),
        allowed_client_headers_on_success: headers(&h.headers_to_downstream_on_allow),
        ..Default::default()
    };
    let authorization_response = (response != AuthorizationResponse::default()).then_some(response);
    let service = HttpService {
        server_uri: Some(HttpUri {
            uri: format!("http://{host}"),
            timeout: Some(timeout(&h.timeout)),
            http_upstream_type: Some(HttpUpstreamType::Cluster(cluster)),
        }),
        path_prefix: h.path_prefix.clone(),
        authorization_request,
        authorization_response,
        ..Default::default()
    };
    let http = HttpExtAuthz {
        status_on_error,
        failure_mode_allow: h.fail_open,
        transport_api_version: ApiVersion::V3 as i32,
        with_request_body: body(&h.include_request_body_in_check),
        allowed_headers: headers(request_headers),
        services: Some(Services::HttpService(service)),
        ..Default::default()
    };
    Ok(Resolved { http, tcp: None })
}

fn grpc_provider(mesh: &Mesh, name: &str, g: &ExtAuthzGrpc) -> Result<Resolved, ProviderError> {
    let (host, cluster) = target(mesh, name, &g.service, g.port)?;
    let status_on_error = status(name, &g.status_on_error)?;
    let grpc = GrpcService {
        target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
            cluster_name: cluster,
            authority: host,
            ..Default::default()
        })),
        timeout: Some(timeout(&g.timeout)),
        ..Default::default()
    };
    let http = HttpExtAuthz {
        status_on_error,
        failure_mode_allow: g.fail_open,
        transport_api_version: ApiVersion::V3 as i32,
        with_request_body: body(&g.include_request_body_in_check),
        services: Some(Services::GrpcService(grpc.clone())),
        ..Default::default()
    };
    let tcp = NetworkExtAuthz {
        stat_prefix: TCP_STAT_PREFIX.into(),
        failure_mode_allow: g.fail_open,
        transport_api_version: ApiVersion::V3 as i32,
        grpc_service: Some(grpc),
        ..Default::default()
    };
    Ok(Resolved {
        http,
        tcp: Some(tcp),
    })
}

/// Checks every provider the way CUSTOM translation would use it, for
/// `analyze`.
pub fn check_provider(mesh: &Mesh, name: &str) -> Result<(), ProviderError> {
    resolve(mesh, name).map(|_| ())
}
