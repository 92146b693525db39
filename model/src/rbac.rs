//! Role-based access control policies (`envoy.config.rbac.v3.RBAC`) as the
//! HTTP filter `envoy.filters.http.rbac` and the network filter
//! `envoy.filters.network.rbac` carry them, compiled once per snapshot.
//!
//! A policy tree is plain data here: regexes are compiled, CIDR ranges and
//! header matchers parsed, and policies kept sorted by name, because Envoy
//! keeps them in an ordered map and reports the first matching one. The
//! evaluation against a request or connection lives in
//! `ferry_filters::http::rbac`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cidr::CidrRange;
use crate::route::{HeaderMatcher, StringMatcher};

/// What a matching policy means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allowed only when a policy matches.
    Allow,
    /// Denied when a policy matches.
    Deny,
    /// Never denies; a match only marks the request for logging.
    Log,
}

/// One set of rules (`rules` or `shadow_rules`).
#[derive(Debug)]
pub struct Rbac {
    pub action: Action,
    /// Sorted by name, as Envoy iterates them.
    pub policies: Vec<Policy>,
}

/// A policy matches when any permission and any principal match.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// A string matcher with its `ignore_case` flag.
#[derive(Debug, Clone)]
pub struct StrMatch {
    pub matcher: StringMatcher,
    pub ignore_case: bool,
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        self.matcher.matches(value, self.ignore_case)
    }
}

/// What an action is performed on.
#[derive(Debug)]
pub enum Permission {
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Any,
    /// A request header (pseudo-headers included); the network filter sees
    /// an empty header map.
    Header(HeaderMatcher),
    /// The request path without its query.
    UrlPath(StrMatch),
    /// `uri_template`: the path without its query, matched whole.
    UriTemplate(regex::Regex),
    /// The downstream local (original destination) address.
    DestinationIp(CidrRange),
    DestinationPort(u16),
    /// `[start, end)`.
    DestinationPortRange {
        start: u32,
        end: u32,
    },
    Metadata(MetadataMatcher),
    Not(Box<Permission>),
    /// The SNI of the downstream TLS connection ("" without one).
    RequestedServerName(StrMatch),
}

/// Who performs the action.
#[derive(Debug)]
pub enum Principal {
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Any,
    /// The downstream connection is TLS and (with a matcher) one of the
    /// peer certificate's URI SANs, DNS SANs or its subject matches.
    Authenticated(Option<StrMatch>),
    /// `source_ip`: the connection's peer address.
    SourceIp(CidrRange),
    DirectRemoteIp(CidrRange),
    /// The downstream remote address, which `x-forwarded-for` can set.
    RemoteIp(CidrRange),
    Header(HeaderMatcher),
    UrlPath(StrMatch),
    Metadata(MetadataMatcher),
    Not(Box<Principal>),
    /// `filter_state` with a `string_match`: the object under the key,
    /// as a string; an absent key never matches.
    FilterState(String, StrMatch),
}

/// `envoy.type.matcher.v3.MetadataMatcher` against the dynamic metadata.
#[derive(Debug)]
pub struct MetadataMatcher {
    pub filter: String,
    pub path: Vec<String>,
    pub value: ValueMatcher,
    pub invert: bool,
}

/// `envoy.type.matcher.v3.ValueMatcher`.
#[derive(Debug)]
pub enum ValueMatcher {
    Null,
    /// `[start, end)` or exact.
    DoubleRange(f64, f64),
    DoubleExact(f64),
    String(StrMatch),
    Bool(bool),
    Present(bool),
    /// A list any of whose elements matches.
    ListOneOf(Box<ValueMatcher>),
    Or(Vec<ValueMatcher>),
}

/// A `google.protobuf.Value` of dynamic metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Null,
    Number(f64),
    String(String),
    Bool(bool),
    List(Vec<MetaValue>),
    Struct(BTreeMap<String, MetaValue>),
}

/// Dynamic metadata of a request or connection: one struct per filter name.
#[derive(Debug, Default, Clone)]
pub struct DynamicMetadata(pub BTreeMap<String, BTreeMap<String, MetaValue>>);

impl DynamicMetadata {
    /// The value at `path` under `filter`; `None` when any step is missing
    /// (Envoy's unset value).
    pub fn lookup(&self, filter: &str, path: &[String]) -> Option<&MetaValue> {
        let top = self.0.get(filter)?;
        let (first, rest) = path.split_first()?;
        let mut cur = top.get(first)?;
        for key in rest {
            match cur {
                MetaValue::Struct(s) => cur = s.get(key)?,
                _ => return None,
            }
        }
        Some(cur)
    }
}

