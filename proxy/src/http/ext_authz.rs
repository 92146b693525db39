//! `envoy.filters.http.ext_authz`: asks an external authorizer about a
//! request before it is routed, as Envoy 1.40 does. The check goes over
//! gRPC (`envoy.service.auth.v3.Authorization/Check`, a `CheckRequest`
//! describing the connection and the request) or plain HTTP (the request's
//! allowed headers sent to `path_prefix` + its path), through the cluster
//! manager, bounded by the service's timeout. An allowed request carries
//! on with the authorizer's header changes; a denied one gets the
//! authorizer's status, body and headers; a failed check gets
//! `status_on_error` (403) unless `failure_mode_allow`.
//!
//! With `with_request_body` the check waits for the request body, up to
//! `max_request_bytes`: a longer one is answered 413 (Envoy's decoder
//! buffer limit), or with `allow_partial_message` checked on its first
//! `max_request_bytes`. What was read is left in the request for the
//! router to send ahead of the rest ([`BufferedPrefix`]).

use std::collections::{BTreeMap, HashMap};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::service::auth::v3 as auth;
use envoy_types::pb::google::protobuf as pbw;
use ferry_model::HttpConnectionManager;
use ferry_model::ext_authz::{BufferSettings, ExtAuthz, HttpService, NameList, Service};
use ferry_model::format::FormatContext;
use ferry_model::rbac::{DynamicMetadata, MetaValue};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use prost::Message;

use super::ConnCtx;
use super::body::{BufferedPrefix, ResponseBody, UpstreamBody};
use super::filters::{PerRoute, RbacMetadata, ResponseHooks};

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
/// The dynamic metadata namespace the authorizer's metadata lands in.
const NAMESPACE: &str = "envoy.filters.http.ext_authz";
const FAILURE_MODE_ALLOWED: &str = "x-envoy-auth-failure-mode-allowed";
const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";
/// Tells the authorizer whether the body it got was cut short.
const PARTIAL_BODY: &str = "x-envoy-auth-partial-body";
/// The most an authorizer's answer may hold (Envoy's default gRPC limit).
const MAX_ANSWER: usize = 4 << 20;

/// How one header from the authorizer changes a header map
/// (`HeaderValueOption.append_action`, or the deprecated `append`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Another entry beside any there.
    Add,
    /// The deprecated `append: true`: joined to the existing value with ",".
    Append,
    AddIfAbsent,
    /// Replaces the existing entries.
    Set,
    SetIfExists,
}

#[derive(Debug, Clone)]
pub struct Edit {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: Action,
}

/// Applies `edits` in order; entries set by the same list are kept beside
/// each other (several `set-cookie`), as Envoy removes then adds them.
pub fn apply_edits(h: &mut HeaderMap, edits: &[Edit]) {
    let mut set_here: Vec<&HeaderName> = Vec::new();
    for e in edits {
        match e.action {
            Action::Add => {
                h.append(e.name.clone(), e.value.clone());
            }
            Action::Append => {
                let joined = {
                    let old: Vec<&[u8]> = h.get_all(&e.name).iter().map(|v| v.as_bytes()).collect();
                    if old.is_empty() {
                        None
                    } else {
                        let mut b = old.join(&b","[..]);
                        b.push(b',');
                        b.extend_from_slice(e.value.as_bytes());
                        HeaderValue::from_bytes(&b).ok()
                    }
                };
                h.insert(e.name.clone(), joined.unwrap_or_else(|| e.value.clone()));
            }
            Action::AddIfAbsent => {
                if !h.contains_key(&e.name) {
                    h.insert(e.name.clone(), e.value.clone());
                }
            }
            Action::Set | Action::SetIfExists => {
                if e.action == Action::SetIfExists && !h.contains_key(&e.name) {
                    continue;
                }
                if set_here.contains(&&e.name) {
                    h.append(e.name.clone(), e.value.clone());
                } else {
                    h.insert(e.name.clone(), e.value.clone());
                    set_here.push(&e.name);
                }
            }
        }
    }
}

