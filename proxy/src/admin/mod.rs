//! The admin server (loopback, 15000 by default) in Envoy's shapes, which
//! `istioctl proxy-config`, Kiali and operators read: `/server_info`,
//! `/clusters` (text and `?format=json`), `/listeners`, `/config_dump`
//! (`resource`, `mask`, `name_regex`, `include_eds`), `/stats` (`filter`,
//! `format=json`, `usedonly`), `/stats/prometheus`, `/logging`, `/certs`,
//! `/memory`, `/ready`, `/healthcheck/fail|ok`, `/drain_listeners`,
//! `/quitquitquit`, `/reopen_logs`, `/hot_restart_version`, `/help`, and
//! Ferry's own `/explain`; the
//! readiness server (`/healthz/ready` on 15021) and Istio's Prometheus port
//! (`/stats/prometheus` on 15090).
//!
//! All three run on a runtime of their own, on their own thread (ztunnel's
//! lesson): a large scrape or configuration dump never takes a worker from
//! the data path.

mod certs;
mod clusters;
mod config_dump;
mod explain;
pub use explain::{ExplainError, explain_config};
mod listeners;
pub mod logging;
mod memory;
pub mod server_info;
mod stats;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain::Drain;
use crate::run::Runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Readiness,
    /// Only `/stats/prometheus` (Istio's 15090, scraped from outside the pod).
    Prometheus,
}

/// What the admin pages report of the process beyond the configuration.
#[derive(Debug)]
pub struct AdminState {
    pub started: Instant,
    /// The node the proxy presents to the xDS server (`/server_info`).
    pub node: envoy_types::pb::envoy::config::core::v3::Node,
    /// Worker threads of the data path.
    pub concurrency: usize,
    pub config_path: String,
    pub drain_timeout: std::time::Duration,
    /// `/healthcheck/fail` was posted (and not `/healthcheck/ok` since).
    pub health_check_failed: AtomicBool,
    /// How far `/drain_listeners` has drained: 0 nothing, 1 the inbound
    /// listeners, 2 all (a graceful drain of what already drains does
    /// nothing more, as Envoy's).
    pub drain_sequence: std::sync::atomic::AtomicU8,
    /// The bootstrap's `admin.access_log`: one entry per admin request.
    pub access_logs: Arc<ferry_model::access_log::AccessLogs>,
}

/// Starts the admin, readiness and Prometheus servers on a runtime of their
/// own (one thread).
pub fn start(
    rt: Arc<Runtime>,
    admin: TcpListener,
    ready: Option<TcpListener>,
    prometheus: Option<TcpListener>,
) -> std::io::Result<()> {
    let listeners: Vec<(std::net::TcpListener, Role)> = [
        Some((admin, Role::Admin)),
        ready.map(|l| (l, Role::Readiness)),
        prometheus.map(|l| (l, Role::Prometheus)),
    ]
    .into_iter()
    .flatten()
    .map(|(l, role)| Ok((l.into_std()?, role)))
    .collect::<std::io::Result<_>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("ferry-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (l, role) in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => tasks.push(tokio::spawn(serve(rt.clone(), l, role))),
                        Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })?;
    Ok(())
}

pub async fn serve(rt: Arc<Runtime>, tcp: TcpListener, role: Role) {
    loop {
        let Ok((stream, peer)) = tcp.accept().await else {
            continue;
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, Infallible>(handle(&rt, role, req, peer).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Serves one admin request and writes the admin access log entry.
async fn handle(
    rt: &Arc<Runtime>,
    role: Role,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let logs = rt.admin.access_logs.clone();
    let log = (role == Role::Admin && !logs.is_empty()).then(|| {
        let mut info = ferry_model::stream_info::StreamInfo::new(
            ferry_model::stream_info::LogType::DownstreamEnd,
            std::time::SystemTime::now(),
        );
        info.request.method = req.method().as_str().to_string();
        info.request.path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        info.request.scheme = "http";
        info.protocol = Some("HTTP/1.1");
        info.downstream_remote = Some(peer);
        info.downstream_direct_remote = Some(peer);
        for n in &logs.needs.request {
            if let Some(v) = req.headers().get(n) {
                info.request.headers.insert(n.clone(), v.clone());
            }
        }
        (info, Instant::now())
    });
    let resp = respond(rt, role, req).await;
    if let Some((mut info, start)) = log {
        info.response_code = Some(resp.status().as_u16());
        info.bytes_sent = http_body::Body::size_hint(resp.body())
            .exact()
            .unwrap_or_default();
        info.duration = Some(start.elapsed());
        rt.access_logs.log(&logs, &info);
    }
    resp
}

/// A response with Envoy's admin headers.
fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, max-age=0"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=UTF-8", body)
}

/// JSON as Envoy's admin prints it (one-space indentation).
fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", pretty(v))
}

/// Envoy's admin JSON layout: pretty-printed with a one-space indent.
pub fn pretty(v: &serde_json::Value) -> Vec<u8> {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b" ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if v.serialize(&mut ser).is_err() {
        out.clear();
    }
    out.push(b'\n');
    out
}