impl ValueMatcher {
    /// Envoy's value matching; `None` is an unset value.
    pub fn matches(&self, v: Option<&MetaValue>) -> bool {
        match self {
            ValueMatcher::Null => matches!(v, Some(MetaValue::Null)),
            ValueMatcher::DoubleRange(start, end) => {
                matches!(v, Some(MetaValue::Number(n)) if start <= n && n < end)
            }
            ValueMatcher::DoubleExact(x) => matches!(v, Some(MetaValue::Number(n)) if n == x),
            ValueMatcher::String(m) => matches!(v, Some(MetaValue::String(s)) if m.matches(s)),
            ValueMatcher::Bool(b) => matches!(v, Some(MetaValue::Bool(x)) if x == b),
            ValueMatcher::Present(p) => v.is_some() == *p,
            ValueMatcher::ListOneOf(m) => match v {
                Some(MetaValue::List(items)) => items.iter().any(|i| m.matches(Some(i))),
                _ => false,
            },
            ValueMatcher::Or(ms) => ms.iter().any(|m| m.matches(v)),
        }
    }
}

impl MetadataMatcher {
    pub fn matches(&self, md: &DynamicMetadata) -> bool {
        self.value.matches(md.lookup(&self.filter, &self.path)) != self.invert
    }
}

/// The HTTP filter's configuration (`envoy.extensions.filters.http.rbac.v3.RBAC`),
/// also the shape of a per-route override (`RBACPerRoute.rbac`).
#[derive(Debug, Default)]
pub struct HttpRbac {
    /// `None`: nothing is enforced.
    pub rules: Option<Arc<Rbac>>,
    pub shadow_rules: Option<Arc<Rbac>>,
    /// Inserted after `rbac.` before the enforced counters' names.
    pub rules_stat_prefix: String,
    /// Inserted after `rbac.` before the shadow counters' names.
    pub shadow_rules_stat_prefix: String,
    /// `track_per_rule_stats`: a counter per matched policy.
    pub track_per_rule_stats: bool,
}

/// When the network filter evaluates its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    /// Once, on the connection's first bytes.
    #[default]
    OneTimeOnFirstByte,
    /// On every read.
    Continuous,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
#[derive(Debug)]
pub struct NetworkRbac {
    pub stat_prefix: String,
    pub rules: Option<Arc<Rbac>>,
    pub shadow_rules: Option<Arc<Rbac>>,
    pub shadow_rules_stat_prefix: String,
    pub enforcement: Enforcement,
    /// `delay_deny`: how long a denied connection is held before it closes.
    pub delay_deny: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_lookup_and_value_matchers() {
        let mut md = DynamicMetadata::default();
        let mut inner = BTreeMap::new();
        inner.insert("c".to_string(), MetaValue::String("exact".into()));
        inner.insert(
            "l".to_string(),
            MetaValue::List(vec![MetaValue::String("a".into()), MetaValue::Bool(true)]),
        );
        md.0.insert("f".into(), inner);
        let s = |v: &str| {
            ValueMatcher::String(StrMatch {
                matcher: StringMatcher::Exact(v.into()),
                ignore_case: false,
            })
        };
        let m = |path: &[&str], value, invert| MetadataMatcher {
            filter: "f".into(),
            path: path.iter().map(|p| p.to_string()).collect(),
            value,
            invert,
        };
        assert!(m(&["c"], s("exact"), false).matches(&md));
        assert!(!m(&["c"], s("other"), false).matches(&md));
        assert!(m(&["c"], s("other"), true).matches(&md));
        assert!(!m(&["missing"], s("exact"), false).matches(&md));
        assert!(m(&["missing"], ValueMatcher::Present(false), false).matches(&md));
        assert!(m(&["l"], ValueMatcher::ListOneOf(Box::new(s("a"))), false).matches(&md));
        assert!(!m(&["l"], ValueMatcher::ListOneOf(Box::new(s("b"))), false).matches(&md));
        assert!(
            m(
                &["l"],
                ValueMatcher::Or(vec![s("x"), ValueMatcher::Present(true)]),
                false
            )
            .matches(&md)
        );
        assert!(!m(&["c", "deeper"], ValueMatcher::Present(true), false).matches(&md));
    }
}
