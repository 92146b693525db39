//! The sidecar injection webhook (istiod's `/inject`, cargo feature
//! `kube`): Kubernetes' API server sends an `AdmissionReview`
//! (`admission.k8s.io/v1`) for each Pod being created, over HTTPS; the
//! answer allows it with the JSONPatch that turns the Pod into what
//! `ferry-pilot inject` writes for it ([`crate::inject::inject_pod`], the
//! same code). Whether a Pod gets a sidecar is decided as Istio's
//! injector does: the Pod's `sidecar.istio.io/inject` label or annotation,
//! else its namespace's `istio-injection: enabled` (or `istio.io/rev`)
//! label (a namespace not seen yet was matched by the webhook
//! configuration's selector, and counts as enabled); a Pod injected already, and anything but a Pod being created,
//! is allowed unchanged. A Pod the injector cannot inject (a bad
//! `proxy.istio.io/config`, a capture annotation `ferry iptables` lacks) is
//! refused with the reason, as istiod refuses it.
//!
//! The sidecar mounts its namespace's bootstrap ConfigMap, which `inject`
//! writes beside the workloads; given a client
//! ([`Injector::with_bootstrap_config_maps`]), the webhook creates it (or
//! brings it up to date) before it admits the namespace's Pod.
//!
//! The serving certificate is given (`--webhook-cert`/`--webhook-key`) or
//! made by the mesh CA for the webhook's DNS names and made again at half
//! its lifetime; the CA's root is then the webhook configuration's
//! `caBundle`, which [`keep_ca_bundle`] sets.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::ca::Ca;
use crate::inject::{BOOTSTRAP_CONFIG_MAP, InjectOptions, bootstrap, inject_pod};
use crate::istio::translate::registry::{INJECTION_LABEL, injected};

/// The labels of a namespace, when it is known.
pub type NamespaceLabels = Arc<dyn Fn(&str) -> Option<BTreeMap<String, String>> + Send + Sync>;

/// Where the API server posts: istiod's path.
pub const PATH: &str = "/inject";
/// An AdmissionReview is a Pod and a few fields; more is refused.
const MAX_BODY: usize = 4 << 20;

/// The injector behind the webhook.
pub struct Injector {
    options: InjectOptions,
    namespace_labels: NamespaceLabels,
    bootstrap: Option<BootstrapWriter>,
}

impl Injector {
    pub fn new(options: InjectOptions, namespace_labels: NamespaceLabels) -> Self {
        Self {
            options,
            namespace_labels,
            bootstrap: None,
        }
    }

    /// Before a Pod of a namespace is admitted with a sidecar, the
    /// namespace's bootstrap ConfigMap (the one `inject` writes beside the
    /// workloads, which the sidecar mounts) is created or brought up to
    /// date through `client`; a Pod is refused when that fails.
    pub fn with_bootstrap_config_maps(mut self, client: kube::Client) -> Self {
        self.bootstrap = Some(BootstrapWriter {
            client,
            data: bootstrap(&self.options.discovery_address),
        });
        self
    }

    /// Answers one `AdmissionReview` (its JSON): the review to send back.
    pub fn review(&self, body: &[u8]) -> Value {
        self.answer(body).0
    }

    /// The review to send back, and the namespace of the Pod it injects.
    fn answer(&self, body: &[u8]) -> (Value, Option<String>) {
        let raw: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return (invalid(format!("not JSON: {e}")), None),
        };
        let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw.clone()) {
            Ok(r) => r,
            Err(e) => return (invalid(format!("not an AdmissionReview: {e}")), None),
        };
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(_) => return (invalid("an AdmissionReview without a request".into()), None),
        };
        // The object as sent (not as the typed view re-serializes it): the
        // patch applies to exactly what the API server holds.
        let pod = &raw["request"]["object"];
        let response = AdmissionResponse::from(&request);
        let mut injected_into = None;
        let response = match self.patch(&request, pod) {
            Ok(None) => response,
            Ok(Some((namespace, patch))) => match response.clone().with_patch(patch) {
                Ok(r) => {
                    // A dry run changes nothing beside the answer (the
                    // configuration says `sideEffects: NoneOnDryRun`).
                    injected_into = (!request.dry_run).then_some(namespace);
                    r
                }
                Err(e) => response.deny(format!("cannot encode the patch: {e}")),
            },
            Err(reason) => {
                tracing::warn!(
                    webhook.namespace = request.namespace.as_deref().unwrap_or_default(),
                    webhook.pod = %pod_name(pod),
                    %reason,
                    "injection refused"
                );
                response.deny(reason)
            }
        };
        let mut review =
            serde_json::to_value(response.into_review()).unwrap_or_else(|e| invalid(e.to_string()));
        base64_patch(&mut review);
        (review, injected_into)
    }

    /// The patch for a Pod being created and its namespace, `None` when it
    /// is left alone.
    fn patch(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        pod: &Value,
    ) -> Result<Option<(String, json_patch::Patch)>, String> {
        let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
        if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
            return Ok(None);
        }
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod["metadata"]["namespace"].as_str().map(str::to_string))
            .unwrap_or_default();
        let strings = |v: &Value| -> BTreeMap<String, String> {
            v.as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        };
        let labels = strings(&pod["metadata"]["labels"]);
        let annotations = strings(&pod["metadata"]["annotations"]);
        // A namespace the Kubernetes source has not seen yet (created a
        // moment ago): the API server called, so the webhook
        // configuration's namespace selector matched it; it counts as
        // enabled, and the Pod's own label or annotation still decides.
        let ns_labels = (self.namespace_labels)(&namespace).unwrap_or_else(|| {
            tracing::debug!(webhook.namespace = %namespace, "namespace not seen yet; trusting the webhook's selector");
            BTreeMap::from([(INJECTION_LABEL.to_string(), "enabled".to_string())])
        });
        if !injected(&labels, &annotations, Some(&ns_labels)) {
            tracing::debug!(webhook.namespace = %namespace, webhook.pod = %pod_name(pod), "not injected");
            return Ok(None);
        }
        let mut yaml: serde_yaml_ng::Value =
            serde_yaml_ng::to_value(pod).map_err(|e| format!("the pod: {e}"))?;
        if !inject_pod(&mut yaml, &self.options)? {
            return Ok(None);
        }
        let patched = serde_json::to_value(&yaml).map_err(|e| format!("the pod: {e}"))?;
        tracing::info!(webhook.namespace = %namespace, webhook.pod = %pod_name(pod), "injected");
        Ok(Some((namespace, json_patch::diff(pod, &patched))))
    }
}