/// What an allowed request is changed by.
#[derive(Debug, Default)]
pub(crate) struct Allowed {
    request: Vec<Edit>,
    remove: Vec<HeaderName>,
    response: Vec<Edit>,
    query_set: Vec<(String, String)>,
    query_remove: Vec<String>,
    metadata: Option<pbw::Struct>,
}

impl Allowed {
    fn changes_request(&self) -> bool {
        !self.request.is_empty()
            || !self.remove.is_empty()
            || !self.query_set.is_empty()
            || !self.query_remove.is_empty()
    }
}

/// The authorizer's verdict.
#[derive(Debug)]
pub(crate) enum Verdict {
    Ok(Allowed),
    Denied {
        status: StatusCode,
        body: String,
        headers: Vec<Edit>,
    },
    Error(String),
}

/// What a request that passed carries on with.
pub struct Passed {
    /// The request's dynamic metadata, when the authorizer added to it.
    pub metadata: Option<DynamicMetadata>,
    /// `clear_route_cache` after header changes: choose the route again.
    pub reroute: bool,
}

/// Runs the filter on one request: `Ok` lets it carry on, `Err` is the
/// answer to send back (with its response flag).
#[allow(clippy::too_many_arguments)] // the request's whole context, once
pub async fn run(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    cfg: &ExtAuthz,
    per_route: PerRoute<'_>,
    filter_name: &str,
    cluster: &str,
    req: &mut Request<Incoming>,
    request_metadata: Option<DynamicMetadata>,
    fctx: &FormatContext<'_>,
    hooks: &mut ResponseHooks,
) -> Result<Passed, Box<Response<ResponseBody>>> {
    let carry_on = |metadata| {
        Ok(Passed {
            metadata,
            reroute: false,
        })
    };
    // Envoy skips the check of a request without a route, and of a route
    // that turns the filter off.
    if per_route.route.is_none() {
        return carry_on(request_metadata);
    }
    let settings = per_route.ext_authz(filter_name);
    if settings.is_some_and(|s| s.disabled) {
        return carry_on(request_metadata);
    }
    // `disabled` is the filter's own; the others are also the routed
    // cluster's, when it exists.
    let counter = |n: &str| {
        let infix = if cfg.stat_prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", cfg.stat_prefix)
        };
        ctx.rt
            .stats
            .counter(&format!("http.{}.ext_authz.{infix}{n}", hcm.stat_prefix))
            .inc();
        if n != "disabled" && !cluster.is_empty() && ctx.rt.clusters.load().get(cluster).is_some() {
            ctx.rt
                .stats
                .counter(&format!("cluster.{cluster}.ext_authz.{infix}{n}"))
                .inc();
        }
    };
    if !enabled(ctx, cfg, req, request_metadata.as_ref()) {
        counter("disabled");
        if cfg.deny_at_disable {
            return Err(Box::new(error_reply(cfg)));
        }
        return carry_on(request_metadata);
    }
    let context_extensions = settings
        .map(|s| s.context_extensions.clone())
        .unwrap_or_default();
    // The route's buffer settings win, and may turn buffering off.
    let buffer = match settings {
        Some(s) if s.disable_request_body_buffering => None,
        Some(s) if s.with_request_body.is_some() => s.with_request_body,
        _ => cfg.with_request_body,
    };
    let body = match buffer {
        // As Envoy: a request without a body, or an upgrade, is checked at once.
        Some(b) if !req.body().is_end_stream() && !is_upgrade(req) => {
            match buffer_body(req, b).await {
                Ok(body) => Some(body),
                Err(BufferError::TooLarge) => return Err(Box::new(too_large())),
                Err(BufferError::Downstream(e)) => {
                    tracing::debug!(error = %e, src.addr = %ctx.peer, "request body failed while buffered for the authorizer");
                    return Err(Box::new(super::local_reply(super::LocalReply {
                        status: StatusCode::BAD_REQUEST,
                        body: None,
                    })));
                }
            }
        }
        _ => None,
    };
    let mut check = check_request(ctx, cfg, req, context_extensions);
    if let (Some(body), Some(b)) = (body, buffer) {
        with_body(cfg, &mut check, body, b);
    }
    let verdict = match tokio::time::timeout(cfg.timeout, ask(ctx, cfg, check, fctx)).await {
        Ok(v) => v,
        Err(_) => Verdict::Error(format!("no answer within {} ms", cfg.timeout.as_millis())),
    };
    match verdict {
        Verdict::Ok(allowed) => {
            counter("ok");
            let reroute = cfg.clear_route_cache && allowed.changes_request();
            apply_allowed(req, &allowed);
            hooks.edit(allowed.response);
            let metadata = with_metadata(ctx, request_metadata, allowed.metadata);
            Ok(Passed { metadata, reroute })
        }
        Verdict::Denied {
            status,
            mut body,
            headers,
        } => {
            counter("denied");
            tracing::debug!(authz.status = status.as_u16(), src.addr = %ctx.peer, "external authorizer denied the request");
            let max = cfg.max_denied_response_body_bytes as usize;
            if max > 0 && body.len() > max {
                let mut cut = max;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
            }
            let mut resp = super::local_reply(super::LocalReply {
                status,
                body: (!body.is_empty()).then_some(body),
            });
            apply_edits(resp.headers_mut(), &headers);
            resp.extensions_mut()
                .insert(super::observe::Details("ext_authz_denied".into()));
            Err(Box::new(resp))
        }
        Verdict::Error(why) => {
            counter("error");
            tracing::debug!(error = %why, src.addr = %ctx.peer, "external authorization failed");
            if cfg.failure_mode_allow {
                counter("failure_mode_allowed");
                if cfg.failure_mode_allow_header_add {
                    req.headers_mut()
                        .append(FAILURE_MODE_ALLOWED, HeaderValue::from_static("true"));
                }
                return carry_on(request_metadata);
            }
            Err(Box::new(error_reply(cfg)))
        }
    }
}

