//! Ferry under istio-agent: the workload certificate `default` and the root
//! `ROOTCA` come over SDS from the agent's `sds-grpc` Unix socket, as Envoy
//! fetches them. The agent is played by a small SDS server written here
//! (`envoy.service.secret.v3.SecretDiscoveryService`, state of the world,
//! on a Unix socket) serving rcgen certificates; a TLS listener whose
//! context names both secrets must present the served certificate and
//! require a client certificate from the served root, through Ferry and
//! through Envoy 1.40 on the same bootstrap, and a pushed rotation must
//! reach new handshakes of both. A gateway listener whose certificate and
//! root are other names on the same `sds-grpc` cluster (a `credentialName`'s
//! `kubernetes://gw-cred` and `kubernetes://gw-cred-cacert`) gets them from
//! the agent too, each on a stream of its own, as in Envoy.
//!
//! Envoy comes from `ferry_tests::envoy`; without it the test fails.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::pki::{Ca, Leaf, TlsClient, client_config};
use ferry_tests::proxy::{Ferry, RunLock, StaticPilot, TempDir, free_port, local};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What the agent serves: a version and the secrets by name.
type Served = (u64, HashMap<String, tls_pb::Secret>);

#[derive(Clone)]
struct Agent {
    served: watch::Receiver<Served>,
    /// The names each stream asked for, in order.
    asked: Arc<Mutex<Vec<Vec<String>>>>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Agent {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = Stream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let mut served = self.served.clone();
        let asked = self.asked.clone();
        tokio::spawn(async move {
            // The first request names the secrets; later ones are ACKs.
            let Ok(Some(first)) = requests.message().await else {
                return;
            };
            let names = first.resource_names.clone();
            if let Ok(mut a) = asked.lock() {
                a.push(names.clone());
            }
            tokio::spawn(async move { while let Ok(Some(_)) = requests.message().await {} });
            loop {
                let (version, secrets) = served.borrow_and_update().clone();
                let resources = names
                    .iter()
                    .filter_map(|n| secrets.get(n))
                    .map(|s| envoy_types::pb::google::protobuf::Any {
                        type_url: SECRET.into(),
                        value: s.encode_to_vec(),
                    })
                    .collect();
                let resp = DiscoveryResponse {
                    version_info: version.to_string(),
                    resources,
                    type_url: SECRET.into(),
                    nonce: format!("n{version}"),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() || served.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("the agent serves SotW SDS"))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("the agent serves streams"))
    }
}

fn inline(pem: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// The gateway's certificate and root, by the names its listener asks for.
const GATEWAY_CERT: &str = "kubernetes://gw-cred";
const GATEWAY_ROOT: &str = "kubernetes://gw-cred-cacert";

/// `default` (the leaf) and `ROOTCA` (the CA), as istio-agent serves them,
/// and the gateway's pair under its own names (the same leaf and CA).
fn secrets(ca: &Ca, leaf: &Leaf) -> HashMap<String, tls_pb::Secret> {
    let mut out = pair(ca, leaf, "default", "ROOTCA");
    out.extend(pair(ca, leaf, GATEWAY_CERT, GATEWAY_ROOT));
    out
}

fn pair(ca: &Ca, leaf: &Leaf, cert: &str, root: &str) -> HashMap<String, tls_pb::Secret> {
    use tls_pb::secret::Type;
    let mut out = HashMap::new();
    out.insert(
        cert.to_string(),
        tls_pb::Secret {
            name: cert.into(),
            r#type: Some(Type::TlsCertificate(tls_pb::TlsCertificate {
                certificate_chain: inline(&leaf.cert_pem),
                private_key: inline(&leaf.key_pem),
                ..Default::default()
            })),
        },
    );
    out.insert(
        root.to_string(),
        tls_pb::Secret {
            name: root.into(),
            r#type: Some(Type::ValidationContext(
                tls_pb::CertificateValidationContext {
                    trusted_ca: inline(&ca.pem()),
                    ..Default::default()
                },
            )),
        },
    );
    out
}

/// The SDS config istiod writes for both secrets.
fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {
        "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
        "initial_fetch_timeout": "0s", "resource_api_version": "V3"}})
}

fn grpc_cluster(name: &str, address: Value) -> Value {
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}})
}

/// istio-agent's layout: ADS on `xds-grpc` (ferry-pilot here), SDS on the
/// `sds-grpc` Unix socket, and an mTLS listener on `port` whose
/// certificate and root are the SDS secrets; the gateway's listener on
/// `gateway` names its own pair.
fn bootstrap(port: u16, gateway: u16, pilot: u16, socket: &Path) -> Value {
    let tls = |cert: &str, root: &str| {
        json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": true,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds(cert)],
            "validation_context_sds_secret_config": sds(root),
        }}})
    };
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mtls",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "served"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}});
    json!({
        "node": {"id": "sidecar~127.0.0.1~app.default~default.svc.cluster.local", "cluster": "app.default",
            "metadata": {"NAMESPACE": "default"}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "listeners": [
                {"name": "mtls", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [hcm.clone()], "transport_socket": tls("default", "ROOTCA")}]},
                {"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": gateway}},
                    "filter_chains": [{"filters": [hcm], "transport_socket": tls(GATEWAY_CERT, GATEWAY_ROOT)}]},
            ],
            "clusters": [
                grpc_cluster("xds-grpc", json!({"socket_address": {"address": "127.0.0.1", "port_value": pilot}})),
                grpc_cluster("sds-grpc", json!({"pipe": {"path": socket.display().to_string()}})),
            ],
        },
    })
}

