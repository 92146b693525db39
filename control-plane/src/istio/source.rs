//! Configuration sources: where the resources translation works from come
//! from, behind the [`Source`] trait (list everything, be told about
//! changes) so that a Kubernetes API source can join the directory source
//! without translation noticing. This module owns reading multi-document
//! YAML into typed [`Resource`]s, the per-document [`LoadError`]s (file,
//! line, resource, field path) and the [`DirectorySource`] that polls a
//! directory tree for changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};
use tokio::sync::watch;

use super::types::{ObjectMeta, ResourceKey, kube, networking, security, telemetry};

/// Where a resource was read from.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line where the resource's YAML document starts.
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// The typed body of a resource. Kinds the control plane does not use are
/// kept as [`Spec::Other`] so that listing them (and ignoring them) is an
/// explicit choice.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Service(kube::Service),
    Pod(kube::Pod),
    Endpoints(kube::Endpoints),
    EndpointSlice(kube::EndpointSlice),
    Deployment(kube::Deployment),
    ServiceAccount,
    Namespace,
    Secret(kube::Secret),
    VirtualService(networking::VirtualService),
    /// Boxed: by far the largest spec, and most snapshots hold few.
    DestinationRule(Box<networking::DestinationRule>),
    Gateway(networking::Gateway),
    ServiceEntry(networking::ServiceEntry),
    WorkloadEntry(networking::WorkloadEntry),
    Sidecar(Box<networking::Sidecar>),
    PeerAuthentication(security::PeerAuthentication),
    AuthorizationPolicy(security::AuthorizationPolicy),
    RequestAuthentication(security::RequestAuthentication),
    Telemetry(telemetry::Telemetry),
    Other,
}

/// One Kubernetes-style object read from a source.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub api_version: String,
    pub kind: String,
    pub meta: ObjectMeta,
    pub origin: Origin,
    pub spec: Spec,
}

impl Resource {
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind.clone(),
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
        }
    }
}

/// A document that could not be turned into a resource. The resource is left
/// out of the snapshot: translation never sees a half-understood object.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{origin}: {}{}: {message}", resource.as_ref().map(|r| format!("{r}: ")).unwrap_or_default(), if field.is_empty() { String::new() } else { format!("field {field}") })]
pub struct LoadError {
    pub origin: Origin,
    pub resource: Option<ResourceKey>,
    /// Path of the offending field from the document root, e.g.
    /// `spec.http[0].route[0].destination.hots`.
    pub field: String,
    pub message: String,
}

/// Everything a source holds at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub resources: Vec<Resource>,
    pub errors: Vec<LoadError>,
}

impl Snapshot {
    /// The resources of one kind, with their typed spec picked out by `pick`.
    pub fn of<'a, T: 'a>(
        &'a self,
        pick: impl Fn(&'a Spec) -> Option<&'a T> + 'a,
    ) -> impl Iterator<Item = (&'a Resource, &'a T)> + 'a {
        self.resources
            .iter()
            .filter_map(move |r| pick(&r.spec).map(|s| (r, s)))
    }

    fn extend(&mut self, other: Snapshot) {
        self.resources.extend(other.resources);
        self.errors.extend(other.errors);
    }
}

/// Failures that stop a whole source from being read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A provider of configuration resources.
pub trait Source: Send + Sync {
    /// Short description for logs (`dir:/etc/istio`).
    fn describe(&self) -> String;
    /// Everything the source holds now.
    fn list(&self) -> Result<Snapshot, SourceError>;
    /// A counter bumped after every change; a consumer re-lists when it moves.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Parses every document of one YAML text (`file` only names it in errors).
pub fn parse_documents(text: &str, file: &Path) -> Snapshot {
    let mut out = Snapshot::default();
    for (line, doc) in split_documents(text) {
        let origin = Origin {
            file: file.to_path_buf(),
            line,
        };
        let value: Value = match serde_yaml_ng::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(LoadError {
                    origin: Origin {
                        // The parser's line is relative to the document.
                        line: line + e.location().map_or(0, |l| l.line().saturating_sub(1)),
                        ..origin
                    },
                    resource: None,
                    field: String::new(),
                    message: format!("invalid YAML: {e}"),
                });
                continue;
            }
        };
        parse_object(value, &origin, &mut out);
    }
    out
}

/// Parses one object already decoded (from the Kubernetes API, say), as
/// a document of a file would be; `origin` names it in errors.
pub fn parse_value(value: Value, origin: &Origin) -> Snapshot {
    let mut out = Snapshot::default();
    parse_object(value, origin, &mut out);
    out
}

/// Splits a multi-document YAML text on `---` lines, returning each
/// document with the 1-based line where it starts. Empty documents are
/// dropped. A `---` inside a block scalar is always indented, so a line
/// starting with it is a separator.
pub fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = idx + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

