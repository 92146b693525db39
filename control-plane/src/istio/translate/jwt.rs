//! RequestAuthentication → `envoy.filters.http.jwt_authn`, laid out as
//! istiod lays it out: the rules of every RequestAuthentication selecting a
//! proxy (root namespace, own namespace, `selector` or a Gateway
//! `targetRef`) sorted by issuer become providers `origins-0`, `origins-1`
//! …, each with its issuer, audiences, token locations, a local JWKS and
//! the payload in the dynamic metadata under `payload` (where the RBAC
//! matchers of `requestPrincipals` and `request.auth.claims` look). One
//! rule on `/` requires any provider or none (`allow_missing`): a request
//! without a token passes and only an AuthorizationPolicy can stop it,
//! while an invalid token gets Envoy's 401.
//!
//! A `jwksUri` is fetched here, as istiod does, and the JWKS inlined. The
//! fetch is an HTTP/1.1 GET with hyper (tokio-rustls and the system roots
//! for `https`), cached by URI; when it fails the provider
//! gets a JWKS whose private key nobody holds (istiod's fallback), so
//! every token of that issuer is refused until a later translation
//! succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match::PathSpecifier};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtClaimToHeader, JwtHeader, JwtProvider, JwtRequirement,
    JwtRequirementAndList, JwtRequirementOrList, RequirementRule, jwt_provider,
    jwt_requirement::RequiresType, requirement_rule,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::google::protobuf::Empty;

use super::listener::http_filter;
use super::registry::selects;
use super::util::any;
use super::{Mesh, Proxy};
use crate::istio::source::Spec;
use crate::istio::types::security::{JwtRule, RequestAuthentication};

pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// The metadata key istiod stores the verified payload under.
const PAYLOAD_KEY: &str = "payload";
/// `targetRef` of kind Gateway selects the deployment with this label.
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// istiod's default fetch timeout (`jwtRules[].timeout`).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed fetch is remembered before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a fetched JWKS is used before it is fetched again (istiod's
/// default refresh interval); a failed refresh keeps the old one.
const REFRESH_AFTER: Duration = Duration::from_secs(20 * 60);
/// Upper bound of a JWKS document.
const MAX_JWKS_BYTES: usize = 1 << 20;

impl Mesh {
    /// The JWT filter for `proxy`, `None` when no RequestAuthentication
    /// selects it.
    pub fn jwt_http_filter(&self, proxy: &Proxy) -> Option<HttpFilter> {
        let mut rules: Vec<&JwtRule> = Vec::new();
        for r in &self.request_authentications {
            let Spec::RequestAuthentication(ra) = &r.spec else {
                continue;
            };
            if self.request_authn_selects(&r.meta.namespace, ra, proxy) {
                rules.extend(&ra.jwt_rules);
            }
        }
        if rules.is_empty() {
            return None;
        }
        // istiod sorts by issuer so the configuration is deterministic.
        rules.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        Some(http_filter(JWT_FILTER, any(&jwt_config(&rules))))
    }

    fn request_authn_selects(&self, ns: &str, ra: &RequestAuthentication, proxy: &Proxy) -> bool {
        let root = ns == self.options.root_namespace;
        if ns != proxy.namespace && !root {
            return false;
        }
        let refs: Vec<_> = ra.target_ref.iter().chain(&ra.target_refs).collect();
        if !refs.is_empty() {
            return refs.iter().any(|t| {
                t.kind == "Gateway"
                    && ns == proxy.namespace
                    && t.namespace.as_deref().unwrap_or(ns) == proxy.namespace
                    && proxy
                        .labels
                        .get(GATEWAY_NAME_LABEL)
                        .is_some_and(|n| *n == t.name)
            });
        }
        ra.selector
            .as_ref()
            .is_none_or(|s| selects(&s.match_labels, &proxy.labels))
    }
}

fn provider_name(i: usize) -> String {
    format!("origins-{i}")
}

fn by_name(name: String) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(RequiresType::ProviderName(name)),
    }
}

fn any_of(requirements: Vec<JwtRequirement>) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(RequiresType::RequiresAny(JwtRequirementOrList {
            requirements,
        })),
    }
}

