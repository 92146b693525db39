//! Envoy's filter state as Ferry keeps it: named objects a filter sets on a
//! request (`envoy.extensions.filters.http.set_filter_state.v3.Config`) or
//! on a connection when it is accepted
//! (`envoy.extensions.filters.network.set_filter_state.v3.Config`), and
//! that may travel with the upstream connection the request or connection
//! opens (`shared_with_upstream`), where an internal listener's
//! `original_dst` filter, RBAC's `Principal.filter_state` and the
//! `%FILTER_STATE%` format command read them. Only the object kinds Ferry
//! acts on exist: strings and addresses.

use std::net::SocketAddr;

use crate::format::ValueFormat;

/// `shared_with_upstream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shared {
    /// Stays with the request.
    #[default]
    None,
    /// Handed to the upstream connection, not beyond it.
    Once,
    /// Handed to the upstream connection and on from there.
    Transitive,
}

/// What an object is, as the factory named by `factory_key` (or the key
/// itself) makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// `envoy.string`: not hashable.
    String,
    /// `envoy.hashable_string`, `istio.hashable_string`.
    HashableString,
    /// `envoy.filters.listener.original_dst.local_ip` / `remote_ip`: an
    /// `ip:port`; a value that does not parse sets nothing, as in Envoy.
    Address,
}

/// The filter state keys the `original_dst` listener filter reads on an
/// internal listener.
pub const ORIGINAL_DST_LOCAL: &str = "envoy.filters.listener.original_dst.local_ip";
pub const ORIGINAL_DST_REMOTE: &str = "envoy.filters.listener.original_dst.remote_ip";

/// One `FilterStateValue` of `set_filter_state`.
#[derive(Debug, Clone)]
pub struct FilterStateValue {
    pub key: String,
    pub kind: ObjectKind,
    pub format: ValueFormat,
    pub read_only: bool,
    pub shared: Shared,
    pub skip_if_empty: bool,
}

/// `envoy.extensions.filters.http.set_filter_state.v3.Config`.
#[derive(Debug, Clone, Default)]
pub struct SetFilterState {
    pub on_request_headers: Vec<FilterStateValue>,
}

/// Sets `values` in `state` in order, each rendered by `render` from the
/// state as set so far (a later value reads an earlier one, as Envoy sets
/// each before rendering the next): empty values skipped when the value
/// says so, values that make no object (an address that does not parse)
/// and keys already set read-only left alone.
pub fn apply(
    values: &[FilterStateValue],
    state: &mut FilterState,
    mut render: impl FnMut(&ValueFormat, &FilterState) -> String,
) {
    for v in values {
        let rendered = render(&v.format, state);
        if rendered.is_empty() && v.skip_if_empty {
            continue;
        }
        if let Some(object) = make(v.kind, rendered) {
            state.set(&v.key, object, v.read_only, v.shared);
        }
    }
}

/// A filter state object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    String { value: String, hashable: bool },
    Address(SocketAddr),
}

impl Object {
    /// The object as a string matcher reads it (Envoy's `serializeAsString`).
    pub fn as_string(&self) -> String {
        match self {
            Object::String { value, .. } => value.clone(),
            Object::Address(a) => a.to_string(),
        }
    }

    /// What a hash policy hashes of the object: `None` for an object that
    /// is not hashable (a plain string), as in Envoy.
    pub fn hash_input(&self) -> Option<String> {
        match self {
            Object::String {
                value,
                hashable: true,
            } => Some(value.clone()),
            Object::String { .. } => None,
            Object::Address(a) => Some(a.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    object: Object,
    read_only: bool,
    shared: Shared,
}

/// The filter state of a request or connection: a few entries, looked up
/// by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterState {
    entries: Vec<Entry>,
}

impl FilterState {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets `key`, unless it is already set read-only (Envoy refuses to
    /// replace a read-only object). Returns whether it was set.
    pub fn set(&mut self, key: &str, object: Object, read_only: bool, shared: Shared) -> bool {
        let entry = Entry {
            key: key.to_string(),
            object,
            read_only,
            shared,
        };
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) if e.read_only => false,
            Some(e) => {
                *e = entry;
                true
            }
            None => {
                self.entries.push(entry);
                true
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Object> {
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| &e.object)
    }

    /// The address object under `key`.
    pub fn address(&self, key: &str) -> Option<SocketAddr> {
        match self.get(key)? {
            Object::Address(a) => Some(*a),
            Object::String { .. } => None,
        }
    }

    /// A text naming the objects and their values: connections that carry
    /// equal state may be shared, others not.
    pub fn identity(&self) -> String {
        let mut parts: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                format!(
                    "{}={}|{:?}|{}",
                    e.key,
                    e.object.as_string(),
                    e.shared,
                    e.read_only
                )
            })
            .collect();
        parts.sort();
        parts.join("\n")
    }

    /// What an upstream connection opened for this request carries: the
    /// shared objects, those shared `Once` no longer shared beyond it.
    pub fn for_upstream(&self) -> Option<FilterState> {
        let entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.shared != Shared::None)
            .map(|e| Entry {
                shared: match e.shared {
                    Shared::Transitive => Shared::Transitive,
                    _ => Shared::None,
                },
                ..e.clone()
            })
            .collect();
        (!entries.is_empty()).then_some(FilterState { entries })
    }
}

