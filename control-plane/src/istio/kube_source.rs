//! The Kubernetes API as a [`Source`] (cargo feature `kube`, on by
//! default): one list+watch per kind translation reads (Services, Pods,
//! Namespaces, EndpointSlices and Istio's networking and security CRDs),
//! each kept as `DynamicObject`s in memory and handed to the same parser as
//! the YAML files, so validation and translation cannot tell the two
//! sources apart. kube-rs' watcher speaks the protocol: a paged list, then
//! a watch from the list's `resourceVersion` resumed from the last event or
//! bookmark, and a relist when the server answers 410 Gone (the version was
//! compacted away); a relist replaces the kind's objects at once. A kind
//! whose API the cluster does not serve (Istio's CRDs not installed) counts
//! as empty until it is. Every applied change bumps the counter
//! [`Source::subscribe`] hands out; `list` returns the current objects.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::source::{Origin, Snapshot, Source, SourceError, parse_value};

/// What is watched: group, version, kind, plural.
pub const WATCHED: &[(&str, &str, &str, &str)] = &[
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "Service", "services"),
    ("", "v1", "Pod", "pods"),
    // The TLS credentials gateways name by `credentialName`.
    ("", "v1", "Secret", "secrets"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    (
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    ("networking.istio.io", "v1", "Gateway", "gateways"),
    (
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
    ),
    (
        "networking.istio.io",
        "v1",
        "WorkloadEntry",
        "workloadentries",
    ),
    ("networking.istio.io", "v1", "Sidecar", "sidecars"),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        "requestauthentications",
    ),
    ("telemetry.istio.io", "v1", "Telemetry", "telemetries"),
];

/// The Secrets watched: all but Helm releases and service account tokens.
pub const SECRET_FIELD_SELECTOR: &str =
    "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("no Kubernetes API (neither an in-cluster service account nor KUBECONFIG)")]
    Connect(#[source] kube::Error),
}

/// Objects of one kind by (namespace, name), as JSON with their type.
type Store = BTreeMap<(String, String), serde_json::Value>;

#[derive(Default)]
struct State {
    stores: BTreeMap<&'static str, Store>,
    /// Kinds (plurals) whose first list completed (or that the API does not
    /// serve).
    listed: Vec<&'static str>,
}

pub struct KubeSource {
    client: kube::Client,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    namespace_changes: watch::Sender<u64>,
    synced: watch::Sender<usize>,
}

impl KubeSource {
    /// Connects with the in-cluster configuration or `KUBECONFIG`.
    pub async fn connect() -> Result<Arc<Self>, KubeSourceError> {
        let client = kube::Client::try_default()
            .await
            .map_err(KubeSourceError::Connect)?;
        Ok(Self::with_client(client))
    }

    pub fn with_client(client: kube::Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
            namespace_changes: watch::channel(0).0,
            synced: watch::channel(0).0,
        })
    }

    /// The client the watchers use.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Starts one watcher per kind; they run until the runtime stops.
    pub fn spawn_watchers(self: &Arc<Self>) {
        for &(group, version, kind, plural) in WATCHED {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            );
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let me = self.clone();
            tokio::spawn(async move { me.watch_kind(api, ar).await });
        }
    }

    /// Waits until every kind was listed once, saying every 10 s which
    /// kinds are still missing (a forbidden list, an unreachable server).
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        loop {
            let all = rx.wait_for(|n| *n >= WATCHED.len());
            if tokio::time::timeout(std::time::Duration::from_secs(10), all)
                .await
                .is_ok()
            {
                return;
            }
            let listed: Vec<&str> = self.lock().listed.to_vec();
            let missing: Vec<&str> = WATCHED
                .iter()
                .map(|w| w.3)
                .filter(|p| !listed.contains(p))
                .collect();
            tracing::warn!(kube.missing = %missing.join(","), "still waiting for the first list of these kinds");
        }
    }

    /// The labels of namespace `name`, if it is known.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let st = self.lock();
        let ns = st
            .stores
            .get("Namespace")?
            .get(&(String::new(), name.to_string()))?;
        let labels = ns.get("metadata")?.get("labels");
        Some(
            labels
                .and_then(|l| serde_json::from_value(l.clone()).ok())
                .unwrap_or_default(),
        )
    }

    /// The names of every namespace known.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock()
            .stores
            .get("Namespace")
            .map(|s| s.keys().map(|(_, name)| name.clone()).collect())
            .unwrap_or_default()
    }

    /// Bumped on every change of the namespaces (for what follows them).
    pub fn subscribe_namespaces(&self) -> watch::Receiver<u64> {
        self.namespace_changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_synced(&self, plural: &'static str, first: &mut bool) {
        if std::mem::take(first) {
            let n = {
                let mut st = self.lock();
                st.listed.push(plural);
                st.listed.len()
            };
            self.synced.send_replace(n);
            tracing::info!(kube.kind = plural, "listed");
        }
    }

    async fn watch_kind(self: Arc<Self>, api: Api<DynamicObject>, ar: ApiResource) {
        let (kind, plural): (&'static str, &'static str) = WATCHED
            .iter()
            .find(|w| w.2 == ar.kind)
            .map_or(("", ""), |w| (w.2, w.3));
        let mut first = true;
        let mut pending: Store = Store::new();
        let mut config = watcher::Config::default();
        if kind == "Secret" {
            // As istiod: the large secrets no gateway names (Helm releases,
            // service account tokens) are never listed.
            config = config.fields(SECRET_FIELD_SELECTOR);
        }
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    pending.clear();
                    false
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    if let Some((key, value)) = entry(&ar, obj) {
                        pending.insert(key, value);
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    // A relist replaces the kind's objects at once.
                    self.lock()
                        .stores
                        .insert(kind, std::mem::take(&mut pending));
                    self.mark_synced(plural, &mut first);
                    tracing::debug!(kube.kind = plural, "(re)listed");
                    true
                }
                Ok(watcher::Event::Apply(obj)) => match entry(&ar, obj) {
                    Some((key, value)) => {
                        self.lock()
                            .stores
                            .entry(kind)
                            .or_default()
                            .insert(key, value);
                        true
                    }
                    None => false,
                },
                Ok(watcher::Event::Delete(obj)) => {
                    let key = (
                        obj.metadata.namespace.clone().unwrap_or_default(),
                        obj.metadata.name.clone().unwrap_or_default(),
                    );
                    self.lock()
                        .stores
                        .get_mut(kind)
                        .is_some_and(|s| s.remove(&key).is_some())
                }
                Err(e) => {
                    // A kind the cluster does not serve (Istio not
                    // installed) counts as empty, and is looked for again
                    // with back-off; other errors are retried the same way
                    // (410 Gone is the watcher's cue to relist).
                    match status_code(&e) {
                        Some(404) => {
                            if first {
                                tracing::info!(
                                    kube.kind = plural,
                                    "not served by this cluster; empty until it is"
                                );
                            }
                            self.mark_synced(plural, &mut first);
                        }
                        Some(410) => {
                            tracing::info!(
                                kube.kind = plural,
                                "watch expired (410 Gone); relisting"
                            );
                        }
                        Some(403) => tracing::error!(
                            kube.kind = plural,
                            error = %e,
                            "forbidden: ferry-pilot's ClusterRole must allow get, list and watch on it"
                        ),
                        _ => {
                            tracing::warn!(kube.kind = plural, error = %e, "watch failed; retrying")
                        }
                    }
                    false
                }
            };
            if changed {
                self.changes.send_modify(|n| *n += 1);
                if kind == "Namespace" {
                    self.namespace_changes.send_modify(|n| *n += 1);
                }
            }
        }
    }
}

