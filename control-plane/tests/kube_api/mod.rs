//! A Kubernetes API server for tests, written here because no real one can
//! run in this repository's tests: HTTPS with its own CA and a bearer
//! token, the REST paths of core and grouped kinds (cluster-wide and
//! namespaced), get/create/replace/JSON-patch/delete, paged lists
//! (`limit`/`continue`) whose `metadata.resourceVersion` is the store's
//! version, and watches as the API server streams them: newline-delimited
//! `ADDED`/`MODIFIED`/`DELETED` events after the asked `resourceVersion`,
//! `BOOKMARK`s when `allowWatchBookmarks` is set, and an `ERROR` event with
//! a 410 `Expired` Status when the version was compacted away. Objects get
//! what the server fills in (uid, resourceVersion, creationTimestamp,
//! generation, managedFields); typed lists leave their items' `apiVersion`
//! and `kind` out, custom resources keep them. Kinds it does not serve
//! answer 404, as for a CRD that is not installed.
//!
//! The test drives the protocol's hard cases by hand: [`ApiServer::serve`]
//! installs a kind, [`ApiServer::compact`]
//! forgets the history, [`ApiServer::drop_watches`] ends every open watch,
//! [`ApiServer::pause_watches`] holds new ones, and every request is logged
//! ([`ApiServer::requests`]).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};

/// One kind the server knows: group ("" for core), version, kind, plural,
/// whether it is namespaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindDef {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

impl KindDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Custom resources (Istio's) keep `apiVersion`/`kind` in list items.
    fn custom(&self) -> bool {
        self.group.ends_with(".istio.io")
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> KindDef {
    KindDef {
        group,
        version,
        kind,
        plural,
        namespaced,
    }
}

/// Every kind a cluster with Istio's CRDs serves that the tests touch.
pub const KINDS: &[KindDef] = &[
    kind("", "v1", "Namespace", "namespaces", false),
    kind("", "v1", "Service", "services", true),
    kind("", "v1", "Pod", "pods", true),
    kind("", "v1", "ConfigMap", "configmaps", true),
    kind("", "v1", "Secret", "secrets", true),
    kind(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    kind(
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        false,
    ),
    kind(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
        true,
    ),
    kind(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
        true,
    ),
    kind("networking.istio.io", "v1", "Gateway", "gateways", true),
    kind(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
        true,
    ),
    kind(
        "networking.istio.io",
        "v1",
        "WorkloadEntry",
        "workloadentries",
        true,
    ),
    kind("networking.istio.io", "v1", "Sidecar", "sidecars", true),
    kind(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
    ),
    kind(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
    ),
    kind(
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        "requestauthentications",
        true,
    ),
    kind("telemetry.istio.io", "v1", "Telemetry", "telemetries", true),
];

pub fn kind_of(api_version: &str, kind: &str) -> Option<KindDef> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.kind == kind && k.api_version() == api_version)
}

/// A request as the server saw it: `LIST pods`, `WATCH pods rv=12`, …
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub verb: String,
    pub plural: String,
    pub resource_version: Option<String>,
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    plural: &'static str,
    kind: &'static str,
    object: Value,
}

type Key = (String, String);

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<&'static str, BTreeMap<Key, Value>>,
    history: Vec<Event>,
    /// Watches from a version older than this get 410 Gone.
    compacted: u64,
    /// Snapshots behind `continue` tokens.
    pages: HashMap<String, (u64, Vec<Value>)>,
    log: Vec<Logged>,
    /// The version each open watch stream has told its client about (an
    /// event or a bookmark), by stream id.
    streams: BTreeMap<u64, (&'static str, u64)>,
    next_stream: u64,
}

struct Inner {
    store: Mutex<Store>,
    served: Mutex<Vec<KindDef>>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch.
    epoch: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    token: String,
    page_size: usize,
    bookmark_every: Duration,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct ApiServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    inner: Arc<Inner>,
}

/// Options of a server: the kinds it serves (the others answer 404).
pub struct Options {
    pub served: Vec<KindDef>,
    /// Items per list page at most (whatever `limit` asks), to make
    /// clients follow `continue`.
    pub page_size: usize,
    pub bookmark_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            served: KINDS.to_vec(),
            page_size: 4,
            bookmark_every: Duration::from_millis(100),
        }
    }
}