/// Makes the object `kind` from a rendered value; `None` when it does not
/// parse (nothing is set).
pub fn make(kind: ObjectKind, value: String) -> Option<Object> {
    match kind {
        ObjectKind::String => Some(Object::String {
            value,
            hashable: false,
        }),
        ObjectKind::HashableString => Some(Object::String {
            value,
            hashable: true,
        }),
        ObjectKind::Address => value.parse().ok().map(Object::Address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharing_and_read_only() {
        let s = |v: &str| Object::String {
            value: v.into(),
            hashable: false,
        };
        let mut fs = FilterState::default();
        assert!(fs.set("a", s("x"), true, Shared::Once));
        assert!(!fs.set("a", s("y"), false, Shared::None));
        assert!(fs.set("b", s("z"), false, Shared::None));
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        fs.set("c", Object::Address(addr), false, Shared::Transitive);
        let up = fs.for_upstream().unwrap();
        assert_eq!(up.get("a"), Some(&s("x")));
        assert_eq!(up.get("b"), None);
        assert_eq!(up.address("c"), Some(addr));
        // Once: not beyond the first hop; transitive: on.
        let next = up.for_upstream().unwrap();
        assert_eq!(next.get("a"), None);
        assert_eq!(next.address("c"), Some(addr));
        assert_eq!(make(ObjectKind::Address, "host:80".into()), None);
    }

    /// Values are set in order, each rendered from the state as set so far
    /// (Istio's waypoint re-sets the original_dst address it came with,
    /// to share it once more).
    #[test]
    fn apply_sets_in_order() {
        let value = |key: &str, kind, format: &str, shared| FilterStateValue {
            key: key.into(),
            kind,
            format: ValueFormat::parse(format).unwrap(),
            read_only: false,
            shared,
            skip_if_empty: false,
        };
        let mut state = FilterState::default();
        let addr: SocketAddr = "10.0.0.9:9080".parse().unwrap();
        // Came with the connection, no longer shared.
        state.set(
            ORIGINAL_DST_LOCAL,
            Object::Address(addr),
            false,
            Shared::None,
        );
        let values = [
            value(
                ORIGINAL_DST_LOCAL,
                ObjectKind::Address,
                "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%",
                Shared::Once,
            ),
            value(
                "copy",
                ObjectKind::String,
                "x-%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%",
                Shared::None,
            ),
            // Not an address: nothing set.
            value(
                ORIGINAL_DST_REMOTE,
                ObjectKind::Address,
                "nowhere",
                Shared::Once,
            ),
        ];
        apply(&values, &mut state, |f, so_far| {
            let pseudo = crate::route::Pseudo {
                method: "",
                path: "",
                authority: "",
                scheme: "",
            };
            let format = crate::format::FormatContext {
                downstream_remote: None,
                downstream_local: None,
                downstream_local_internal: None,
                upstream_remote: None,
                protocol: "",
                hostname: "",
                start_time: std::time::UNIX_EPOCH,
            };
            let ctx = crate::format::ValueContext {
                format: &format,
                pseudo: &pseudo,
                peer_uri_sans: &[],
                local_uri_sans: &[],
                filter_state: Some(so_far),
            };
            f.render(&ctx, &http::HeaderMap::new())
        });
        assert_eq!(state.get("copy").unwrap().as_string(), "x-10.0.0.9:9080");
        assert_eq!(state.get(ORIGINAL_DST_REMOTE), None);
        // Shared once more: the next internal connection gets it.
        let up = state.for_upstream().unwrap();
        assert_eq!(up.address(ORIGINAL_DST_LOCAL), Some(addr));
        assert_eq!(up.get("copy"), None);
    }
}
