//! The ADS gRPC service: one task per stream drives a protocol state machine
//! (SotW or delta) with the stream's requests and the cache's change
//! notifications, and writes its responses back. Also the server handle that
//! tests and the binary use: serving on a listener, the status of every
//! stream, and waiting for ACKs and NACKs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SERVICE_NAME as SDS_SERVICE_NAME, SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::XdsError;
use super::cache::Cache;
use super::delta::DeltaStream;
use super::grpc_stream;
use super::sotw::SotwStream;
use super::status::{Nack, Protocol, ProxyStatus, Registry};

/// `control_plane.identifier` of every response.
pub(crate) const CONTROL_PLANE_ID: &str = "ferry-pilot";
/// Unanswered responses remembered per type for ACK/NACK bookkeeping.
pub(crate) const MAX_PENDING: usize = 32;
/// Largest request accepted (a reconnecting delta client lists every
/// resource it holds in `initial_resource_versions`).
const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Responses queued per stream before the stream task waits for the client.
const STREAM_QUEUE: usize = 16;

/// The protocol logic of one stream, free of I/O.
pub(crate) trait StreamState: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    /// Handles one request; an error ends the stream with that status.
    fn on_request(&mut self, req: Self::Request) -> Result<Option<Self::Response>, Status>;
    /// The cache changed: the responses the stream's subscriptions need.
    fn on_change(&mut self) -> Vec<Self::Response>;
    /// The node a request identifies itself as (the first one carries it).
    fn node_of(req: &Self::Request) -> Option<&Node>;
    /// Serves this stream from `cache` (chosen once its node is known).
    fn use_cache(&mut self, cache: Cache);
}

/// Chooses the cache a node is served from: per-proxy configuration, as
/// istiod computes it for each proxy from its node metadata. The stream's
/// peer address comes along: what a proxy may have (its workload
/// certificate) depends on who is really asking, not on what the node says.
pub type CacheResolver = Arc<dyn Fn(&Node, Option<std::net::SocketAddr>) -> Cache + Send + Sync>;

struct Inner {
    cache: Cache,
    resolver: Option<CacheResolver>,
    registry: Arc<Registry>,
    /// Set when the server shuts down, which ends every stream.
    shutdown: watch::Sender<bool>,
    /// The certificate service served beside ADS, as istiod's 15012.
    ca: std::sync::OnceLock<crate::ca::CaService>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("cache", &self.cache)
            .field("per_node", &self.resolver.is_some())
            .finish()
    }
}

/// TLS of the ADS server: its certificate chain and key (PEM), and the CA
/// that client certificates must chain to (mutual TLS) if any.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// The ADS server: the cache it serves and the status of its streams.
/// Clones share everything.
#[derive(Clone, Debug)]
pub struct Server {
    inner: Arc<Inner>,
}

/// The tonic service implementing `AggregatedDiscoveryService`.
#[derive(Clone, Debug)]
pub struct AdsService {
    inner: Arc<Inner>,
}

impl Server {
    pub fn new(cache: Cache) -> Self {
        Self::build(cache, None)
    }

    /// A server whose streams are each served from the cache `resolver`
    /// picks for their node; `fallback` serves a stream that names no node.
    pub fn per_node(fallback: Cache, resolver: CacheResolver) -> Self {
        Self::build(fallback, Some(resolver))
    }