/// The HTTP status the API server answered with, if the error is one.
fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// An object as the YAML parser expects it: `apiVersion` and `kind` set
/// (list items come without them).
fn entry(ar: &ApiResource, obj: DynamicObject) -> Option<((String, String), serde_json::Value)> {
    let key = (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone()?,
    );
    let mut value = serde_json::to_value(&obj).ok()?;
    let map = value.as_object_mut()?;
    map.insert("apiVersion".into(), ar.api_version.clone().into());
    map.insert("kind".into(), ar.kind.clone().into());
    Some((key, value))
}

/// The stored objects through the YAML source's parser, kinds in
/// [`WATCHED`] order; an object's origin reads `kube:PLURAL/NS/NAME`.
fn snapshot(stores: &BTreeMap<&'static str, Store>) -> Snapshot {
    let mut out = Snapshot::default();
    for &(_, _, kind, plural) in WATCHED {
        for ((ns, name), value) in stores.get(kind).into_iter().flatten() {
            let origin = Origin {
                file: PathBuf::from(format!("kube:{plural}/{ns}/{name}")),
                line: 1,
            };
            let Ok(yaml) = serde_yaml_ng::to_value(value) else {
                continue;
            };
            let snap = parse_value(yaml, &origin);
            out.resources.extend(snap.resources);
            out.errors.extend(snap.errors);
        }
    }
    out
}

impl Source for KubeSource {
    fn describe(&self) -> String {
        "kubernetes".into()
    }

    fn list(&self) -> Result<Snapshot, SourceError> {
        Ok(snapshot(&self.lock().stores))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::source::Spec;

    fn ar(group: &str, kind: &str, plural: &str) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
    }

    /// Objects as a list response carries them (no apiVersion or kind)
    /// become the same typed resources as YAML files; a schema error names
    /// the object and the field.
    #[test]
    fn api_objects_parse_like_files() {
        let pod: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews-1", "namespace": "shop", "labels": {"app": "reviews"},
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"containers": [{"name": "app", "image": "x"}], "nodeName": "n1"},
            "status": {"podIP": "10.1.0.5", "phase": "Running"}
        }))
        .expect("pod");
        let vs: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"hots": "reviews"}}]}]}
        }))
        .expect("vs");
        let mut stores: BTreeMap<&'static str, Store> = BTreeMap::new();
        let (k, v) = entry(&ar("", "Pod", "pods"), pod).expect("entry");
        stores.entry("Pod").or_default().insert(k, v);
        let (k, v) = entry(
            &ar("networking.istio.io", "VirtualService", "virtualservices"),
            vs,
        )
        .expect("entry");
        stores.entry("VirtualService").or_default().insert(k, v);
        let snap = snapshot(&stores);
        assert_eq!(snap.resources.len(), 1, "{:?}", snap.errors);
        let r = &snap.resources[0];
        assert_eq!(
            (r.kind.as_str(), r.meta.namespace.as_str()),
            ("Pod", "shop")
        );
        let Spec::Pod(p) = &r.spec else {
            panic!("{:?}", r.spec)
        };
        assert_eq!(p.status.pod_ip.as_deref(), Some("10.1.0.5"));
        assert_eq!(snap.errors.len(), 1);
        let e = snap.errors[0].to_string();
        assert!(
            e.contains("kube:virtualservices/shop/reviews")
                && e.contains("spec.http[0].route[0].destination")
                && e.contains("hots"),
            "{e}"
        );
    }
}