/// Keeps a namespace's bootstrap ConfigMap as `inject` writes it.
struct BootstrapWriter {
    client: kube::Client,
    data: String,
}

impl BootstrapWriter {
    async fn ensure(&self, namespace: &str) -> Result<(), kube::Error> {
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::api::{Api, PostParams};
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let data = BTreeMap::from([("bootstrap.yaml".to_string(), self.data.clone())]);
        match api.get_opt(BOOTSTRAP_CONFIG_MAP).await? {
            Some(cm) if cm.data.as_ref() == Some(&data) => Ok(()),
            Some(mut cm) => {
                cm.data = Some(data);
                api.replace(BOOTSTRAP_CONFIG_MAP, &PostParams::default(), &cm)
                    .await?;
                tracing::info!(webhook.namespace = %namespace, "bootstrap ConfigMap updated");
                Ok(())
            }
            None => {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(BOOTSTRAP_CONFIG_MAP.into()),
                        namespace: Some(namespace.into()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "ferry-pilot".to_string(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    // Made by another request meanwhile: the same data.
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    Err(e) => Err(e),
                    Ok(_) => {
                        tracing::info!(webhook.namespace = %namespace, "bootstrap ConfigMap created");
                        Ok(())
                    }
                }
            }
        }
    }
}

/// Keeps the `caBundle` of every webhook of the MutatingWebhookConfiguration
/// `name` at `root_pem` (the mesh CA's root, which signs the webhook's
/// certificate), as istiod's webhook controller does: the configuration is
/// watched, and a webhook whose bundle differs (a fresh install, an upgrade
/// that reset it) is patched. Runs until the runtime stops.
pub async fn keep_ca_bundle(client: kube::Client, name: String, root_pem: String) {
    use futures_util::StreamExt;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(webhooks) => match patch_ca_bundle(&api, &webhooks, &root_pem).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(webhook.config = %name, webhook.patched = n, "caBundle set to the mesh CA's root")
                }
                Err(e) => {
                    tracing::warn!(webhook.config = %name, error = %e, "caBundle not patched")
                }
            },
            Err(e) => {
                tracing::warn!(webhook.config = %name, error = %e, "watching the webhook configuration")
            }
        }
    }
}

/// Patches the webhooks of `config` whose `caBundle` is not `root_pem`;
/// returns how many. The patch first tests the configuration's version, so
/// it never lands on webhooks rearranged meanwhile.
async fn patch_ca_bundle(
    api: &kube::Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>,
    config: &k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    root_pem: &str,
) -> Result<usize, kube::Error> {
    use base64::Engine;
    let want = k8s_openapi::ByteString(root_pem.as_bytes().to_vec());
    let encoded = base64::engine::general_purpose::STANDARD.encode(root_pem);
    let mut ops: Vec<Value> = config
        .webhooks
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| w.client_config.ca_bundle.as_ref() != Some(&want))
        .map(|(i, _)| {
            serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded})
        })
        .collect();
    let n = ops.len();
    let (Some(name), Some(version)) = (&config.metadata.name, &config.metadata.resource_version)
    else {
        return Ok(0);
    };
    if n == 0 {
        return Ok(0);
    }
    ops.insert(
        0,
        serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}),
    );
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops)).map_err(kube::Error::SerdeError)?;
    api.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Json::<()>(patch),
    )
    .await?;
    Ok(n)
}

