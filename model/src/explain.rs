//! Why a request gets the configuration it gets, in words: the first
//! condition of a route's match that a request fails, what a filter chain
//! asks of a connection at each selection step, and the names of a retry
//! policy's conditions. `/explain` builds its answer from these.
//!
//! Nothing here runs on the data path. The verdicts are the matchers' own
//! (`RouteMatch::matches_pseudo`, `Listener::select_chain`): the texts only
//! say which condition decided, and the tests hold the two to agree.

use std::net::IpAddr;

use http::HeaderMap;

use crate::cidr::CidrRange;
use crate::listener::{ChainStep, ConnectionInfo, FilterChainMatch};
use crate::route::{
    HeaderKey, HeaderMatcher, PathMatch, Pseudo, QueryMatch, RetryOn, RouteMatch, StringMatcher,
    VirtualHost, is_grpc,
};

impl RouteMatch {
    /// The first condition of the match the request fails, in the order
    /// they are checked (path, headers, query parameters, gRPC); `None`
    /// when every one holds. `runtime_fraction` is left to the caller: it
    /// depends on a per-request draw, not on the request.
    pub fn mismatch(&self, pseudo: &Pseudo<'_>, headers: &HeaderMap) -> Option<String> {
        let (path, query) = match pseudo.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (pseudo.path, None),
        };
        if !self.path_matches(path) {
            return Some(format!(
                "path \"{path}\" does not match {}",
                describe_path(&self.path, self.case_sensitive)
            ));
        }
        if let Some(h) = self
            .headers
            .iter()
            .find(|h| !h.matches_request(headers, Some(pseudo)))
        {
            return Some(format!(
                "{} is {}, wanted {}",
                header_label(&h.name),
                header_value(&h.name, headers, pseudo),
                describe_header(h)
            ));
        }
        if let Some(q) = self.query_parameters.iter().find(|q| !q.matches(query)) {
            let got = query
                .and_then(|q2| crate::route::first_query_value(q2, &q.name))
                .map_or_else(|| "absent".to_string(), |v| format!("\"{v}\""));
            let wanted = match &q.kind {
                QueryMatch::Present | QueryMatch::PresentMatch(true) => "present".to_string(),
                QueryMatch::PresentMatch(false) => "absent".to_string(),
                QueryMatch::String {
                    matcher,
                    ignore_case,
                } => describe_string(matcher, *ignore_case),
            };
            return Some(format!(
                "query parameter \"{}\" is {got}, wanted {wanted}",
                q.name
            ));
        }
        if self.grpc && !is_grpc(headers) {
            return Some("not a gRPC request (the route matches only gRPC)".into());
        }
        None
    }

    /// The match in words (`prefix "/api"`, then its other conditions).
    pub fn describe(&self) -> String {
        let mut parts = vec![describe_path(&self.path, self.case_sensitive)];
        for h in &self.headers {
            parts.push(format!("{} {}", header_label(&h.name), describe_header(h)));
        }
        for q in &self.query_parameters {
            parts.push(format!("query parameter \"{}\"", q.name));
        }
        if self.grpc {
            parts.push("gRPC".into());
        }
        if let Some(f) = self.runtime_fraction {
            parts.push(format!(
                "runtime_fraction {}/{}",
                f.numerator, f.denominator
            ));
        }
        parts.join(", ")
    }
}

impl VirtualHost {
    /// The domain of this virtual host that `host` matched (as configured,
    /// `*` patterns included), when one does.
    pub fn matched_domain(&self, host: &str) -> Option<String> {
        let host = host.to_ascii_lowercase();
        self.domains
            .iter()
            .filter_map(|d| d.rank(&host).map(|r| (r, d)))
            .max_by_key(|(r, _)| *r)
            .map(|(_, d)| match d {
                crate::route::DomainMatcher::Exact(e) => e.clone(),
                crate::route::DomainMatcher::Suffix(s) => format!("*{s}"),
                crate::route::DomainMatcher::Prefix(p) => format!("{p}*"),
                crate::route::DomainMatcher::Any => "*".into(),
            })
    }
}

