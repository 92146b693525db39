//! Incremental ADS (`DeltaAggregatedResources`): per type URL the
//! subscription of one stream (wildcard, subscribed names) and the version of
//! every resource the client holds, so that each response carries only what
//! changed and `removed_resources` names what went away or does not exist.
//! Subscription changes are honoured even on a stale nonce, as Envoy's
//! protocol requires; the nonce only pairs an ACK or NACK with its response.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::Status;

use super::cache::{Cache, TypeSnapshot};
use super::server::{CONTROL_PLANE_ID, MAX_PENDING, StreamState};
use super::status::{Nack, StreamHandle};
use super::{is_wildcard_type, push_rank};

/// One delta stream.
pub(crate) struct DeltaStream {
    cache: Cache,
    handle: StreamHandle,
    node: Option<String>,
    nonces: u64,
    types: BTreeMap<String, DeltaType>,
}

#[derive(Default, Debug)]
struct DeltaType {
    wildcard: bool,
    /// Explicitly subscribed names.
    names: BTreeSet<String>,
    /// Name → version of every resource the client holds (as sent, or as it
    /// declared in `initial_resource_versions`).
    known: HashMap<Arc<str>, Arc<str>>,
    /// Subscribed names already reported as absent in `removed_resources`.
    told_absent: BTreeSet<String>,
    /// Responses not answered yet: (nonce, system version), oldest first.
    pending: VecDeque<(String, String)>,
    /// Cache counter last compared against.
    seen_counter: u64,
}

/// What one request asks to be sent regardless of the client's versions.
#[derive(Default)]
struct Force {
    all: bool,
    names: BTreeSet<String>,
}

impl DeltaType {
    fn interested(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Applies one request's subscription fields.
    fn subscribe(&mut self, req: &DeltaDiscoveryRequest, first: bool) -> Force {
        let mut force = Force::default();
        if first {
            self.known = req
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (Arc::from(n.as_str()), Arc::from(v.as_str())))
                .collect();
            // Legacy wildcard: a first request that names nothing at all.
            if req.resource_names_subscribe.is_empty()
                && req.resource_names_unsubscribe.is_empty()
                && is_wildcard_type(&req.type_url)
            {
                self.wildcard = true;
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                // Re-subscribing to what the client seems to hold still
                // means "send it": it may have forgotten it.
                force.all |= !first;
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
                if !first {
                    force.names.insert(name.clone());
                }
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                self.wildcard = false;
                let names = &self.names;
                self.known.retain(|k, _| names.contains(&**k));
            } else {
                self.names.remove(name);
                self.told_absent.remove(name);
                if self.wildcard {
                    // The client cannot tell whether the wildcard still
                    // covers it: answer with the resource or its removal.
                    force.names.insert(name.clone());
                } else {
                    force.names.remove(name);
                    // Forgotten, so a later re-subscription sends it again.
                    self.known.remove(name.as_str());
                }
            }
        }
        force
    }

    /// The resources to send and the names to remove, updating what the
    /// client is known to hold. Every proxy's stream runs it on every change
    /// of a type it holds, so the usual case (what it holds is all there,
    /// every name it asked for exists) costs two lookups per resource: the
    /// other passes run only when the counts say they have work.
    fn diff(&mut self, snap: &TypeSnapshot, force: &Force) -> (Vec<Resource>, Vec<String>) {
        let mut resources = Vec::new();
        // Resources the client wants, and those of them it asked by name.
        let (mut wanted, mut named) = (0, 0);
        for (name, r) in snap.resources.iter() {
            let explicit = !self.names.is_empty() && self.names.contains(&**name);
            if !(self.wildcard || explicit) {
                continue;
            }
            wanted += 1;
            named += usize::from(explicit);
            let forced = force.all || force.names.contains(&**name);
            if forced || self.known.get(&**name) != Some(&r.version) {
                resources.push(Resource {
                    name: name.to_string(),
                    version: r.version.to_string(),
                    resource: Some((*r.any).clone()),
                    ..Default::default()
                });
                self.known.insert(name.clone(), r.version.clone());
                self.told_absent.remove(&**name);
            }
        }
        let mut removed = BTreeSet::new();
        // Every wanted resource is in `known` now: anything more there is
        // gone from the cache or no longer wanted.
        if self.known.len() > wanted {
            let gone: Vec<Arc<str>> = self
                .known
                .keys()
                .filter(|k| !snap.resources.contains_key(&***k))
                .cloned()
                .collect();
            for name in gone {
                self.known.remove(&name);
                if self.interested(&name) {
                    if self.names.contains(&*name) {
                        self.told_absent.insert(name.to_string());
                    }
                    removed.insert(name.to_string());
                }
            }
            // Versions declared for names the client does not subscribe to.
            let (wildcard, names) = (self.wildcard, &self.names);
            self.known.retain(|k, _| wildcard || names.contains(&**k));
        }
        // Subscribed names that do not exist are reported once, so the
        // client need not wait for a timeout.
        if named < self.names.len() {
            for name in &self.names {
                if !snap.resources.contains_key(name.as_str()) && !self.told_absent.contains(name) {
                    removed.insert(name.clone());
                }
            }
        }
        for name in &force.names {
            if !snap.resources.contains_key(name.as_str()) {
                removed.insert(name.clone());
            }
        }
        for name in &removed {
            if self.names.contains(name) {
                self.told_absent.insert(name.clone());
            }
        }
        (resources, removed.into_iter().collect())
    }
}