/// The filter configuration of `rules` (already in issuer order).
fn jwt_config(rules: &[&JwtRule]) -> JwtAuthentication {
    let mut providers = HashMap::new();
    // Per provider: its token or none. ANDed when there are several, so a
    // token that is present must be valid for its issuer.
    let mut each_or_missing = Vec::new();
    // Any provider alone: when providers share a location, a token of one
    // issuer fails the others' requirement above.
    let mut any_provider = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let name = provider_name(i);
        providers.insert(name.clone(), provider(rule));
        each_or_missing.push(any_of(vec![
            by_name(name.clone()),
            JwtRequirement {
                requires_type: Some(RequiresType::AllowMissing(Empty {})),
            },
        ]));
        any_provider.push(by_name(name));
    }
    let requires = if each_or_missing.len() == 1 {
        each_or_missing.remove(0)
    } else {
        any_provider.push(JwtRequirement {
            requires_type: Some(RequiresType::RequiresAll(JwtRequirementAndList {
                requirements: each_or_missing,
            })),
        });
        any_of(any_provider)
    };
    JwtAuthentication {
        providers,
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(requires)),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    }
}

fn provider(rule: &JwtRule) -> JwtProvider {
    let jwks = match (&rule.jwks, &rule.jwks_uri) {
        (Some(inline), _) if !inline.is_empty() => inline.clone(),
        (_, Some(uri)) if !uri.is_empty() => {
            let timeout = rule
                .timeout
                .as_ref()
                .map(|d| d.0)
                .filter(|d| !d.is_zero())
                .unwrap_or(FETCH_TIMEOUT);
            jwks_for(uri, &rule.issuer, timeout)
        }
        _ => {
            // As istiod: the issuer's OpenID configuration names the JWKS.
            let timeout = rule
                .timeout
                .as_ref()
                .map(|d| d.0)
                .filter(|d| !d.is_zero())
                .unwrap_or(FETCH_TIMEOUT);
            match blocking(|| discover_jwks_uri(&rule.issuer, timeout)) {
                Ok(uri) => jwks_for(&uri, &rule.issuer, timeout),
                Err(e) => {
                    tracing::warn!(jwt.issuer = %rule.issuer, error = %e,
                        "jwtRule has neither jwks nor jwksUri and its issuer's OpenID configuration gives none; its tokens are refused");
                    fake_jwks().to_string()
                }
            }
        }
    };
    let mut space_delimited: Vec<String> = rule.space_delimited_claims.clone();
    for c in ["permission", "scope"] {
        if !space_delimited.iter().any(|x| x == c) {
            space_delimited.push(c.into());
        }
    }
    space_delimited.sort();
    space_delimited.dedup();
    JwtProvider {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        forward: rule.forward_original_token,
        forward_payload_header: rule.output_payload_to_header.clone().unwrap_or_default(),
        payload_in_metadata: PAYLOAD_KEY.into(),
        normalize_payload_in_metadata: Some(jwt_provider::NormalizePayload {
            space_delimited_claims: space_delimited,
        }),
        claim_to_headers: rule
            .output_claim_to_headers
            .iter()
            .map(|c| JwtClaimToHeader {
                header_name: c.header.clone(),
                claim_name: c.claim.clone(),
                ..Default::default()
            })
            .collect(),
        from_headers: rule
            .from_headers
            .iter()
            .map(|h| JwtHeader {
                name: h.name.clone(),
                value_prefix: h.prefix.clone().unwrap_or_default(),
            })
            .collect(),
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(jwks)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

// ------------------------------------------------------------------------------ JWKS

/// Fetched JWKS by URI: the text and when it was fetched, or when a
/// fetch failed.
enum Cached {
    Jwks(String, Instant),
    Failed(Instant),
}

fn cache() -> &'static Mutex<HashMap<String, Cached>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Cached>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The JWKS at `uri` (fetched once, then from the cache), or istiod's
/// fallback when it cannot be had.
fn jwks_for(uri: &str, issuer: &str, timeout: Duration) -> String {
    let stale = {
        let c = cache().lock().unwrap_or_else(|p| p.into_inner());
        match c.get(uri) {
            Some(Cached::Jwks(text, at)) if at.elapsed() < REFRESH_AFTER => return text.clone(),
            Some(Cached::Jwks(text, _)) => Some(text.clone()),
            Some(Cached::Failed(at)) if at.elapsed() < RETRY_AFTER => {
                return fake_jwks().to_string();
            }
            _ => None,
        }
    };
    let (entry, text) = match blocking(|| fetch(uri, timeout)) {
        Ok(text) => (Cached::Jwks(text.clone(), Instant::now()), text),
        Err(e) if stale.is_some() => {
            tracing::warn!(jwt.issuer = %issuer, jwt.jwks_uri = %uri, error = %e,
                "cannot refresh the JWKS; the last one stays in use");
            let text = stale.unwrap_or_default();
            (Cached::Jwks(text.clone(), Instant::now()), text)
        }
        Err(e) => {
            tracing::warn!(jwt.issuer = %issuer, jwt.jwks_uri = %uri, error = %e,
                "cannot fetch the JWKS; tokens of this issuer are refused until it can be fetched");
            (Cached::Failed(Instant::now()), fake_jwks().to_string())
        }
    };
    cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uri.to_string(), entry);
    text
}

/// Runs a blocking fetch; on a multi-threaded tokio runtime the worker
/// hands its other tasks over first, so other proxies' streams are not held
/// up by a slow JWKS server.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The `jwks_uri` of `issuer`'s OpenID configuration
/// (`<issuer>/.well-known/openid-configuration`).
fn discover_jwks_uri(issuer: &str, timeout: Duration) -> Result<String, FetchError> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let doc = get(&url, timeout, None)?;
    serde_json::from_str::<serde_json::Value>(&doc)
        .ok()
        .and_then(|v| v.get("jwks_uri")?.as_str().map(str::to_string))
        .ok_or(FetchError::NotJwks(url))
}

