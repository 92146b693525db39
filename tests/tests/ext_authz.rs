//! The external authorization filter (`envoy.filters.http.ext_authz`) proven equal to
//! Envoy's: one static bootstrap with several listeners — a gRPC authorizer with per-route
//! settings, an HTTP authorizer with istiod's header lists, an authorizer that is down
//! (failing closed, with `status_on_error`, failing open with the header), and istiod's
//! CUSTOM shape translated by ferry-pilot from Istio's extauthz sample (HTTP and gRPC
//! providers) — runs through Ferry and through Envoy 1.40 in front of the same
//! `tests/apps/echo.py` backend. The same requests must give the same status, body and
//! client headers, the same headers at the backend, and the same `ext_authz` counters.
//!
//! The authorizers are written here with the semantics of Istio's sample server
//! (`samples/extauthz`): `x-ext-authz: allow` is allowed (`x-ext-authz-check-result:
//! allowed`, the `x-ext-authz-additional-header-override` value echoed back), anything else
//! is denied with 403, a body and `x-ext-authz-check-result: denied`; `x-ext-authz: slow`
//! answers after a second (past the check's timeout).
//!
//! Envoy comes from `ferry_tests::envoy`; without it the test is skipped with a note,
//! except under `CI=true`, where a missing Envoy fails the test.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status;
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, free_port, http_connection_manager, http_request,
    listener, local, read_response, static_cluster,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHECK_HEADER: &str = "x-ext-authz";
const RESULT_HEADER: &str = "x-ext-authz-check-result";
const OVERRIDE_HEADER: &str = "x-ext-authz-additional-header-override";
/// What the authorizer saw (the path and the added header for HTTP, the context
/// extensions for gRPC), told to the backend on allow.
const SEEN_HEADER: &str = "x-ext-authz-seen";
const DENY_BODY: &str =
    "denied by ext_authz for not found header `x-ext-authz: allow` in the request";

// ------------------------------------------------------------------------------ authorizers

/// The sample's gRPC authorizer (`envoy.service.auth.v3.Authorization`).
struct GrpcAuthz;

fn set(key: &str, value: &str) -> HeaderValueOption {
    #[allow(deprecated)] // the sample server sets `append: false`, as many do
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for GrpcAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // A connection's check (no HTTP request): allowed unless the filter's
        // `initial_metadata` says `x-verdict: deny`.
        let verdict = request
            .metadata()
            .get("x-verdict")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("allow")
            .to_string();
        let attrs = request.into_inner().attributes.unwrap_or_default();
        let Some(http) = attrs.request.and_then(|r| r.http) else {
            let code = if verdict == "deny" { 7 } else { 0 };
            return Ok(tonic::Response::new(CheckResponse {
                status: Some(Status {
                    code,
                    ..Default::default()
                }),
                ..Default::default()
            }));
        };
        let h = |k: &str| http.headers.get(k).cloned();
        if h(CHECK_HEADER).as_deref() == Some("slow") {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let allowed = matches!(h(CHECK_HEADER).as_deref(), Some("allow" | "slow"));
        let mut headers = vec![set(
            RESULT_HEADER,
            if allowed { "allowed" } else { "denied" },
        )];
        if let Some(v) = h(OVERRIDE_HEADER) {
            headers.push(set(OVERRIDE_HEADER, &v));
        }
        let answer = if allowed {
            let ctx: BTreeMap<_, _> = attrs.context_extensions.into_iter().collect();
            let seen = ctx
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            headers.push(set(
                SEEN_HEADER,
                &format!(
                    "ctx[{seen}] method={}{}",
                    http.method,
                    grpc_body_seen(&http)
                ),
            ));
            CheckResponse {
                status: Some(Status::default()),
                http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
                    headers,
                    headers_to_remove: vec!["x-ext-authz-remove-me".into()],
                    response_headers_to_add: vec![set("x-ext-authz-on-success", "yes")],
                    ..Default::default()
                })),
                ..Default::default()
            }
        } else {
            CheckResponse {
                status: Some(Status {
                    code: 7,
                    ..Default::default()
                }),
                http_response: Some(check_response::HttpResponse::DeniedResponse(
                    DeniedHttpResponse {
                        status: Some(HttpStatus { code: 403 }),
                        headers,
                        body: DENY_BODY.into(),
                    },
                )),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(answer))
    }
}

/// The request body a gRPC check carried (none without `with_request_body`): its text,
/// its bytes, the partial-body header and the declared size.
fn grpc_body_seen(
    http: &envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
) -> String {
    let partial = http.headers.get("x-envoy-auth-partial-body");
    if http.body.is_empty() && http.raw_body.is_empty() && partial.is_none() {
        return String::new();
    }
    format!(
        " body={:?} raw_body={:?} partial={partial:?} size={}",
        http.body,
        String::from_utf8_lossy(&http.raw_body),
        http.size
    )
}