impl DeltaStream {
    pub(crate) fn new(cache: Cache, handle: StreamHandle) -> Self {
        Self {
            cache,
            handle,
            node: None,
            nonces: 0,
            types: BTreeMap::new(),
        }
    }

    fn note_node(&mut self, node: Option<&Node>) {
        if self.node.is_none()
            && let Some(n) = node
        {
            self.node = Some(n.id.clone());
            self.handle.set_node(&n.id, &n.cluster);
            tracing::info!(
                xds.node = %n.id,
                xds.stream = self.handle.id(),
                "delta ADS stream opened"
            );
        }
    }

    fn bookkeep(&mut self, req: &DeltaDiscoveryRequest) {
        if req.response_nonce.is_empty() {
            return;
        }
        let node = self.node.clone().unwrap_or_default();
        let Some(t) = self.types.get_mut(&req.type_url) else {
            return;
        };
        let Some(pos) = t.pending.iter().position(|(n, _)| *n == req.response_nonce) else {
            tracing::debug!(
                xds.node = %node,
                xds.type_url = %req.type_url,
                xds.nonce = %req.response_nonce,
                "answer to an unknown nonce"
            );
            return;
        };
        t.pending.drain(..pos);
        let Some((nonce, version)) = t.pending.pop_front() else {
            return;
        };
        match &req.error_detail {
            None => {
                tracing::debug!(
                    xds.node = %node,
                    xds.type_url = %req.type_url,
                    xds.version = %version,
                    xds.nonce = %nonce,
                    "ACK"
                );
                self.handle.acked(&req.type_url, &version, &nonce);
            }
            // The client keeps its previous versions, but `known` keeps the
            // rejected ones: the same resource is not sent again until it
            // changes, which is what a NACK asks of the server.
            Some(e) => {
                tracing::warn!(
                    xds.node = %node,
                    xds.type_url = %req.type_url,
                    xds.version = %version,
                    xds.nonce = %nonce,
                    xds.error = %e.message,
                    "NACK"
                );
                self.handle.nacked(
                    &req.type_url,
                    Nack {
                        nonce,
                        version,
                        client_version: String::new(),
                        code: e.code,
                        message: e.message.clone(),
                    },
                );
            }
        }
    }