    fn build(cache: Cache, resolver: Option<CacheResolver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                cache,
                resolver,
                registry: Arc::new(Registry::new()),
                shutdown: watch::Sender::new(false),
                ca: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Serves Istio's certificate service on the same port as ADS. Only
    /// the first call counts.
    pub fn set_ca(&self, ca: crate::ca::CaService) {
        let _ = self.inner.ca.set(ca);
    }

    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// Every open stream, in the order they connected.
    pub fn status(&self) -> Vec<ProxyStatus> {
        self.inner.registry.snapshot()
    }

    /// The gRPC service, to mount on a tonic server of one's own.
    /// The SDS service (`SecretDiscoveryService`), served beside ADS.
    pub fn sds_service(&self) -> SecretDiscoveryServiceServer<AdsService> {
        SecretDiscoveryServiceServer::new(AdsService {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    pub fn ads_service(&self) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Serves ADS (plaintext HTTP/2) on `listener` until `shutdown`
    /// completes; then every stream ends and open connections are drained.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        self.serve_maybe_tls(listener, None, shutdown).await
    }

    /// Serves ADS over TLS (istiod's port 15012) on `listener` until
    /// `shutdown` completes.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: &ServerTls,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        self.serve_maybe_tls(listener, Some(tls), shutdown).await
    }

    async fn serve_maybe_tls(
        &self,
        listener: TcpListener,
        tls: Option<&ServerTls>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        let addr = listener.local_addr().map_err(XdsError::LocalAddr)?;
        tracing::info!(xds.addr = %addr, xds.tls = tls.is_some(), "ADS server listening");
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let inner = self.inner.clone();
        let signal = async move {
            shutdown.await;
            inner.shutdown.send_replace(true);
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            let mut config = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
            );
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            builder = builder.tls_config(config)?;
        }
        let svc = Dispatch {
            streams: AdsService {
                inner: self.inner.clone(),
            },
            ads: self.ads_service(),
            sds: self.sds_service(),
            ca: self.inner.ca.get().cloned(),
        };
        builder
            .serve_with_incoming_shutdown(svc, incoming, signal)
            .await?;
        Ok(())
    }

    /// Waits until `f` finds what it looks for in the streams' status.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        f: impl FnMut(&[ProxyStatus]) -> Option<T>,
    ) -> Result<T, XdsError> {
        self.wait("a status condition", None, timeout, f).await
    }

    /// Waits until a stream of `node` has ACKed `version` of `type_url`.
    pub async fn wait_ack(
        &self,
        node: &str,
        type_url: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<(), XdsError> {
        let what = format!("node {node:?} to ACK {type_url} {version}");
        self.wait(&what, Some(node), timeout, |streams| {
            streams
                .iter()
                .filter(|s| s.node_id == node)
                .filter_map(|s| s.types.get(type_url))
                .any(|t| t.acked_version.as_deref() == Some(version))
                .then_some(())
        })
        .await
    }

    /// Waits until a stream of `node` has NACKed `type_url`, and returns the
    /// latest NACK (one recorded before the call counts).
    pub async fn wait_nack(
        &self,
        node: &str,
        type_url: &str,
        timeout: Duration,
    ) -> Result<Nack, XdsError> {
        let what = format!("node {node:?} to NACK {type_url}");
        self.wait(&what, Some(node), timeout, |streams| {
            streams
                .iter()
                .rev()
                .filter(|s| s.node_id == node)
                .filter_map(|s| s.types.get(type_url))
                .find_map(|t| t.last_nack.clone())
        })
        .await
    }

    async fn wait<T>(
        &self,
        what: &str,
        node: Option<&str>,
        timeout: Duration,
        mut f: impl FnMut(&[ProxyStatus]) -> Option<T>,
    ) -> Result<T, XdsError> {
        // Subscribed before the first look, so no change slips between.
        let mut changes = self.inner.registry.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f(&self.status()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let streams: Vec<ProxyStatus> = self
                        .status()
                        .into_iter()
                        .filter(|s| node.is_none_or(|n| s.node_id == n))
                        .collect();
                    return Err(XdsError::Timeout {
                        what: what.to_string(),
                        timeout,
                        streams: serde_json::to_string(&streams).unwrap_or_default(),
                    });
                }
            }
        }
    }
}

impl AdsService {
    fn spawn<S: StreamState>(
        &self,
        state: S,
        inbound: Streaming<S::Request>,
        peer: Option<std::net::SocketAddr>,
    ) -> ReceiverStream<Result<S::Response, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        // Both receivers are taken before the task starts, so a change made
        // right after the stream opened is not missed.
        let changes = self.inner.cache.changes();
        let shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(drive(
            state,
            inbound,
            tx,
            changes,
            shutdown,
            self.inner.resolver.clone(),
            peer,
        ));
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.sotw(request)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.delta(request)))
    }
}