/// Whether the request asks for an upgrade (WebSocket, or HTTP/2's
/// extended CONNECT), whose body is never buffered.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(http::header::UPGRADE)
        || req.extensions().get::<hyper::ext::Protocol>().is_some()
}

#[derive(Debug, thiserror::Error)]
enum BufferError {
    #[error("the request body is larger than max_request_bytes")]
    TooLarge,
    #[error("downstream body: {0}")]
    Downstream(#[source] hyper::Error),
}

/// Reads the request body until it ended or, with `allow_partial_message`,
/// `max_request_bytes` arrived; more than that without it is
/// [`BufferError::TooLarge`]. What was read stays in the request as a
/// [`BufferedPrefix`]; the result is the body as read.
async fn buffer_body(req: &mut Request<Incoming>, s: BufferSettings) -> Result<Bytes, BufferError> {
    let max = s.max_request_bytes as usize;
    let progress = super::stream_timers::RequestProgress::current();
    let mut prefix = BufferedPrefix::default();
    let mut len = 0usize;
    loop {
        let Some(frame) = req.body_mut().frame().await else {
            prefix.ended = true;
            break;
        };
        let frame = frame.map_err(BufferError::Downstream)?;
        if let Some(p) = &progress {
            p.active();
        }
        match frame.into_data() {
            Ok(d) => {
                len += d.len();
                prefix.chunks.push(d);
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    prefix.trailers = Some(t);
                }
            }
        }
        if req.body().is_end_stream() {
            prefix.ended = true;
            break;
        }
        // Envoy checks the limit on what was buffered, the end excepted.
        if s.allow_partial_message {
            if len >= max {
                break;
            }
        } else if len > max {
            return Err(BufferError::TooLarge);
        }
    }
    if prefix.ended
        && let Some(p) = &progress
    {
        p.ended();
    }
    let mut whole = BytesMut::with_capacity(len);
    for c in &prefix.chunks {
        whole.extend_from_slice(c);
    }
    req.extensions_mut().insert(prefix);
    Ok(whole.freeze())
}

/// Envoy's answer to a body past its decoder buffer limit.
fn too_large() -> Response<ResponseBody> {
    let mut resp = super::local_reply(super::LocalReply {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        body: Some("Payload Too Large".into()),
    });
    resp.extensions_mut()
        .insert(super::observe::Details("request_payload_too_large".into()));
    resp
}

