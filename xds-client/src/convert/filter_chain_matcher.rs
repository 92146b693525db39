//! `Listener.filter_chain_matcher`: the unified matcher
//! (`xds.type.matcher.v3.Matcher`: `matcher_tree` with exact and prefix
//! maps or the `xds.type.matcher.v3.IPMatcher` trie, `matcher_list` with
//! string predicates), its network inputs
//! (`envoy.extensions.matching.common_inputs.network.v3`) and its actions
//! (`google.protobuf.StringValue` naming a filter chain).
//!
//! Inputs, custom matchers and actions Ferry does not evaluate are refused
//! by type name, so a listener never runs with part of its matcher dropped.

use std::collections::HashMap;

use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::xds::core::v3 as xds_core_pb;
use envoy_types::pb::xds::r#type::matcher::v3 as xm_pb;
use ferry_model as m;
use ferry_model::chain_matcher as cm;
use prost::Message;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, Typed};

fields!(pub(super) static MATCHER = "xds.type.matcher.v3.Matcher" {
    "matcher_list": applied,
    "matcher_tree": applied,
    "on_no_match": applied,
});

fields!(pub(super) static ON_MATCH = "xds.type.matcher.v3.Matcher.OnMatch" {
    "matcher": applied,
    "action": applied "google.protobuf.StringValue naming a filter chain (a name the listener lacks closes the connection, as Envoy)",
    "keep_matching": applied "the match counts as none and the search goes on",
});

fields!(pub(super) static MATCHER_LIST = "xds.type.matcher.v3.Matcher.MatcherList" {
    "matchers": applied "in order: the first whose predicate holds and whose branch matches",
});

fields!(pub(super) static FIELD_MATCHER = "xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher" {
    "predicate": applied,
    "on_match": applied,
});

fields!(pub(super) static PREDICATE = "xds.type.matcher.v3.Matcher.MatcherList.Predicate" {
    "single_predicate": applied,
    "or_matcher": applied,
    "and_matcher": applied,
    "not_matcher": applied,
});

fields!(pub(super) static SINGLE_PREDICATE = "xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate" {
    "input": applied "destination_ip, destination_port, source_ip, source_port, direct_source_ip, source_type, server_name, transport_protocol, application_protocol (others refused by type)",
    "value_match": applied "an input without a value matches nothing",
    "custom_match": refused "custom input matchers in a matcher list are not supported (use value_match)",
});

fields!(pub(super) static PREDICATE_LIST = "xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList" {
    "predicate": applied,
});

fields!(pub(super) static MATCHER_TREE = "xds.type.matcher.v3.Matcher.MatcherTree" {
    "input": applied "destination_ip, destination_port, source_ip, source_port, direct_source_ip, source_type, server_name, transport_protocol, application_protocol (others refused by type)",
    "exact_match_map": applied,
    "prefix_match_map": applied "longest prefix first; a branch that does not match falls back to the next shorter prefix",
    "custom_match": applied "xds.type.matcher.v3.IPMatcher (other custom matchers refused by type)",
});

fields!(pub(super) static MATCH_MAP = "xds.type.matcher.v3.Matcher.MatcherTree.MatchMap" {
    "map": applied,
});

fields!(pub(super) static IP_MATCHER = "xds.type.matcher.v3.IPMatcher" {
    "range_matchers": applied "longest prefix first, then declaration order",
});

fields!(pub(super) static IP_RANGE_MATCHER = "xds.type.matcher.v3.IPMatcher.IPRangeMatcher" {
    "ranges": applied,
    "on_match": applied,
    "exclusive": applied "skipped once a more specific range failed its nested match",
});

fields!(pub(super) static XDS_CIDR_RANGE = "xds.core.v3.CidrRange" {
    "address_prefix": applied,
    "prefix_len": applied,
});

fields!(pub(super) static TYPED_EXTENSION_CONFIG = "xds.core.v3.TypedExtensionConfig" {
    "name": inert "a label; the type of typed_config selects the extension",
    "typed_config": applied,
});

fields!(pub(super) static XDS_STRING_MATCHER = "xds.type.matcher.v3.StringMatcher" {
    "exact": applied,
    "prefix": applied,
    "suffix": applied,
    "safe_regex": applied,
    "contains": applied,
    "custom": refused "custom string matchers are not supported",
    "ignore_case": applied,
});

