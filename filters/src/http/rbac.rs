//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac`: evaluation of
//! a compiled policy set ([`ferry_model::rbac::Rbac`]) against what is known
//! of a request or a connection.
//!
//! Pure and synchronous: the caller gathers a [`Subject`] (addresses, TLS
//! peer, headers, dynamic metadata), asks for a [`Verdict`], and turns it
//! into a 403, a closed connection and counters. The network filter passes
//! an empty header map and no path, so path matchers never match (header
//! rules are refused there when the configuration is converted).

use std::net::{IpAddr, SocketAddr};

use ferry_model::filter_state::FilterState;
use ferry_model::rbac::{Action, DynamicMetadata, Permission, Principal, Rbac};
use ferry_model::stream_info::INTERNAL_CLIENT_ADDRESS;
use ferry_model::{HeaderKey, HeaderMatcher, Pseudo};
use http::HeaderMap;

/// The downstream TLS connection's peer certificate, as the `authenticated`
/// principal reads it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TlsPeer<'a> {
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
    /// RFC 2253 subject; empty without a client certificate.
    pub subject: &'a str,
}

/// Everything a policy can look at.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub headers: &'a HeaderMap,
    /// The pseudo-headers; `None` for the network filter.
    pub pseudo: Option<&'a Pseudo<'a>>,
    /// The downstream local address (the original destination).
    pub local: SocketAddr,
    /// The peer of the downstream connection.
    pub direct_remote: SocketAddr,
    /// The downstream remote address (`x-forwarded-for` may have set it).
    pub remote: IpAddr,
    /// SNI ("" when none).
    pub server_name: &'a str,
    /// `Some` on a TLS connection, even without a client certificate.
    pub tls: Option<TlsPeer<'a>>,
    pub metadata: &'a DynamicMetadata,
    /// The request's or connection's filter state, when it has any.
    pub filter_state: Option<&'a FilterState>,
}

/// The outcome of one policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The first policy (by name) that matched.
    pub matched_policy: Option<String>,
    /// `LOG` action: whether a policy matched (the request is to be logged).
    pub log: Option<bool>,
}

/// Evaluates `rbac` on `s`: ALLOW lets through only what a policy matches,
/// DENY stops what a policy matches, LOG never stops anything.
pub fn evaluate(rbac: &Rbac, s: &Subject<'_>) -> Verdict {
    let matched = rbac
        .policies
        .iter()
        .find(|p| {
            p.permissions.iter().any(|perm| permission(perm, s))
                && p.principals.iter().any(|pr| principal(pr, s))
        })
        .map(|p| p.name.clone());
    let hit = matched.is_some();
    let (allowed, log) = match rbac.action {
        Action::Allow => (hit, None),
        Action::Deny => (!hit, None),
        Action::Log => (true, Some(hit)),
    };
    Verdict {
        allowed,
        matched_policy: matched,
        log,
    }
}

/// A header rule as Envoy 1.40's RBAC evaluates it (observed against it,
/// and unlike a join of repeated values): a value matcher matches when any
/// one value of the header matches (inverted: when none does), and never
/// matches an absent header, inverted or not; a presence matcher (inverted
/// or `present_match: false`) is about presence alone.
fn header(h: &HeaderMatcher, s: &Subject<'_>) -> bool {
    let pseudo = match &h.name {
        HeaderKey::Name(_) => None,
        HeaderKey::Method => s.pseudo.map(|p| p.method),
        HeaderKey::Path => s.pseudo.map(|p| p.path),
        HeaderKey::Authority => s.pseudo.map(|p| p.authority),
        HeaderKey::Scheme => s.pseudo.map(|p| p.scheme),
    };
    let mut present = pseudo.is_some();
    let mut any = false;
    let mut check = |v: &str| {
        if let Some(m) = &h.matcher {
            any |= m.matches(v, h.ignore_case);
        }
    };
    match (&h.name, pseudo) {
        (HeaderKey::Name(name), _) => {
            for v in s.headers.get_all(name) {
                present = true;
                match v.to_str() {
                    Ok(v) => check(v),
                    Err(_) => check(&String::from_utf8_lossy(v.as_bytes())),
                }
            }
        }
        (_, Some(v)) => check(v),
        (_, None) => {}
    }
    match &h.matcher {
        None => (present == h.present) != h.invert,
        Some(_) if !present => false,
        Some(_) => any != h.invert,
    }
}

