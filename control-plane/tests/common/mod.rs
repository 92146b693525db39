//! Shared test harness: an ADS server on 127.0.0.1:0, tonic SotW and delta
//! clients that speak to it request by request, resource builders and a tiny
//! HTTP GET.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use ferry_pilot::xds::{self, Cache, Server, to_any};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prost::{Message, Name};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

pub const ENVOY_WAIT: Duration = Duration::from_secs(30);
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a client listens to conclude that nothing was sent.
pub const QUIET: Duration = Duration::from_millis(300);

/// Starts an ADS server on an ephemeral loopback port.
pub async fn start(cache: Cache) -> (Server, SocketAddr) {
    let server = Server::new(cache);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener, std::future::pending()).await });
    (server, addr)
}

async fn client(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the ADS server")
        .max_decoding_message_size(256 << 20)
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_string(),
        cluster: "test-cluster".to_string(),
        ..Default::default()
    })
}

/// A state-of-the-world ADS stream.
pub struct Sotw {
    pub node: String,
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    sent_node: bool,
}

impl Sotw {
    pub async fn connect(addr: SocketAddr, node: &str) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = client(addr)
            .await
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open SotW stream")
            .into_inner();
        Self {
            node: node.to_string(),
            tx,
            rx,
            sent_node: false,
        }
    }

    pub async fn send(&mut self, mut req: DiscoveryRequest) {
        // Like Envoy: the node only on the first request.
        if !self.sent_node {
            req.node = node(&self.node);
            self.sent_node = true;
        }
        self.tx.send(req).await.expect("stream open");
    }

    /// A request for `names` of `type_url` answering (version, nonce).
    pub async fn request(&mut self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.send(DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.to_string(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        })
        .await;
    }

    pub async fn ack(&mut self, resp: &DiscoveryResponse, names: &[&str]) {
        self.request(&resp.type_url, names, &resp.version_info, &resp.nonce)
            .await;
    }

    pub async fn nack(&mut self, resp: &DiscoveryResponse, names: &[&str], kept: &str, why: &str) {
        self.send(DiscoveryRequest {
            type_url: resp.type_url.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: kept.to_string(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: why.to_string(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no SotW response in time")
            .expect("stream failed")
            .expect("stream ended")
    }

    /// Asserts that nothing arrives for a while.
    pub async fn quiet(&mut self) {
        if let Ok(msg) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!(
                "expected no response, got {:?}",
                msg.map(|m| m.map(|m| summary(&m)))
            );
        }
    }

    pub async fn recv_status(&mut self) -> tonic::Status {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Err(status)) => status,
            other => panic!("expected a stream error, got {other:?}"),
        }
    }
}

/// An incremental ADS stream.
pub struct Delta {
    pub node: String,
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    sent_node: bool,
}

impl Delta {
    pub async fn connect(addr: SocketAddr, node: &str) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = client(addr)
            .await
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open delta stream")
            .into_inner();
        Self {
            node: node.to_string(),
            tx,
            rx,
            sent_node: false,
        }
    }

    pub async fn send(&mut self, mut req: DeltaDiscoveryRequest) {
        if !self.sent_node {
            req.node = node(&self.node);
            self.sent_node = true;
        }
        self.tx.send(req).await.expect("stream open");
    }

    pub async fn subscribe(&mut self, type_url: &str, sub: &[&str], unsub: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    pub async fn ack(&mut self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    pub async fn nack(&mut self, resp: &DeltaDiscoveryResponse, why: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: why.to_string(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no delta response in time")
            .expect("stream failed")
            .expect("stream ended")
    }

    pub async fn quiet(&mut self) {
        if let Ok(msg) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!(
                "expected no response, got {:?}",
                msg.map(|m| m.map(|m| (
                    m.resources
                        .iter()
                        .map(|r| r.name.clone())
                        .collect::<Vec<_>>(),
                    m.removed_resources
                )))
            );
        }
    }
}

/// The name inside a served resource.
pub fn resource_name(any: &Any) -> String {
    let v = any.value.as_slice();
    match any.type_url.as_str() {
        xds::LISTENER => Listener::decode(v).expect("listener").name,
        xds::CLUSTER => Cluster::decode(v).expect("cluster").name,
        xds::ROUTE => RouteConfiguration::decode(v).expect("route").name,
        xds::ENDPOINT => ClusterLoadAssignment::decode(v).expect("cla").cluster_name,
        xds::SECRET => Secret::decode(v).expect("secret").name,
        other => panic!("unexpected type {other}"),
    }
}

/// The names in a SotW response, in order.
pub fn names(resp: &DiscoveryResponse) -> Vec<String> {
    resp.resources.iter().map(resource_name).collect()
}

fn summary(resp: &DiscoveryResponse) -> (String, String, Vec<String>) {
    (
        resp.type_url.clone(),
        resp.version_info.clone(),
        names(resp),
    )
}

/// A message from Envoy JSON, packed.
pub fn json_any<M: Message + Default + Name>(value: serde_json::Value) -> Any {
    let m: M = ferry_envoy_json::from_json(&M::full_name(), value).expect("valid Envoy JSON");
    to_any(&m)
}

pub fn listener(name: &str, port: u16) -> (String, Any) {
    let l = json_any::<Listener>(serde_json::json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name, "cluster": "backend"}
        }]}]
    }));
    (name.to_string(), l)
}