fn describe_path(p: &PathMatch, case_sensitive: bool) -> String {
    let s = match p {
        PathMatch::Prefix(x) => format!("prefix \"{x}\""),
        PathMatch::Exact(x) => format!("path \"{x}\""),
        PathMatch::Regex(r) => format!("safe_regex \"{}\"", r.as_str()),
        PathMatch::SeparatedPrefix(x) => format!("path_separated_prefix \"{x}\""),
        PathMatch::Connect => "connect_matcher".to_string(),
    };
    if case_sensitive {
        s
    } else {
        format!("{s} (case-insensitive)")
    }
}

fn describe_string(m: &StringMatcher, ignore_case: bool) -> String {
    let s = match m {
        StringMatcher::Exact(x) => format!("exact \"{x}\""),
        StringMatcher::Prefix(x) => format!("prefix \"{x}\""),
        StringMatcher::Suffix(x) => format!("suffix \"{x}\""),
        StringMatcher::Contains(x) => format!("contains \"{x}\""),
        StringMatcher::Regex(r) => format!("safe_regex \"{}\"", r.as_str()),
    };
    if ignore_case {
        format!("{s} (ignoring case)")
    } else {
        s
    }
}

fn header_label(k: &HeaderKey) -> String {
    let name = match k {
        HeaderKey::Name(n) => n.as_str(),
        HeaderKey::Method => ":method",
        HeaderKey::Path => ":path",
        HeaderKey::Authority => ":authority",
        HeaderKey::Scheme => ":scheme",
    };
    format!("header \"{name}\"")
}

fn header_value(k: &HeaderKey, headers: &HeaderMap, pseudo: &Pseudo<'_>) -> String {
    let v = match k {
        HeaderKey::Name(n) => {
            let values: Vec<&str> = headers
                .get_all(n)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() {
                return "absent".into();
            }
            values.join(",")
        }
        HeaderKey::Method => pseudo.method.to_string(),
        HeaderKey::Path => pseudo.path.to_string(),
        HeaderKey::Authority => pseudo.authority.to_string(),
        HeaderKey::Scheme => pseudo.scheme.to_string(),
    };
    format!("\"{v}\"")
}

fn describe_header(h: &HeaderMatcher) -> String {
    let s = match &h.matcher {
        None if h.present => "present".to_string(),
        None => "absent".to_string(),
        Some(m) => describe_string(m, h.ignore_case),
    };
    if h.invert { format!("not {s}") } else { s }
}

/// What a chain's `filter_chain_match` asks at one selection step, in
/// words; `None` when it leaves the criterion open.
pub fn chain_criterion(m: &FilterChainMatch, step: ChainStep) -> Option<String> {
    let list = |v: &[String]| format!("[{}]", v.join(", "));
    let ranges = |v: &[CidrRange]| {
        let s: Vec<String> = v
            .iter()
            .map(|r| format!("{}/{}", r.addr, r.prefix_len))
            .collect();
        format!("[{}]", s.join(", "))
    };
    match step {
        ChainStep::DestinationPort => m.destination_port.map(|p| p.to_string()),
        ChainStep::DestinationIp => (!m.prefix_ranges.is_empty()).then(|| ranges(&m.prefix_ranges)),
        ChainStep::ServerName => (!m.server_names.is_empty()).then(|| list(&m.server_names)),
        ChainStep::TransportProtocol => m.transport_protocol.clone(),
        ChainStep::ApplicationProtocols => {
            (!m.application_protocols.is_empty()).then(|| list(&m.application_protocols))
        }
        ChainStep::DirectSourceIp => (!m.direct_source_prefix_ranges.is_empty())
            .then(|| ranges(&m.direct_source_prefix_ranges)),
        ChainStep::SourceType => match m.source_type {
            crate::listener::SourceType::Any => None,
            t => Some(format!("{t:?}")),
        },
        ChainStep::SourceIp => {
            (!m.source_prefix_ranges.is_empty()).then(|| ranges(&m.source_prefix_ranges))
        }
        ChainStep::SourcePort => (!m.source_ports.is_empty()).then(|| {
            let s: Vec<String> = m.source_ports.iter().map(u16::to_string).collect();
            format!("[{}]", s.join(", "))
        }),
    }
}