/// Why a JWKS could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: only http:// and https:// URIs can be fetched")]
    Scheme(String),
    #[error("{uri}: TLS: {message}")]
    Tls { uri: String, message: String },
    #[error("{0}: malformed URI")]
    Uri(String),
    #[error("{uri}: {source}")]
    Io { uri: String, source: std::io::Error },
    #[error("{uri}: answered {status}")]
    Status { uri: String, status: String },
    #[error("{0}: the answer is not a JWKS")]
    NotJwks(String),
}

/// GET `uri` (`http://` or `https://`) within `timeout`; `https` is
/// verified against the system's root certificates.
pub fn fetch(uri: &str, timeout: Duration) -> Result<String, FetchError> {
    fetch_with(uri, timeout, None)
}

/// [`fetch`], with `https` verified by `roots` instead of the system's.
fn fetch_with(
    uri: &str,
    timeout: Duration,
    roots: Option<Arc<rustls::ClientConfig>>,
) -> Result<String, FetchError> {
    let body = get(uri, timeout, roots)?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|_| FetchError::NotJwks(uri.into()))?;
    if !v.get("keys").is_some_and(|k| k.is_array()) {
        return Err(FetchError::NotJwks(uri.into()));
    }
    Ok(body)
}

/// The body of a 200 answer to GET `uri`. Translation is synchronous and
/// may run on any runtime (or none), so the request runs on a
/// current-thread runtime of its own, on a thread of its own; fetches are
/// rare (cached for minutes).
fn get(
    uri: &str,
    timeout: Duration,
    roots: Option<Arc<rustls::ClientConfig>>,
) -> Result<String, FetchError> {
    let tls = if uri.starts_with("http://") {
        false
    } else if uri.starts_with("https://") {
        true
    } else {
        return Err(FetchError::Scheme(uri.into()));
    };
    let parsed: http::Uri = uri.parse().map_err(|_| FetchError::Uri(uri.into()))?;
    let Some(authority) = parsed.authority().filter(|a| !a.host().is_empty()) else {
        return Err(FetchError::Uri(uri.into()));
    };
    // `[v6]` without its brackets, for the connection and the TLS name.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tls = if tls {
        let config = match roots {
            Some(c) => c,
            None => tls_config()?,
        };
        Some((config, server_name(uri, &host)?))
    } else {
        None
    };
    let request = http::Request::get(
        parsed
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str),
    )
    .header(http::header::HOST, authority.as_str())
    .header(http::header::ACCEPT, "application/json")
    .header(http::header::USER_AGENT, "ferry-pilot")
    .body(http_body_util::Empty::<bytes::Bytes>::new())
    .map_err(|_| FetchError::Uri(uri.into()))?;
    let io = |source| FetchError::Io {
        uri: uri.into(),
        source,
    };
    let answer = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    tokio::time::timeout(timeout, exchange(&host, port, tls, request))
                        .await
                        .unwrap_or_else(|_| {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no answer in time",
                            ))
                        })
                })
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the fetch thread failed")))
    })
    .map_err(io)?;
    let (status, body) = answer;
    if status != http::StatusCode::OK {
        return Err(FetchError::Status {
            uri: uri.into(),
            status: status.to_string(),
        });
    }
    String::from_utf8(body).map_err(|_| FetchError::NotJwks(uri.into()))
}