/// The query parameters of an admin request (`?a=b&c`), percent-decoded.
/// A repeated key keeps all its values (`/explain`'s `header=`); the
/// single-valued accessors read the last.
pub(crate) struct Query(BTreeMap<String, Vec<String>>);

impl Query {
    /// From decoded pairs, repeated keys in order.
    fn from_pairs(pairs: &[(String, String)]) -> Self {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in pairs {
            m.entry(k.clone()).or_default().push(v.clone());
        }
        Query(m)
    }

    fn parse(q: Option<&str>) -> Self {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.entry(decode(k)).or_default().push(decode(v));
        }
        Query(m)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(|v| v.last()).map(String::as_str)
    }

    /// Every value of a repeated key, in order.
    fn all(&self, k: &str) -> &[String] {
        self.0.get(k).map_or(&[], Vec::as_slice)
    }

    fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
}

/// Percent-decoding (and `+` as a space) of a query component.
fn decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /drain_listeners` as Envoy: `inboundonly` acts on the listeners
/// whose `traffic_direction` is INBOUND, others on every listener. Without
/// `graceful` they stop accepting at once and their open connections are
/// left be. With `graceful` a drain sequence of the drain time
/// (`--drain-timeout`, Envoy's `--drain-time-s`) starts: the listeners keep
/// accepting until its end, then stop, and meanwhile each HTTP response
/// may close its connection (HTTP/1 `connection: close`, HTTP/2 GOAWAY)
/// as `--drain-strategy` says: at once (`immediate`) or with a chance
/// growing over the drain time (`gradual`). A second graceful drain of the
/// same listeners does nothing more. `skip_exit` (drain the connections,
/// leave the listeners open) is refused: Ferry's drain stops both.
fn drain_listeners(rt: &Arc<Runtime>, q: &Query) -> Response<Full<Bytes>> {
    if q.has("skip_exit") {
        return text(
            StatusCode::BAD_REQUEST,
            "skip_exit is not supported: draining stops the listeners\n",
        );
    }
    let (inbound_only, level) = if q.has("inboundonly") {
        (true, 1)
    } else {
        (false, 2)
    };
    let listeners = move |rt: &Runtime| -> Drain {
        if inbound_only {
            rt.inbound.clone()
        } else {
            rt.drain.clone()
        }
    };
    if !q.has("graceful") {
        listeners(rt).stop_listeners();
    } else if rt.admin.drain_sequence.fetch_max(level, Ordering::AcqRel) < level {
        let drain = listeners(rt);
        drain.start_sequence(rt.admin.drain_timeout, rt.drain_strategy);
        let time = rt.admin.drain_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            drain.stop_listeners();
        });
    }
    text(StatusCode::OK, "OK\n")
}

/// `/ready`: Envoy's server state (the admin port's); the readiness port
/// answers as the agent, which also waits for the DNS name table.
fn state(rt: &Runtime, role: Role) -> (&'static str, bool) {
    let ok = match role {
        Role::Admin => rt.is_live(),
        _ => rt.is_ready(),
    };
    if rt.admin.health_check_failed.load(Ordering::Acquire)
        || rt.inbound.is_stopped()
        || rt.inbound.sequence_started()
    {
        ("DRAINING", false)
    } else if ok {
        ("LIVE", true)
    } else {
        ("PRE_INITIALIZING", false)
    }
}

const HELP: &str = "admin commands are:
  /: Admin home page
  /certs: print certs on machine
  /clusters: upstream cluster status
      format: File format to use; One of (text, json)
  /config_dump: dump current Envoy configs
      resource: The resource to dump
      mask: The mask to apply
      name_regex: Dump only the currently loaded configurations whose names match the specified regex
      include_eds: Dump currently loaded configuration including EDS
  /drain_listeners (POST): drain listeners
      graceful: When draining listeners, enter a graceful drain period prior to closing listeners (--drain-timeout)
      inboundonly: Drains all inbound listeners (traffic_direction INBOUND)
  /explain: what the running configuration does with a request, and why (Ferry)
      method, authority, path, scheme, header (name:value, repeated): the request
      source, destination, listener, sni, tls, alpn, protocol, principal: its connection
  /healthcheck/fail (POST): cause the server to fail health checks
  /healthcheck/ok (POST): cause the server to pass health checks
  /help: print out list of admin commands
  /hot_restart_version: print the hot restart compatibility version
  /listeners: print listener info
      format: File format to use; One of (text, json)
  /logging (POST): query/change logging levels
      paths: Change multiple logging levels by setting to <logger_name1>:<desired_level1>,<logger_name2>:<desired_level2>
      level: desired logging level
  /memory: print current allocation/heap usage
  /quitquitquit (POST): exit the server
  /ready: print server state, return 200 if LIVE, otherwise return 503
  /reopen_logs (POST): reopen access logs
  /runtime: print runtime values
  /runtime_modify (POST): not supported (Ferry reads static runtime layers only)
  /server_info: print server version/status information
  /stats: print server stats
      usedonly: Only include stats that have been written by system since restart
      filter: Regular expression (Google re2) for filtering stats
      format: Format to use; One of (html, active-html, text, json)
  /stats/prometheus: print server stats in prometheus format
";

async fn respond(rt: &Arc<Runtime>, role: Role, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let q = Query::parse(req.uri().query());
    let ready = || {
        let (s, ok) = state(rt, role);
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        text(status, format!("{s}\n"))
    };
    let post = req.method() == Method::POST;
    match (role, path.as_str()) {
        (Role::Admin | Role::Prometheus, "/stats/prometheus") => stats::prometheus(rt),
        (Role::Readiness, "/healthz/ready") => ready(),
        (Role::Readiness | Role::Prometheus, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        (Role::Admin, "/ready") => ready(),
        (Role::Admin, "/config_dump") => config_dump::respond(rt, &q),
        (Role::Admin, "/stats") => stats::respond(rt, &q),
        (Role::Admin, "/clusters") => clusters::respond(rt, &q),
        (Role::Admin, "/listeners") => listeners::respond(rt, &q),
        (Role::Admin, "/server_info") => server_info::respond(rt),
        (Role::Admin, "/explain") => explain::respond(rt, &q),
        (Role::Admin, "/certs") => certs::respond(rt),
        (Role::Admin, "/memory") => memory::respond(),
        (Role::Admin, "/hot_restart_version") => text(StatusCode::OK, "disabled"),
        (Role::Admin, "/runtime") => json(&runtime_entries(&ferry_xds::runtime::current())),
        // The admin layer stays empty: a value set here would have to reach
        // configuration already converted, which Ferry does not redo.
        (Role::Admin, "/runtime_modify") => text(
            StatusCode::NOT_IMPLEMENTED,
            "runtime_modify is not supported: Ferry reads the bootstrap's static runtime layers only\n",
        ),
        (Role::Admin, "/help" | "/") => text(StatusCode::OK, HELP),
        (Role::Admin, "/logging") if post => logging::respond(&q),
        (Role::Admin, "/quitquitquit") if post => {
            rt.quit();
            text(StatusCode::OK, "OK\n")
        }
        (Role::Admin, "/drain_listeners") if post => drain_listeners(rt, &q),
        (Role::Admin, "/healthcheck/fail") if post => {
            rt.admin.health_check_failed.store(true, Ordering::Release);
            text(StatusCode::OK, "OK\n")
        }
        (Role::Admin, "/healthcheck/ok") if post => {
            rt.admin.health_check_failed.store(false, Ordering::Release);
            text(StatusCode::OK, "OK\n")
        }
        (Role::Admin, "/reopen_logs") if post => {
            let rt = rt.clone();
            let _ = tokio::task::spawn_blocking(move || rt.access_logs.reopen()).await;
            text(StatusCode::OK, "OK\n")
        }
        (
            Role::Admin,
            "/logging" | "/quitquitquit" | "/drain_listeners" | "/healthcheck/fail"
            | "/healthcheck/ok" | "/reopen_logs",
        ) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {} not allowed, POST required.", req.method()),
        ),
        (Role::Admin, _) => text(StatusCode::NOT_FOUND, format!("invalid path. {HELP}")),
    }
}

/// `/runtime` as Envoy prints it: the layer names, then each key with its
/// value in every layer (empty where a layer lacks it) and the final value.
fn runtime_entries(rt: &ferry_xds::runtime::Runtime) -> serde_json::Value {
    let keys: std::collections::BTreeSet<&String> =
        rt.layers.iter().flat_map(|l| l.values.keys()).collect();
    let mut entries = serde_json::Map::new();
    for k in keys {
        let layer_values: Vec<String> = rt
            .layers
            .iter()
            .map(|l| l.values.get(k).map(|v| v.display()).unwrap_or_default())
            .collect();
        let final_value = rt.get(k).map(|v| v.display()).unwrap_or_default();
        entries.insert(
            k.clone(),
            serde_json::json!({"final_value": final_value, "layer_values": layer_values}),
        );
    }
    serde_json::json!({
        "layers": rt.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
        "entries": entries,
    })
}

/// Sends `POST /quitquitquit` to an admin address (used by `ferry demo`).
pub async fn request_quit(admin: std::net::SocketAddr) {
    use tokio::io::AsyncWriteExt;
    if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
        let req = format!(
            "POST /quitquitquit HTTP/1.1\r\nhost: {admin}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let _ = s.write_all(req.as_bytes()).await;
        let mut buf = [0u8; 256];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some("filter=%5Ecluster%5C.a&format=json&usedonly&x=a+b"));
        assert_eq!(q.get("filter"), Some("^cluster\\.a"));
        assert_eq!(q.get("format"), Some("json"));
        assert!(q.has("usedonly"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