pub fn cluster(name: &str, timeout_ms: u32) -> (String, Any) {
    let c = json_any::<Cluster>(serde_json::json!({
        "name": name, "type": "EDS", "connect_timeout": format!("{}s", f64::from(timeout_ms) / 1000.0),
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    }));
    (name.to_string(), c)
}

pub fn route(name: &str, cluster: &str) -> (String, Any) {
    let r = json_any::<RouteConfiguration>(serde_json::json!({
        "name": name,
        "virtual_hosts": [{"name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]
    }));
    (name.to_string(), r)
}

pub fn endpoints(name: &str, port: u16) -> (String, Any) {
    let e = json_any::<ClusterLoadAssignment>(serde_json::json!({
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]
    }));
    (name.to_string(), e)
}

/// GET over HTTP/1.1: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The reference Envoy, installed by `scripts/install-envoy.sh`; `None`
/// (skip) only outside CI.
pub fn envoy_binary() -> Option<PathBuf> {
    // CI installs Envoy once before the tests and says where; running the
    // installer from many tests at once is only the fallback.
    if let Some(path) = std::env::var_os("FERRY_ENVOY").map(PathBuf::from)
        && path.is_file()
    {
        return Some(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-envoy.sh");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match Command::new("bash").arg(&script).output() {
        Ok(out) if out.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if path.is_file() {
                return Some(path);
            }
            assert!(!ci, "install-envoy.sh printed no binary: {path:?}");
        }
        Ok(out) => assert!(
            !ci,
            "install-envoy.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => assert!(!ci, "cannot run install-envoy.sh: {e}"),
    }
    eprintln!("Envoy could not be installed; skipped (set CI=true to fail instead)");
    None
}

/// An Envoy process, killed on drop; its log is printed if the test fails.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
}

impl Envoy {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    pub async fn admin(&self) -> SocketAddr {
        let path = self.dir.join("admin-address");
        for _ in 0..600 {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(addr) = text.trim().parse()
            {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Envoy wrote no admin address; log:\n{}", self.log());
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- Envoy log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts Envoy on an ADS bootstrap pointing at `xds`, with node `metadata`.
pub fn start_envoy(
    bin: &Path,
    node: &str,
    api_type: &str,
    xds: SocketAddr,
    metadata: serde_json::Value,
) -> Envoy {
    start_envoy_with_sds(bin, node, api_type, xds, metadata, None)
}

/// [`start_envoy`] with istio-agent's `sds-grpc` at `sds` (ferry-pilot
/// serving the workload certificate) instead of nowhere.
pub fn start_envoy_with_sds(
    bin: &Path,
    node: &str,
    api_type: &str,
    xds: SocketAddr,
    metadata: serde_json::Value,
    sds: Option<SocketAddr>,
) -> Envoy {
    let sds = sds.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)));
    let dir = std::env::temp_dir().join(format!("ferry-pilot-envoy-{node}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bootstrap = json!({
        "node": {"id": node, "cluster": "ferry-test", "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        // As istio-agent's bootstrap: internal listeners may come over LDS.
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                "value": {"buffer_size_kb": 64}
            }
        }],
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            },
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": xds.ip().to_string(), "port_value": xds.port()}}
            }}]}]}
        }, {
            // istio-agent's SDS server, as its bootstrap names it (mTLS
            // settings refer to it); nothing answers on it here, so
            // resources that need its secrets stay warming.
            "name": "sds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            },
            "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": sds.ip().to_string(), "port_value": sds.port()}}
            }}]}]}
        }]}
    });
    let config = dir.join("bootstrap.json");
    std::fs::write(&config, bootstrap.to_string()).expect("write bootstrap");
    // Envoy's stderr rather than --log-path: the file sink buffers, and a
    // killed Envoy would leave its last lines unwritten.
    let log = std::fs::File::create(dir.join("envoy.log")).expect("envoy log file");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .arg("--admin-address-path")
        .arg(dir.join("admin-address"))
        .args(["--disable-hot-restart", "--concurrency", "1"])
        .args([
            "--log-level",
            "info",
            "--component-log-level",
            "config:debug",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start envoy");
    Envoy { child, dir }
}

/// A free port on 127.0.0.1, reserved across the workspace's test processes
/// (`ferry_netns::ports`).
pub fn free_port() -> u16 {
    ferry_netns::ports::free_port()
}

/// [`free_port`] as an address on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