impl ApiServer {
    pub async fn start(options: Options) -> ApiServer {
        let dir = std::env::temp_dir().join(format!(
            "ferry-kube-api-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (ca_pem, tls) = tls_config();
        std::fs::write(dir.join("ca.pem"), &ca_pem).expect("write ca");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            served: Mutex::new(options.served),
            events: broadcast::channel(4096).0,
            epoch: watch::channel(0).0,
            paused: watch::channel(false).0,
            token: "ferry-test-token".into(),
            page_size: options.page_size.max(1),
            bookmark_every: options.bookmark_every,
        });
        let server = ApiServer { addr, dir, inner };
        std::fs::write(server.kubeconfig_path(), server.kubeconfig()).expect("kubeconfig");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let inner = server.inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let inner = inner.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A kubeconfig as `kubectl` writes one: the server, its CA, a token.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: test\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            self.url(),
            self.ca_path().display(),
            self.inner.token
        )
    }

    /// A client configured from [`Self::kubeconfig`], as `KUBECONFIG` would.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.kubeconfig_path()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("client config");
        kube::Client::try_from(config).expect("client")
    }

    /// Creates (or replaces) an object as the API server would store it.
    pub fn apply(&self, object: Value) -> Value {
        let k = kind_of(
            object["apiVersion"].as_str().unwrap_or_default(),
            object["kind"].as_str().unwrap_or_default(),
        )
        .unwrap_or_else(|| panic!("unknown kind: {object}"));
        let ns = object["metadata"]["namespace"].as_str().map(str::to_string);
        write(&self.inner, k, ns, object, Write::Upsert).unwrap_or_else(|f| panic!("apply: {f:?}"))
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let k = kind_of(api_version, kind).expect("known kind");
        let key = (
            if k.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        remove(&self.inner, k, &key).unwrap_or_else(|f| panic!("delete: {f:?}"));
    }

    /// Every stored object of `plural`, whole (with `apiVersion` and `kind`).
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let st = self.inner.lock();
        st.objects
            .iter()
            .filter(|(p, _)| **p == plural)
            .flat_map(|(_, m)| m.values().cloned())
            .collect()
    }

    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.inner.lock();
        let m = st.objects.get(plural)?;
        m.get(&(namespace.to_string(), name.to_string()))
            .or_else(|| m.get(&(String::new(), name.to_string())))
            .cloned()
    }

    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// Starts serving kind `plural` (a CRD being installed).
    pub fn serve(&self, plural: &str) {
        let k = KINDS
            .iter()
            .copied()
            .find(|k| k.plural == plural)
            .unwrap_or_else(|| panic!("unknown kind {plural}"));
        let mut served = self.inner.served.lock().unwrap_or_else(|p| p.into_inner());
        if !served.contains(&k) {
            served.push(k);
        }
    }

    /// Forgets the history up to now: a watch from an older version gets
    /// 410 Gone.
    pub fn compact(&self) {
        let mut st = self.inner.lock();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Ends every open watch (as an API server restart or a load
    /// balancer's idle timeout would).
    pub fn drop_watches(&self) {
        self.inner.epoch.send_modify(|e| *e += 1);
    }

    /// While paused, a new watch waits before it is answered.
    pub fn pause_watches(&self, paused: bool) {
        self.inner.paused.send_replace(paused);
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.inner.lock().log.clone()
    }

    pub fn count(&self, verb: &str, plural: &str) -> usize {
        self.inner
            .lock()
            .log
            .iter()
            .filter(|l| l.verb == verb && l.plural == plural)
            .count()
    }

    /// Waits until every open watch of the kinds in `plurals` has told its
    /// client about version `rv` or later (by an event or a bookmark).
    pub async fn wait_watches_at(&self, plurals: &[&str], rv: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ok = {
                let st = self.inner.lock();
                plurals.iter().all(|p| {
                    let mine: Vec<u64> = st
                        .streams
                        .values()
                        .filter(|(sp, _)| sp == p)
                        .map(|(_, v)| *v)
                        .collect();
                    !mine.is_empty() && mine.iter().all(|v| *v >= rv)
                })
            };
            if ok {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "watches of {plurals:?} not at version {rv}: {:?}",
                    self.inner.lock().streams
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn tls_config() -> (String, rustls::ServerConfig) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubernetes test CA");
    let ca_pem = ca_params.self_signed(&ca_key).expect("ca").pem();
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "kubernetes".to_string()])
            .expect("params");
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    (ca_pem, config)
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_default()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// `/api/v1[/namespaces/NS]/PLURAL[/NAME]` or the same under
/// `/apis/GROUP/VERSION`; a Namespace's own path is `/api/v1/namespaces/NAME`.
fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (ns, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(ns.to_string()), plural.to_string(), None),
        ["namespaces", ns, plural, name] => (
            Some(ns.to_string()),
            plural.to_string(),
            Some(name.to_string()),
        ),
        [plural] => (None, plural.to_string(), None),
        [plural, name] => (None, plural.to_string(), Some(name.to_string())),
        _ => return None,
    };
    Some(Route {
        group,
        version,
        ns,
        plural,
        name,
    })
}