/// Puts the buffered body (its first `max_request_bytes`) into the check,
/// with the header telling whether it was cut.
fn with_body(cfg: &ExtAuthz, check: &mut auth::CheckRequest, body: Bytes, b: BufferSettings) {
    let Some(http) = check
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    else {
        return;
    };
    let max = b.max_request_bytes as usize;
    // As Envoy: the size is what was buffered, not the declared length.
    http.size = body.len() as i64;
    let partial = body.len() > max;
    let body = body.slice(..body.len().min(max));
    let flag = if partial { "true" } else { "false" };
    if cfg.encode_raw_headers {
        if let Some(m) = http.header_map.as_mut() {
            m.headers.push(core_pb::HeaderValue {
                key: PARTIAL_BODY.into(),
                raw_value: flag.as_bytes().to_vec(),
                ..Default::default()
            });
        }
    } else {
        http.headers.insert(PARTIAL_BODY.into(), flag.into());
    }
    if b.pack_as_bytes {
        http.raw_body = body.to_vec();
    } else {
        http.body = String::from_utf8_lossy(&body).into_owned();
    }
}

fn error_reply(cfg: &ExtAuthz) -> Response<ResponseBody> {
    let mut resp = super::local_reply(super::LocalReply {
        status: cfg.status_on_error,
        body: None,
    });
    resp.extensions_mut()
        .insert(super::observe::Details("ext_authz_error".into()));
    resp
}

/// `filter_enabled` and `filter_enabled_metadata`: the metadata the RBAC
/// filters before left (their shadow results) counts.
fn enabled(
    ctx: &ConnCtx,
    cfg: &ExtAuthz,
    req: &Request<Incoming>,
    request_metadata: Option<&DynamicMetadata>,
) -> bool {
    if let Some(f) = &cfg.filter_enabled
        && !f.hits(rand::random())
    {
        return false;
    }
    let Some(m) = &cfg.filter_enabled_metadata else {
        return true;
    };
    let mut md = request_metadata
        .cloned()
        .unwrap_or_else(|| ctx.rbac_view().1.clone());
    if let Some(r) = req.extensions().get::<RbacMetadata>() {
        let ns =
            md.0.entry("envoy.filters.http.rbac".to_string())
                .or_default();
        for (k, v) in &r.0 {
            ns.insert(k.clone(), MetaValue::String(v.clone()));
        }
    }
    m.matches(&md)
}

/// The request's metadata with the authorizer's under its namespace.
fn with_metadata(
    ctx: &ConnCtx,
    request_metadata: Option<DynamicMetadata>,
    from_authorizer: Option<pbw::Struct>,
) -> Option<DynamicMetadata> {
    let Some(s) = from_authorizer.filter(|s| !s.fields.is_empty()) else {
        return request_metadata;
    };
    let mut md = request_metadata.unwrap_or_else(|| ctx.rbac_view().1.clone());
    let ns = md.0.entry(NAMESPACE.to_string()).or_default();
    for (k, v) in s.fields {
        ns.insert(k, meta_value(v));
    }
    Some(md)
}