/// Waits until the listener presents `want` to a client with `client`'s
/// certificate from `ca`, and answers.
fn wait_presented(port: u16, ca: &Ca, client: &Leaf, want: &Leaf, what: &str) -> Result<()> {
    let cfg = client_config(&ca.pem(), Some(client), &["http/1.1"])?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last;
    loop {
        match TlsClient::connect(local(port), cfg.clone(), "app.default.svc") {
            Ok(mut c) if c.server_cert().as_deref() == Some(&want.der[..]) => {
                let (status, body) = c.get("/")?;
                anyhow::ensure!(status == 200 && body == "served", "{what}: {status} {body}");
                return Ok(());
            }
            Ok(_) => last = "another certificate".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: the served certificate was not presented ({last})");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workload_secrets_come_from_the_agents_sds_socket_and_rotate_as_in_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let bin = envoy::require_bin()?;
    let dir = TempDir::new("sds-agent")?;
    let socket = dir.path().join("socket");
    let ca = Ca::new("agent root")?;
    let dns = ["app.default.svc"];
    let id = "spiffe://cluster.local/ns/default/sa/app";
    let leaves = [
        ca.leaf(id, &dns)?,
        ca.leaf(id, &dns)?,
        ca.leaf(id, &dns)?,
        ca.leaf(id, &dns)?,
    ];
    let client = ca.leaf("spiffe://cluster.local/ns/default/sa/client", &[])?;
    let (served_tx, served_rx) = watch::channel((1, secrets(&ca, &leaves[0])));
    let agent = Agent {
        served: served_rx,
        asked: Arc::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket) })?;
    let server = agent.clone();
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .serve_with_incoming(
                SecretDiscoveryServiceServer::new(server),
                UnixListenerStream::new(listener),
            )
            .await;
    });

    let pilot = StaticPilot::start(dir.path())?;
    let pilot_port = pilot.port;

    // Ferry: no --ca-addr, so the agent's socket is the source.
    let (port, gateway) = (free_port(), free_port());
    let ferry = Ferry::start(&serde_json::to_string(&bootstrap(
        port, gateway, pilot_port, &socket,
    ))?)?;
    wait_presented(port, &ca, &client, &leaves[0], "ferry, first certificate")
        .with_context(|| ferry.log())?;
    wait_presented(gateway, &ca, &client, &leaves[0], "ferry, gateway")
        .with_context(|| ferry.log())?;
    served_tx.send_modify(|s| *s = (2, secrets(&ca, &leaves[1])));
    wait_presented(port, &ca, &client, &leaves[1], "ferry, rotated certificate")
        .with_context(|| ferry.log())?;
    wait_presented(gateway, &ca, &client, &leaves[1], "ferry, gateway rotated")
        .with_context(|| ferry.log())?;
    drop(ferry);
    let ferry_asked =
        std::mem::take(&mut *agent.asked.lock().map_err(|_| anyhow::anyhow!("lock"))?);

    served_tx.send_modify(|s| *s = (3, secrets(&ca, &leaves[2])));
    let (eport, egateway) = (free_port(), free_port());
    let envoy = Envoy::start(
        &bin,
        &bootstrap(eport, egateway, pilot_port, &socket),
        eport,
    )?;
    wait_presented(eport, &ca, &client, &leaves[2], "envoy, first certificate")
        .with_context(|| envoy.log())?;
    wait_presented(egateway, &ca, &client, &leaves[2], "envoy, gateway")
        .with_context(|| envoy.log())?;
    served_tx.send_modify(|s| *s = (4, secrets(&ca, &leaves[3])));
    wait_presented(
        eport,
        &ca,
        &client,
        &leaves[3],
        "envoy, rotated certificate",
    )
    .with_context(|| envoy.log())?;
    drop(envoy);
    let envoy_asked = agent
        .asked
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clone();

    // Both ask for each secret on a stream of its own, the gateway's too.
    let sorted = |mut v: Vec<Vec<String>>| {
        v.sort();
        v.dedup();
        v
    };
    let ferry_asked = sorted(ferry_asked);
    assert!(
        ferry_asked.contains(&vec![GATEWAY_CERT.to_string()]),
        "{ferry_asked:?}"
    );
    assert_eq!(ferry_asked, sorted(envoy_asked));
    drop(pilot);
    Ok(())
}
