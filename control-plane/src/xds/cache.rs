//! The resource cache behind the ADS server: per type URL, the resources by
//! name, each with its own version (a short hash of its encoded bytes), and a
//! type version (`v1`, `v2`, …) bumped by every change. A change wakes every
//! stream, which then compares versions and pushes what its subscriptions need.
//! Caches made [`Cache::with_interner`] share the encodings equal across
//! them (one copy for every proxy sent the same cluster).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

use super::intern::Interner;

/// One cached resource: its version and its encoding. Names and versions
/// are shared strings: the caches of the proxies sent the same resource, and
/// the streams that remember what each proxy holds, keep one copy of them.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedResource {
    /// Short hash of the encoded resource; equal bytes give equal versions,
    /// across restarts too, so a reconnecting delta client's
    /// `initial_resource_versions` stay meaningful.
    pub version: Arc<str>,
    pub any: Arc<Any>,
}

/// The resources of one type at one version. Cheap to clone: streams take one
/// per response and never hold the cache lock while encoding.
#[derive(Clone, Debug)]
pub struct TypeSnapshot {
    /// Monotonic change counter of the type (0: never set).
    pub counter: u64,
    /// The type version sent as `version_info` / `system_version_info`.
    pub version: String,
    pub resources: Arc<BTreeMap<Arc<str>, CachedResource>>,
}

impl TypeSnapshot {
    fn empty() -> Self {
        Self {
            counter: 0,
            version: "v0".to_string(),
            resources: Arc::default(),
        }
    }
}

/// The shared resource cache. Clones share the same resources.
#[derive(Clone, Debug)]
pub struct Cache {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    types: Mutex<HashMap<String, TypeSnapshot>>,
    /// Bumped after every change; streams wait on it.
    changes: watch::Sender<u64>,
    interner: Option<Interner>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A cache whose resources are shared, through `interner`, with every
    /// other cache of the same interner that holds equal ones.
    pub fn with_interner(interner: Interner) -> Self {
        Self::build(Some(interner))
    }

    fn build(interner: Option<Interner>) -> Self {
        Self {
            shared: Arc::new(Shared {
                types: Mutex::new(HashMap::new()),
                changes: watch::Sender::new(0),
                interner,
            }),
        }
    }

    /// Replaces every resource of `type_url` with `resources` (a later
    /// duplicate name wins) and returns the new type version.
    pub fn set(
        &self,
        type_url: &str,
        resources: impl IntoIterator<Item = (String, Any)>,
    ) -> String {
        self.set_cached(
            type_url,
            resources
                .into_iter()
                .map(|(name, any)| (name, self.cached(any))),
        )
    }

    /// As [`Cache::set`], with resources encoded already (see
    /// [`CachedResource::new`]): what several caches are sent alike is
    /// encoded once.
    pub fn set_cached<K: Into<Arc<str>>>(
        &self,
        type_url: &str,
        resources: impl IntoIterator<Item = (K, CachedResource)>,
    ) -> String {
        let map = collect(resources);
        self.update(type_url, |current| *current = map)
    }

    /// As [`Cache::set`], but when every resource is what the cache holds
    /// already (same names, same versions) nothing changes: no new type
    /// version and no wake-up, so no stream pushes it again. Returns the
    /// type version either way.
    pub fn replace(
        &self,
        type_url: &str,
        resources: impl IntoIterator<Item = (String, Any)>,
    ) -> String {
        self.replace_cached(
            type_url,
            resources
                .into_iter()
                .map(|(name, any)| (name, self.cached(any))),
        )
    }

    /// As [`Cache::replace`], with resources encoded already.
    pub fn replace_cached<K: Into<Arc<str>>>(
        &self,
        type_url: &str,
        resources: impl IntoIterator<Item = (K, CachedResource)>,
    ) -> String {
        let map = collect(resources);
        {
            let types = self
                .shared
                .types
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(current) = types.get(type_url)
                && current.counter > 0
                && current.resources.len() == map.len()
                && current
                    .resources
                    .iter()
                    .zip(map.iter())
                    .all(|((n1, r1), (n2, r2))| n1 == n2 && r1.version == r2.version)
            {
                return current.version.clone();
            }
        }
        self.update(type_url, |current| *current = map)
    }

    /// Adds or replaces `upserts` and deletes `removals` (unknown names are
    /// ignored), then returns the new type version.
    pub fn apply(
        &self,
        type_url: &str,
        upserts: impl IntoIterator<Item = (String, Any)>,
        removals: impl IntoIterator<Item = String>,
    ) -> String {
        let upserts: Vec<(Arc<str>, CachedResource)> = upserts
            .into_iter()
            .map(|(name, any)| (Arc::from(name), self.cached(any)))
            .collect();
        let removals: Vec<String> = removals.into_iter().collect();
        self.update(type_url, |current| {
            for name in &removals {
                current.remove(name.as_str());
            }
            current.extend(upserts);
        })
    }

    fn update(
        &self,
        type_url: &str,
        f: impl FnOnce(&mut BTreeMap<Arc<str>, CachedResource>),
    ) -> String {
        let version = {
            let mut types = self
                .shared
                .types
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = types
                .entry(type_url.to_string())
                .or_insert_with(TypeSnapshot::empty);
            // Copy on write: streams may still hold the previous map.
            f(Arc::make_mut(&mut entry.resources));
            entry.counter += 1;
            entry.version = format!("v{}", entry.counter);
            tracing::debug!(
                xds.type_url = type_url,
                xds.version = %entry.version,
                xds.resources = entry.resources.len(),
                "cache updated"
            );
            entry.version.clone()
        };
        self.shared.changes.send_modify(|g| *g += 1);
        version
    }

