//! Matchers: `type.matcher.v3` string and regex matchers,
//! `RegexMatchAndSubstitute`, and the route `HeaderMatcher` and
//! `QueryParameterMatcher` that routes, RBAC, the fault filter and rate
//! limits share.

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use ferry_model as m;

use super::{ConvertError, Ctx};

pub(super) fn regex(
    ctx: &Ctx<'_>,
    field: &str,
    r: &matcher_pb::RegexMatcher,
) -> Result<regex::Regex, ConvertError> {
    // Envoy's safe_regex must match the whole value (RE2 full match).
    regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| {
        ctx.err(
            format!("{field}.regex"),
            format!("invalid regex {:?}: {e}", r.regex),
        )
    })
}

pub(super) fn string_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    s: &matcher_pb::StringMatcher,
) -> Result<m::StringMatcher, ConvertError> {
    use matcher_pb::string_matcher::MatchPattern as P;
    Ok(match &s.match_pattern {
        Some(P::Exact(v)) => m::StringMatcher::Exact(v.clone()),
        Some(P::Prefix(v)) => m::StringMatcher::Prefix(v.clone()),
        Some(P::Suffix(v)) => m::StringMatcher::Suffix(v.clone()),
        Some(P::Contains(v)) => m::StringMatcher::Contains(v.clone()),
        Some(P::SafeRegex(r)) => {
            m::StringMatcher::Regex(regex(ctx, &format!("{field}.safe_regex"), r)?)
        }
        _ => return Err(ctx.err(field, "unsupported string matcher")),
    })
}

#[allow(deprecated)] // Envoy still sends the deprecated forms; both are honoured.
pub(super) fn header_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    h: &route_pb::HeaderMatcher,
) -> Result<m::HeaderMatcher, ConvertError> {
    use route_pb::header_matcher::HeaderMatchSpecifier as S;
    let name = m::HeaderKey::parse(&h.name).ok_or_else(|| {
        ctx.err(
            format!("{field}.name"),
            format!("{:?} is not a valid header name", h.name),
        )
    })?;
    let mut present = true;
    let mut ignore_case = false;
    let matcher = match &h.header_match_specifier {
        None => None,
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
            return Err(ctx.err(
                format!("{field}.range_match"),
                "range_match is not supported yet",
            ));
        }
    };
    Ok(m::HeaderMatcher {
        name,
        matcher,
        ignore_case,
        invert: h.invert_match,
        present,
    })
}

pub(super) fn query_parameter_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    q: &route_pb::QueryParameterMatcher,
) -> Result<m::QueryParameterMatcher, ConvertError> {
    use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
    if q.name.is_empty() {
        return Err(ctx.err(format!("{field}.name"), "a parameter name is required"));
    }
    let kind = match &q.query_parameter_match_specifier {
        None => m::QueryMatch::Present,
        Some(Q::PresentMatch(p)) => m::QueryMatch::PresentMatch(*p),
        Some(Q::StringMatch(sm)) => m::QueryMatch::String {
            matcher: string_matcher(ctx, &format!("{field}.string_match"), sm)?,
            ignore_case: sm.ignore_case,
        },
    };
    Ok(m::QueryParameterMatcher {
        name: q.name.clone(),
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
    let pattern = r
        .pattern
        .as_ref()
        .ok_or_else(|| ctx.err(format!("{field}.pattern"), "a pattern is required"))?;
    let re = regex::Regex::new(&pattern.regex).map_err(|e| {
        ctx.err(
            format!("{field}.pattern.regex"),
            format!("invalid regex {:?}: {e}", pattern.regex),
        )
    })?;
    let substitution = re2_substitution(&r.substitution, re.captures_len())
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