fn parse_object(value: Value, origin: &Origin, out: &mut Snapshot) {
    let Value::Mapping(map) = value else {
        // Not an object (a bare list or scalar): not a Kubernetes resource.
        return;
    };
    let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        // A fragment such as a mesh-config snippet: not a resource to load.
        return;
    };
    if kind == "List" {
        if let Some(Value::Sequence(items)) = map.get("items") {
            for item in items.clone() {
                parse_object(item, origin, out);
            }
        }
        return;
    }
    let mut meta: ObjectMeta = match map.get("metadata") {
        Some(m) => match typed::<ObjectMeta>(m.clone()) {
            Ok(meta) => meta,
            Err((path, message)) => {
                out.errors.push(LoadError {
                    origin: origin.clone(),
                    resource: None,
                    field: join_path("metadata", &path),
                    message,
                });
                return;
            }
        },
        None => ObjectMeta::default(),
    };
    if meta.namespace.is_empty() && !is_cluster_scoped(&kind) {
        meta.namespace = "default".to_string();
    }
    let key = ResourceKey {
        kind: kind.clone(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
    };
    let fail = |field: String, message: String| LoadError {
        origin: origin.clone(),
        resource: Some(key.clone()),
        field,
        message,
    };
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let istio = matches!(group, "networking.istio.io" | "security.istio.io");
    if istio {
        if meta.name.is_empty() {
            out.errors.push(fail(
                "metadata.name".into(),
                "a resource needs a name".into(),
            ));
            return;
        }
        // Only the envelope's own keys are allowed beside the spec.
        for k in map.keys() {
            let k = k.as_str().unwrap_or_default();
            if !matches!(k, "apiVersion" | "kind" | "metadata" | "spec" | "status") {
                out.errors
                    .push(fail(k.to_string(), format!("unknown field `{k}`")));
                return;
            }
        }
    }
    let spec_value = map
        .get("spec")
        .cloned()
        .unwrap_or(Value::Mapping(Mapping::new()));
    let whole = Value::Mapping(map.clone());
    let spec = match (group, kind.as_str()) {
        ("", "Service") => kube_obj(whole, Spec::Service),
        ("", "Pod") => kube_obj(whole, Spec::Pod),
        ("", "Endpoints") => kube_obj(whole, Spec::Endpoints),
        ("discovery.k8s.io", "EndpointSlice") => kube_obj(whole, Spec::EndpointSlice),
        ("apps", "Deployment") => kube_obj(whole, Spec::Deployment),
        ("", "ServiceAccount") => Ok(Spec::ServiceAccount),
        ("", "Namespace") => Ok(Spec::Namespace),
        ("", "Secret") => kube_obj(whole, Spec::Secret),
        ("networking.istio.io", "VirtualService") => spec_of(spec_value, Spec::VirtualService),
        ("networking.istio.io", "DestinationRule") => {
            spec_of(spec_value, |dr| Spec::DestinationRule(Box::new(dr)))
        }
        ("networking.istio.io", "Gateway") => spec_of(spec_value, Spec::Gateway),
        ("networking.istio.io", "ServiceEntry") => spec_of(spec_value, Spec::ServiceEntry),
        ("networking.istio.io", "WorkloadEntry") => spec_of(spec_value, Spec::WorkloadEntry),
        ("networking.istio.io", "Sidecar") => spec_of(spec_value, |sc| Spec::Sidecar(Box::new(sc))),
        ("security.istio.io", "PeerAuthentication") => {
            spec_of(spec_value, Spec::PeerAuthentication)
        }
        ("security.istio.io", "AuthorizationPolicy") => {
            spec_of(spec_value, Spec::AuthorizationPolicy)
        }
        ("security.istio.io", "RequestAuthentication") => {
            spec_of(spec_value, Spec::RequestAuthentication)
        }
        ("telemetry.istio.io", "Telemetry") => spec_of(spec_value, Spec::Telemetry),
        _ => Ok(Spec::Other),
    };
    match spec {
        Ok(spec) => out.resources.push(Resource {
            api_version,
            kind,
            meta,
            origin: origin.clone(),
            spec,
        }),
        Err((field, message)) => out.errors.push(fail(field, message)),
    }
}

fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "ClusterIssuer"
            | "CustomResourceDefinition"
            | "Node"
    )
}

fn kube_obj<T: DeserializeOwned>(
    value: Value,
    wrap: fn(T) -> Spec,
) -> Result<Spec, (String, String)> {
    typed::<T>(value).map(wrap)
}

fn spec_of<T: DeserializeOwned>(
    value: Value,
    wrap: fn(T) -> Spec,
) -> Result<Spec, (String, String)> {
    typed::<T>(value)
        .map(wrap)
        .map_err(|(path, message)| (join_path("spec", &path), message))
}