    /// The current resources of `type_url` (empty at `v0` if never set).
    pub fn snapshot(&self, type_url: &str) -> TypeSnapshot {
        let types = self
            .shared
            .types
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        types
            .get(type_url)
            .cloned()
            .unwrap_or_else(TypeSnapshot::empty)
    }

    /// The current version of `type_url` (`v0` if never set).
    pub fn version(&self, type_url: &str) -> String {
        let types = self
            .shared
            .types
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match types.get(type_url) {
            Some(t) => t.version.clone(),
            None => TypeSnapshot::empty().version,
        }
    }

    /// Every type URL that has been set, sorted.
    pub fn type_urls(&self) -> Vec<String> {
        let types = self
            .shared
            .types
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut urls: Vec<String> = types.keys().cloned().collect();
        urls.sort();
        urls
    }

    /// A receiver that sees a new value after every change.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}

impl Cache {
    fn cached(&self, any: Any) -> CachedResource {
        CachedResource::new(any, self.shared.interner.as_ref())
    }
}

impl CachedResource {
    /// `any` with its version, shared through `interner` with every equal
    /// resource it holds (as the caches of that interner keep them).
    pub fn new(any: Any, interner: Option<&Interner>) -> Self {
        let hash = content_hash(&any);
        Self {
            version: format!("{hash:016x}").into(),
            any: match interner {
                Some(i) => i.intern(hash, any),
                None => Arc::new(any),
            },
        }
    }
}

/// The resources by name (a later duplicate name wins).
fn collect<K: Into<Arc<str>>>(
    resources: impl IntoIterator<Item = (K, CachedResource)>,
) -> BTreeMap<Arc<str>, CachedResource> {
    resources
        .into_iter()
        .map(|(name, r)| (name.into(), r))
        .collect()
}

/// The version of one resource: 64-bit FNV-1a of its type URL and encoded
/// value, as 16 hex digits. Stable across builds and restarts, unlike
/// `std`'s hasher.
pub fn resource_version(any: &Any) -> String {
    format!("{:016x}", content_hash(any))
}

fn content_hash(any: &Any) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    for b in any
        .type_url
        .as_bytes()
        .iter()
        .chain(std::iter::once(&0u8))
        .chain(any.value.iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Packs a message into an `Any` with its canonical type URL.
pub fn to_any<M: prost::Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    fn cluster(name: &str, ms: i32) -> (String, Any) {
        let c = Cluster {
            name: name.to_string(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            }),
            ..Default::default()
        };
        (name.to_string(), to_any(&c))
    }

    #[test]
    fn versions_and_updates() {
        let cache = Cache::new();
        let url = crate::xds::CLUSTER;
        assert_eq!(cache.version(url), "v0");
        let mut changes = cache.changes();
        assert_eq!(cache.set(url, [cluster("a", 1), cluster("b", 1)]), "v1");
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let before = cache.snapshot(url);
        let a1 = before.resources["a"].version.clone();
        assert_eq!(a1.len(), 16);

        assert_eq!(cache.apply(url, [cluster("a", 2)], ["b".to_string()]), "v2");
        assert!(changes.has_changed().unwrap());
        let after = cache.snapshot(url);
        assert_eq!(after.counter, 2);
        assert_eq!(after.resources.len(), 1);
        assert_ne!(after.resources["a"].version, a1);
        // The older snapshot is untouched (copy on write).
        assert_eq!(before.resources.len(), 2);
        // Same bytes, same version.
        assert_eq!(cache.set(url, [cluster("a", 1)]), "v3");
        assert_eq!(cache.snapshot(url).resources["a"].version, a1);
        assert_eq!(cache.type_urls(), vec![url.to_string()]);
    }

    #[test]
    fn replace_leaves_an_unchanged_type_alone() {
        let cache = Cache::new();
        let url = crate::xds::CLUSTER;
        assert_eq!(cache.replace(url, []), "v1", "a first replace always sets");
        assert_eq!(cache.replace(url, [cluster("a", 1)]), "v2");
        let mut changes = cache.changes();
        changes.mark_unchanged();
        assert_eq!(cache.replace(url, [cluster("a", 1)]), "v2");
        assert!(!changes.has_changed().unwrap(), "no wake-up");
        assert_eq!(cache.replace(url, [cluster("a", 2)]), "v3");
        assert_eq!(cache.replace(url, [cluster("a", 2), cluster("b", 1)]), "v4");
        assert_eq!(cache.replace(url, [cluster("b", 1)]), "v5");
    }

    #[test]
    fn caches_of_one_interner_share_equal_resources() {
        let interner = Interner::new();
        let (one, two) = (
            Cache::with_interner(interner.clone()),
            Cache::with_interner(interner.clone()),
        );
        let url = crate::xds::CLUSTER;
        one.set(url, [cluster("a", 1), cluster("b", 1)]);
        two.set(url, [cluster("a", 1), cluster("b", 2)]);
        let (s1, s2) = (one.snapshot(url), two.snapshot(url));
        assert!(Arc::ptr_eq(&s1.resources["a"].any, &s2.resources["a"].any));
        assert!(!Arc::ptr_eq(&s1.resources["b"].any, &s2.resources["b"].any));
        assert_eq!(s2.resources["b"].any.value, cluster("b", 2).1.value);
        assert_eq!(interner.len(), 3);
    }
}
