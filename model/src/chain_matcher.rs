//! A listener's `filter_chain_matcher`: Envoy's unified matcher
//! (`xds.type.matcher.v3.Matcher`) over what is known of a connection when
//! its filter chain is chosen, whose actions name filter chains.
//!
//! Evaluation follows Envoy's match tree: a map or IP tree looks its input
//! up (exact key; longest prefix first; longest CIDR first, then declaration
//! order, skipping `exclusive` ranges once a more specific one failed); a
//! list tries its predicates in order. When the branch taken does not match
//! (a nested matcher without a match, a `keep_matching` action), the next
//! candidate is tried and finally the matcher's `on_no_match`. An input with
//! no value (no SNI, no ALPN, not a local source) takes `on_no_match`
//! directly. No match at all selects the listener's default chain; a match
//! naming a chain the listener lacks selects none (the connection is closed,
//! as Envoy closes it).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::cidr::CidrRange;
use crate::listener::{ConnectionInfo, is_local_source};
use crate::route::StringMatcher;

/// What a matcher reads from the connection
/// (`envoy.extensions.matching.common_inputs.network.v3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    DestinationIp,
    DestinationPort,
    SourceIp,
    SourcePort,
    /// The directly connected peer (Ferry rewrites no source address, so
    /// the same as [`Input::SourceIp`]).
    DirectSourceIp,
    /// `"local"` for a loopback source or one equal to the destination.
    SourceType,
    ServerName,
    /// `"tls"` when the TLS inspector saw a ClientHello, `"raw_buffer"`
    /// otherwise (Envoy sets it before choosing the chain).
    TransportProtocol,
    /// The ALPN or detected HTTP protocols, each in single quotes, joined
    /// by commas: `'h2','http/1.1'`.
    ApplicationProtocol,
}

impl Input {
    /// The input's value for this connection; `None` is Envoy's empty
    /// input (which takes `on_no_match`).
    pub fn value(self, info: &ConnectionInfo) -> Option<String> {
        match self {
            Input::DestinationIp => info.destination.map(|d| d.ip().to_string()),
            Input::DestinationPort => info.destination.map(|d| d.port().to_string()),
            Input::SourceIp | Input::DirectSourceIp => info.source.map(|s| s.ip().to_string()),
            Input::SourcePort => info.source.map(|s| s.port().to_string()),
            Input::SourceType => is_local_source(info).then(|| "local".to_string()),
            Input::ServerName => info.server_name.clone().filter(|s| !s.is_empty()),
            Input::TransportProtocol => {
                Some(info.transport_protocol.unwrap_or("raw_buffer").to_string())
            }
            Input::ApplicationProtocol => (!info.application_protocols.is_empty()).then(|| {
                let quoted: Vec<String> = info
                    .application_protocols
                    .iter()
                    .map(|p| format!("'{p}'"))
                    .collect();
                quoted.join(",")
            }),
        }
    }

    /// The extension name Envoy registers the input under.
    pub fn name(self) -> &'static str {
        match self {
            Input::DestinationIp => "envoy.matching.inputs.destination_ip",
            Input::DestinationPort => "envoy.matching.inputs.destination_port",
            Input::SourceIp => "envoy.matching.inputs.source_ip",
            Input::SourcePort => "envoy.matching.inputs.source_port",
            Input::DirectSourceIp => "envoy.matching.inputs.direct_source_ip",
            Input::SourceType => "envoy.matching.inputs.source_type",
            Input::ServerName => "envoy.matching.inputs.server_name",
            Input::TransportProtocol => "envoy.matching.inputs.transport_protocol",
            Input::ApplicationProtocol => "envoy.matching.inputs.application_protocol",
        }
    }
}

/// A node of the match tree.
#[derive(Debug)]
pub enum Matcher {
    /// `matcher_tree`: one input looked up in a map or an IP trie.
    Tree {
        input: Input,
        lookup: Lookup,
        on_no_match: Option<Box<OnMatch>>,
    },
    /// `matcher_list`: the first predicate that holds and whose branch
    /// matches.
    List {
        matchers: Vec<(Predicate, OnMatch)>,
        on_no_match: Option<Box<OnMatch>>,
    },
}

