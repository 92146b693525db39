//! Matchers: `type.matcher.v3` string and regex matchers,
//! `RegexMatchAndSubstitute`, and the route `HeaderMatcher` and
//! `QueryParameterMatcher` that routes, RBAC, the fault filter and rate
//! limits share.

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use ferry_model as m;

use super::coverage::fields;
use super::{ConvertError, Ctx};

fields!(pub(super) static STRING_MATCHER = "envoy.type.matcher.v3.StringMatcher" {
    "exact": applied,
    "prefix": applied,
    "suffix": applied,
    "safe_regex": applied,
    "contains": applied,
    "custom": refused "custom string matchers are not supported",
    "ignore_case": applied,
});

fields!(pub(super) static REGEX_MATCHER = "envoy.type.matcher.v3.RegexMatcher" {
    "google_re2": inert "RE2 engine settings: the regex crate has no program-size limit to set",
    "regex": applied "RE2 syntax, the whole value must match",
});

fields!(pub(super) static REGEX_MATCH_AND_SUBSTITUTE = "envoy.type.matcher.v3.RegexMatchAndSubstitute" {
    "pattern": applied,
    "substitution": applied,
});

fields!(pub(super) static HEADER_MATCHER = "envoy.config.route.v3.HeaderMatcher" {
    "name": applied "pseudo-headers :method, :path, :authority, :scheme included",
    "exact_match": applied "an empty value matches any value, as Envoy",
    "safe_regex_match": applied,
    "range_match": refused "range matching is not supported",
    "present_match": applied,
    "prefix_match": applied,
    "suffix_match": applied,
    "contains_match": applied,
    "string_match": applied,
    "invert_match": applied "an absent header matches no value matcher, inverted or not, as Envoy",
    "treat_missing_header_as_empty": applied,
});

fields!(pub(super) static QUERY_PARAMETER_MATCHER = "envoy.config.route.v3.QueryParameterMatcher" {
    "name": applied,
    "string_match": applied,
    "present_match": applied,
});

pub(super) fn regex(
    ctx: &Ctx<'_>,
    field: &str,
    r: &matcher_pb::RegexMatcher,
) -> Result<regex::Regex, ConvertError> {
    #[allow(deprecated)]
    let matcher_pb::RegexMatcher { regex, engine_type } = r;
    // Engine settings (RE2's program size) have no counterpart here.
    let _ = engine_type;
    // Envoy's safe_regex must match the whole value (RE2 full match).
    regex::Regex::new(&format!("^(?:{regex})$")).map_err(|e| {
        ctx.err(
            format!("{field}.regex"),
            format!("invalid regex {regex:?}: {e}"),
        )
    })
}

pub(super) fn string_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    s: &matcher_pb::StringMatcher,
) -> Result<m::StringMatcher, ConvertError> {
    use matcher_pb::string_matcher::MatchPattern as P;
    // `ignore_case` is read by the callers, which keep it beside the matcher.
    let matcher_pb::StringMatcher {
        ignore_case: _,
        match_pattern,
    } = s;
    Ok(match match_pattern {
        Some(P::Exact(v)) => m::StringMatcher::Exact(v.clone()),
        Some(P::Prefix(v)) => m::StringMatcher::Prefix(v.clone()),
        Some(P::Suffix(v)) => m::StringMatcher::Suffix(v.clone()),
        Some(P::Contains(v)) => m::StringMatcher::Contains(v.clone()),
        Some(P::SafeRegex(r)) => {
            m::StringMatcher::Regex(regex(ctx, &format!("{field}.safe_regex"), r)?)
        }
        Some(P::Custom(_)) => {
            ctx.refuse(&STRING_MATCHER, field, "custom", true)?;
            m::StringMatcher::Exact(String::new())
        }
        None => return Err(ctx.err(field, "a match pattern is required")),
    })
}