/// Connects (TLS when `tls` says so), sends `request` over HTTP/1.1 and
/// reads the answer's status and body (bounded).
async fn exchange(
    host: &str,
    port: u16,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    request: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> std::io::Result<(http::StatusCode, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    match tls {
        Some((config, name)) => {
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            send(hyper_util::rt::TokioIo::new(stream), request).await
        }
        None => send(hyper_util::rt::TokioIo::new(tcp), request).await,
    }
}

async fn send<S>(
    io: S,
    request: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> std::io::Result<(http::StatusCode, Vec<u8>)>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

fn server_name(
    uri: &str,
    host: &str,
) -> Result<rustls::pki_types::ServerName<'static>, FetchError> {
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| FetchError::Uri(uri.into()))
}

/// The client configuration for `https` JWKS URIs: ring, the system's
/// root certificates (loaded once).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, FetchError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err("no system root certificates were found".to_string());
            }
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|message| FetchError::Tls {
            uri: "https".into(),
            message,
        })
}

/// A JWKS with one P-256 public key whose private half was thrown away as
/// soon as it was made: no token verifies against it.
fn fake_jwks() -> &'static str {
    static FAKE: OnceLock<String> = OnceLock::new();
    FAKE.get_or_init(|| {
        let raw = rcgen::KeyPair::generate()
            .map(|k| k.public_key_raw().to_vec())
            .unwrap_or_default();
        // An uncompressed point (65 bytes); key generation with ring does
        // not fail in practice, and a short answer leaves empty coordinates.
        let (x, y) = if raw.len() == 65 {
            (b64url(&raw[1..33]), b64url(&raw[33..]))
        } else {
            (String::new(), String::new())
        };
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "ferry-unfetched",
            "alg": "ES256", "x": x, "y": y}]})
        .to_string()
    })
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::source::parse_documents;
    use crate::istio::translate::MeshOptions;
    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#;

    fn mesh(yaml: &str) -> Mesh {
        let snap = parse_documents(yaml, std::path::Path::new("test.yaml"));
        Mesh::new(&snap, MeshOptions::default())
    }

    fn proxy(ns: &str, labels: &[(&str, &str)]) -> Proxy {
        Proxy {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    fn config(f: &HttpFilter) -> JwtAuthentication {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
        use prost::Message;
        let Some(ConfigType::TypedConfig(a)) = &f.config_type else {
            panic!("typed config")
        };
        JwtAuthentication::decode(a.value.as_slice()).expect("decode")
    }

    fn ra(ns: &str, name: &str, extra: &str, rules: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{extra}  jwtRules:\n{rules}---\n"
        )
    }

    #[test]
    fn selection_follows_namespaces_selectors_and_gateway_refs() {
        let rule = |iss: &str| format!("  - issuer: {iss}\n    jwks: '{JWKS}'\n");
        let yaml = [
            ra("istio-system", "mesh-wide", "", &rule("root.example")),
            ra("foo", "ns-wide", "", &rule("ns.example")),
            ra(
                "foo",
                "httpbin-only",
                "  selector: {matchLabels: {app: httpbin}}\n",
                &rule("httpbin.example"),
            ),
            ra(
                "foo",
                "gw",
                "  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: web}\n",
                &rule("gw.example"),
            ),
        ]
        .concat();
        let m = mesh(&yaml);
        let issuers = |p: &Proxy| -> Vec<String> {
            m.jwt_http_filter(p).map_or_else(Vec::new, |f| {
                let c = config(&f);
                let mut v: Vec<(String, String)> = c
                    .providers
                    .iter()
                    .map(|(n, p)| (n.clone(), p.issuer.clone()))
                    .collect();
                v.sort();
                v.into_iter().map(|(_, i)| i).collect()
            })
        };
        assert_eq!(
            issuers(&proxy("foo", &[("app", "httpbin")])),
            ["httpbin.example", "ns.example", "root.example"]
        );
        assert_eq!(
            issuers(&proxy("foo", &[("app", "sleep")])),
            ["ns.example", "root.example"]
        );
        assert_eq!(issuers(&proxy("bar", &[])), ["root.example"]);
        // A targetRef policy selects only the Gateway's deployment.
        assert_eq!(
            issuers(&proxy("foo", &[(GATEWAY_NAME_LABEL, "web")])),
            ["gw.example", "ns.example", "root.example"]
        );
    }

    #[test]
    fn istiods_requirement_shapes_and_provider_fields() {
        let one = mesh(&ra(
            "foo",
            "one",
            "",
            &format!(
                "  - issuer: a.example\n    jwks: '{JWKS}'\n    audiences: [x]\n    fromHeaders: [{{name: x-jwt, prefix: 'T '}}]\n    fromParams: [tok]\n    fromCookies: [c]\n    outputPayloadToHeader: x-payload\n    outputClaimToHeaders: [{{header: x-sub, claim: sub}}]\n    forwardOriginalToken: true\n    spaceDelimitedClaims: [roles]\n"
            ),
        ));
        let c = config(&one.jwt_http_filter(&proxy("foo", &[])).expect("filter"));
        assert!(c.bypass_cors_preflight);
        let p = &c.providers["origins-0"];
        assert_eq!(p.issuer, "a.example");
        assert_eq!(p.audiences, ["x"]);
        assert_eq!(p.payload_in_metadata, "payload");
        assert!(p.forward);
        assert_eq!(p.forward_payload_header, "x-payload");
        assert_eq!(p.from_headers[0].name, "x-jwt");
        assert_eq!(p.from_headers[0].value_prefix, "T ");
        assert_eq!(
            (p.from_params.as_slice(), p.from_cookies.as_slice()),
            (&["tok".to_string()][..], &["c".to_string()][..])
        );
        assert_eq!(p.claim_to_headers[0].header_name, "x-sub");
        assert_eq!(
            p.normalize_payload_in_metadata
                .as_ref()
                .expect("normalize")
                .space_delimited_claims,
            ["permission", "roles", "scope"]
        );
        let Some(jwt_provider::JwksSourceSpecifier::LocalJwks(d)) = &p.jwks_source_specifier else {
            panic!("local jwks")
        };
        assert_eq!(
            d.specifier,
            Some(data_source::Specifier::InlineString(JWKS.into()))
        );
        let requires = |c: &JwtAuthentication| match &c.rules[0].requirement_type {
            Some(requirement_rule::RequirementType::Requires(r)) => r.clone(),
            _ => panic!("requires"),
        };
        let or_missing = |n: &str| {
            any_of(vec![
                by_name(n.into()),
                JwtRequirement {
                    requires_type: Some(RequiresType::AllowMissing(Empty {})),
                },
            ])
        };
        assert_eq!(requires(&c), or_missing("origins-0"));
        // Two rules: sorted by issuer; any provider, or each provider's token or none.
        let two = mesh(&ra(
            "foo",
            "two",
            "",
            &format!(
                "  - issuer: z.example\n    jwks: '{JWKS}'\n  - issuer: b.example\n    jwks: '{JWKS}'\n"
            ),
        ));
        let c = config(&two.jwt_http_filter(&proxy("foo", &[])).expect("filter"));
        assert_eq!(c.providers["origins-0"].issuer, "b.example");
        assert_eq!(c.providers["origins-1"].issuer, "z.example");
        assert_eq!(
            requires(&c),
            any_of(vec![
                by_name("origins-0".into()),
                by_name("origins-1".into()),
                JwtRequirement {
                    requires_type: Some(RequiresType::RequiresAll(JwtRequirementAndList {
                        requirements: vec![or_missing("origins-0"), or_missing("origins-1")],
                    })),
                },
            ])
        );
    }

    /// A JWKS served over TLS by a certificate for `localhost` from a CA
    /// made here, fetched with that CA as the only root.
    #[test]
    fn https_jwks_uri_is_verified_and_fetched() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use std::sync::Arc;
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("server config");
        let server = Arc::new(server);
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                let Ok(conn) = rustls::ServerConnection::new(server.clone()) else {
                    continue;
                };
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 2048];
                if s.read(&mut buf).is_err() {
                    continue;
                }
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{JWKS}",
                    JWKS.len()
                );
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("root");
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let uri = format!("https://localhost:{port}/jwks");
        assert_eq!(
            fetch_with(&uri, FETCH_TIMEOUT, Some(client.clone())).expect("fetched"),
            JWKS
        );
        // Another name than the certificate's is refused.
        let wrong = format!("https://127.0.0.1:{port}/jwks");
        assert!(matches!(
            fetch_with(&wrong, FETCH_TIMEOUT, Some(client)),
            Err(FetchError::Io { .. })
        ));
    }

    #[test]
    fn jwks_uri_is_fetched_cached_and_falls_back() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let discovery = format!(r#"{{"jwks_uri":"http://127.0.0.1:{port}/jwks2"}}"#);
                let (status, body) =
                    if req.starts_with("GET /jwks ") || req.starts_with("GET /jwks2 ") {
                        ("200 OK", JWKS)
                    } else if req.starts_with("GET /idp/.well-known/openid-configuration ") {
                        ("200 OK", discovery.as_str())
                    } else {
                        ("404 Not Found", "{}")
                    };
                let _ = write!(
                    s,
                    "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let uri = format!("http://127.0.0.1:{port}/jwks");
        assert_eq!(jwks_for(&uri, "i", FETCH_TIMEOUT), JWKS);
        assert_eq!(jwks_for(&uri, "i", FETCH_TIMEOUT), JWKS);
        assert_eq!(
            served.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "cached"
        );
        // No jwks nor jwksUri: the issuer's OpenID configuration names it.
        let rule = JwtRule {
            issuer: format!("http://127.0.0.1:{port}/idp"),
            ..Default::default()
        };
        let Some(jwt_provider::JwksSourceSpecifier::LocalJwks(d)) =
            provider(&rule).jwks_source_specifier
        else {
            panic!("local jwks")
        };
        assert_eq!(
            d.specifier,
            Some(data_source::Specifier::InlineString(JWKS.into()))
        );
        let missing = format!("http://127.0.0.1:{port}/nope");
        assert!(matches!(
            fetch(&missing, FETCH_TIMEOUT),
            Err(FetchError::Status { .. })
        ));
        assert_eq!(jwks_for(&missing, "i", FETCH_TIMEOUT), fake_jwks());
        assert!(matches!(
            fetch("ftp://x/y", FETCH_TIMEOUT),
            Err(FetchError::Scheme(_))
        ));
        // TLS to a plaintext server fails the handshake (or finds no roots).
        let tls = format!("https://127.0.0.1:{port}/jwks");
        assert!(matches!(
            fetch(&tls, FETCH_TIMEOUT),
            Err(FetchError::Io { .. } | FetchError::Tls { .. })
        ));
        // The fallback is a usable key set nobody can sign for.
        let fake: serde_json::Value = serde_json::from_str(fake_jwks()).expect("json");
        assert_eq!(fake["keys"][0]["crv"], "P-256");
        assert_eq!(fake["keys"][0]["x"].as_str().map(str::len), Some(43));
    }
}
