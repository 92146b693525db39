//! State-of-the-world ADS (`StreamAggregatedResources`): per type URL the
//! subscription of one stream (legacy and explicit wildcard, named
//! resources), the responses it was sent, and Envoy's rules for requests:
//! the first request of a type and every newly requested name get a response;
//! a request naming the latest nonce is its ACK or NACK; a NACK is recorded,
//! never answered with the same version; a request with an older nonce is
//! stale and changes nothing but the ACK/NACK bookkeeping.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;

use super::cache::{Cache, TypeSnapshot};
use super::server::{CONTROL_PLANE_ID, MAX_PENDING, StreamState};
use super::status::{Nack, StreamHandle};
use super::{is_wildcard_type, push_rank};

/// One SotW stream.
pub(crate) struct SotwStream {
    cache: Cache,
    handle: StreamHandle,
    node: Option<String>,
    nonces: u64,
    types: BTreeMap<String, SotwType>,
}

#[derive(Default)]
struct SotwType {
    /// Only empty `resource_names` so far on a Listener/Cluster stream.
    legacy_wildcard: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Nonce of the latest response; requests naming another one are stale.
    last_nonce: Option<String>,
    /// Responses not answered yet: (nonce, version), oldest first.
    pending: VecDeque<(String, String)>,
    /// Cache counter of the latest response.
    sent_counter: u64,
}

impl SotwType {
    /// Applies a request's `resource_names`; true when something is newly
    /// requested (which Envoy's protocol says must be answered).
    fn subscribe(&mut self, names: &[String], first: bool, wildcard_type: bool) -> bool {
        if first && names.is_empty() && wildcard_type {
            self.legacy_wildcard = true;
            self.wildcard = true;
            return true;
        }
        if self.legacy_wildcard && names.is_empty() {
            return false;
        }
        // Once a name was given, an empty list means "nothing", not "all".
        self.legacy_wildcard = false;
        let star = names.iter().any(|n| n == "*");
        let named: BTreeSet<String> = names.iter().filter(|n| *n != "*").cloned().collect();
        let newly = (star && !self.wildcard) || named.iter().any(|n| !self.names.contains(n));
        self.wildcard = star;
        self.names = named;
        newly
    }
}

impl SotwStream {
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
                "SotW ADS stream opened"
            );
        }
    }

    fn node_label(&self) -> &str {
        self.node.as_deref().unwrap_or("?")
    }

    /// Records the ACK or NACK in `req` if it answers an unanswered response.
    fn bookkeep(&mut self, req: &DiscoveryRequest) {
        let node = self.node.clone().unwrap_or_default();
        let Some(t) = self.types.get_mut(&req.type_url) else {
            return;
        };
        if req.response_nonce.is_empty() {
            return;
        }
        let Some(pos) = t.pending.iter().position(|(n, _)| *n == req.response_nonce) else {
            return;
        };
        // Older unanswered responses were superseded by the one answered now.
        t.pending.drain(..pos);
        let Some((nonce, version)) = t.pending.pop_front() else {
            return;
        };
        let (code, message) = match (&req.error_detail, req.version_info == version) {
            (None, true) => {
                tracing::debug!(
                    xds.node = %node,
                    xds.type_url = %req.type_url,
                    xds.version = %version,
                    xds.nonce = %nonce,
                    "ACK"
                );
                self.handle.acked(&req.type_url, &version, &nonce);
                return;
            }
            (Some(e), _) => (e.code, e.message.clone()),
            // Clients older than error_detail NACK by repeating their version.
            (None, false) => (
                0,
                format!(
                    "version_info {:?} does not match the response's {version:?}",
                    req.version_info
                ),
            ),
        };
        tracing::warn!(
            xds.node = %node,
            xds.type_url = %req.type_url,
            xds.version = %version,
            xds.nonce = %nonce,
            xds.error = %message,
            "NACK"
        );
        self.handle.nacked(
            &req.type_url,
            Nack {
                nonce,
                version,
                client_version: req.version_info.clone(),
                code,
                message,
            },
        );
    }

    fn respond(&mut self, type_url: &str, snap: &TypeSnapshot) -> Option<DiscoveryResponse> {
        self.nonces += 1;
        let nonce = format!("{}-{}", self.handle.id(), self.nonces);
        let node = self.node_label().to_string();
        let t = self.types.get_mut(type_url)?;
        let resources: Vec<_> = if t.wildcard {
            snap.resources.values().map(|r| (*r.any).clone()).collect()
        } else {
            t.names
                .iter()
                .filter_map(|n| snap.resources.get(n.as_str()))
                .map(|r| (*r.any).clone())
                .collect()
        };
        t.last_nonce = Some(nonce.clone());
        t.pending.push_back((nonce.clone(), snap.version.clone()));
        if t.pending.len() > MAX_PENDING {
            t.pending.pop_front();
        }
        t.sent_counter = snap.counter;
        self.handle
            .sent(type_url, &snap.version, &nonce, resources.len());
        tracing::debug!(
            xds.node = %node,
            xds.type_url = type_url,
            xds.version = %snap.version,
            xds.nonce = %nonce,
            xds.resources = resources.len(),
            "SotW response"
        );
        Some(DiscoveryResponse {
            version_info: snap.version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            control_plane: Some(ControlPlane {
                identifier: CONTROL_PLANE_ID.to_string(),
            }),
            ..Default::default()
        })
    }
}