fields!(pub(super) static XDS_REGEX_MATCHER = "xds.type.matcher.v3.RegexMatcher" {
    "google_re2": inert "RE2 engine settings: the regex crate has no program-size limit to set",
    "regex": applied "RE2 syntax, the whole value must match",
});

/// `xds.type.matcher.v3.IPMatcher` (cncf/xds `ip.proto`), which the
/// `envoy-types` crate does not generate.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct IpMatcher {
    #[prost(message, repeated, tag = "1")]
    pub range_matchers: Vec<IpRangeMatcher>,
}

/// `xds.type.matcher.v3.IPMatcher.IPRangeMatcher`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct IpRangeMatcher {
    #[prost(message, repeated, tag = "1")]
    pub ranges: Vec<xds_core_pb::CidrRange>,
    #[prost(message, optional, tag = "2")]
    pub on_match: Option<xm_pb::matcher::OnMatch>,
    #[prost(bool, tag = "3")]
    pub exclusive: bool,
}

const IP_MATCHER_TYPE: &str = "xds.type.matcher.v3.IPMatcher";
const NETWORK_INPUTS: &str = "envoy.extensions.matching.common_inputs.network.v3.";
const STRING_VALUE_TYPE: &str = "google.protobuf.StringValue";

/// Converts a listener's `filter_chain_matcher`; `chains` are the names of
/// its `filter_chains`, in order.
pub(super) fn filter_chain_matcher(
    ctx: &mut Ctx<'_>,
    field: &str,
    matcher: &xm_pb::Matcher,
    chains: &[&str],
) -> Result<cm::ChainMatcher, ConvertError> {
    // Envoy requires every chain to be named, once, when a matcher picks them.
    let mut seen = HashMap::new();
    for (i, name) in chains.iter().enumerate() {
        if name.is_empty() {
            return Err(ctx.err(
                format!("filter_chains[{i}].name"),
                "a name is required when the listener has a filter_chain_matcher",
            ));
        }
        if let Some(first) = seen.insert(*name, i) {
            return Err(ctx.err(
                format!("filter_chains[{i}].name"),
                format!("{name:?} is also the name of filter_chains[{first}]"),
            ));
        }
    }
    let mut b = Builder {
        chains: &seen,
        branches: Vec::new(),
    };
    let root = b.matcher(ctx, field, matcher)?;
    Ok(cm::ChainMatcher::new(root, b.branches))
}

struct Builder<'a> {
    chains: &'a HashMap<&'a str, usize>,
    branches: Vec<cm::OnMatch>,
}