/// The path without query and fragment, as Envoy's path matchers see it;
/// `None` outside HTTP.
fn url_path<'a>(s: &Subject<'a>) -> Option<&'a str> {
    let p = s.pseudo?.path;
    let end = p.find(['?', '#']).unwrap_or(p.len());
    Some(&p[..end])
}

fn permission(p: &Permission, s: &Subject<'_>) -> bool {
    match p {
        Permission::And(all) => all.iter().all(|p| permission(p, s)),
        Permission::Or(any) => any.iter().any(|p| permission(p, s)),
        Permission::Any => true,
        Permission::Header(h) => header(h, s),
        Permission::UrlPath(m) => url_path(s).is_some_and(|p| m.matches(p)),
        Permission::UriTemplate(re) => url_path(s).is_some_and(|p| re.is_match(p)),
        Permission::DestinationIp(c) => socket(s.local).is_some_and(|l| c.contains(l.ip())),
        Permission::DestinationPort(port) => socket(s.local).is_some_and(|l| l.port() == *port),
        Permission::DestinationPortRange { start, end } => socket(s.local).is_some_and(|l| {
            let port = u32::from(l.port());
            *start <= port && port < *end
        }),
        Permission::Metadata(m) => m.matches(s.metadata),
        Permission::Not(p) => !permission(p, s),
        Permission::RequestedServerName(m) => m.matches(s.server_name),
    }
}

/// `a` as the address matchers see it: none for an end of an internal
/// connection (Envoy's `envoy://…` addresses have no IP and no port, and
/// match no IP or port matcher), which Ferry holds as the placeholder
/// [`INTERNAL_CLIENT_ADDRESS`].
fn socket(a: SocketAddr) -> Option<SocketAddr> {
    (a != INTERNAL_CLIENT_ADDRESS).then_some(a)
}

fn principal(p: &Principal, s: &Subject<'_>) -> bool {
    match p {
        Principal::And(all) => all.iter().all(|p| principal(p, s)),
        Principal::Or(any) => any.iter().any(|p| principal(p, s)),
        Principal::Any => true,
        Principal::Authenticated(m) => match (s.tls, m) {
            (None, _) => false,
            (Some(_), None) => true,
            // URI SANs, then DNS SANs, then the subject: any may match.
            (Some(t), Some(m)) => {
                t.uri_sans.iter().any(|u| m.matches(u))
                    || t.dns_sans.iter().any(|d| m.matches(d))
                    || m.matches(t.subject)
            }
        },
        Principal::SourceIp(c) | Principal::DirectRemoteIp(c) => {
            socket(s.direct_remote).is_some_and(|r| c.contains(r.ip()))
        }
        // The peer's own address, unless a trusted `x-forwarded-for` gave
        // another.
        Principal::RemoteIp(c) => {
            let internal =
                socket(s.direct_remote).is_none() && s.remote == INTERNAL_CLIENT_ADDRESS.ip();
            !internal && c.contains(s.remote)
        }
        Principal::Header(h) => header(h, s),
        Principal::UrlPath(m) => url_path(s).is_some_and(|p| m.matches(p)),
        Principal::Metadata(m) => m.matches(s.metadata),
        Principal::Not(p) => !principal(p, s),
        Principal::FilterState(key, m) => s
            .filter_state
            .and_then(|f| f.get(key))
            .is_some_and(|o| m.matches(&o.as_string())),
    }
}