impl AdsService {
    fn sotw(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> ReceiverStream<Result<DiscoveryResponse, Status>> {
        let peer = request.remote_addr();
        let handle = self.inner.registry.open(Protocol::Sotw, peer);
        let state = SotwStream::new(self.inner.cache.clone(), handle);
        self.spawn(state, request.into_inner(), peer)
    }

    fn delta(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> ReceiverStream<Result<DeltaDiscoveryResponse, Status>> {
        let peer = request.remote_addr();
        let handle = self.inner.registry.open(Protocol::Delta, peer);
        let state = DeltaStream::new(self.inner.cache.clone(), handle);
        self.spawn(state, request.into_inner(), peer)
    }
}

/// SDS on its own stream, as Envoy asks for the secrets of an
/// `api_config_source` naming this server's cluster (Istio's `sds-grpc`):
/// the same protocol and per-node cache as ADS, secrets only.
#[tonic::async_trait]
impl SecretDiscoveryService for AdsService {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Ok(Response::new(self.sotw(request)))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Ok(Response::new(self.delta(request)))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "FetchSecrets (REST-style SDS) is not served; use StreamSecrets",
        ))
    }
}

/// Runs one stream until the client goes away, the server shuts down or the
/// protocol fails. Dropping `state` removes the stream from the status.
async fn drive<S: StreamState>(
    mut state: S,
    mut inbound: Streaming<S::Request>,
    tx: mpsc::Sender<Result<S::Response, Status>>,
    mut changes: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    resolver: Option<CacheResolver>,
    peer: Option<std::net::SocketAddr>,
) {
    if let Some(resolve) = resolver {
        // The node arrives with the first request: its cache is chosen then.
        let first = match inbound.message().await {
            Ok(Some(req)) => req,
            _ => return,
        };
        if let Some(node) = S::node_of(&first) {
            let cache = resolve(node, peer);
            changes = cache.changes();
            state.use_cache(cache);
        }
        match state.on_request(first) {
            Ok(Some(r)) => {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
    loop {
        let out: Vec<S::Response> = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => match state.on_request(req) {
                    Ok(r) => r.into_iter().collect(),
                    Err(status) => {
                        tracing::warn!(xds.error = %status.message(), "ending ADS stream");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                },
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(xds.error = %status, "ADS stream closed by the client");
                    return;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                state.on_change()
            }
            // The guard `wait_for` returns is not `Send`: drop it inside.
            () = async { let _ = shutdown.wait_for(|down| *down).await; } => return,
        };
        if !out.is_empty() {
            crate::heap::released();
        }
        for r in out {
            if tx.send(Ok(r)).await.is_err() {
                return;
            }
        }
    }
}

/// ADS and, when set, the certificate service on one port, told apart by
/// the gRPC service name in the path.
#[derive(Clone)]
struct Dispatch {
    /// The streaming methods, framed by [`grpc_stream`].
    streams: AdsService,
    /// What remains of each service (tonic answers `FetchSecrets` and
    /// unknown methods).
    ads: AggregatedDiscoveryServiceServer<AdsService>,
    sds: SecretDiscoveryServiceServer<AdsService>,
    ca: Option<crate::ca::CaService>,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Dispatch {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let res = match req.uri().path() {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
            | "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets" => {
                grpc_stream::serve(req, MAX_REQUEST_BYTES, |r| self.streams.sotw(r))
            }
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
            | "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets" => {
                grpc_stream::serve(req, MAX_REQUEST_BYTES, |r| self.streams.delta(r))
            }
            _ => return self.route(req),
        };
        Box::pin(async move { Ok(res) })
    }
}

impl Dispatch {
    fn route(
        &mut self,
        req: http::Request<tonic::body::Body>,
    ) -> tonic::codegen::BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    {
        use tonic::codegen::Service;
        let of = |service: &str| {
            req.uri()
                .path()
                .strip_prefix('/')
                .and_then(|p| p.strip_prefix(service))
                .is_some_and(|rest| rest.starts_with('/'))
        };
        let (ca, sds) = (
            of(ferry_envoy_json::istio_ca::SERVICE),
            of(SDS_SERVICE_NAME),
        );
        match &mut self.ca {
            Some(svc) if ca => svc.call(req),
            _ if sds => Box::pin(self.sds.call(req)),
            _ => Box::pin(self.ads.call(req)),
        }
    }
}