/// Where a request goes: the kind's group, version and plural, the
/// namespace and the object's name when the path has them.
struct Route {
    group: String,
    version: String,
    ns: Option<String>,
    plural: String,
    name: Option<String>,
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `key=value` and `key!=value` selectors, comma-separated (all the tests
/// use).
fn selected(obj: &Value, q: &HashMap<String, String>) -> bool {
    let meta = &obj["metadata"];
    let fields_ok = q.get("fieldSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v, equal) = match term.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => {
                    let (k, v) = term.split_once('=').unwrap_or((term, ""));
                    (k, v, true)
                }
            };
            let field = match k {
                "metadata.name" => &meta["name"],
                "metadata.namespace" => &meta["namespace"],
                "type" => &obj["type"],
                _ => return false,
            };
            (field.as_str().unwrap_or_default() == v) == equal
        })
    });
    let labels_ok = q.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap_or((term, ""));
            meta["labels"][k] == v
        })
    });
    fields_ok && labels_ok
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {}", inner.token) {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        );
    }
    let path = req.uri().path().to_string();
    let Some(Route {
        group,
        version,
        ns,
        plural,
        name,
    }) = route(&path)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {path}"),
        );
    };
    let served = inner
        .served
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .find(|k| k.group == group && k.version == version && k.plural == plural);
    let Some(k) = served else {
        // Logged as well: the client asked, the kind is not served.
        let watching = req.uri().query().is_some_and(|q| q.contains("watch=true"));
        let verb = match (name.is_some(), watching) {
            (true, _) => "GET",
            (false, true) => "WATCH",
            (false, false) => "LIST",
        };
        log(&inner, verb, &plural, None);
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let q = query(&req);
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let key_ns = if k.namespaced {
        ns.clone().unwrap_or_default()
    } else {
        String::new()
    };
    match (method, name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            log(&inner, "WATCH", k.plural, q.get("resourceVersion").cloned());
            watch_response(inner, k, ns, q).await
        }
        (Method::GET, None) => {
            log(&inner, "LIST", k.plural, q.get("resourceVersion").cloned());
            list_response(&inner, k, ns, &q)
        }
        (Method::GET, Some(name)) => {
            log(&inner, "GET", k.plural, None);
            match inner
                .lock()
                .objects
                .get(k.plural)
                .and_then(|m| m.get(&(key_ns, name.clone())))
            {
                Some(o) => full(StatusCode::OK, o.clone()),
                None => not_found(k, &name),
            }
        }
        (Method::POST, None) => {
            log(&inner, "CREATE", k.plural, None);
            let Some(obj) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
            };
            match write(&inner, k, ns, obj, Write::Create) {
                Ok(o) => full(StatusCode::CREATED, o),
                Err(f) => f.response(),
            }
        }
        (Method::PUT, Some(_)) => {
            log(&inner, "UPDATE", k.plural, None);
            let Some(obj) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
            };
            match write(&inner, k, ns, obj, Write::Replace) {
                Ok(o) => full(StatusCode::OK, o),
                Err(f) => f.response(),
            }
        }
        (Method::PATCH, Some(name)) => {
            log(&inner, "PATCH", k.plural, None);
            let current = inner
                .lock()
                .objects
                .get(k.plural)
                .and_then(|m| m.get(&(key_ns, name.clone())))
                .cloned();
            let Some(mut obj) = current else {
                return not_found(k, &name);
            };
            let Some(Value::Array(ops)) = parsed else {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "only JSON patches (application/json-patch+json) here".into(),
                );
            };
            if let Err(e) = json_patch(&mut obj, &ops) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
            }
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            match write(&inner, k, ns, obj, Write::Replace) {
                Ok(o) => full(StatusCode::OK, o),
                Err(f) => f.response(),
            }
        }
        (Method::DELETE, Some(name)) => {
            log(&inner, "DELETE", k.plural, None);
            match remove(&inner, k, &(key_ns, name)) {
                Ok(o) => full(StatusCode::OK, o),
                Err(f) => f.response(),
            }
        }
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} not supported"),
        ),
    }
}