impl Builder<'_> {
    fn matcher(
        &mut self,
        ctx: &mut Ctx<'_>,
        f: &str,
        mm: &xm_pb::Matcher,
    ) -> Result<cm::Matcher, ConvertError> {
        use xm_pb::matcher::MatcherType;
        let xm_pb::Matcher {
            on_no_match,
            matcher_type,
        } = mm;
        let on_no_match = on_no_match
            .as_ref()
            .map(|o| self.on_match(ctx, &path(f, "on_no_match"), o).map(Box::new))
            .transpose()?;
        match matcher_type {
            Some(MatcherType::MatcherTree(t)) => {
                self.tree(ctx, &path(f, "matcher_tree"), t, on_no_match)
            }
            Some(MatcherType::MatcherList(l)) => {
                let lf = path(f, "matcher_list");
                let xm_pb::matcher::MatcherList { matchers } = l;
                if matchers.is_empty() {
                    return Err(ctx.err(path(&lf, "matchers"), "at least one matcher is required"));
                }
                let mut out = Vec::with_capacity(matchers.len());
                for (i, fm) in matchers.iter().enumerate() {
                    let ff = format!("{lf}.matchers[{i}]");
                    let xm_pb::matcher::matcher_list::FieldMatcher {
                        predicate,
                        on_match,
                    } = fm;
                    let p = predicate.as_ref().ok_or_else(|| {
                        ctx.err(path(&ff, "predicate"), "a predicate is required")
                    })?;
                    let p = self.predicate(ctx, &path(&ff, "predicate"), p)?;
                    let o = on_match
                        .as_ref()
                        .ok_or_else(|| ctx.err(path(&ff, "on_match"), "on_match is required"))?;
                    out.push((p, self.on_match(ctx, &path(&ff, "on_match"), o)?));
                }
                Ok(cm::Matcher::List {
                    matchers: out,
                    on_no_match,
                })
            }
            None => Err(ctx.err(f, "matcher_tree or matcher_list is required")),
        }
    }

    fn tree(
        &mut self,
        ctx: &mut Ctx<'_>,
        f: &str,
        t: &xm_pb::matcher::MatcherTree,
        on_no_match: Option<Box<cm::OnMatch>>,
    ) -> Result<cm::Matcher, ConvertError> {
        use xm_pb::matcher::matcher_tree::{MatchMap, TreeType};
        let xm_pb::matcher::MatcherTree { input, tree_type } = t;
        let input = network_input(ctx, &path(f, "input"), input.as_ref())?;
        let mut map = |ctx: &mut Ctx<'_>, name: &str, mm: &MatchMap| {
            let MatchMap { map } = mm;
            let mut entries = Vec::with_capacity(map.len());
            for (k, o) in map {
                let at = format!("{f}.{name}.map{{{k}}}");
                entries.push((k.clone(), self.on_match(ctx, &at, o)?));
            }
            Ok::<_, ConvertError>(entries)
        };
        let lookup = match tree_type {
            Some(TreeType::ExactMatchMap(mm)) => {
                cm::Lookup::Exact(map(ctx, "exact_match_map", mm)?.into_iter().collect())
            }
            Some(TreeType::PrefixMatchMap(mm)) => {
                let mut entries = map(ctx, "prefix_match_map", mm)?;
                entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
                cm::Lookup::Prefix(entries)
            }
            Some(TreeType::CustomMatch(c)) => {
                self.custom_match(ctx, &path(f, "custom_match"), c)?
            }
            None => {
                return Err(ctx.err(
                    f,
                    "exact_match_map, prefix_match_map or custom_match is required",
                ));
            }
        };
        Ok(cm::Matcher::Tree {
            input,
            lookup,
            on_no_match,
        })
    }

    fn custom_match(
        &mut self,
        ctx: &mut Ctx<'_>,
        f: &str,
        c: &xds_core_pb::TypedExtensionConfig,
    ) -> Result<cm::Lookup, ConvertError> {
        let (tf, typed) = typed_extension(ctx, f, c)?;
        if typed.type_name() != IP_MATCHER_TYPE {
            return Err(ctx.err(
                &tf,
                format!(
                    "unsupported custom matcher {} (only {IP_MATCHER_TYPE})",
                    typed.type_name()
                ),
            ));
        }
        let ip: IpMatcher = typed.decode().map_err(|e| ctx.err(&tf, e))?;
        let IpMatcher { range_matchers } = &ip;
        let mut ranges = Vec::new();
        for (i, rm) in range_matchers.iter().enumerate() {
            let rf = format!("{tf}.range_matchers[{i}]");
            let IpRangeMatcher {
                ranges: cidrs,
                on_match,
                exclusive,
            } = rm;
            if cidrs.is_empty() {
                return Err(ctx.err(path(&rf, "ranges"), "at least one range is required"));
            }
            let o = on_match
                .as_ref()
                .ok_or_else(|| ctx.err(path(&rf, "on_match"), "on_match is required"))?;
            let branch = self.branches.len();
            let o = self.on_match(ctx, &path(&rf, "on_match"), o)?;
            self.branches.push(o);
            for (j, r) in cidrs.iter().enumerate() {
                ranges.push(cm::IpRange {
                    range: xds_cidr(ctx, &format!("{rf}.ranges[{j}]"), r)?,
                    exclusive: *exclusive,
                    branch,
                });
            }
        }
        // Longest prefix first, then declaration order (a stable sort).
        ranges.sort_by_key(|r| std::cmp::Reverse(r.range.prefix_len));
        Ok(cm::Lookup::Ip(ranges))
    }

    fn on_match(
        &mut self,
        ctx: &mut Ctx<'_>,
        f: &str,
        o: &xm_pb::matcher::OnMatch,
    ) -> Result<cm::OnMatch, ConvertError> {
        use xm_pb::matcher::on_match::OnMatch as O;
        let xm_pb::matcher::OnMatch {
            keep_matching,
            on_match,
        } = o;
        let then = match on_match {
            Some(O::Matcher(inner)) => {
                cm::Then::Matcher(Box::new(self.matcher(ctx, &path(f, "matcher"), inner)?))
            }
            Some(O::Action(a)) => {
                let (tf, typed) = typed_extension(ctx, &path(f, "action"), a)?;
                if typed.type_name() != STRING_VALUE_TYPE {
                    return Err(ctx.err(
                        &tf,
                        format!(
                            "unsupported filter chain matcher action {} (only {STRING_VALUE_TYPE} naming a filter chain)",
                            typed.type_name()
                        ),
                    ));
                }
                let name: envoy_types::pb::google::protobuf::StringValue =
                    typed.decode().map_err(|e| ctx.err(&tf, e))?;
                let index = self.chains.get(name.value.as_str()).copied();
                if index.is_none() {
                    ctx.warn(
                        &tf,
                        format!(
                            "names no filter chain of the listener ({:?}): connections it matches are closed",
                            name.value
                        ),
                    );
                }
                cm::Then::Chain {
                    name: name.value,
                    index,
                }
            }
            None => return Err(ctx.err(f, "matcher or action is required")),
        };
        Ok(cm::OnMatch {
            keep_matching: *keep_matching,
            then,
        })
    }

    fn predicate(
        &mut self,
        ctx: &mut Ctx<'_>,
        f: &str,
        p: &xm_pb::matcher::matcher_list::Predicate,
    ) -> Result<cm::Predicate, ConvertError> {
        use xm_pb::matcher::matcher_list::predicate::{
            MatchType, PredicateList, SinglePredicate, single_predicate,
        };
        let xm_pb::matcher::matcher_list::Predicate { match_type } = p;
        let mut list = |ctx: &mut Ctx<'_>, name: &str, l: &PredicateList| {
            let PredicateList { predicate } = l;
            if predicate.len() < 2 {
                return Err(ctx.err(
                    format!("{f}.{name}.predicate"),
                    "at least two predicates are required",
                ));
            }
            predicate
                .iter()
                .enumerate()
                .map(|(i, p)| self.predicate(ctx, &format!("{f}.{name}.predicate[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match match_type {
            Some(MatchType::SinglePredicate(s)) => {
                let sf = path(f, "single_predicate");
                let SinglePredicate { input, matcher } = s;
                let input = network_input(ctx, &path(&sf, "input"), input.as_ref())?;
                match matcher {
                    Some(single_predicate::Matcher::ValueMatch(sm)) => {
                        let (matcher, ignore_case) =
                            xds_string_matcher(ctx, &path(&sf, "value_match"), sm)?;
                        cm::Predicate::Single {
                            input,
                            matcher,
                            ignore_case,
                        }
                    }
                    Some(single_predicate::Matcher::CustomMatch(_)) => {
                        return Err(ctx.refused(&SINGLE_PREDICATE, &sf, "custom_match"));
                    }
                    None => return Err(ctx.err(&sf, "value_match or custom_match is required")),
                }
            }
            Some(MatchType::OrMatcher(l)) => cm::Predicate::Or(list(ctx, "or_matcher", l)?),
            Some(MatchType::AndMatcher(l)) => cm::Predicate::And(list(ctx, "and_matcher", l)?),
            Some(MatchType::NotMatcher(n)) => {
                cm::Predicate::Not(Box::new(self.predicate(ctx, &path(f, "not_matcher"), n)?))
            }
            None => return Err(ctx.err(f, "a predicate is required")),
        })
    }
}

