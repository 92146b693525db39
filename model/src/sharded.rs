//! [`ShardedMap`]: a name-keyed map in shards that its clones share, so
//! that the next snapshot's map is the previous one's clone with a few
//! entries changed: cloning copies one pointer per shard, and changing an
//! entry copies only its shard (about 32 entries). With 10,000 clusters, an
//! update of one copies and frees 32 entries instead of 10,000.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

type Shard<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// Entries per shard the map keeps to (it doubles its shards beyond).
const PER_SHARD: usize = 32;

/// A map from names to `V` in shared shards (see the module's text).
/// Iteration order is unspecified, as a `HashMap`'s.
pub struct ShardedMap<V> {
    /// A power of two in number (none while empty).
    shards: Vec<Arc<Shard<V>>>,
    len: usize,
}

impl<V> Default for ShardedMap<V> {
    fn default() -> Self {
        Self {
            shards: Vec::new(),
            len: 0,
        }
    }
}

impl<V> Clone for ShardedMap<V> {
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
            len: self.len,
        }
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for ShardedMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Which of `shards` (a power of two) a name lives in: a hash that is the
/// same for every map, so that shards line up between clones.
fn shard_of(name: &str, shards: usize) -> usize {
    const SEED: u64 = 0x6665_7272_792d_736d;
    let h = foldhash::fast::FixedState::with_seed(SEED).hash_one(name);
    (h as usize) & (shards - 1)
}

impl<V: Clone> ShardedMap<V> {
    /// An empty map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        let count = (n / PER_SHARD).max(1).next_power_of_two();
        Self {
            shards: (0..count).map(|_| Arc::default()).collect(),
            len: 0,
        }
    }

    /// The shard of `name`, copied first if another map shares it.
    fn shard_mut(&mut self, name: &str) -> &mut Shard<V> {
        if self.shards.is_empty() {
            self.shards.push(Arc::default());
        }
        let i = shard_of(name, self.shards.len());
        Arc::make_mut(&mut self.shards[i])
    }

    pub fn insert(&mut self, name: String, value: V) -> Option<V> {
        if self.len >= self.shards.len() * PER_SHARD {
            self.grow();
        }
        let old = self.shard_mut(&name).insert(name, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, name: &str) -> Option<V> {
        if self.shards.is_empty() {
            return None;
        }
        let old = self.shard_mut(name).remove(name);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Twice the shards, every entry moved to its new one.
    fn grow(&mut self) {
        let count = (self.shards.len() * 2).max(1);
        let mut shards: Vec<Shard<V>> = (0..count).map(|_| Shard::default()).collect();
        for (k, v) in self.iter() {
            shards[shard_of(k, count)].insert(k.clone(), v.clone());
        }
        self.shards = shards.into_iter().map(Arc::new).collect();
    }

    /// Whether `self` and `other` share the shard `name` lives in (then it
    /// maps to the same value in both).
    pub fn shares_shard_of(&self, other: &Self, name: &str) -> bool {
        self.shards.len() == other.shards.len()
            && !self.shards.is_empty()
            && Arc::ptr_eq(
                &self.shards[shard_of(name, self.shards.len())],
                &other.shards[shard_of(name, other.shards.len())],
            )
    }
}

impl<V> ShardedMap<V> {
    pub fn get(&self, name: &str) -> Option<&V> {
        if self.shards.is_empty() {
            return None;
        }
        self.shards[shard_of(name, self.shards.len())].get(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Whether both maps hold the very same shards (then the same entries).
    pub fn same_shards(&self, other: &Self) -> bool {
        self.shards.len() == other.shards.len()
            && self
                .shards
                .iter()
                .zip(&other.shards)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl<V> std::ops::Index<&str> for ShardedMap<V> {
    type Output = V;

    /// Panics when the name is absent, as `HashMap`'s index does (tests).
    fn index(&self, name: &str) -> &V {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no entry {name:?}"),
        }
    }
}

impl<V: Clone> FromIterator<(String, V)> for ShardedMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut m = Self::with_capacity(iter.size_hint().0);
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

impl<V: Clone> Extend<(String, V)> for ShardedMap<V> {
    fn extend<I: IntoIterator<Item = (String, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<'a, V> IntoIterator for &'a ShardedMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a String, &'a V)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_copies_only_its_shard_and_clones_share_the_rest() {
        let mut a: ShardedMap<Arc<u32>> = (0..10_000)
            .map(|i| (format!("cluster-{i}"), Arc::new(i)))
            .collect();
        assert_eq!(a.len(), 10_000);
        assert!(a.shards.len() >= 10_000 / PER_SHARD / 2);
        let before = a.clone();
        assert!(a.same_shards(&before));
        a.insert("cluster-7".into(), Arc::new(70));
        let shared = a
            .shards
            .iter()
            .zip(&before.shards)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared, a.shards.len() - 1, "one shard copied");
        assert!(!a.shares_shard_of(&before, "cluster-7"));
        assert_eq!(*a["cluster-7"], 70);
        assert_eq!(*before["cluster-7"], 7);
        assert_eq!(a.len(), 10_000);
        assert_eq!(a.remove("cluster-8").as_deref(), Some(&8));
        assert_eq!(a.remove("cluster-8"), None);
        assert_eq!(a.len(), 9_999);
        assert!(!a.contains_key("cluster-8") && before.contains_key("cluster-8"));
        assert_eq!(a.iter().count(), 9_999);
    }

    #[test]
    fn a_map_grows_its_shards_and_keeps_every_entry() {
        let mut m = ShardedMap::default();
        assert!(m.get("x").is_none() && m.is_empty());
        for i in 0..1000u32 {
            assert_eq!(m.insert(i.to_string(), i), None);
        }
        assert_eq!(m.insert("5".into(), 50), Some(5));
        assert_eq!(m.len(), 1000);
        assert!(m.shards.len().is_power_of_two());
        assert!(m.shards.iter().all(|s| s.len() <= 2 * PER_SHARD));
        let mut keys: Vec<u32> = m.keys().map(|k| k.parse().unwrap_or(u32::MAX)).collect();
        keys.sort();
        assert_eq!(keys, (0..1000).collect::<Vec<_>>());
        assert_eq!(m.get("5"), Some(&50));
    }
}