/// How a tree looks its input up.
#[derive(Debug)]
pub enum Lookup {
    /// `exact_match_map` (ordered, so that equal configurations print alike).
    Exact(BTreeMap<String, OnMatch>),
    /// `prefix_match_map`, longest prefix first.
    Prefix(Vec<(String, OnMatch)>),
    /// `custom_match` with `xds.type.matcher.v3.IPMatcher`: one entry per
    /// range, longest prefix first, then in declaration order.
    Ip(Vec<IpRange>),
}

/// One CIDR range of an IP matcher and the branch it leads to.
#[derive(Debug)]
pub struct IpRange {
    pub range: CidrRange,
    /// Not tried once a more specific range was (and failed).
    pub exclusive: bool,
    /// The `range_matchers` entry the range belongs to (several ranges
    /// share one branch).
    pub branch: usize,
}

/// What a matched entry leads to.
#[derive(Debug)]
pub struct OnMatch {
    /// A match here counts as no match (the search goes on).
    pub keep_matching: bool,
    pub then: Then,
}

#[derive(Debug)]
pub enum Then {
    Matcher(Box<Matcher>),
    /// The filter chain the action names: its index in the listener's
    /// `filter_chains`, `None` when the listener has no chain of that name.
    Chain {
        name: String,
        index: Option<usize>,
    },
}

/// `MatcherList.Predicate`.
#[derive(Debug)]
pub enum Predicate {
    Single {
        input: Input,
        matcher: StringMatcher,
        ignore_case: bool,
    },
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
    Not(Box<Predicate>),
}

impl Predicate {
    fn holds(&self, info: &ConnectionInfo) -> bool {
        match self {
            // An empty input matches no string matcher.
            Predicate::Single {
                input,
                matcher,
                ignore_case,
            } => input
                .value(info)
                .is_some_and(|v| matcher.matches(&v, *ignore_case)),
            Predicate::Or(ps) => ps.iter().any(|p| p.holds(info)),
            Predicate::And(ps) => ps.iter().all(|p| p.holds(info)),
            Predicate::Not(p) => !p.holds(info),
        }
    }
}

/// A listener's `filter_chain_matcher` with the branches of its IP
/// matchers.
#[derive(Debug)]
pub struct ChainMatcher {
    root: Matcher,
    /// The branches IP ranges lead to, by [`IpRange::branch`].
    branches: Vec<OnMatch>,
    /// The inputs read anywhere in the tree (what detection must learn).
    inputs: Vec<Input>,
}

/// The outcome of a chain selection by matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// The chain at this index of `filter_chains`.
    Chain(usize),
    /// The matched action names a chain the listener does not have: no
    /// chain (Envoy closes the connection).
    Missing,
    /// Nothing matched: the default chain, if any.
    NoMatch,
}

impl ChainMatcher {
    pub fn new(root: Matcher, branches: Vec<OnMatch>) -> Self {
        let mut m = ChainMatcher {
            root,
            branches,
            inputs: Vec::new(),
        };
        let mut inputs = Vec::new();
        m.collect_matcher(&m.root, &mut inputs);
        for b in &m.branches {
            m.collect_on_match(b, &mut inputs);
        }
        inputs.sort_by_key(|i| i.name());
        inputs.dedup();
        m.inputs = inputs;
        m
    }

    pub fn select(&self, info: &ConnectionInfo) -> Selection {
        match self.matcher(&self.root, info) {
            Some(index) => index.map_or(Selection::Missing, Selection::Chain),
            None => Selection::NoMatch,
        }
    }

