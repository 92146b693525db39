//! Sharing of encoded resources between caches: the proxies of one
//! namespace are mostly sent the same clusters and endpoints, and each
//! proxy's cache would otherwise keep its own copy of the same bytes. An
//! [`Interner`] hands every cache that encodes an equal resource the same
//! `Arc<Any>`; it holds them weakly, so a resource no cache serves any
//! more is freed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use envoy_types::pb::google::protobuf::Any;

/// Entries are swept of dead ones when they reach this many, or twice as
/// many as the last sweep left, whichever is more.
const MIN_SWEEP: usize = 4096;

/// Content-addressed table of encoded resources. Clones share the table.
#[derive(Clone, Debug, Default)]
pub struct Interner {
    table: Arc<Mutex<Table>>,
}

#[derive(Debug, Default)]
struct Table {
    /// Content hash → the resources with that hash (more than one only on
    /// a collision: equality is always checked on the bytes).
    by_hash: HashMap<u64, Vec<Weak<Any>>>,
    entries: usize,
    sweep_at: usize,
}

impl Interner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared copy of `any` (whose content hash is `hash`): an equal
    /// one already held by some cache, else `any` itself, now shared.
    pub fn intern(&self, hash: u64, any: Any) -> Arc<Any> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = t.by_hash.entry(hash).or_default();
        if let Some(found) = slot
            .iter()
            .filter_map(Weak::upgrade)
            .find(|held| **held == any)
        {
            return found;
        }
        slot.retain(|w| w.strong_count() > 0);
        let shared = Arc::new(any);
        slot.push(Arc::downgrade(&shared));
        t.entries += 1;
        if t.entries >= t.sweep_at.max(MIN_SWEEP) {
            t.sweep();
        }
        shared
    }

    /// Live resources in the table (for tests and diagnostics).
    pub fn len(&self) -> usize {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.by_hash
            .values()
            .flatten()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    fn sweep(&mut self) {
        self.by_hash.retain(|_, slot| {
            slot.retain(|w| w.strong_count() > 0);
            !slot.is_empty()
        });
        self.entries = self.by_hash.values().map(Vec::len).sum();
        self.sweep_at = self.entries * 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: "t".into(),
            value: v.to_vec(),
        }
    }

    #[test]
    fn equal_resources_share_one_copy_and_are_freed_with_their_last_holder() {
        let i = Interner::new();
        let a = i.intern(1, any(b"a"));
        let b = i.intern(1, any(b"a"));
        assert!(Arc::ptr_eq(&a, &b));
        // A hash collision still tells different bytes apart.
        let c = i.intern(1, any(b"c"));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, any(b"c"));
        assert_eq!(i.len(), 2);
        drop((a, b));
        assert_eq!(i.len(), 1);
        let again = i.intern(1, any(b"a"));
        assert_eq!(*again, any(b"a"));
        assert_eq!(i.len(), 2);
    }
}