fn meta_value(v: pbw::Value) -> MetaValue {
    use pbw::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => MetaValue::Null,
        Some(Kind::NumberValue(n)) => MetaValue::Number(n),
        Some(Kind::StringValue(s)) => MetaValue::String(s),
        Some(Kind::BoolValue(b)) => MetaValue::Bool(b),
        Some(Kind::ListValue(l)) => MetaValue::List(l.values.into_iter().map(meta_value).collect()),
        Some(Kind::StructValue(s)) => MetaValue::Struct(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, meta_value(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

/// The allowed request's header and query changes.
fn apply_allowed(req: &mut Request<Incoming>, a: &Allowed) {
    apply_edits(req.headers_mut(), &a.request);
    for name in &a.remove {
        // Envoy never removes `host` (pseudo-headers are not headers here).
        if name != http::header::HOST {
            req.headers_mut().remove(name);
        }
    }
    if a.query_set.is_empty() && a.query_remove.is_empty() {
        return;
    }
    let Some(pq) = req.uri().path_and_query() else {
        return;
    };
    // As Envoy: the query is parsed into a map, changed, and written back
    // in key order.
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for pair in pq
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.entry(k.to_string()).or_insert_with(|| v.to_string());
    }
    for (k, v) in &a.query_set {
        params.insert(k.clone(), v.clone());
    }
    for k in &a.query_remove {
        params.remove(k);
    }
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let path = if query.is_empty() {
        pq.path().to_string()
    } else {
        format!("{}?{}", pq.path(), query.join("&"))
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(p) = path.parse() {
        parts.path_and_query = Some(p);
        if let Ok(u) = http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

pub(crate) fn socket(addr: std::net::SocketAddr) -> core_pb::Address {
    core_pb::Address {
        address: Some(core_pb::address::Address::SocketAddress(
            core_pb::SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(core_pb::socket_address::PortSpecifier::PortValue(
                    u32::from(addr.port()),
                )),
                ..Default::default()
            },
        )),
    }
}

fn allowed_header(cfg: &ExtAuthz, name: &str) -> bool {
    cfg.allowed_headers.as_ref().is_none_or(|l| l.matches(name))
        && !cfg.disallowed_headers.matches(name)
}

/// The `CheckRequest` Envoy fills for an HTTP request.
fn check_request(
    ctx: &ConnCtx,
    cfg: &ExtAuthz,
    req: &Request<Incoming>,
    context_extensions: BTreeMap<String, String>,
) -> auth::CheckRequest {
    use auth::attribute_context as ac;
    let pseudo = super::pseudo_of(req);
    let scheme = if ctx.tls.is_some() { "https" } else { "http" };
    // The request's headers as Envoy's header map holds them: the
    // pseudo-headers, then the others, repeated values joined by ",".
    let mut headers: Vec<(String, String)> = vec![
        (":authority".into(), pseudo.authority.to_string()),
        (":path".into(), pseudo.path.to_string()),
        (":method".into(), pseudo.method.to_string()),
        (":scheme".into(), scheme.into()),
    ];
    for name in req.headers().keys() {
        if name == http::header::HOST {
            continue;
        }
        let joined = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        headers.push((name.as_str().to_string(), joined));
    }
    headers.retain(|(k, _)| allowed_header(cfg, k));
    let (headers_map, header_map) = if cfg.encode_raw_headers {
        let list = headers
            .into_iter()
            .map(|(key, v)| core_pb::HeaderValue {
                key,
                raw_value: v.into_bytes(),
                ..Default::default()
            })
            .collect();
        (HashMap::new(), Some(core_pb::HeaderMap { headers: list }))
    } else {
        (headers.into_iter().collect::<HashMap<_, _>>(), None)
    };
    let (source_principal, destination_principal) =
        match ctx.tls.as_ref().and_then(|t| t.client_cert.as_ref()) {
            Some(c) => (
                c.uris
                    .first()
                    .or(c.dns.first())
                    .cloned()
                    .unwrap_or_else(|| c.subject.clone()),
                c.by.first().cloned().unwrap_or_default(),
            ),
            None => Default::default(),
        };
    let size = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let http_req = ac::HttpRequest {
        id: req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        method: pseudo.method.to_string(),
        headers: headers_map,
        header_map,
        path: pseudo.path.to_string(),
        host: pseudo.authority.to_string(),
        scheme: scheme.into(),
        size,
        protocol: super::protocol_name(req.version()).into(),
        ..Default::default()
    };
    auth::CheckRequest {
        attributes: Some(auth::AttributeContext {
            source: Some(ac::Peer {
                address: Some(socket(ctx.peer)),
                principal: source_principal,
                ..Default::default()
            }),
            destination: Some(ac::Peer {
                address: Some(socket(ctx.original_dst)),
                principal: destination_principal,
                ..Default::default()
            }),
            request: Some(ac::Request {
                time: Some(pbw::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(http_req),
            }),
            context_extensions: context_extensions.into_iter().collect(),
            tls_session: (cfg.include_tls_session && ctx.tls.is_some()).then(|| ac::TlsSession {
                sni: ctx.server_name.clone(),
            }),
            ..Default::default()
        }),
    }
}

/// Asks the authorizer; every failure is an [`Verdict::Error`].
async fn ask(
    ctx: &ConnCtx,
    cfg: &ExtAuthz,
    check: auth::CheckRequest,
    fctx: &FormatContext<'_>,
) -> Verdict {
    match &cfg.service {
        Service::Grpc {
            cluster,
            authority,
            metadata,
        } => match grpc(&ctx.rt, cfg.timeout, cluster, authority, metadata, check).await {
            Ok(v) => v,
            Err(e) => Verdict::Error(e),
        },
        Service::Http(h) => match http_check(ctx, h, check, fctx).await {
            Ok(v) => v,
            Err(e) => Verdict::Error(e),
        },
    }
}

/// A pool of the cluster `name` to send the check to.
async fn endpoint(
    rt: &crate::run::Runtime,
    name: &str,
) -> Result<
    (
        std::sync::Arc<crate::cluster::EndpointPool>,
        ferry_model::UpstreamProtocol,
    ),
    String,
> {
    let crt = rt
        .clusters
        .load()
        .get(name)
        .cloned()
        .ok_or_else(|| format!("cluster {name:?} does not exist"))?;
    crt.warmed().await;
    let pool = crt
        .pick(None)
        .ok_or_else(|| format!("cluster {name:?} has no healthy endpoint"))?;
    Ok((pool, crt.cfg.protocol))
}

/// `Authorization/Check` over the cluster `cluster`.
pub(crate) async fn grpc(
    rt: &crate::run::Runtime,
    timeout: std::time::Duration,
    cluster: &str,
    authority: &str,
    metadata: &[(HeaderName, HeaderValue)],
    check: auth::CheckRequest,
) -> Result<Verdict, String> {
    let (pool, _) = endpoint(rt, cluster).await?;
    let msg = check.encode_to_vec();
    let mut framed = BytesMut::with_capacity(msg.len() + 5);
    framed.put_u8(0);
    framed.put_u32(msg.len() as u32);
    framed.put_slice(&msg);
    let mut req = crate::trace::post(
        authority,
        CHECK_PATH,
        metadata,
        "application/grpc",
        framed.freeze(),
        true,
    );
    let h = req.headers_mut();
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if let Ok(v) = HeaderValue::from_str(&format!("{}m", timeout.as_millis())) {
        h.insert("grpc-timeout", v);
    }
    let resp = pool.send_h2(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("authorizer answered HTTP {}", resp.status()));
    }
    let (parts, body) = resp.into_parts();
    let collected = read_limited(body).await?;
    let code = collected
        .1
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if code != "0" {
        return Err(format!("grpc-status {code:?}"));
    }
    let mut b = collected.0;
    if b.len() < 5 || b[0] != 0 {
        return Err("not an uncompressed gRPC message".into());
    }
    b.advance(1);
    let len = b.get_u32() as usize;
    if b.len() < len {
        return Err("truncated gRPC message".into());
    }
    let answer = auth::CheckResponse::decode(b.slice(..len)).map_err(|e| e.to_string())?;
    Ok(from_grpc(answer))
}

/// Reads an answer whole, up to [`MAX_ANSWER`].
async fn read_limited(body: Incoming) -> Result<(Bytes, Option<HeaderMap>), String> {
    let limited = http_body_util::Limited::new(body, MAX_ANSWER);
    let c = limited.collect().await.map_err(|e| e.to_string())?;
    let trailers = c.trailers().cloned();
    Ok((c.to_bytes(), trailers))
}

#[allow(deprecated)] // `append` is deprecated but authorizers still send it
fn edits(list: Vec<core_pb::HeaderValueOption>) -> Result<Vec<Edit>, String> {
    use core_pb::header_value_option::HeaderAppendAction as A;
    let mut out = Vec::with_capacity(list.len());
    for o in list {
        let Some(hv) = o.header else { continue };
        let value = if hv.value.is_empty() && !hv.raw_value.is_empty() {
            HeaderValue::from_bytes(&hv.raw_value)
        } else {
            HeaderValue::from_str(&hv.value)
        }
        .map_err(|_| format!("invalid value of header {:?}", hv.key))?;
        let name = HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("invalid header name {:?}", hv.key))?;
        let action = match o.append {
            Some(a) if a.value => Action::Append,
            Some(_) => Action::Set,
            None => match A::try_from(o.append_action) {
                Ok(A::AppendIfExistsOrAdd) => Action::Add,
                Ok(A::AddIfAbsent) => Action::AddIfAbsent,
                Ok(A::OverwriteIfExists) => Action::SetIfExists,
                Ok(A::OverwriteIfExistsOrAdd) | Err(_) => Action::Set,
            },
        };
        out.push(Edit {
            name,
            value,
            action,
        });
    }
    Ok(out)
}

fn from_grpc(r: auth::CheckResponse) -> Verdict {
    use auth::check_response::HttpResponse;
    let metadata = r.dynamic_metadata;
    let ok = r.status.as_ref().is_none_or(|s| s.code == 0);
    if ok {
        let mut a = Allowed {
            metadata,
            ..Default::default()
        };
        if let Some(HttpResponse::OkResponse(o)) = r.http_response {
            #[allow(deprecated)] // the deprecated field still wins, as in Envoy
            if let Some(m) = o.dynamic_metadata {
                a.metadata = Some(m);
            }
            a.request = match edits(o.headers) {
                Ok(e) => e,
                Err(e) => return Verdict::Error(e),
            };
            a.response = match edits(o.response_headers_to_add) {
                Ok(e) => e,
                Err(e) => return Verdict::Error(e),
            };
            for name in o.headers_to_remove {
                match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    Ok(n) => a.remove.push(n),
                    // A pseudo-header or an invalid name: never removed.
                    Err(_) => continue,
                }
            }
            a.query_set = o
                .query_parameters_to_set
                .into_iter()
                .map(|q| (q.key, q.value))
                .collect();
            a.query_remove = o.query_parameters_to_remove;
        }
        Verdict::Ok(a)
    } else {
        let (mut status, mut body, mut headers) = (StatusCode::FORBIDDEN, String::new(), vec![]);
        if let Some(HttpResponse::DeniedResponse(d)) = r.http_response {
            if let Some(s) = d.status
                && let Ok(c) = u16::try_from(s.code)
                && c > 0
                && let Ok(c) = StatusCode::from_u16(c)
            {
                status = c;
            }
            body = d.body;
            headers = match edits(d.headers) {
                Ok(e) => e,
                Err(e) => return Verdict::Error(e),
            };
        }
        Verdict::Denied {
            status,
            body,
            headers,
        }
    }
}

/// Hop-by-hop headers of the authorizer's answer, which never reach the
/// client.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "proxy-connection" | "te"
    )
}