/// One HTTP/1.1 exchange of the sample's HTTP authorizer on a connection; `false` when
/// the connection is done.
async fn http_authz_exchange(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let h = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    // A check carries the request body with `with_request_body`, else none.
    let length: usize = h("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf.split_off(head_end + 4);
    while body.len() < length {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let body_seen = if length > 0 || h("x-envoy-auth-partial-body").is_some() {
        format!(
            " body={:?} partial={:?} content-length={length}",
            String::from_utf8_lossy(&body[..length]),
            h("x-envoy-auth-partial-body")
        )
    } else {
        String::new()
    };
    if h(CHECK_HEADER).as_deref() == Some("slow") {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let allowed = matches!(h(CHECK_HEADER).as_deref(), Some("allow" | "slow"));
    let mut out = if allowed {
        format!(
            "HTTP/1.1 200 OK\r\n{RESULT_HEADER}: allowed\r\n{SEEN_HEADER}: path={path} added={}{body_seen}\r\n",
            h("x-added").unwrap_or_default()
        )
    } else {
        format!(
            "HTTP/1.1 403 Forbidden\r\n{RESULT_HEADER}: denied\r\ncontent-type: text/plain; charset=utf-8\r\nx-not-for-client: 1\r\ncontent-length: {}\r\n",
            DENY_BODY.len()
        )
    };
    if let Some(v) = h(OVERRIDE_HEADER) {
        out.push_str(&format!("{OVERRIDE_HEADER}: {v}\r\n"));
    }
    if allowed {
        out.push_str("content-length: 0\r\n\r\n");
    } else {
        out.push_str("\r\n");
        out.push_str(DENY_BODY);
    }
    s.write_all(out.as_bytes()).await.is_ok()
}

/// The two authorizers on fresh ports, served by their own runtime until dropped.
struct Authorizers {
    http: u16,
    grpc: u16,
    _rt: tokio::runtime::Runtime,
}

impl Authorizers {
    fn start() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (http, grpc) = rt.block_on(async {
            let h = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let g = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok((h, g))
        })?;
        let ports = (http.local_addr()?.port(), grpc.local_addr()?.port());
        rt.spawn(async move {
            while let Ok((mut s, _)) = http.accept().await {
                tokio::spawn(async move { while http_authz_exchange(&mut s).await {} });
            }
        });
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(AuthorizationServer::new(GrpcAuthz), incoming)
                .await;
        });
        Ok(Authorizers {
            http: ports.0,
            grpc: ports.1,
            _rt: rt,
        })
    }
}

// ------------------------------------------------------------------------------ config

/// The listeners of the bootstrap, by what they show.
#[derive(Clone, Copy, Debug)]
enum L {
    Grpc,
    Http,
    Down,
    DownStatus,
    DownAllow,
    IstiodHttp,
    IstiodGrpc,
    NetAllow,
    NetDeny,
    NetDown,
    NetDownAllow,
    IstiodTcp,
}

const ALL: [L; 12] = [
    L::Grpc,
    L::Http,
    L::Down,
    L::DownStatus,
    L::DownAllow,
    L::IstiodHttp,
    L::IstiodGrpc,
    L::NetAllow,
    L::NetDeny,
    L::NetDown,
    L::NetDownAllow,
    L::IstiodTcp,
];

const HTTP_CLUSTER: &str = "outbound|8000||ext-authz.foo.svc.cluster.local";
const GRPC_CLUSTER: &str = "outbound|9000||ext-authz.foo.svc.cluster.local";

fn ext_authz(cfg: Value) -> Value {
    let mut c = cfg;
    c["@type"] = json!("type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz");
    json!({"name": "envoy.filters.http.ext_authz", "typed_config": c})
}

/// An `envoy_grpc` service; the authority is set, since the cluster's name (the default)
/// holds `|`, which no HTTP/2 server takes in `:authority`.
fn grpc_service(cluster: &str) -> Value {
    json!({"envoy_grpc": {"cluster_name": cluster, "authority": "ext-authz"}})
}

/// Routes to the backend: `/off` with the filter disabled, `/retry/` retried once on a
/// 5xx, `/nobody` without buffering the body, `/ctx` with context
/// extensions (a virtual host's merged under the route's), anything else plain.
fn routes() -> Vec<Value> {
    let per_route = |cfg: Value| {
        let mut c = cfg;
        c["@type"] = json!(
            "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
        );
        json!({"envoy.filters.http.ext_authz": c})
    };
    vec![
        json!({"match": {"prefix": "/off"}, "route": {"cluster": "backend", "timeout": "5s"},
            "typed_per_filter_config": per_route(json!({"disabled": true}))}),
        // Retried once on a 5xx: the retry sends the body again.
        json!({"match": {"prefix": "/retry/"}, "route": {"cluster": "backend", "timeout": "5s",
            "prefix_rewrite": "/", "retry_policy": {"retry_on": "5xx", "num_retries": 1}}}),
        json!({"match": {"prefix": "/nobody"}, "route": {"cluster": "backend", "timeout": "5s"},
            "typed_per_filter_config": per_route(json!({"check_settings": {
                "disable_request_body_buffering": true}}))}),
        json!({"match": {"prefix": "/ctx"}, "route": {"cluster": "backend", "timeout": "5s"},
            "typed_per_filter_config": per_route(json!({"check_settings": {
                "context_extensions": {"route": "ctx", "shared": "route"}}}))}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "5s"}}),
    ]
}