/// A refusal: the status code, its reason and message.
#[derive(Debug)]
struct Failure(StatusCode, &'static str, String);

impl Failure {
    fn response(self) -> Response<Body> {
        status(self.0, self.1, self.2)
    }
}

fn missing(k: KindDef, name: &str) -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{}.{} \"{name}\" not found", k.plural, k.group),
    )
}

fn not_found(k: KindDef, name: &str) -> Response<Body> {
    missing(k, name).response()
}

fn log(inner: &Inner, verb: &str, plural: &str, rv: Option<String>) {
    inner.lock().log.push(Logged {
        verb: verb.into(),
        plural: plural.into(),
        resource_version: rv,
    });
}

/// An RFC 6902 JSON patch: `add`, `replace`, `remove` and `test`.
fn json_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let path = op["path"].as_str().ok_or("op without a path")?;
        let mut parts: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().ok_or("empty path")?;
        let mut parent = &mut *doc;
        for p in &parts {
            parent = match parent {
                Value::Object(m) => m.get_mut(p).ok_or(format!("no {p} in {path}"))?,
                Value::Array(a) => {
                    let i: usize = p.parse().map_err(|_| format!("bad index {p}"))?;
                    a.get_mut(i).ok_or(format!("no index {i} in {path}"))?
                }
                _ => return Err(format!("{path} goes through a scalar")),
            };
        }
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match (op["op"].as_str(), parent) {
            (Some("add" | "replace"), Value::Object(m)) => {
                m.insert(last, value);
            }
            (Some("remove"), Value::Object(m)) => {
                m.remove(&last).ok_or(format!("nothing at {path}"))?;
            }
            (Some("test"), Value::Object(m)) => {
                if m.get(&last) != Some(&value) {
                    return Err(format!("test failed at {path}"));
                }
            }
            (Some(o), _) => return Err(format!("op {o} at {path} not supported here")),
            (None, _) => return Err("op missing".into()),
        }
    }
    Ok(())
}

#[derive(PartialEq)]
enum Write {
    Create,
    Replace,
    Upsert,
}