    fn respond(
        &mut self,
        type_url: &str,
        snap: &TypeSnapshot,
        resources: Vec<Resource>,
        removed: Vec<String>,
    ) -> DeltaDiscoveryResponse {
        self.nonces += 1;
        let nonce = format!("{}-{}", self.handle.id(), self.nonces);
        if let Some(t) = self.types.get_mut(type_url) {
            t.pending.push_back((nonce.clone(), snap.version.clone()));
            if t.pending.len() > MAX_PENDING {
                t.pending.pop_front();
            }
        }
        self.handle
            .sent(type_url, &snap.version, &nonce, resources.len());
        tracing::debug!(
            xds.node = %self.node.as_deref().unwrap_or("?"),
            xds.type_url = type_url,
            xds.version = %snap.version,
            xds.nonce = %nonce,
            xds.resources = resources.len(),
            xds.removed = removed.len(),
            "delta response"
        );
        DeltaDiscoveryResponse {
            system_version_info: snap.version.clone(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            control_plane: Some(ControlPlane {
                identifier: CONTROL_PLANE_ID.to_string(),
            }),
            ..Default::default()
        }
    }
}

impl StreamState for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn node_of(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn use_cache(&mut self, cache: Cache) {
        self.cache = cache;
    }

    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        self.note_node(req.node.as_ref());
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "DeltaDiscoveryRequest.type_url is required on an aggregated stream",
            ));
        }
        let first = !self.types.contains_key(&req.type_url);
        self.bookkeep(&req);
        let t = self.types.entry(req.type_url.clone()).or_default();
        let force = t.subscribe(&req, first);
        self.handle
            .subscribed(&req.type_url, t.wildcard, t.names.iter().cloned().collect());
        let snap = self.cache.snapshot(&req.type_url);
        t.seen_counter = snap.counter;
        let (resources, removed) = t.diff(&snap, &force);
        // The first request of a type is always answered, if only with an
        // empty response: Envoy's initialisation waits for one.
        if first || !resources.is_empty() || !removed.is_empty() {
            Ok(Some(self.respond(&req.type_url, &snap, resources, removed)))
        } else {
            Ok(None)
        }
    }

    fn on_change(&mut self) -> Vec<DeltaDiscoveryResponse> {
        let mut urls: Vec<String> = self.types.keys().cloned().collect();
        urls.sort_by_key(|u| push_rank(u));
        let mut out = Vec::new();
        for url in urls {
            let snap = self.cache.snapshot(&url);
            let Some(t) = self.types.get_mut(&url) else {
                continue;
            };
            if snap.counter <= t.seen_counter {
                continue;
            }
            t.seen_counter = snap.counter;
            let (resources, removed) = t.diff(&snap, &Force::default());
            if !resources.is_empty() || !removed.is_empty() {
                out.push(self.respond(&url, &snap, resources, removed));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{CLUSTER, ENDPOINT};
    use envoy_types::pb::google::protobuf::Any;

    fn any(v: u8) -> Any {
        Any {
            type_url: CLUSTER.into(),
            value: vec![v],
        }
    }

    fn req(url: &str, sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: url.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn names(r: &[Resource]) -> Vec<&str> {
        r.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn wildcard_with_initial_versions() {
        let cache = Cache::new();
        cache.set(CLUSTER, [("a".into(), any(1)), ("b".into(), any(2))]);
        let snap = cache.snapshot(CLUSTER);
        let mut first = req(CLUSTER, &[], &[]);
        first
            .initial_resource_versions
            .insert("a".into(), snap.resources["a"].version.to_string());
        first
            .initial_resource_versions
            .insert("gone".into(), "x".into());
        let mut t = DeltaType::default();
        let force = t.subscribe(&first, true);
        assert!(t.wildcard);
        let (res, removed) = t.diff(&snap, &force);
        assert_eq!(names(&res), ["b"]);
        assert_eq!(removed, ["gone"]);

        cache.apply(CLUSTER, [("a".into(), any(3))], ["b".into()]);
        let (res, removed) = t.diff(&cache.snapshot(CLUSTER), &Force::default());
        assert_eq!(names(&res), ["a"]);
        assert_eq!(removed, ["b"]);
        let (res, removed) = t.diff(&cache.snapshot(CLUSTER), &Force::default());
        assert!(res.is_empty() && removed.is_empty());

        // Unsubscribing a name under a wildcard answers with the resource.
        let force = t.subscribe(&req(CLUSTER, &["a"], &[]), false);
        let (res, _) = t.diff(&cache.snapshot(CLUSTER), &force);
        assert_eq!(names(&res), ["a"], "re-subscription resends");
        let force = t.subscribe(&req(CLUSTER, &[], &["a", "nope"]), false);
        let (res, removed) = t.diff(&cache.snapshot(CLUSTER), &force);
        assert_eq!(names(&res), ["a"]);
        assert_eq!(removed, ["nope"]);
    }

    #[test]
    fn named_subscriptions() {
        let cache = Cache::new();
        cache.set(ENDPOINT, [("a".into(), any(1)), ("b".into(), any(2))]);
        let mut t = DeltaType::default();
        let force = t.subscribe(&req(ENDPOINT, &[], &[]), true);
        assert!(!t.wildcard, "no legacy wildcard for EDS");
        assert!(t.diff(&cache.snapshot(ENDPOINT), &force).0.is_empty());

        let force = t.subscribe(&req(ENDPOINT, &["a", "missing"], &[]), false);
        let (res, removed) = t.diff(&cache.snapshot(ENDPOINT), &force);
        assert_eq!(names(&res), ["a"]);
        assert_eq!(removed, ["missing"]);
        // Absence is reported once.
        cache.apply(ENDPOINT, [("b".into(), any(4))], []);
        let (res, removed) = t.diff(&cache.snapshot(ENDPOINT), &Force::default());
        assert!(res.is_empty() && removed.is_empty());
        // ... and the resource is sent when it appears.
        cache.apply(ENDPOINT, [("missing".into(), any(5))], []);
        let (res, _) = t.diff(&cache.snapshot(ENDPOINT), &Force::default());
        assert_eq!(names(&res), ["missing"]);

        let force = t.subscribe(&req(ENDPOINT, &[], &["a"]), false);
        cache.apply(ENDPOINT, [("a".into(), any(6))], []);
        let (res, removed) = t.diff(&cache.snapshot(ENDPOINT), &force);
        assert!(res.is_empty() && removed.is_empty(), "unsubscribed");
        let force = t.subscribe(&req(ENDPOINT, &["a"], &[]), false);
        let (res, _) = t.diff(&cache.snapshot(ENDPOINT), &force);
        assert_eq!(names(&res), ["a"]);
    }
}