/// A `TypedExtensionConfig`'s typed config, with the path to it.
fn typed_extension(
    ctx: &Ctx<'_>,
    f: &str,
    c: &xds_core_pb::TypedExtensionConfig,
) -> Result<(String, Typed), ConvertError> {
    let xds_core_pb::TypedExtensionConfig { name, typed_config } = c;
    // The name is a label; the type selects the extension.
    let _ = name;
    let tf = path(f, "typed_config");
    let any: &Any = typed_config
        .as_ref()
        .ok_or_else(|| ctx.err(&tf, "typed_config is required"))?;
    let typed = Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
    Ok((tf, typed))
}

/// A matcher input: one of the network inputs Ferry knows at chain
/// selection; any other type is refused by name.
fn network_input(
    ctx: &Ctx<'_>,
    f: &str,
    input: Option<&xds_core_pb::TypedExtensionConfig>,
) -> Result<cm::Input, ConvertError> {
    use cm::Input as I;
    let input = input.ok_or_else(|| ctx.err(f, "an input is required"))?;
    let (tf, typed) = typed_extension(ctx, f, input)?;
    let ty = typed.type_name();
    Ok(match ty.strip_prefix(NETWORK_INPUTS) {
        Some("DestinationIPInput") => I::DestinationIp,
        Some("DestinationPortInput") => I::DestinationPort,
        Some("SourceIPInput") => I::SourceIp,
        Some("SourcePortInput") => I::SourcePort,
        Some("DirectSourceIPInput") => I::DirectSourceIp,
        Some("SourceTypeInput") => I::SourceType,
        Some("ServerNameInput") => I::ServerName,
        Some("TransportProtocolInput") => I::TransportProtocol,
        Some("ApplicationProtocolInput") => I::ApplicationProtocol,
        Some("FilterStateInput") => {
            return Err(ctx.err(
                &tf,
                format!(
                    "unsupported matcher input {ty} (envoy.matching.inputs.filter_state): choosing a chain by filter state is not supported"
                ),
            ));
        }
        _ => return Err(ctx.err(&tf, format!("unsupported matcher input {ty}"))),
    })
}