/// A listener whose connection manager runs `filters` before the router.
fn with_filters(name: &str, port: u16, filters: Vec<Value>) -> Value {
    let mut hcm = http_connection_manager(name, routes());
    let vh = &mut hcm["typed_config"]["route_config"]["virtual_hosts"][0];
    vh["typed_per_filter_config"] = json!({"envoy.filters.http.ext_authz": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "check_settings": {"context_extensions": {"vhost": "all", "shared": "vhost"}}}});
    if let Some(list) = hcm["typed_config"]["http_filters"].as_array_mut() {
        for (i, f) in filters.into_iter().enumerate() {
            list.insert(i, f);
        }
    }
    listener(name, port, vec![json!({"filters": [hcm]})])
}

/// Istio's extauthz sample as ferry-pilot translates it for an `httpbin` sidecar: a CUSTOM
/// AuthorizationPolicy sending `/headers` to `provider` (the MeshConfig's
/// `envoyExtAuthzHttp` or `envoyExtAuthzGrpc` provider): the connection manager's RBAC and
/// ext_authz filters, as JSON.
fn istiod_filters(provider: &str) -> Result<Vec<Value>> {
    istiod_chain_filters(provider, false)
}

/// Like [`istiod_filters`], or with `tcp` the network RBAC and ext_authz filters of a TCP
/// chain of the same listener.
fn istiod_chain_filters(provider: &str, tcp: bool) -> Result<Vec<Value>> {
    use ferry_pilot::istio::source::parse_documents;
    use ferry_pilot::istio::translate::{Mesh, MeshOptions, Proxy};
    use ferry_pilot::istio::types::mesh::MeshConfig;
    const HTTP_FILTER: &str =
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter";
    const NETWORK_FILTER: &str = "envoy.config.listener.v3.Filter";
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: foo}}\n\
         spec: {{clusterIP: 10.96.9.9, ports: [{{name: http, port: 8000}}, {{name: grpc, port: 9000}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: httpbin, namespace: foo}}\n\
         spec: {{clusterIP: 10.96.9.10, selector: {{app: httpbin}}, ports: [{{name: http, port: 8000, targetPort: 8080}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: ext-authz, namespace: foo}}\n\
         spec: {{selector: {{matchLabels: {{app: httpbin}}}}, action: CUSTOM, provider: {{name: {provider}}},\n\
         \x20 rules: [{{to: [{{operation: {{paths: [\"/headers\"]}}}}]}}]}}\n"
    );
    let snap = parse_documents(&yaml, Path::new("extauthz.yaml"));
    anyhow::ensure!(snap.errors.is_empty(), "{:?}", snap.errors);
    // The sample's MeshConfig (istio.io's external authorization task).
    let mesh_config: MeshConfig = serde_yaml_ng::from_str(
        "extensionProviders:\n\
         - name: sample-ext-authz-grpc\n  envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}\n\
         - name: sample-ext-authz-http\n  envoyExtAuthzHttp:\n    service: ext-authz.foo.svc.cluster.local\n    port: 8000\n\
         \x20   includeRequestHeadersInCheck: [\"x-ext-authz\"]\n",
    )?;
    let mesh = Mesh::new(&snap, MeshOptions::from_mesh_config(&mesh_config));
    let mut p = Proxy {
        id: "sidecar~10.0.0.1~httpbin-1.foo~foo.svc.cluster.local".into(),
        namespace: "foo".into(),
        ips: vec!["10.0.0.1".into()],
        labels: [("app".to_string(), "httpbin".to_string())].into(),
        ..Default::default()
    };
    mesh.complete_proxy(&mut p);
    let cfg = mesh.proxy_config(&p);
    let d = ferry_envoy_json::Descriptors::load().map_err(anyhow::Error::msg)?;
    for l in cfg.listeners.iter().filter(|l| l.name == "virtualInbound") {
        for c in &l.filter_chains {
            if tcp {
                let picked: Vec<Value> = c
                    .filters
                    .iter()
                    .filter(|f| {
                        matches!(
                            f.name.as_str(),
                            "envoy.filters.network.rbac" | "envoy.filters.network.ext_authz"
                        )
                    })
                    .map(|f| d.to_json(NETWORK_FILTER, f).map_err(anyhow::Error::msg))
                    .collect::<Result<_>>()?;
                if picked
                    .iter()
                    .any(|f| f["name"] == "envoy.filters.network.ext_authz")
                    && c.filters
                        .iter()
                        .any(|f| f.name == "envoy.filters.network.tcp_proxy")
                {
                    return Ok(picked);
                }
                continue;
            }
            for f in &c.filters {
                use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
                use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
                use prost::Message;
                let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if f.name != "envoy.filters.network.http_connection_manager" {
                    continue;
                }
                let hcm = HttpConnectionManager::decode(&*any.value)?;
                let picked: Vec<Value> = hcm
                    .http_filters
                    .iter()
                    .filter(|f| {
                        matches!(
                            f.name.as_str(),
                            "envoy.filters.http.rbac" | "envoy.filters.http.ext_authz"
                        )
                    })
                    .map(|f| d.to_json(HTTP_FILTER, f).map_err(anyhow::Error::msg))
                    .collect::<Result<_>>()?;
                if picked
                    .iter()
                    .any(|f| f["name"] == "envoy.filters.http.ext_authz")
                {
                    return Ok(picked);
                }
            }
        }
    }
    anyhow::bail!("ferry-pilot made no ext_authz filter for {provider}")
}

struct Ports(BTreeMap<String, u16>);

impl Ports {
    fn new() -> Self {
        Ports(
            ALL.iter()
                .map(|l| (format!("{l:?}"), free_port()))
                .collect(),
        )
    }

    fn of(&self, l: L) -> u16 {
        self.0[&format!("{l:?}")]
    }
}

/// A TCP listener: `filters`, then `tcp_proxy` to the echo server.
fn tcp_listener(name: &str, port: u16, filters: Vec<Value>) -> Value {
    let mut all = filters;
    all.push(ferry_tests::proxy::tcp_proxy(name, "echo"));
    listener(name, port, vec![json!({"filters": all})])
}

fn network_ext_authz(cluster: &str, extra: Value) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
        "stat_prefix": "net",
        "grpc_service": grpc_service(cluster),
    });
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    json!({"name": "envoy.filters.network.ext_authz", "typed_config": c})
}

fn config(
    ports: &Ports,
    backend: u16,
    echo: u16,
    authz: &Authorizers,
    down: u16,
) -> Result<String> {
    let grpc = ext_authz(json!({
        "grpc_service": grpc_service(GRPC_CLUSTER),
        "transport_api_version": "V3",
    }));
    let http = ext_authz(json!({
        "http_service": {
            "server_uri": {"uri": "http://ext-authz", "cluster": HTTP_CLUSTER, "timeout": "0.2s"},
            "path_prefix": "/check",
            "authorization_request": {
                "allowed_headers": {"patterns": [{"exact": CHECK_HEADER, "ignore_case": true},
                    {"exact": OVERRIDE_HEADER}]},
                "headers_to_add": [{"key": "x-added", "value": "from-%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}],
            },
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": RESULT_HEADER},
                    {"exact": SEEN_HEADER}, {"prefix": "x-ext-authz-additional"}]},
                "allowed_client_headers": {"patterns": [{"exact": RESULT_HEADER}]},
                "allowed_client_headers_on_success": {"patterns": [{"exact": RESULT_HEADER}]},
            },
        },
        "transport_api_version": "V3",
    }));
    let down_cfg = |extra: Value| {
        let mut c = json!({"grpc_service": grpc_service("down"), "stat_prefix": "down"});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        ext_authz(c)
    };
    let b = Bootstrap::new()
        .listener(with_filters("grpc", ports.of(L::Grpc), vec![grpc]))
        .listener(with_filters("http", ports.of(L::Http), vec![http]))
        .listener(with_filters(
            "down",
            ports.of(L::Down),
            vec![down_cfg(json!({}))],
        ))
        .listener(with_filters(
            "down_status",
            ports.of(L::DownStatus),
            vec![down_cfg(json!({"status_on_error": {"code": 503}}))],
        ))
        .listener(with_filters(
            "down_allow",
            ports.of(L::DownAllow),
            vec![down_cfg(
                json!({"failure_mode_allow": true, "failure_mode_allow_header_add": true}),
            )],
        ))
        .listener(with_filters(
            "istiod_http",
            ports.of(L::IstiodHttp),
            istiod_filters("sample-ext-authz-http")?,
        ))
        .listener(with_filters(
            "istiod_grpc",
            ports.of(L::IstiodGrpc),
            istiod_filters("sample-ext-authz-grpc")?,
        ))
        .listener(tcp_listener(
            "net_allow",
            ports.of(L::NetAllow),
            vec![network_ext_authz(GRPC_CLUSTER, json!({}))],
        ))
        .listener(tcp_listener(
            "net_deny",
            ports.of(L::NetDeny),
            vec![network_ext_authz(
                GRPC_CLUSTER,
                json!({"grpc_service": {"envoy_grpc": {"cluster_name": GRPC_CLUSTER, "authority": "ext-authz"},
                    "initial_metadata": [{"key": "x-verdict", "value": "deny"}]}}),
            )],
        ))
        .listener(tcp_listener(
            "net_down",
            ports.of(L::NetDown),
            vec![network_ext_authz("down", json!({"stat_prefix": "down"}))],
        ))
        .listener(tcp_listener(
            "net_down_allow",
            ports.of(L::NetDownAllow),
            vec![network_ext_authz(
                "down",
                json!({"stat_prefix": "down_allow", "failure_mode_allow": true}),
            )],
        ))
        .listener(tcp_listener(
            "istiod_tcp",
            ports.of(L::IstiodTcp),
            istiod_chain_filters("sample-ext-authz-grpc", true)?,
        ))
        .cluster(static_cluster("echo", &[echo], Upstream::Http1))
        .cluster(static_cluster("backend", &[backend], Upstream::Http1))
        .cluster(static_cluster(HTTP_CLUSTER, &[authz.http], Upstream::Http1))
        .cluster(static_cluster(GRPC_CLUSTER, &[authz.grpc], Upstream::Http2))
        .cluster(static_cluster("down", &[down], Upstream::Http2));
    Ok(b.render())
}

// ------------------------------------------------------------------------------ requests

/// What one request shows.
#[derive(Debug, PartialEq)]
struct Seen {
    what: String,
    status: u16,
    /// The proxy's own answer (anything but 200).
    body: Option<String>,
    /// The authorizer's headers as the client got them, and the answer's type.
    client: Vec<(String, String)>,
    /// The authorizer's headers as the backend got them.
    backend: Option<Vec<(String, String)>>,
}

const SHOWN: [&str; 6] = [
    RESULT_HEADER,
    OVERRIDE_HEADER,
    SEEN_HEADER,
    "x-ext-authz-remove-me",
    "x-ext-authz-on-success",
    "x-envoy-auth-failure-mode-allowed",
];

/// A TCP exchange: a line, then half-close; what came back ("closed" when the
/// connection was closed without an answer).
fn exchange(port: u16, l: L, line: &[u8]) -> Result<Seen> {
    use std::io::Read;
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut back = Vec::new();
    let outcome = s
        .write_all(line)
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .and_then(|()| s.read_to_end(&mut back));
    let body = match outcome {
        Ok(_) if !back.is_empty() => String::from_utf8_lossy(&back).into_owned(),
        _ => "closed".into(),
    };
    Ok(Seen {
        what: format!("{l:?} tcp {:?}", String::from_utf8_lossy(line)),
        status: 0,
        body: Some(body),
        client: Vec::new(),
        backend: None,
    })
}

fn request(port: u16, l: L, path: &str, headers: &[(&str, &str)]) -> Result<Seen> {
    match path {
        "tcp" => return exchange(port, l, b"hello\n"),
        // Closed before a byte: checked all the same.
        "tcp-empty" => return exchange(port, l, b""),
        _ => {}
    }
    let s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    (&s).write_all(head.as_bytes())?;
    let resp = read_response(&mut BufReader::new(s))?;
    let what = format!("{l:?} GET {path} {headers:?}");
    let mut client: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .filter(|(k, _)| {
            SHOWN.contains(&k.as_str()) || k == "content-type" || k == "x-not-for-client"
        })
        .collect();
    client.sort();
    let backend = if resp.status == 200 {
        let j = resp.json()?;
        let mut seen: Vec<(String, String)> = j["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                let k = h[0].as_str()?.to_ascii_lowercase();
                let v = h[1].as_str()?.to_string();
                SHOWN.contains(&k.as_str()).then_some((k, v))
            })
            .collect();
        seen.sort();
        Some(seen)
    } else {
        None
    };
    Ok(Seen {
        what,
        status: resp.status,
        body: (resp.status != 200).then(|| String::from_utf8_lossy(&resp.body).into_owned()),
        client,
        backend,
    })
}

/// Every non-zero counter whose name has an `ext_authz` part.
fn ext_authz_stats(admin: u16) -> Result<Vec<(String, u64)>> {
    let (_, body) = http_request(local(admin), "GET", "/stats")?;
    let mut out: Vec<(String, u64)> = body
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            let v: u64 = v.trim().parse().ok()?;
            (k.contains("ext_authz") && v > 0).then(|| (k.trim().to_string(), v))
        })
        .collect();
    out.sort();
    Ok(out)
}

type Case = (L, &'static str, Vec<(&'static str, &'static str)>);

fn cases() -> Vec<Case> {
    let allow = vec![(CHECK_HEADER, "allow")];
    let mut out = Vec::new();
    for l in [L::Grpc, L::Http] {
        out.extend([
            (l, "/headers", allow.clone()),
            (l, "/headers", vec![(CHECK_HEADER, "deny")]),
            (l, "/headers", vec![]),
            (
                l,
                "/headers?q=1",
                vec![
                    (CHECK_HEADER, "allow"),
                    (OVERRIDE_HEADER, "from-client"),
                    ("x-ext-authz-remove-me", "please"),
                ],
            ),
            (l, "/headers", vec![(CHECK_HEADER, "slow")]),
            (l, "/off/anything", vec![]),
            (l, "/ctx", allow.clone()),
            (l, "/ctx", vec![(OVERRIDE_HEADER, "x")]),
        ]);
    }
    for l in [L::Down, L::DownStatus, L::DownAllow] {
        out.extend([(l, "/headers", allow.clone()), (l, "/off", vec![])]);
    }
    for l in [L::IstiodHttp, L::IstiodGrpc] {
        out.extend([
            (l, "/headers", allow.clone()),
            (l, "/headers", vec![(CHECK_HEADER, "deny")]),
            (l, "/headers", vec![]),
            // Not selected by the policy: never sent to the authorizer.
            (l, "/ip", vec![]),
            (l, "/ip", vec![(CHECK_HEADER, "deny")]),
        ]);
    }
    for l in [
        L::NetAllow,
        L::NetDeny,
        L::NetDown,
        L::NetDownAllow,
        L::IstiodTcp,
    ] {
        out.push((l, "tcp", vec![]));
    }
    out.push((L::NetAllow, "tcp-empty", vec![]));
    out.push((L::IstiodTcp, "tcp-empty", vec![]));
    out
}

#[test]
fn ext_authz_matches_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; differential test skipped");
        return Ok(());
    };
    let app = App::http("backend", &[])?;
    let echo = App::mode("tcp")?;
    let authz = Authorizers::start()?;
    // A port nothing listens on: the authorizer that is down.
    let down = free_port();
    let cases = cases();
    let observe = |ports: &Ports| -> Result<Vec<Seen>> {
        cases
            .iter()
            .map(|(l, p, h)| request(ports.of(*l), *l, p, h))
            .collect()
    };

    let ports = Ports::new();
    let ferry = Ferry::start(&config(&ports, app.port, echo.port, &authz, down)?)?;
    let through_ferry =
        observe(&ports).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    let ferry_stats = ext_authz_stats(ferry.admin)?;
    drop(ferry);
    let ports = Ports::new();
    let cfg: Value = serde_json::from_str(&config(&ports, app.port, echo.port, &authz, down)?)?;
    // Every listener is up once one is; an HTTP one is probed, since a TCP one would
    // count the probe's connection.
    let envoy = Envoy::start(&bin, &cfg, ports.of(L::Http))?;
    let through_envoy =
        observe(&ports).with_context(|| format!("through envoy:\n{}", envoy.log()))?;
    let envoy_stats = ext_authz_stats(envoy.admin())?;
    let mut differ = Vec::new();
    for (f, e) in through_ferry.iter().zip(&through_envoy) {
        if f == e {
            eprintln!("both saw: {f:?}");
        } else {
            differ.push(format!("ferry: {f:#?}\nenvoy: {e:#?}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    assert_eq!(ferry_stats, envoy_stats, "ext_authz counters");
    eprintln!("both counted: {ferry_stats:?}");
    // The cases did what they are named for: allowed, denied by the authorizer, failed.
    let statuses: Vec<u16> = through_ferry.iter().map(|s| s.status).collect();
    assert!(statuses.contains(&200) && statuses.contains(&403) && statuses.contains(&503));
    let tcp: Vec<&str> = through_ferry
        .iter()
        .filter(|s| s.status == 0)
        .filter_map(|s| s.body.as_deref())
        .collect();
    assert!(tcp.contains(&"closed") && tcp.iter().any(|b| b.starts_with("hello")));
    Ok(())
}

// ------------------------------------------------------------------------------ with_request_body

/// The listeners of the body test: the gRPC and the HTTP authorizer, each holding up to
/// [`MAX_BODY`] bytes, answering 413 past it or checking the first bytes
/// (`allow_partial_message`, with `pack_as_bytes` for gRPC).
const BODY_LISTENERS: [&str; 4] = ["grpc_body", "grpc_partial", "http_body", "http_partial"];
const MAX_BODY: u32 = 32;

fn body_config(ports: &BTreeMap<&str, u16>, backend: u16, authz: &Authorizers) -> String {
    let grpc = |buffer: Value| {
        ext_authz(json!({
            "grpc_service": grpc_service(GRPC_CLUSTER),
            "with_request_body": buffer,
        }))
    };
    let http = |buffer: Value| {
        ext_authz(json!({
            "http_service": {
                "server_uri": {"uri": "http://ext-authz", "cluster": HTTP_CLUSTER, "timeout": "0.5s"},
                "authorization_request": {"allowed_headers": {"patterns": [{"exact": CHECK_HEADER}]}},
                "authorization_response": {"allowed_upstream_headers": {"patterns": [{"exact": SEEN_HEADER}]}},
            },
            "with_request_body": buffer,
        }))
    };
    let whole = json!({"max_request_bytes": MAX_BODY});
    let partial = json!({"max_request_bytes": MAX_BODY, "allow_partial_message": true});
    let mut partial_bytes = partial.clone();
    partial_bytes["pack_as_bytes"] = json!(true);
    let filters = [
        grpc(whole.clone()),
        grpc(partial_bytes),
        http(whole),
        http(partial),
    ];
    let mut b = Bootstrap::new();
    for (name, f) in BODY_LISTENERS.iter().zip(filters) {
        b = b.listener(with_filters(name, ports[name], vec![f]));
    }
    b.cluster(static_cluster("backend", &[backend], Upstream::Http1))
        .cluster(static_cluster(HTTP_CLUSTER, &[authz.http], Upstream::Http1))
        .cluster(static_cluster(GRPC_CLUSTER, &[authz.grpc], Upstream::Http2))
        .render()
}

/// What one request with a body shows: the status, the proxy's own answer, what the
/// authorizer saw of the body, and the body's length and digest at the backend.
#[derive(Debug, PartialEq)]
struct BodySeen {
    what: String,
    status: u16,
    body: Option<String>,
    authorizer: Option<String>,
    backend: Option<(u64, String)>,
}

/// POSTs `body` to `path` with the check's `allow`, over HTTP/1.1 or (`h2`) HTTP/2
/// with prior knowledge; with `pause` the first `pause` bytes of the body go out with
/// the head and the rest after a while, so both proxies read the body in (at least)
/// two parts.
/// A `{run}` in `path` is replaced by `run`, so that each proxy gets its own
/// `/flaky/` path at the backend.
fn post(
    port: u16,
    what: &str,
    path: &str,
    run: &str,
    body: &[u8],
    pause: Option<usize>,
    h2: bool,
) -> Result<BodySeen> {
    let template = path;
    let path = &path.replace("{run}", run);
    let first = pause.unwrap_or(body.len()).min(body.len());
    let (status, answer) = if h2 {
        post_h2(port, path, body, first)?
    } else {
        post_h1(port, path, body, first)?
    };
    let (authorizer, backend) = if status == 200 {
        let j: Value = serde_json::from_slice(&answer)
            .with_context(|| format!("{}", String::from_utf8_lossy(&answer)))?;
        let seen = j["headers"].as_array().into_iter().flatten().find_map(|h| {
            (h[0].as_str()?.eq_ignore_ascii_case(SEEN_HEADER))
                .then(|| h[1].as_str().map(String::from))?
        });
        let len = j["body_len"].as_u64().unwrap_or_default();
        let digest = j["body_sha256"].as_str().unwrap_or_default().to_string();
        // The authorizer saw the path as sent.
        (seen.map(|v| v.replace(path, template)), Some((len, digest)))
    } else {
        (None, None)
    };
    Ok(BodySeen {
        what: format!(
            "{what} POST {template} {} bytes pause {pause:?}{}",
            body.len(),
            if h2 { " over HTTP/2" } else { "" }
        ),
        status,
        body: (status != 200).then(|| String::from_utf8_lossy(&answer).into_owned()),
        authorizer,
        backend,
    })
}

/// [`post`] over HTTP/1.1: the status and the body of the answer.
fn post_h1(port: u16, path: &str, body: &[u8], first: usize) -> Result<(u16, Vec<u8>)> {
    let s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n{CHECK_HEADER}: allow\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body[..first]);
    (&s).write_all(&out)?;
    if first < body.len() {
        std::thread::sleep(Duration::from_millis(300));
        // A proxy that answered already may have closed: what it answered counts.
        let _ = (&s).write_all(&body[first..]);
    }
    let resp = read_response(&mut BufReader::new(s))?;
    Ok((resp.status, resp.body))
}

/// [`post`] over HTTP/2 (h2c with prior knowledge): the body in DATA frames, the
/// first `first` bytes at once and the rest after a while.
fn post_h2(port: u16, path: &str, body: &[u8], first: usize) -> Result<(u16, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            let tcp = tokio::net::TcpStream::connect(local(port)).await?;
            let (send, conn) = h2::client::handshake(tcp).await?;
            let conn = tokio::spawn(conn);
            let mut send = send.ready().await?;
            let req = http::Request::builder()
                .method(http::Method::POST)
                .uri(format!("http://httpbin.foo:8000{path}"))
                .header(CHECK_HEADER, "allow")
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(())?;
            let (resp, mut stream) = send.send_request(req, body.is_empty())?;
            if !body.is_empty() {
                // Sent as the window allows; the proxy may have answered before the rest.
                stream.reserve_capacity(body.len());
                let done = first == body.len();
                let _ = stream.send_data(bytes::Bytes::copy_from_slice(&body[..first]), done);
                if !done {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = stream.send_data(bytes::Bytes::copy_from_slice(&body[first..]), true);
                }
            }
            let resp = resp.await?;
            let status = resp.status().as_u16();
            let mut rx = resp.into_body();
            let mut answer = Vec::new();
            // A stream reset after a complete answer (a local reply before the whole
            // request was read) keeps what came.
            while let Some(Ok(chunk)) = rx.data().await {
                let _ = rx.flow_control().release_capacity(chunk.len());
                answer.extend_from_slice(&chunk);
            }
            drop(send);
            conn.abort();
            anyhow::Ok((status, answer))
        })
        .await
        .context("the HTTP/2 request hung")?
    })
}

/// One request of the body test: the listener, the path, the body, where it
/// pauses, and whether it goes over HTTP/2.
type BodyCase = (&'static str, &'static str, Vec<u8>, Option<usize>, bool);

/// `with_request_body` as Envoy: the authorizer gets the body (whole, or its first
/// `max_request_bytes` with `x-envoy-auth-partial-body`), a longer one is answered 413
/// unless `allow_partial_message`, and the backend receives the whole body intact, the
/// buffered start ahead of the rest; over HTTP/1.1 and over HTTP/2 alike.
#[test]
fn ext_authz_request_body_matches_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; differential test skipped");
        return Ok(());
    };
    let app = App::http("backend", &[])?;
    let authz = Authorizers::start()?;
    let small = b"name=ferry&kind=proxy".to_vec();
    let large: Vec<u8> = (0..3000u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i % 36) as usize])
        .collect();
    let cases: Vec<BodyCase> = BODY_LISTENERS
        .iter()
        .flat_map(|l| {
            [
                (*l, "/headers", small.clone(), None),
                (*l, "/headers", Vec::new(), None),
                // Longer than the limit, read in two parts: 413, or the first bytes checked.
                (*l, "/headers", large.clone(), Some(40)),
                // The route turns buffering off: checked without the body.
                (*l, "/nobody", large.clone(), Some(40)),
                // The first attempt fails: the retry sends the buffered start again,
                // then the rest.
                (*l, "/retry/flaky/1/503/{run}/small", small.clone(), None),
                (
                    *l,
                    "/retry/flaky/1/503/{run}/large",
                    large.clone(),
                    Some(40),
                ),
            ]
        })
        // Each over HTTP/1.1 and over HTTP/2 (its own flaky path).
        .flat_map(|(l, p, b, pause)| [(l, p, b.clone(), pause, false), (l, p, b, pause, true)])
        .collect();
    let observe = |ports: &BTreeMap<&str, u16>, run: &str| -> Result<Vec<BodySeen>> {
        cases
            .iter()
            .map(|(l, p, b, pause, h2)| {
                let run = if *h2 {
                    format!("{run}-h2")
                } else {
                    run.to_string()
                };
                post(ports[l], l, p, &run, b, *pause, *h2)
            })
            .collect()
    };
    let new_ports =
        || -> BTreeMap<&str, u16> { BODY_LISTENERS.iter().map(|l| (*l, free_port())).collect() };

    let ports = new_ports();
    let ferry = Ferry::start(&body_config(&ports, app.port, &authz))?;
    let through_ferry =
        observe(&ports, "ferry").with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    drop(ferry);
    let ports = new_ports();
    let cfg: Value = serde_json::from_str(&body_config(&ports, app.port, &authz))?;
    let envoy = Envoy::start(&bin, &cfg, ports["grpc_body"])?;
    let through_envoy =
        observe(&ports, "envoy").with_context(|| format!("through envoy:\n{}", envoy.log()))?;
    let mut differ = Vec::new();
    for (f, e) in through_ferry.iter().zip(&through_envoy) {
        if f == e {
            eprintln!("both saw: {f:?}");
        } else {
            differ.push(format!("ferry: {f:#?}\nenvoy: {e:#?}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    // The cases did what they are named for: a body past the limit refused with 413,
    // bodies reaching the authorizer, and the backend getting every body whole.
    assert!(through_ferry.iter().any(|s| s.status == 413));
    let digest = |b: &[u8]| -> String {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    for (s, (_, _, body, _, _)) in through_ferry.iter().zip(&cases) {
        if let Some((len, d)) = &s.backend {
            assert_eq!(
                (*len as usize, d.as_str()),
                (body.len(), digest(body).as_str()),
                "{s:?}"
            );
        }
    }
    let seen: Vec<&str> = through_ferry
        .iter()
        .filter_map(|s| s.authorizer.as_deref())
        .collect();
    assert!(
        seen.iter().any(|s| s.contains("name=ferry&kind=proxy")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|s| s.contains("partial=Some(\"true\")")),
        "{seen:?}"
    );
    // HTTP/2 requests went through both outcomes too.
    let h2: Vec<&BodySeen> = through_ferry
        .iter()
        .filter(|s| s.what.ends_with("over HTTP/2"))
        .collect();
    assert!(h2.iter().any(|s| s.status == 413), "{h2:#?}");
    assert!(
        h2.iter()
            .filter_map(|s| s.authorizer.as_deref())
            .any(|a| a.contains("name=ferry&kind=proxy")),
        "{h2:#?}"
    );
    Ok(())
}