/// Deserializes with the path of the failing field (`http[0].match[0].uri`).
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." || path == "?" {
            String::new()
        } else {
            path
        };
        (path, e.into_inner().to_string())
    })
}

fn join_path(prefix: &str, path: &str) -> String {
    if path.is_empty() {
        prefix.to_string()
    } else if path.starts_with('[') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}.{path}")
    }
}

/// Reads one file.
pub fn load_file(path: &Path) -> Result<Snapshot, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_documents(&text, path))
}

/// Reads every `.yaml` / `.yml` file under `root` (recursively, in path
/// order so the result does not depend on the file system's order).
pub fn load_dir(root: &Path) -> Result<Snapshot, SourceError> {
    let mut out = Snapshot::default();
    for file in yaml_files(root)? {
        out.extend(load_file(&file.path)?);
    }
    Ok(out)
}

/// A file's identity for change detection.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    modified: Option<SystemTime>,
    len: u64,
}

fn yaml_files(root: &Path) -> Result<Vec<FileStamp>, SourceError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceError::Io { path, source }
    };
    let mut files = Vec::new();
    let meta = std::fs::metadata(root).map_err(io(root))?;
    if meta.is_file() {
        files.push(FileStamp {
            path: root.to_path_buf(),
            modified: meta.modified().ok(),
            len: meta.len(),
        });
        return Ok(files);
    }
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(io(&path))?;
            if meta.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml")
            {
                files.push(FileStamp {
                    path,
                    modified: meta.modified().ok(),
                    len: meta.len(),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// A directory of YAML files (or a single file), re-read when a file's
/// modification time or size changes, or a file appears or disappears.
pub struct DirectorySource {
    root: PathBuf,
    changes: watch::Sender<u64>,
}

impl DirectorySource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            changes: watch::Sender::new(0),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Polls the tree every `interval` and bumps the change counter when it
    /// differs from the state at the call (taken before this returns, so a
    /// change made right after is seen). Polling keeps the source free of
    /// platform file-notification APIs and works on every file system,
    /// including the bind mounts and config maps it will mostly read. The
    /// task ends when the source is dropped; whether anybody listens yet
    /// does not matter (a follower may subscribe after the first tick).
    pub fn spawn_poller(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let source = Arc::downgrade(self);
        let root = self.root.clone();
        let mut last = yaml_files(&root).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = source.upgrade() else {
                    return;
                };
                let now = yaml_files(&root).ok();
                if now != last {
                    tracing::info!(source.root = %root.display(), "configuration changed");
                    last = now;
                    this.changes.send_modify(|n| *n += 1);
                }
            }
        })
    }
}

impl Source for DirectorySource {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    fn list(&self) -> Result<Snapshot, SourceError> {
        load_dir(&self.root)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_start_lines() {
        let text = "a: 1\n---\n# only a comment\n---\nb: 2\n--- \nc: 3\n";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].0, 1);
        assert_eq!(docs[1].0, 5);
        assert_eq!(docs[2].0, 7);
    }

    #[test]
    fn unknown_istio_field_names_its_path() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination:\n        hots: r\n";
        let snap = parse_documents(yaml, Path::new("x.yaml"));
        assert!(snap.resources.is_empty());
        assert_eq!(snap.errors.len(), 1);
        let err = &snap.errors[0];
        assert_eq!(err.field, "spec.http[0].route[0].destination.hots");
        assert!(
            err.message.contains("unknown field `hots`"),
            "{}",
            err.message
        );
        assert_eq!(
            err.resource.as_ref().map(|r| r.namespace.as_str()),
            Some("default")
        );
    }

    #[test]
    fn unknown_kinds_are_kept_as_other() {
        let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: g\nspec:\n  whatever: 1\n";
        let snap = parse_documents(yaml, Path::new("x.yaml"));
        assert!(snap.errors.is_empty());
        assert_eq!(snap.resources[0].spec, Spec::Other);
    }

    /// A follower that subscribes only after the poller's first ticks still
    /// hears about later changes, and changes written between the call
    /// and the first tick are not lost.
    #[tokio::test]
    async fn poller_reports_changes_to_late_subscribers() {
        let dir = std::env::temp_dir().join(format!("ferry-poller-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        let source = Arc::new(DirectorySource::new(&dir));
        let poller = source.spawn_poller(Duration::from_millis(20));
        // Written before the poller ran at all.
        std::fs::write(dir.join("b.yaml"), "b: 2\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut changes = source.subscribe();
        assert_eq!(*changes.borrow_and_update(), 1, "the early change counts");
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("a change after subscribing is reported")
            .unwrap();
        drop(changes);
        drop(source);
        tokio::time::timeout(Duration::from_secs(5), poller)
            .await
            .expect("the poller ends with its source")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
