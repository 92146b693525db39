//! VirtualService delegation: a rule with `delegate: {name, namespace}`
//! stands for the delegate VirtualService's HTTP rules, each merged under
//! the parent rule's match as Istio documents it. A delegate's match must
//! narrow the parent's (a longer URI prefix, extra headers); one that
//! contradicts it (another exact URI, another method) never matches and is
//! dropped. Fields the delegate's rule leaves unset (rewrite, timeout,
//! retries, fault, mirror, CORS, headers) come from the parent rule.

use crate::istio::types::networking::{HttpMatchRequest, HttpRoute, StringMatch};

/// The delegate's rule `child` under the parent `rule` and one of its
/// matches (`None` for a parent rule without match). `None` when every
/// match of `child` contradicts the parent's.
pub(super) fn merge(
    rule: &HttpRoute,
    parent: Option<&HttpMatchRequest>,
    child: &HttpRoute,
) -> Option<HttpRoute> {
    let mut out = child.clone();
    out.delegate = None;
    if let Some(pm) = parent {
        if child.match_.is_empty() {
            out.match_ = vec![pm.clone()];
        } else {
            out.match_ = child
                .match_
                .iter()
                .filter_map(|cm| merge_match(pm, cm))
                .collect();
            if out.match_.is_empty() {
                return None;
            }
        }
    }
    out.name = match (&rule.name, &child.name) {
        (Some(p), Some(c)) => Some(format!("{p}-{c}")),
        (p, c) => c.clone().or_else(|| p.clone()),
    };
    macro_rules! inherit {
        ($($f:ident),*) => {$(
            if out.$f.is_none() {
                out.$f.clone_from(&rule.$f);
            }
        )*};
    }
    inherit!(
        rewrite,
        timeout,
        retries,
        fault,
        mirror,
        mirror_percent,
        mirror_percentage,
        cors_policy,
        headers
    );
    Some(out)
}

/// One delegate match under one parent match, or `None` on a conflict.
fn merge_match(parent: &HttpMatchRequest, child: &HttpMatchRequest) -> Option<HttpMatchRequest> {
    let mut m = child.clone();
    m.uri = narrower_uri(parent.uri.as_ref(), child.uri.as_ref())?;
    m.scheme = same(parent.scheme.as_ref(), child.scheme.as_ref())?;
    m.method = same(parent.method.as_ref(), child.method.as_ref())?;
    m.authority = same(parent.authority.as_ref(), child.authority.as_ref())?;
    m.port = match (parent.port, child.port) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => b.or(a),
    };
    m.source_namespace = match (&parent.source_namespace, &child.source_namespace) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => b.clone().or_else(|| a.clone()),
    };
    for (k, v) in &parent.headers {
        match m.headers.get(k) {
            Some(c) if c != v => return None,
            _ => {
                m.headers.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in &parent.query_params {
        match m.query_params.get(k) {
            Some(c) if c != v => return None,
            _ => {
                m.query_params.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in &parent.without_headers {
        m.without_headers
            .entry(k.clone())
            .or_insert_with(|| v.clone());
    }
    for (k, v) in &parent.source_labels {
        match m.source_labels.get(k) {
            Some(c) if c != v => return None,
            _ => {
                m.source_labels.insert(k.clone(), v.clone());
            }
        }
    }
    if m.gateways.is_empty() {
        m.gateways.clone_from(&parent.gateways);
    }
    m.ignore_uri_case |= parent.ignore_uri_case;
    if m.name.is_none() {
        m.name.clone_from(&parent.name);
    }
    Some(m)
}

/// Both set must agree; otherwise whichever is set.
fn same(parent: Option<&StringMatch>, child: Option<&StringMatch>) -> Option<Option<StringMatch>> {
    match (parent, child) {
        (Some(a), Some(b)) if a != b => None,
        (a, b) => Some(b.or(a).cloned()),
    }
}

/// The delegate's URI must fall within the parent's: the same match, an
/// exact path or a longer prefix under the parent's prefix.
fn narrower_uri(
    parent: Option<&StringMatch>,
    child: Option<&StringMatch>,
) -> Option<Option<StringMatch>> {
    let (Some(p), Some(c)) = (parent, child) else {
        return Some(child.or(parent).cloned());
    };
    if p == c {
        return Some(Some(c.clone()));
    }
    let inside = match (&p.prefix, &c.exact, &c.prefix) {
        (Some(pp), Some(e), _) => e.starts_with(pp.as_str()),
        (Some(pp), None, Some(cp)) => cp.starts_with(pp.as_str()),
        _ => false,
    };
    inside.then(|| Some(c.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> Option<StringMatch> {
        Some(StringMatch {
            prefix: Some(p.into()),
            ..Default::default()
        })
    }

    #[test]
    fn delegate_matches_narrow_the_parent() {
        let parent = HttpMatchRequest {
            uri: prefix("/api"),
            ..Default::default()
        };
        let inside = HttpMatchRequest {
            uri: prefix("/api/v1"),
            ..Default::default()
        };
        let outside = HttpMatchRequest {
            uri: prefix("/other"),
            ..Default::default()
        };
        let child = HttpRoute {
            match_: vec![inside.clone(), outside],
            ..Default::default()
        };
        let rule = HttpRoute {
            name: Some("root".into()),
            timeout: Some(crate::istio::types::Duration(
                std::time::Duration::from_secs(3),
            )),
            ..Default::default()
        };
        let merged = merge(&rule, Some(&parent), &child).expect("one match fits");
        assert_eq!(merged.match_, vec![inside]);
        assert_eq!(merged.timeout, rule.timeout);
        assert_eq!(merged.name.as_deref(), Some("root"));
        let only_outside = HttpRoute {
            match_: vec![HttpMatchRequest {
                uri: prefix("/x"),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(merge(&rule, Some(&parent), &only_outside), None);
        // A delegate rule without match inherits the parent's.
        let bare = merge(&rule, Some(&parent), &HttpRoute::default()).expect("bare");
        assert_eq!(bare.match_, vec![parent]);
    }
}