impl StreamState for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn node_of(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn use_cache(&mut self, cache: Cache) {
        self.cache = cache;
    }

    fn on_request(&mut self, req: DiscoveryRequest) -> Result<Option<DiscoveryResponse>, Status> {
        self.note_node(req.node.as_ref());
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "DiscoveryRequest.type_url is required on an aggregated stream",
            ));
        }
        let first = !self.types.contains_key(&req.type_url);
        self.bookkeep(&req);
        let node = self.node_label().to_string();
        let t = self.types.entry(req.type_url.clone()).or_default();
        // A nonce does not survive its stream: on a type's first request it
        // names a response of an earlier stream and is ignored.
        if !first
            && let Some(last) = &t.last_nonce
            && *last != req.response_nonce
        {
            tracing::debug!(
                xds.node = %node,
                xds.type_url = %req.type_url,
                xds.nonce = %req.response_nonce,
                "stale request ignored"
            );
            return Ok(None);
        }
        let newly = t.subscribe(&req.resource_names, first, is_wildcard_type(&req.type_url));
        self.handle
            .subscribed(&req.type_url, t.wildcard, t.names.iter().cloned().collect());
        let snap = self.cache.snapshot(&req.type_url);
        // After a NACK nothing is resent until the cache moves on.
        if first || newly || snap.counter > t.sent_counter {
            Ok(self.respond(&req.type_url, &snap))
        } else {
            Ok(None)
        }
    }

    fn on_change(&mut self) -> Vec<DiscoveryResponse> {
        let mut urls: Vec<String> = self.types.keys().cloned().collect();
        urls.sort_by_key(|u| push_rank(u));
        let mut out = Vec::new();
        for url in urls {
            let snap = self.cache.snapshot(&url);
            let due = self
                .types
                .get(&url)
                .is_some_and(|t| snap.counter > t.sent_counter);
            if due && let Some(r) = self.respond(&url, &snap) {
                out.push(r);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_transitions_follow_envoy() {
        // The sequence of the protocol's "How the client specifies what
        // resources to return" section.
        let mut t = SotwType::default();
        assert!(t.subscribe(&[], true, true));
        assert!(t.wildcard);
        assert!(!t.subscribe(&[], false, true), "legacy wildcard persists");
        assert!(t.subscribe(&["*".into(), "A".into()], false, true));
        assert!(t.wildcard);
        assert!(!t.subscribe(&["A".into()], false, true));
        assert!(!t.wildcard, "explicit names end the wildcard");
        assert!(!t.subscribe(&[], false, true));
        assert!(!t.wildcard && t.names.is_empty(), "now an unsubscription");

        let mut eds = SotwType::default();
        assert!(!eds.subscribe(&[], true, false));
        assert!(!eds.wildcard, "only LDS/CDS have the legacy wildcard");
        assert!(eds.subscribe(&["a".into()], false, false));
        assert!(eds.subscribe(&["a".into(), "b".into()], false, false));
        assert!(!eds.subscribe(&["b".into()], false, false));
    }
}