fn xds_cidr(
    ctx: &Ctx<'_>,
    f: &str,
    r: &xds_core_pb::CidrRange,
) -> Result<m::CidrRange, ConvertError> {
    let xds_core_pb::CidrRange {
        address_prefix,
        prefix_len,
    } = r;
    let ip: std::net::IpAddr = address_prefix.parse().map_err(|_| {
        ctx.err(
            path(f, "address_prefix"),
            format!("{address_prefix:?} is not an IP address"),
        )
    })?;
    // Unset is 0, as the proto says (not the address's full length).
    let len = prefix_len.as_ref().map_or(0, |v| v.value);
    u8::try_from(len)
        .ok()
        .and_then(|len| m::CidrRange::new(ip, len))
        .ok_or_else(|| ctx.err(path(f, "prefix_len"), format!("{len} is too long for {ip}")))
}

/// `xds.type.matcher.v3.StringMatcher` and its `ignore_case`.
fn xds_string_matcher(
    ctx: &Ctx<'_>,
    f: &str,
    s: &xm_pb::StringMatcher,
) -> Result<(m::StringMatcher, bool), ConvertError> {
    use xm_pb::string_matcher::MatchPattern as P;
    let xm_pb::StringMatcher {
        ignore_case,
        match_pattern,
    } = s;
    let matcher = match match_pattern {
        Some(P::Exact(v)) => m::StringMatcher::Exact(v.clone()),
        Some(P::Prefix(v)) => m::StringMatcher::Prefix(v.clone()),
        Some(P::Suffix(v)) => m::StringMatcher::Suffix(v.clone()),
        Some(P::Contains(v)) => m::StringMatcher::Contains(v.clone()),
        Some(P::SafeRegex(r)) => {
            let rf = path(f, "safe_regex");
            let xm_pb::RegexMatcher { regex, engine_type } = r;
            // RE2 engine settings have no counterpart here.
            let _ = engine_type;
            m::StringMatcher::Regex(regex::Regex::new(&format!("^(?:{regex})$")).map_err(|e| {
                ctx.err(path(&rf, "regex"), format!("invalid regex {regex:?}: {e}"))
            })?)
        }
        Some(P::Custom(_)) => return Err(ctx.refused(&XDS_STRING_MATCHER, f, "custom")),
        None => return Err(ctx.err(f, "a match pattern is required")),
    };
    Ok((matcher, *ignore_case))
}