/// Stores an object as the API server does: metadata filled in, the
/// version bumped, an event recorded and broadcast.
fn write(
    inner: &Inner,
    k: KindDef,
    ns: Option<String>,
    mut obj: Value,
    mode: Write,
) -> Result<Value, Failure> {
    let mut st = inner.lock();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err(Failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value".into(),
        ));
    }
    let namespace = if k.namespaced {
        ns.or_else(|| obj["metadata"]["namespace"].as_str().map(str::to_string))
            .unwrap_or_else(|| "default".into())
    } else {
        String::new()
    };
    let key = (namespace.clone(), name.clone());
    let existing = st.objects.get(k.plural).and_then(|m| m.get(&key)).cloned();
    match (&mode, &existing) {
        (Write::Create, Some(_)) => {
            return Err(Failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", k.plural, k.group),
            ));
        }
        (Write::Replace, None) => return Err(missing(k, &name)),
        (Write::Replace, Some(old)) => {
            let asked = obj["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if !asked.is_empty() && asked != old["metadata"]["resourceVersion"] {
                return Err(Failure(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified",
                        k.plural
                    ),
                ));
            }
        }
        _ => {}
    }
    st.rv += 1;
    let rv = st.rv;
    let uid = match &existing {
        Some(old) => old["metadata"]["uid"].clone(),
        None => {
            st.uid += 1;
            json!(format!("6f1e2c3a-0000-4000-8000-{:012x}", st.uid))
        }
    };
    let generation = match &existing {
        Some(old) if old["spec"] != obj["spec"] => {
            old["metadata"]["generation"].as_u64().unwrap_or(1) + 1
        }
        Some(old) => old["metadata"]["generation"].as_u64().unwrap_or(1),
        None => 1,
    };
    let created = existing
        .as_ref()
        .map(|o| o["metadata"]["creationTimestamp"].clone())
        .unwrap_or_else(|| json!("2026-01-05T10:00:00Z"));
    obj["apiVersion"] = json!(k.api_version());
    obj["kind"] = json!(k.kind);
    if let Err(e) = typed_shape(k, &obj) {
        return Err(Failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e));
    }
    let meta = obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object");
    if k.namespaced {
        meta.insert("namespace".into(), json!(namespace));
    }
    meta.insert("uid".into(), uid);
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    meta.insert("creationTimestamp".into(), created);
    if k.custom() {
        meta.insert("generation".into(), json!(generation));
    }
    meta.insert(
        "managedFields".into(),
        json!([{"manager": "kubectl-client-side-apply", "operation": "Update",
                 "apiVersion": k.api_version(), "time": "2026-01-05T10:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]),
    );
    st.objects
        .entry(k.plural)
        .or_default()
        .insert(key, obj.clone());
    let event = Event {
        rv,
        plural: k.plural,
        kind: if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        },
        object: obj.clone(),
    };
    st.history.push(event.clone());
    // Sent under the store's lock: once a watch reads version N, every
    // event up to N is in its channel (see the bookmarks).
    let _ = inner.events.send(event);
    drop(st);
    Ok(obj)
}

/// A built-in kind's object must be what k8s-openapi's type for it reads
/// and writes back unchanged: no unknown field, no wrong type, no `null`
/// where the API server would leave the field out. Istio's kinds are read
/// by the control plane's own types when translated.
fn typed_shape(k: KindDef, obj: &Value) -> Result<(), String> {
    use k8s_openapi::api::{admissionregistration, core, discovery};
    fn same<T: serde::de::DeserializeOwned + serde::Serialize>(obj: &Value) -> Result<(), String> {
        let typed: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
        let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
        if &back == obj {
            Ok(())
        } else {
            Err(format!(
                "not the shape of {}: sent {obj}, the type keeps {back}",
                std::any::type_name::<T>()
            ))
        }
    }
    match k.kind {
        "Namespace" => same::<core::v1::Namespace>(obj),
        "Service" => same::<core::v1::Service>(obj),
        "Pod" => same::<core::v1::Pod>(obj),
        "ConfigMap" => same::<core::v1::ConfigMap>(obj),
        "EndpointSlice" => same::<discovery::v1::EndpointSlice>(obj),
        "MutatingWebhookConfiguration" => {
            same::<admissionregistration::v1::MutatingWebhookConfiguration>(obj)
        }
        _ => Ok(()),
    }
}

fn remove(inner: &Inner, k: KindDef, key: &Key) -> Result<Value, Failure> {
    let mut st = inner.lock();
    let Some(mut obj) = st.objects.get_mut(k.plural).and_then(|m| m.remove(key)) else {
        return Err(missing(k, &key.1));
    };
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let event = Event {
        rv,
        plural: k.plural,
        kind: "DELETED",
        object: obj.clone(),
    };
    st.history.push(event.clone());
    // Sent under the store's lock: once a watch reads version N, every
    // event up to N is in its channel (see the bookmarks).
    let _ = inner.events.send(event);
    drop(st);
    Ok(obj)
}

fn in_scope(obj: &Value, ns: &Option<String>) -> bool {
    ns.as_ref()
        .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns.as_str()))
}

/// An item as a typed list carries it: built-in kinds without
/// `apiVersion`/`kind`.
fn list_item(k: KindDef, obj: &Value) -> Value {
    let mut o = obj.clone();
    if !k.custom()
        && let Some(m) = o.as_object_mut()
    {
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

fn list_response(
    inner: &Inner,
    k: KindDef,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let mut st = inner.lock();
    let (rv, items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match st.pages.remove(token) {
            Some(page) => page,
            None => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "the provided continue parameter is too old".into(),
                );
            }
        },
        None => {
            let items: Vec<Value> = st
                .objects
                .get(k.plural)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| in_scope(o, &ns) && selected(o, q))
                .map(|o| list_item(k, o))
                .collect();
            (st.rv, items)
        }
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(usize::MAX)
        .min(inner.page_size);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    let (page, rest) = if items.len() > limit {
        let (a, b) = items.split_at(limit);
        (a.to_vec(), b.to_vec())
    } else {
        (items, Vec::new())
    };
    if !rest.is_empty() {
        let token = format!("{}-{}-{}", k.plural, rv, st.pages.len() + st.log.len());
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        st.pages.insert(token, (rv, rest));
    }
    full(
        StatusCode::OK,
        json!({"apiVersion": k.api_version(), "kind": format!("{}List", k.kind),
               "metadata": metadata, "items": page}),
    )
}