/// Envoy's dynamic metadata for a peer with a SPIFFE identity, in the
/// shape Istio's authentication filter gives it (`istio_authn`:
/// `source.principal` and `source.user` without the `spiffe://` scheme,
/// `source.namespace`).
pub fn istio_authn_metadata(spiffe: Option<&str>) -> DynamicMetadata {
    use ferry_model::rbac::MetaValue;
    let mut md = DynamicMetadata::default();
    let Some(id) = spiffe.and_then(|s| s.strip_prefix("spiffe://")) else {
        return md;
    };
    let mut authn = std::collections::BTreeMap::new();
    authn.insert("source.principal".into(), MetaValue::String(id.into()));
    authn.insert("source.user".into(), MetaValue::String(id.into()));
    let mut parts = id.split('/');
    while let Some(p) = parts.next() {
        if p == "ns"
            && let Some(ns) = parts.next()
        {
            authn.insert("source.namespace".into(), MetaValue::String(ns.into()));
            break;
        }
    }
    md.0.insert("istio_authn".into(), authn);
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::rbac::{MetaValue, MetadataMatcher, Policy, StrMatch, ValueMatcher};
    use ferry_model::{CidrRange, StringMatcher};

    fn exact(v: &str) -> StrMatch {
        StrMatch {
            matcher: StringMatcher::Exact(v.into()),
            ignore_case: false,
        }
    }

    fn prefix(v: &str) -> StrMatch {
        StrMatch {
            matcher: StringMatcher::Prefix(v.into()),
            ignore_case: false,
        }
    }

    fn header(name: &str, m: Option<StringMatcher>, invert: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: HeaderKey::parse(name).unwrap(),
            matcher: m,
            ignore_case: false,
            invert,
            present: true,
            treat_missing_as_empty: false,
        }
    }

    fn rbac(action: Action, policies: Vec<(&str, Vec<Permission>, Vec<Principal>)>) -> Rbac {
        Rbac {
            action,
            policies: policies
                .into_iter()
                .map(|(n, permissions, principals)| Policy {
                    name: n.into(),
                    permissions,
                    principals,
                })
                .collect(),
        }
    }

    struct Req {
        headers: HeaderMap,
        method: &'static str,
        path: &'static str,
        local: SocketAddr,
        peer: SocketAddr,
        uris: Vec<String>,
        tls: bool,
        md: DynamicMetadata,
    }

    impl Req {
        fn new(method: &'static str, path: &'static str) -> Self {
            Req {
                headers: HeaderMap::new(),
                method,
                path,
                local: "10.0.0.1:8080".parse().unwrap(),
                peer: "192.168.1.7:5555".parse().unwrap(),
                uris: vec![],
                tls: false,
                md: DynamicMetadata::default(),
            }
        }

        fn run(&self, r: &Rbac) -> Verdict {
            let pseudo = Pseudo {
                method: self.method,
                path: self.path,
                authority: "example.com",
                scheme: "http",
            };
            let s = Subject {
                headers: &self.headers,
                pseudo: Some(&pseudo),
                local: self.local,
                direct_remote: self.peer,
                remote: self.peer.ip(),
                server_name: "",
                tls: self.tls.then_some(TlsPeer {
                    uri_sans: &self.uris,
                    dns_sans: &[],
                    subject: "",
                }),
                metadata: &self.md,
                filter_state: None,
            };
            evaluate(r, &s)
        }

        fn network(&self, r: &Rbac) -> Verdict {
            let empty = HeaderMap::new();
            let s = Subject {
                headers: &empty,
                pseudo: None,
                local: self.local,
                direct_remote: self.peer,
                remote: self.peer.ip(),
                server_name: "",
                tls: None,
                metadata: &self.md,
                filter_state: None,
            };
            evaluate(r, &s)
        }
    }

    #[test]
    fn allow_needs_a_matching_policy() {
        let r = rbac(
            Action::Allow,
            vec![(
                "get-api",
                vec![Permission::And(vec![
                    Permission::UrlPath(prefix("/api/")),
                    Permission::Header(header(
                        ":method",
                        Some(StringMatcher::Exact("GET".into())),
                        false,
                    )),
                ])],
                vec![Principal::Any],
            )],
        );
        let v = Req::new("GET", "/api/x?q=1").run(&r);
        assert!(v.allowed);
        assert_eq!(v.matched_policy.as_deref(), Some("get-api"));
        assert!(!Req::new("POST", "/api/x").run(&r).allowed);
        assert!(!Req::new("GET", "/other").run(&r).allowed);
        // The query is not part of url_path.
        let exact_path = rbac(
            Action::Allow,
            vec![(
                "p",
                vec![Permission::UrlPath(exact("/a"))],
                vec![Principal::Any],
            )],
        );
        assert!(Req::new("GET", "/a?x=/b").run(&exact_path).allowed);
        // No policy at all: ALLOW denies everything, DENY allows everything.
        assert!(
            !Req::new("GET", "/")
                .run(&rbac(Action::Allow, vec![]))
                .allowed
        );
        assert!(
            Req::new("GET", "/")
                .run(&rbac(Action::Deny, vec![]))
                .allowed
        );
    }

    #[test]
    fn deny_log_and_nesting() {
        let deny = rbac(
            Action::Deny,
            vec![(
                "no-evil",
                vec![Permission::Header(header(
                    "x-evil",
                    Some(StringMatcher::Exact("1".into())),
                    false,
                ))],
                vec![Principal::Any],
            )],
        );
        let mut req = Req::new("GET", "/");
        assert!(req.run(&deny).allowed);
        req.headers.insert("x-evil", "1".parse().unwrap());
        let v = req.run(&deny);
        assert!(!v.allowed);
        assert_eq!(v.matched_policy.as_deref(), Some("no-evil"));
        let log = rbac(
            Action::Log,
            vec![(
                "l",
                vec![Permission::Not(Box::new(Permission::DestinationPort(80)))],
                vec![Principal::Or(vec![
                    Principal::DirectRemoteIp("10.0.0.0/8".parse().unwrap()),
                    Principal::Not(Box::new(Principal::SourceIp(
                        "192.168.0.0/16".parse().unwrap(),
                    ))),
                ])],
            )],
        );
        let v = req.run(&log);
        assert!(v.allowed);
        assert_eq!(v.log, Some(false));
        req.peer = "10.1.1.1:1".parse().unwrap();
        assert_eq!(req.run(&log).log, Some(true));
    }

    #[test]
    fn ports_ips_and_first_policy_by_name() {
        let r = rbac(
            Action::Allow,
            vec![
                (
                    "a-range",
                    vec![Permission::DestinationPortRange {
                        start: 8000,
                        end: 8080,
                    }],
                    vec![Principal::Any],
                ),
                (
                    "b-port",
                    vec![Permission::DestinationPort(8080)],
                    vec![Principal::Any],
                ),
                (
                    "c-ip",
                    vec![Permission::DestinationIp(
                        CidrRange::new("10.0.0.0".parse().unwrap(), 24).unwrap(),
                    )],
                    vec![Principal::Any],
                ),
            ],
        );
        let mut req = Req::new("GET", "/");
        assert_eq!(req.run(&r).matched_policy.as_deref(), Some("b-port"));
        req.local = "10.0.0.9:8079".parse().unwrap();
        assert_eq!(req.run(&r).matched_policy.as_deref(), Some("a-range"));
        req.local = "10.0.0.9:9000".parse().unwrap();
        assert_eq!(req.run(&r).matched_policy.as_deref(), Some("c-ip"));
        req.local = "10.0.1.9:9000".parse().unwrap();
        assert!(!req.run(&r).allowed);
    }

    /// The ends of an internal connection (Envoy's `envoy://…` addresses)
    /// have no IP and no port: no address matcher matches them, not even
    /// one for every address; a negated one does.
    #[test]
    fn internal_connection_ends_match_no_address() {
        let all = || CidrRange::new("0.0.0.0".parse().unwrap(), 0).unwrap();
        let r = rbac(
            Action::Allow,
            vec![
                (
                    "dst-ip",
                    vec![Permission::DestinationIp(all())],
                    vec![Principal::Any],
                ),
                (
                    "dst-port",
                    vec![Permission::DestinationPort(0)],
                    vec![Principal::Any],
                ),
                (
                    "dst-range",
                    vec![Permission::DestinationPortRange { start: 0, end: 10 }],
                    vec![Principal::Any],
                ),
                (
                    "src-ip",
                    vec![Permission::Any],
                    vec![Principal::DirectRemoteIp(all())],
                ),
                (
                    "remote-ip",
                    vec![Permission::Any],
                    vec![Principal::RemoteIp(all())],
                ),
            ],
        );
        let mut req = Req::new("GET", "/");
        req.local = INTERNAL_CLIENT_ADDRESS;
        req.peer = INTERNAL_CLIENT_ADDRESS;
        assert!(!req.run(&r).allowed);
        assert!(!req.network(&r).allowed);
        let not = rbac(
            Action::Allow,
            vec![(
                "not-dst-ip",
                vec![Permission::Not(Box::new(Permission::DestinationIp(all())))],
                vec![Principal::Any],
            )],
        );
        assert!(req.run(&not).allowed);
        // A real peer's address still matches.
        req.peer = "192.168.1.7:5555".parse().unwrap();
        let v = req.run(&r);
        assert!(v.allowed);
        assert!(
            matches!(v.matched_policy.as_deref(), Some("src-ip" | "remote-ip")),
            "{v:?}"
        );
    }

    #[test]
    fn network_sees_no_headers_and_no_path() {
        let r = rbac(
            Action::Allow,
            vec![
                (
                    "path",
                    vec![Permission::UrlPath(prefix("/"))],
                    vec![Principal::Any],
                ),
                (
                    "hdr",
                    vec![Permission::Header(header(
                        ":method",
                        Some(StringMatcher::Prefix("".into())),
                        false,
                    ))],
                    vec![Principal::Any],
                ),
            ],
        );
        let req = Req::new("GET", "/");
        assert!(req.run(&r).allowed);
        assert!(!req.network(&r).allowed);
    }

    #[test]
    fn header_rules_match_one_value_and_never_an_absent_header() {
        let rule = |m: Option<StringMatcher>, invert: bool, present: bool| {
            let mut h = header("x-m", m, invert);
            h.present = present;
            rbac(
                Action::Allow,
                vec![("h", vec![Permission::Header(h)], vec![Principal::Any])],
            )
        };
        let exact = |v: &str| Some(StringMatcher::Exact(v.into()));
        let mut req = Req::new("GET", "/");
        // Absent: a value matcher never matches, inverted or not.
        assert!(!req.run(&rule(exact("a"), false, true)).allowed);
        assert!(!req.run(&rule(exact("a"), true, true)).allowed);
        // Absent: inverted presence and `present_match: false` match.
        assert!(req.run(&rule(None, true, true)).allowed);
        assert!(req.run(&rule(None, false, false)).allowed);
        assert!(!req.run(&rule(None, false, true)).allowed);
        // Repeated values are matched one by one, not joined.
        req.headers.append("x-m", "a".parse().unwrap());
        req.headers.append("x-m", "b".parse().unwrap());
        assert!(req.run(&rule(exact("b"), false, true)).allowed);
        assert!(!req.run(&rule(exact("a,b"), false, true)).allowed);
        assert!(!req.run(&rule(exact("a"), true, true)).allowed);
        assert!(req.run(&rule(exact("c"), true, true)).allowed);
        assert!(req.run(&rule(None, false, true)).allowed);
    }

    #[test]
    fn authenticated_principals_and_istio_metadata() {
        let spiffe = "spiffe://cluster.local/ns/foo/sa/bar";
        let r = rbac(
            Action::Allow,
            vec![(
                "mtls",
                vec![Permission::Any],
                vec![Principal::Authenticated(Some(exact(spiffe)))],
            )],
        );
        let any_tls = rbac(
            Action::Allow,
            vec![(
                "tls",
                vec![Permission::Any],
                vec![Principal::Authenticated(None)],
            )],
        );
        let mut req = Req::new("GET", "/");
        assert!(!req.run(&r).allowed);
        assert!(!req.run(&any_tls).allowed);
        req.tls = true;
        assert!(req.run(&any_tls).allowed);
        assert!(!req.run(&r).allowed);
        req.uris = vec![spiffe.into()];
        assert!(req.run(&r).allowed);

        req.md = istio_authn_metadata(Some(spiffe));
        let md = rbac(
            Action::Allow,
            vec![(
                "ns",
                vec![Permission::Any],
                vec![Principal::Metadata(MetadataMatcher {
                    filter: "istio_authn".into(),
                    path: vec!["source.namespace".into()],
                    value: ValueMatcher::String(exact("foo")),
                    invert: false,
                })],
            )],
        );
        assert!(req.run(&md).allowed);
        assert_eq!(
            req.md.lookup("istio_authn", &["source.principal".into()]),
            Some(&MetaValue::String("cluster.local/ns/foo/sa/bar".into()))
        );
        req.md = DynamicMetadata::default();
        assert!(!req.run(&md).allowed);
    }
}