#[allow(deprecated)] // Envoy still sends the deprecated forms; both are honoured.
pub(super) fn header_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    h: &route_pb::HeaderMatcher,
) -> Result<m::HeaderMatcher, ConvertError> {
    use route_pb::header_matcher::HeaderMatchSpecifier as S;
    let route_pb::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = h;
    let key = m::HeaderKey::parse(name).ok_or_else(|| {
        ctx.err(
            format!("{field}.name"),
            format!("{name:?} is not a valid header name"),
        )
    })?;
    let mut present = true;
    let mut ignore_case = false;
    let matcher = match header_match_specifier {
        None => None,
        // Envoy: an empty exact value matches any value of a present header.
        Some(S::ExactMatch(v)) if v.is_empty() => Some(m::StringMatcher::Prefix(String::new())),
        Some(S::ExactMatch(v)) => Some(m::StringMatcher::Exact(v.clone())),
        Some(S::PrefixMatch(v)) => Some(m::StringMatcher::Prefix(v.clone())),
        Some(S::SuffixMatch(v)) => Some(m::StringMatcher::Suffix(v.clone())),
        Some(S::ContainsMatch(v)) => Some(m::StringMatcher::Contains(v.clone())),
        Some(S::SafeRegexMatch(r)) => Some(m::StringMatcher::Regex(regex(
            ctx,
            &format!("{field}.safe_regex_match"),
            r,
        )?)),
        Some(S::PresentMatch(p)) => {
            present = *p;
            None
        }
        Some(S::StringMatch(s)) => {
            ignore_case = s.ignore_case;
            Some(string_matcher(ctx, &format!("{field}.string_match"), s)?)
        }
        Some(S::RangeMatch(_)) => {
            ctx.refuse(&HEADER_MATCHER, field, "range_match", true)?;
            None
        }
    };
    Ok(m::HeaderMatcher {
        name: key,
        matcher,
        ignore_case,
        invert: *invert_match,
        present,
        treat_missing_as_empty: *treat_missing_header_as_empty,
    })
}

pub(super) fn query_parameter_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    q: &route_pb::QueryParameterMatcher,
) -> Result<m::QueryParameterMatcher, ConvertError> {
    use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
    let route_pb::QueryParameterMatcher {
        name,
        query_parameter_match_specifier,
    } = q;
    if name.is_empty() {
        return Err(ctx.err(format!("{field}.name"), "a parameter name is required"));
    }
    let kind = match query_parameter_match_specifier {
        None => m::QueryMatch::Present,
        Some(Q::PresentMatch(p)) => m::QueryMatch::PresentMatch(*p),
        Some(Q::StringMatch(sm)) => m::QueryMatch::String {
            matcher: string_matcher(ctx, &format!("{field}.string_match"), sm)?,
            ignore_case: sm.ignore_case,
        },
    };
    Ok(m::QueryParameterMatcher {
        name: name.clone(),
        kind,
    })
}

/// `RegexMatchAndSubstitute`: the pattern is searched (not anchored) and
/// every match replaced; RE2's `\N` group references become `${N}`.
pub(super) fn regex_rewrite(
    ctx: &Ctx<'_>,
    field: &str,
    r: &matcher_pb::RegexMatchAndSubstitute,
) -> Result<m::RegexRewrite, ConvertError> {
    let matcher_pb::RegexMatchAndSubstitute {
        pattern,
        substitution,
    } = r;
    let pattern = pattern
        .as_ref()
        .ok_or_else(|| ctx.err(format!("{field}.pattern"), "a pattern is required"))?;
    let re = regex::Regex::new(&pattern.regex).map_err(|e| {
        ctx.err(
            format!("{field}.pattern.regex"),
            format!("invalid regex {:?}: {e}", pattern.regex),
        )
    })?;
    let substitution = re2_substitution(substitution, re.captures_len())
        .map_err(|e| ctx.err(format!("{field}.substitution"), e))?;
    Ok(m::RegexRewrite {
        pattern: re,
        substitution,
    })
}

/// RE2's rewrite string (`\0`..`\9`, `\\`) in the `regex` crate's
/// syntax (`${N}`, `$$` for a literal `$`).
fn re2_substitution(s: &str, groups: usize) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some(d) if d.is_ascii_digit() => {
                    let n = d as usize - '0' as usize;
                    if n >= groups {
                        return Err(format!(
                            "{s:?} refers to group {n}, the pattern has {} groups",
                            groups - 1
                        ));
                    }
                    out.push_str(&format!("${{{n}}}"));
                }
                _ => return Err(format!("{s:?}: a '\\' must be followed by a digit or '\\'")),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}