fn line(v: Value) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(format!("{v}\n"))))
}

async fn watch_response(
    inner: Arc<Inner>,
    k: KindDef,
    ns: Option<String>,
    q: HashMap<String, String>,
) -> Response<Body> {
    // A paused server holds the request before answering it.
    let mut paused = inner.paused.subscribe();
    let _ = paused.wait_for(|p| !*p).await;
    let mut events = inner.events.subscribe();
    let mut epoch = inner.epoch.subscribe();
    epoch.borrow_and_update();
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let asked = q.get("resourceVersion").cloned().unwrap_or_default();
    let (start, backlog, stream_id) = {
        let mut st = inner.lock();
        let start: u64 = match asked.as_str() {
            // "Any" or "most recent": the current objects as ADDED events.
            "" | "0" => 0,
            v => v.parse().unwrap_or(0),
        };
        if start != 0 && start < st.compacted {
            drop(st);
            let _ = tx.try_send(line(json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {start} ({})", inner.lock().compacted),
                "reason": "Expired", "code": 410}})));
            drop(tx);
            return stream_response(rx);
        }
        let backlog: Vec<(u64, Value)> = if start == 0 {
            st.objects
                .get(k.plural)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| in_scope(o, &ns) && selected(o, &q))
                .map(|o| (st.rv, json!({"type": "ADDED", "object": o})))
                .collect()
        } else {
            st.history
                .iter()
                .filter(|e| e.rv > start && e.plural == k.plural)
                .filter(|e| in_scope(&e.object, &ns) && selected(&e.object, &q))
                .map(|e| (e.rv, json!({"type": e.kind, "object": e.object})))
                .collect()
        };
        let start = if start == 0 { st.rv } else { start };
        st.next_stream += 1;
        let id = st.next_stream;
        st.streams.insert(id, (k.plural, start));
        (start, backlog, id)
    };
    let inner2 = inner.clone();
    tokio::spawn(async move {
        let mut last = start;
        let set_last = |v: u64| {
            if let Some(s) = inner2.lock().streams.get_mut(&stream_id) {
                s.1 = v;
            }
        };
        for (rv, ev) in backlog {
            if tx.send(line(ev)).await.is_err() {
                inner2.lock().streams.remove(&stream_id);
                return;
            }
            last = last.max(rv);
        }
        set_last(last);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(inner2.bookmark_every);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(e) if e.rv > last && e.plural == k.plural
                        && in_scope(&e.object, &ns) && selected(&e.object, &q) => {
                        if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            break;
                        }
                        last = e.rv;
                        set_last(last);
                    }
                    Ok(_) => {}
                    // Fell behind: end the stream, the client resumes.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick(), if bookmarks => {
                    let now = inner2.lock().rv;
                    // Events up to `now` are in the channel: deliver them
                    // before a bookmark claims their version.
                    let mut ended = false;
                    loop {
                        match events.try_recv() {
                            Ok(e) if e.rv > last && e.plural == k.plural
                                && in_scope(&e.object, &ns) && selected(&e.object, &q) => {
                                if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                                    ended = true;
                                    break;
                                }
                                last = e.rv;
                                set_last(last);
                            }
                            Ok(_) => {}
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(_) => {
                                ended = true;
                                break;
                            }
                        }
                    }
                    if ended {
                        break;
                    }
                    if now > last {
                        let bm = json!({"type": "BOOKMARK", "object": {
                            "kind": k.kind, "apiVersion": k.api_version(),
                            "metadata": {"resourceVersion": now.to_string()}}});
                        if tx.send(line(bm)).await.is_err() {
                            break;
                        }
                        last = now;
                        set_last(last);
                    }
                }
                _ = epoch.changed() => break,
                () = &mut deadline => break,
                () = tx.closed() => break,
            }
        }
        inner2.lock().streams.remove(&stream_id);
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
        .unwrap_or_default()
}

/// Every object of a YAML text (multi-document) as JSON.
pub fn yaml_objects(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .filter_map(|d| serde_yaml_ng::Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML as JSON"))
        .collect()
}

pub fn read_yaml(path: &Path) -> Vec<Value> {
    yaml_objects(&std::fs::read_to_string(path).expect("read YAML"))
}