/// What the connection offers at one selection step, in words.
pub fn connection_value(info: &ConnectionInfo, step: ChainStep) -> String {
    let none = || "none".to_string();
    match step {
        ChainStep::DestinationPort => info.destination.map_or_else(none, |d| d.port().to_string()),
        ChainStep::DestinationIp => info.destination.map_or_else(none, |d| d.ip().to_string()),
        ChainStep::ServerName => info.server_name.clone().unwrap_or_else(none),
        ChainStep::TransportProtocol => info
            .transport_protocol
            .map_or_else(none, ToString::to_string),
        ChainStep::ApplicationProtocols => format!("[{}]", info.application_protocols.join(", ")),
        ChainStep::DirectSourceIp | ChainStep::SourceIp => {
            info.source.map_or_else(none, |s| s.ip().to_string())
        }
        ChainStep::SourceType => match info.source {
            None => none(),
            Some(_) if crate::listener::is_local_source(info) => "local".into(),
            Some(_) => "external".into(),
        },
        ChainStep::SourcePort => info.source.map_or_else(none, |s| s.port().to_string()),
    }
}

/// Whether a chain's criterion at `step` accepts the connection at all
/// (a chain that does may still lose to a more specific one).
pub fn chain_accepts(m: &FilterChainMatch, info: &ConnectionInfo, step: ChainStep) -> bool {
    let in_ranges = |v: &[CidrRange], ip: Option<IpAddr>| {
        v.is_empty() || ip.is_some_and(|ip| v.iter().any(|r| r.contains(ip)))
    };
    match step {
        ChainStep::DestinationPort => m
            .destination_port
            .is_none_or(|p| info.destination.is_some_and(|d| d.port() == p)),
        ChainStep::DestinationIp => in_ranges(&m.prefix_ranges, info.destination.map(|d| d.ip())),
        ChainStep::ServerName => {
            m.server_names.is_empty()
                || info.server_name.as_deref().is_some_and(|sni| {
                    m.server_names.iter().any(|n| {
                        n.eq_ignore_ascii_case(sni)
                            || n.strip_prefix('*').is_some_and(|suffix| {
                                sni.len() > suffix.len()
                                    && sni[sni.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                            })
                    })
                })
        }
        ChainStep::TransportProtocol => match (&m.transport_protocol, info.transport_protocol) {
            (None, _) => true,
            (Some(t), Some(got)) => t == got,
            (Some(t), None) => t == "raw_buffer",
        },
        ChainStep::ApplicationProtocols => {
            m.application_protocols.is_empty()
                || m.application_protocols
                    .iter()
                    .any(|p| info.application_protocols.contains(p))
        }
        ChainStep::DirectSourceIp => {
            in_ranges(&m.direct_source_prefix_ranges, info.source.map(|s| s.ip()))
        }
        ChainStep::SourceType => {
            let local = crate::listener::is_local_source(info);
            match m.source_type {
                crate::listener::SourceType::Any => true,
                crate::listener::SourceType::SameIpOrLoopback => local,
                crate::listener::SourceType::External => !local && info.source.is_some(),
            }
        }
        ChainStep::SourceIp => in_ranges(&m.source_prefix_ranges, info.source.map(|s| s.ip())),
        ChainStep::SourcePort => {
            m.source_ports.is_empty()
                || info
                    .source
                    .is_some_and(|s| m.source_ports.contains(&s.port()))
        }
    }
}

impl RetryOn {
    /// The conditions by Envoy's names, in `retry_on`'s usual order.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.server_error, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.connect_failure, "connect-failure"),
            (self.retriable_4xx, "retriable-4xx"),
            (self.refused_stream, "refused-stream"),
            (self.retriable_status_codes, "retriable-status-codes"),
            (self.reset_before_request, "reset-before-request"),
            (self.grpc_cancelled, "cancelled"),
            (self.grpc_deadline_exceeded, "deadline-exceeded"),
            (self.grpc_resource_exhausted, "resource-exhausted"),
            (self.grpc_internal, "internal"),
            (self.grpc_unavailable, "unavailable"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::HeaderValue;
    use regex::Regex;

    use super::*;
    use crate::listener::{FilterChain, Listener};
    use crate::route::QueryParameterMatcher;

    fn route_match(path: PathMatch) -> RouteMatch {
        RouteMatch {
            path,
            case_sensitive: true,
            headers: Vec::new(),
            query_parameters: Vec::new(),
            grpc: false,
            runtime_fraction: None,
            ignore_path_parameters: false,
        }
    }

    /// Every matcher kind against a set of requests: the explanation says
    /// "no mismatch" exactly when the matcher matches, and names the
    /// condition that failed otherwise.
    #[test]
    fn mismatch_agrees_with_the_matcher() {
        let header =
            |name: &str, m: Option<StringMatcher>, invert: bool, present: bool| HeaderMatcher {
                name: HeaderKey::parse(name).unwrap(),
                matcher: m,
                ignore_case: false,
                invert,
                present,
                treat_missing_as_empty: false,
            };
        let mut matchers = vec![
            route_match(PathMatch::Prefix("/api".into())),
            route_match(PathMatch::Exact("/api/v1".into())),
            route_match(PathMatch::Regex(Regex::new("^/api/v[0-9]+$").unwrap())),
            route_match(PathMatch::SeparatedPrefix("/api".into())),
            RouteMatch {
                case_sensitive: false,
                ..route_match(PathMatch::Prefix("/API".into()))
            },
        ];
        let mut m = route_match(PathMatch::Prefix("/".into()));
        m.headers.push(header(
            ":method",
            Some(StringMatcher::Exact("POST".into())),
            false,
            true,
        ));
        matchers.push(m);
        let mut m = route_match(PathMatch::Prefix("/".into()));
        m.headers.push(header(
            "x-user",
            Some(StringMatcher::Prefix("a".into())),
            true,
            true,
        ));
        m.headers.push(header("x-debug", None, false, false));
        matchers.push(m);
        let mut m = route_match(PathMatch::Prefix("/".into()));
        m.query_parameters.push(QueryParameterMatcher {
            name: "v".into(),
            kind: QueryMatch::String {
                matcher: StringMatcher::Exact("2".into()),
                ignore_case: false,
            },
        });
        matchers.push(m);
        let mut m = route_match(PathMatch::Prefix("/".into()));
        m.grpc = true;
        matchers.push(m);

        type Request<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
        let requests: Vec<Request<'_>> = vec![
            ("GET", "/api/v1", vec![]),
            ("POST", "/api/v1?v=2", vec![("x-user", "bob")]),
            ("GET", "/apix", vec![("x-user", "alice")]),
            ("GET", "/Api/v1", vec![("x-debug", "1")]),
            (
                "PUT",
                "/other?v=3",
                vec![("content-type", "application/grpc")],
            ),
            (
                "POST",
                "/api",
                vec![("content-type", "application/grpc+proto")],
            ),
        ];
        let mut disagreements = Vec::new();
        let mut reasons = 0;
        for (method, path, hs) in &requests {
            let mut headers = HeaderMap::new();
            for (k, v) in hs {
                headers.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let pseudo = Pseudo {
                method,
                path,
                authority: "example.com",
                scheme: "http",
            };
            for (i, m) in matchers.iter().enumerate() {
                let matched = m.matches_pseudo(&pseudo, &headers, 0);
                let why = m.mismatch(&pseudo, &headers);
                if matched == why.is_some() {
                    disagreements.push((i, method.to_string(), path.to_string(), why.clone()));
                }
                if let Some(w) = why {
                    assert!(!w.is_empty());
                    reasons += 1;
                }
            }
        }
        assert!(disagreements.is_empty(), "{disagreements:?}");
        assert!(reasons > 10, "the cases exercise mismatches");

        let pseudo = Pseudo {
            method: "GET",
            path: "/other",
            authority: "a",
            scheme: "http",
        };
        assert_eq!(
            matchers[0].mismatch(&pseudo, &HeaderMap::new()).as_deref(),
            Some("path \"/other\" does not match prefix \"/api\"")
        );
        let pseudo = Pseudo {
            method: "GET",
            path: "/x",
            ..pseudo
        };
        assert_eq!(
            matchers[5].mismatch(&pseudo, &HeaderMap::new()).as_deref(),
            Some("header \":method\" is \"GET\", wanted exact \"POST\"")
        );
        let pseudo = Pseudo {
            path: "/x?v=3",
            ..pseudo
        };
        assert_eq!(
            matchers[7].mismatch(&pseudo, &HeaderMap::new()).as_deref(),
            Some("query parameter \"v\" is \"3\", wanted exact \"2\"")
        );
    }

    #[test]
    fn chain_steps_report_what_each_chain_asks() {
        let chain = |name: &str, m: FilterChainMatch| {
            Arc::new(FilterChain {
                name: name.into(),
                fingerprint: 0,
                fingerprint_without_network_rbac: 0,
                filter_chain_match: m,
                tls: None,
                rbac: Vec::new(),
                kind: crate::listener::ChainKind::Tcp(crate::listener::TcpProxy {
                    stat_prefix: "t".into(),
                    cluster: "c".into(),
                    weighted: Vec::new(),
                    idle_timeout: None,
                    access_logs: Default::default(),
                    max_connect_attempts: 1,
                    max_downstream_connection_duration: None,
                    hash_source_ip: false,
                    tunneling: None,
                }),
                ext_authz: Vec::new(),
                set_filter_state: Vec::new(),
                istio_stats: None,
                metadata_exchange: None,
                request_buffer_limit: None,
            })
        };
        let l = Listener {
            name: "l".into(),
            fingerprint: 0,
            settings_fingerprint: 0,
            address: "0.0.0.0:15006".parse().unwrap(),
            additional_addresses: Vec::new(),
            bind_to_port: true,
            internal: false,
            use_original_dst: false,
            listener_filters: Default::default(),
            detection_timeout: None,
            close_on_detection_timeout: false,
            tcp_keepalive: None,
            filter_chains: vec![
                chain(
                    "port-9080",
                    FilterChainMatch {
                        destination_port: Some(9080),
                        ..Default::default()
                    },
                ),
                chain(
                    "port-8080-tls",
                    FilterChainMatch {
                        destination_port: Some(8080),
                        transport_protocol: Some("tls".into()),
                        ..Default::default()
                    },
                ),
                chain(
                    "port-8080-plain",
                    FilterChainMatch {
                        destination_port: Some(8080),
                        transport_protocol: Some("raw_buffer".into()),
                        ..Default::default()
                    },
                ),
                chain("any", FilterChainMatch::default()),
            ],
            default_chain: None,
            filter_chain_matcher: None,
            access_logs: Default::default(),
        };
        let info = ConnectionInfo {
            destination: Some("10.0.0.1:8080".parse().unwrap()),
            source: Some("10.0.0.2:5000".parse().unwrap()),
            transport_protocol: Some("raw_buffer"),
            ..Default::default()
        };
        let mut left: Vec<String> = l.filter_chains.iter().map(|c| c.name.clone()).collect();
        let mut dropped = Vec::new();
        let chosen = l.select_chain_observed(&info, |step, cands| {
            left.retain(|n| {
                let keep = cands.iter().any(|c| &c.name == n);
                if !keep {
                    dropped.push((n.clone(), step));
                }
                keep
            });
        });
        assert_eq!(chosen.map(|c| c.name.as_str()), Some("port-8080-plain"));
        assert_eq!(
            chosen.map(|c| c.name.as_str()),
            l.select_chain(&info).map(|c| c.name.as_str())
        );
        assert_eq!(
            dropped,
            vec![
                ("port-9080".to_string(), ChainStep::DestinationPort),
                ("any".to_string(), ChainStep::DestinationPort),
                ("port-8080-tls".to_string(), ChainStep::TransportProtocol),
            ]
        );
        let fcm = |n: usize| &l.filter_chains[n].filter_chain_match;
        // 9080 does not accept 8080; "any" accepts it but is less specific.
        assert!(!chain_accepts(fcm(0), &info, ChainStep::DestinationPort));
        assert!(chain_accepts(fcm(3), &info, ChainStep::DestinationPort));
        assert!(!chain_accepts(fcm(1), &info, ChainStep::TransportProtocol));
        assert_eq!(
            chain_criterion(fcm(0), ChainStep::DestinationPort).as_deref(),
            Some("9080")
        );
        assert_eq!(chain_criterion(fcm(3), ChainStep::DestinationPort), None);
        assert_eq!(connection_value(&info, ChainStep::DestinationPort), "8080");
        assert_eq!(
            connection_value(&info, ChainStep::TransportProtocol),
            "raw_buffer"
        );
    }

    #[test]
    fn retry_conditions_by_name() {
        let (on, unknown) = RetryOn::parse("5xx,connect-failure,unavailable");
        assert!(unknown.is_empty());
        assert_eq!(on.names(), vec!["5xx", "connect-failure", "unavailable"]);
    }
}