/// Turns an allowing review into a refusal (`reason`), dropping its patch.
fn refuse(review: &mut Value, reason: String) {
    if let Some(resp) = review.get_mut("response").and_then(Value::as_object_mut) {
        resp.remove("patch");
        resp.remove("patchType");
        resp.insert("allowed".into(), Value::Bool(false));
        resp.insert(
            "status".into(),
            serde_json::json!({"status": "Failure", "message": reason, "code": 500}),
        );
    }
}

fn pod_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    meta["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .or(meta["generateName"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The patch as Kubernetes' Go types write a `[]byte`: a base64 string
/// (kube-rs' type writes an array of numbers, which Go reads too; the
/// string is what istiod and every other webhook send).
fn base64_patch(review: &mut Value) {
    use base64::Engine;
    let Some(patch) = review.pointer_mut("/response/patch") else {
        return;
    };
    let bytes: Option<Vec<u8>> = patch.as_array().and_then(|a| {
        a.iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect()
    });
    if let Some(bytes) = bytes {
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}

fn invalid(reason: String) -> Value {
    tracing::warn!(%reason, "bad admission request");
    serde_json::to_value(AdmissionResponse::invalid(reason).into_review()).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook certificate: {0}")]
    Certificate(String),
}

/// The webhook's serving certificate: given, or made by the mesh CA and
/// made again at half its lifetime.
#[derive(Debug)]
pub struct ServingCert {
    source: CertSource,
    current: Mutex<(Arc<CertifiedKey>, Instant)>,
}

enum CertSource {
    Given,
    Ca {
        ca: Arc<Ca>,
        dns_names: Vec<String>,
        ttl: Duration,
    },
}

impl std::fmt::Debug for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertSource::Given => f.write_str("given"),
            CertSource::Ca { dns_names, .. } => write!(f, "CA for {dns_names:?}"),
        }
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, WebhookError> {
    let bad = |e: String| WebhookError::Certificate(e);
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

impl ServingCert {
    /// A certificate chain and key from PEM (`--webhook-cert`/`--webhook-key`).
    pub fn given(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, WebhookError> {
        Ok(Self {
            source: CertSource::Given,
            current: Mutex::new((certified_key(cert_pem, key_pem)?, far_future())),
        })
    }

    /// A certificate for `dns_names` from the mesh CA, lasting `ttl`.
    pub fn from_ca(
        ca: Arc<Ca>,
        dns_names: Vec<String>,
        ttl: Duration,
    ) -> Result<Self, WebhookError> {
        let key = Self::issue(&ca, &dns_names, ttl)?;
        Ok(Self {
            source: CertSource::Ca { ca, dns_names, ttl },
            current: Mutex::new((key, Instant::now() + ttl / 2)),
        })
    }

    fn issue(
        ca: &Ca,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Arc<CertifiedKey>, WebhookError> {
        let (cert, key) = ca
            .issue_server(dns_names, ttl)
            .map_err(|e| WebhookError::Certificate(e.to_string()))?;
        certified_key(cert.as_bytes(), key.as_bytes())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let CertSource::Ca { ca, dns_names, ttl } = &self.source
            && Instant::now() >= cur.1
        {
            match Self::issue(ca, dns_names, *ttl) {
                Ok(key) => *cur = (key, Instant::now() + *ttl / 2),
                Err(e) => tracing::error!(error = %e, "webhook certificate not renewed"),
            }
        }
        cur.0.clone()
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The TLS configuration of the webhook: HTTP/2 or HTTP/1.1 (the API
/// server speaks either), the certificate from `cert`.
pub fn tls_config(cert: Arc<ServingCert>) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_no_client_auth()
    .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn handle(injector: Arc<Injector>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if path != PATH && !path.starts_with("/inject/") {
        return reply(StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, b"{}".to_vec());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                invalid(e.to_string()).to_string().into(),
            );
        }
    };
    // Injection reads YAML values and diffs JSON: CPU work off the reactor.
    let worker = injector.clone();
    let (mut answer, injected_into) = tokio::task::spawn_blocking(move || worker.answer(&body))
        .await
        .unwrap_or_else(|e| (invalid(format!("injector failed: {e}")), None));
    if let (Some(namespace), Some(writer)) = (injected_into, &injector.bootstrap)
        && let Err(e) = writer.ensure(&namespace).await
    {
        let reason = format!("cannot write ConfigMap {BOOTSTRAP_CONFIG_MAP} in {namespace}: {e}");
        tracing::error!(webhook.namespace = %namespace, %reason, "injection refused");
        refuse(&mut answer, reason);
    }
    reply(StatusCode::OK, answer.to_string().into_bytes())
}

/// Serves the webhook on `listener` over TLS until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    injector: Arc<Injector>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let injector = injector.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let injector = injector.clone();
                async move { Ok::<_, Infallible>(handle(injector, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