async fn http_check(
    ctx: &ConnCtx,
    svc: &HttpService,
    check: auth::CheckRequest,
    fctx: &FormatContext<'_>,
) -> Result<Verdict, String> {
    let (pool, protocol) = endpoint(&ctx.rt, &svc.cluster).await?;
    let http = check
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .unwrap_or_default();
    // The buffered body, if any, is the check's body.
    let body = if http.raw_body.is_empty() {
        Bytes::from(http.body.into_bytes())
    } else {
        Bytes::from(http.raw_body)
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let (mut method, mut path, mut authority) = (http.method, http.path, http.host);
    let pairs: Vec<(String, Vec<u8>)> = match http.header_map {
        Some(m) => m
            .headers
            .into_iter()
            .map(|h| (h.key, h.raw_value))
            .collect(),
        None => http
            .headers
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
    };
    for (k, v) in pairs {
        let text = String::from_utf8_lossy(&v).into_owned();
        match k.as_str() {
            ":method" => method = text,
            ":path" => path = text,
            ":authority" => authority = text,
            "content-length" => {}
            k if k.starts_with(':') => {}
            _ => {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_bytes(&v),
                ) {
                    headers.append(n, v);
                }
            }
        }
    }
    let path = format!("{}{}", svc.path_prefix, path);
    let request_headers = headers.clone();
    svc.headers_to_add
        .apply(&mut headers, fctx, Some(&request_headers));
    let h2 = protocol == ferry_model::UpstreamProtocol::Http2;
    let mut req = Request::new(if body.is_empty() {
        UpstreamBody::empty()
    } else {
        UpstreamBody::full(body)
    });
    *req.method_mut() = http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let uri = if h2 {
        format!("http://{authority}{path}")
    } else {
        path
    };
    *req.uri_mut() = uri
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    if h2 {
        *req.version_mut() = http::Version::HTTP_2;
    } else if let Ok(v) = HeaderValue::from_str(&authority) {
        headers.insert(http::header::HOST, v);
    }
    *req.headers_mut() = headers;
    let resp = pool.send(h2, req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // A 5xx is a failed check, as in Envoy.
    if status.is_server_error() {
        return Err(format!("authorizer answered {status}"));
    }
    let (parts, body) = resp.into_parts();
    let (body, _) = read_limited(body).await?;
    let mut answer = parts.headers;
    let remove: Vec<HeaderName> = if status == StatusCode::OK {
        answer
            .get_all(HEADERS_TO_REMOVE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .filter_map(|n| HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    answer.remove(HEADERS_TO_REMOVE);
    let pick = |list: &NameList, action: Action| -> Vec<Edit> {
        answer
            .iter()
            .filter(|(n, _)| list.matches(n.as_str()))
            .map(|(n, v)| Edit {
                name: n.clone(),
                value: v.clone(),
                action,
            })
            .collect()
    };
    if status == StatusCode::OK {
        let mut request = pick(&svc.upstream_headers, Action::Set);
        request.extend(pick(&svc.upstream_headers_to_append, Action::Add));
        return Ok(Verdict::Ok(Allowed {
            request,
            remove,
            response: pick(&svc.client_headers_on_success, Action::Add),
            ..Default::default()
        }));
    }
    // The denial's headers: all of the authorizer's but hop-by-hop ones
    // (and the length, set for the body sent), or the allowed ones plus
    // those Envoy always passes.
    let headers: Vec<Edit> = answer
        .iter()
        .filter(|(n, _)| !hop_by_hop(n) && *n != http::header::CONTENT_LENGTH)
        .filter(|(n, _)| {
            svc.client_headers.is_empty()
                || svc.client_headers.matches(n.as_str())
                || *n == http::header::WWW_AUTHENTICATE
                || *n == http::header::LOCATION
        })
        .map(|(n, v)| Edit {
            name: n.clone(),
            value: v.clone(),
            action: Action::Set,
        })
        .collect();
    Ok(Verdict::Denied {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(name: &'static str, value: &'static str, action: Action) -> Edit {
        Edit {
            name: HeaderName::from_static(name),
            value: HeaderValue::from_static(value),
            action,
        }
    }

    #[test]
    fn edits_follow_the_append_actions() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        h.insert("b", HeaderValue::from_static("1"));
        h.insert("c", HeaderValue::from_static("1"));
        apply_edits(
            &mut h,
            &[
                edit("a", "2", Action::Add),
                edit("b", "2", Action::Append),
                edit("c", "2", Action::AddIfAbsent),
                edit("d", "2", Action::SetIfExists),
                edit("e", "1", Action::Set),
                edit("e", "2", Action::Set),
                edit("c", "3", Action::Set),
            ],
        );
        let all = |n: &str| -> Vec<&str> {
            h.get_all(n)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        assert_eq!(all("a"), ["1", "2"]);
        assert_eq!(all("b"), ["1,2"]);
        assert_eq!(all("c"), ["3"]);
        assert!(all("d").is_empty());
        // Set twice by one answer: both kept (several `set-cookie`).
        assert_eq!(all("e"), ["1", "2"]);
    }

    #[test]
    fn grpc_answers_become_verdicts() {
        // No status at all is OK, as an empty answer.
        assert!(matches!(
            from_grpc(auth::CheckResponse::default()),
            Verdict::Ok(_)
        ));
        // A denial without an HTTP answer is a bare 403.
        let denied = auth::CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status {
                code: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        match from_grpc(denied) {
            Verdict::Denied { status, body, .. } => {
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert!(body.is_empty());
            }
            v => panic!("{v:?}"),
        }
        // A header the client could not carry makes the check fail.
        let bad = auth::CheckResponse {
            http_response: Some(auth::check_response::HttpResponse::OkResponse(
                auth::OkHttpResponse {
                    headers: vec![core_pb::HeaderValueOption {
                        header: Some(core_pb::HeaderValue {
                            key: "bad name".into(),
                            value: "v".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        assert!(matches!(from_grpc(bad), Verdict::Error(_)));
    }
}