    /// The inputs read anywhere in the tree, each once.
    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }

    fn collect_matcher(&self, m: &Matcher, out: &mut Vec<Input>) {
        fn predicate(p: &Predicate, out: &mut Vec<Input>) {
            match p {
                Predicate::Single { input, .. } => out.push(*input),
                Predicate::Or(ps) | Predicate::And(ps) => {
                    ps.iter().for_each(|p| predicate(p, out));
                }
                Predicate::Not(p) => predicate(p, out),
            }
        }
        match m {
            Matcher::Tree {
                input,
                lookup,
                on_no_match,
            } => {
                out.push(*input);
                match lookup {
                    Lookup::Exact(map) => map.values().for_each(|o| self.collect_on_match(o, out)),
                    Lookup::Prefix(v) => v.iter().for_each(|(_, o)| self.collect_on_match(o, out)),
                    // The branches are walked by `inputs`.
                    Lookup::Ip(_) => {}
                }
                if let Some(o) = on_no_match {
                    self.collect_on_match(o, out);
                }
            }
            Matcher::List {
                matchers,
                on_no_match,
            } => {
                for (p, o) in matchers {
                    predicate(p, out);
                    self.collect_on_match(o, out);
                }
                if let Some(o) = on_no_match {
                    self.collect_on_match(o, out);
                }
            }
        }
    }

    fn collect_on_match(&self, o: &OnMatch, out: &mut Vec<Input>) {
        if let Then::Matcher(m) = &o.then {
            self.collect_matcher(m, out);
        }
    }

    /// `Some(chain)` on a match (`Some(None)`: a chain the listener lacks),
    /// `None` on no match.
    fn matcher(&self, m: &Matcher, info: &ConnectionInfo) -> Option<Option<usize>> {
        match m {
            Matcher::Tree {
                input,
                lookup,
                on_no_match,
            } => {
                let no_match = || on_no_match.as_deref().and_then(|o| self.on_match(o, info));
                let Some(value) = input.value(info) else {
                    return no_match();
                };
                let found = match lookup {
                    Lookup::Exact(map) => map.get(&value).and_then(|o| self.on_match(o, info)),
                    Lookup::Prefix(entries) => entries
                        .iter()
                        .filter(|(p, _)| value.starts_with(p.as_str()))
                        .find_map(|(_, o)| self.on_match(o, info)),
                    Lookup::Ip(ranges) => {
                        let Ok(ip) = value.parse::<IpAddr>() else {
                            return no_match();
                        };
                        self.ip_lookup(ranges, ip, info)
                    }
                };
                found.or_else(no_match)
            }
            Matcher::List {
                matchers,
                on_no_match,
            } => matchers
                .iter()
                .filter(|(p, _)| p.holds(info))
                .find_map(|(_, o)| self.on_match(o, info))
                .or_else(|| on_no_match.as_deref().and_then(|o| self.on_match(o, info))),
        }
    }

    fn ip_lookup(
        &self,
        ranges: &[IpRange],
        ip: IpAddr,
        info: &ConnectionInfo,
    ) -> Option<Option<usize>> {
        let mut first = true;
        for r in ranges.iter().filter(|r| r.range.contains(ip)) {
            if !first && r.exclusive {
                continue;
            }
            first = false;
            if let Some(found) = self
                .branches
                .get(r.branch)
                .and_then(|o| self.on_match(o, info))
            {
                return Some(found);
            }
        }
        None
    }

    fn on_match(&self, o: &OnMatch, info: &ConnectionInfo) -> Option<Option<usize>> {
        let found = match &o.then {
            Then::Matcher(m) => self.matcher(m, info)?,
            Then::Chain { index, .. } => *index,
        };
        (!o.keep_matching).then_some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(i: usize) -> OnMatch {
        OnMatch {
            keep_matching: false,
            then: Then::Chain {
                name: format!("c{i}"),
                index: Some(i),
            },
        }
    }

    fn info(dst: &str, src: &str) -> ConnectionInfo {
        ConnectionInfo {
            destination: Some(dst.parse().unwrap()),
            source: Some(src.parse().unwrap()),
            ..Default::default()
        }
    }

    /// An IP trie whose most specific range leads to a port map: a port
    /// the map lacks falls back to the less specific non-exclusive range,
    /// never to an exclusive one.
    #[test]
    fn ip_ranges_longest_first_and_exclusive() {
        let ports = |port: &str, i: usize| Matcher::Tree {
            input: Input::DestinationPort,
            lookup: Lookup::Exact(BTreeMap::from([(port.to_string(), chain(i))])),
            on_no_match: None,
        };
        let build = |exclusive: bool| {
            ChainMatcher::new(
                Matcher::Tree {
                    input: Input::DestinationIp,
                    lookup: Lookup::Ip(vec![
                        IpRange {
                            range: "10.0.0.0/24".parse().unwrap(),
                            exclusive: false,
                            branch: 1,
                        },
                        IpRange {
                            range: "10.0.0.0/8".parse().unwrap(),
                            exclusive,
                            branch: 0,
                        },
                    ]),
                    on_no_match: Some(Box::new(chain(9))),
                },
                vec![
                    chain(0),
                    OnMatch {
                        keep_matching: false,
                        then: Then::Matcher(Box::new(ports("80", 1))),
                    },
                ],
            )
        };
        let m = build(false);
        assert_eq!(
            m.select(&info("10.0.0.1:80", "1.1.1.1:5")),
            Selection::Chain(1)
        );
        assert_eq!(
            m.select(&info("10.0.0.1:81", "1.1.1.1:5")),
            Selection::Chain(0)
        );
        assert_eq!(
            m.select(&info("10.1.0.1:81", "1.1.1.1:5")),
            Selection::Chain(0)
        );
        assert_eq!(
            m.select(&info("11.0.0.1:81", "1.1.1.1:5")),
            Selection::Chain(9)
        );
        let m = build(true);
        // The exclusive /8 is skipped after the /24 failed: on_no_match.
        assert_eq!(
            m.select(&info("10.0.0.1:81", "1.1.1.1:5")),
            Selection::Chain(9)
        );
        assert_eq!(
            m.select(&info("10.1.0.1:81", "1.1.1.1:5")),
            Selection::Chain(0)
        );
    }

    #[test]
    fn inputs_and_lists() {
        let mut i = info("127.0.0.1:443", "127.0.0.1:5");
        i.application_protocols = vec!["h2".into(), "http/1.1".into()];
        assert_eq!(
            Input::ApplicationProtocol.value(&i).as_deref(),
            Some("'h2','http/1.1'")
        );
        assert_eq!(Input::SourceType.value(&i).as_deref(), Some("local"));
        assert_eq!(
            Input::TransportProtocol.value(&i).as_deref(),
            Some("raw_buffer")
        );
        assert_eq!(Input::ServerName.value(&i), None);
        let m = ChainMatcher::new(
            Matcher::List {
                matchers: vec![
                    (
                        Predicate::Single {
                            input: Input::ServerName,
                            matcher: StringMatcher::Suffix(".example.com".into()),
                            ignore_case: true,
                        },
                        chain(0),
                    ),
                    (
                        Predicate::Not(Box::new(Predicate::Single {
                            input: Input::ServerName,
                            matcher: StringMatcher::Exact("x".into()),
                            ignore_case: false,
                        })),
                        OnMatch {
                            keep_matching: true,
                            then: Then::Chain {
                                name: "skipped".into(),
                                index: Some(5),
                            },
                        },
                    ),
                ],
                on_no_match: Some(Box::new(OnMatch {
                    keep_matching: false,
                    then: Then::Chain {
                        name: "absent".into(),
                        index: None,
                    },
                })),
            },
            Vec::new(),
        );
        i.server_name = Some("A.Example.COM".into());
        assert_eq!(m.select(&i), Selection::Chain(0));
        i.server_name = None;
        assert_eq!(m.select(&i), Selection::Missing);
        assert_eq!(m.inputs(), [Input::ServerName]);
    }
}
