//! Envoy's RBAC protos (`envoy.config.rbac.v3`, the HTTP filter with its
//! `RBACPerRoute`, the network filter) → `ferry_model::rbac`.
//!
//! Everything Istio's AuthorizationPolicy translation emits is accepted.
//! What Ferry cannot evaluate — CEL conditions, the matcher-tree forms
//! (`matcher`, `shadow_matcher`), permission `matcher` extensions, custom
//! principals, route-sourced metadata — is refused with an error naming the
//! field, because silently skipping an authorization rule would change who
//! gets in.

use std::sync::Arc;

use envoy_types::pb::envoy::config::rbac::v3 as rbac_pb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac_pb;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_rbac_pb;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3 as uri_template_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use ferry_model::rbac as mr;

use super::core_types::cidr;
use super::coverage::{fields, path};
use super::matcher::{header_matcher, string_matcher};
use super::{ConvertError, Ctx, Typed};

fields!(pub(super) static HTTP_RBAC = "envoy.extensions.filters.http.rbac.v3.RBAC" {
    "rules": applied,
    "rules_stat_prefix": applied,
    "matcher": refused "the matcher-based RBAC form is not supported; use rules",
    "shadow_rules": applied,
    "shadow_matcher": refused "the matcher-based RBAC form is not supported; use shadow_rules",
    "shadow_rules_stat_prefix": applied,
    "track_per_rule_stats": applied,
});

fields!(pub(super) static RBAC_PER_ROUTE = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute" {
    "rbac": applied "replaces the filter's rules for the route; none turns the filter off there",
});

fields!(pub(super) static NETWORK_RBAC = "envoy.extensions.filters.network.rbac.v3.RBAC" {
    "rules": applied "header rules refused (a connection has no headers)",
    "matcher": refused "the matcher-based RBAC form is not supported; use rules",
    "shadow_rules": applied,
    "shadow_matcher": refused "the matcher-based RBAC form is not supported; use shadow_rules",
    "shadow_rules_stat_prefix": applied,
    "stat_prefix": applied,
    "enforcement_type": applied,
    "delay_deny": applied,
});

fields!(pub(super) static RBAC = "envoy.config.rbac.v3.RBAC" {
    "action": applied,
    "policies": applied,
    "audit_logging_options": warned "RBAC audit loggers are not implemented; decisions are not audited",
});

fields!(pub(super) static POLICY = "envoy.config.rbac.v3.Policy" {
    "permissions": applied,
    "principals": applied,
    "condition": refused "CEL conditions are not supported",
    "checked_condition": refused "CEL conditions are not supported",
    "cel_config": inert "read only with a CEL condition, which is refused",
});

fields!(pub(super) static PERMISSION = "envoy.config.rbac.v3.Permission" {
    "and_rules": applied,
    "or_rules": applied,
    "any": applied "true (false refused)",
    "header": applied,
    "url_path": applied,
    "destination_ip": applied,
    "destination_port": applied,
    "destination_port_range": applied,
    "metadata": applied,
    "not_rule": applied,
    "requested_server_name": applied,
    "matcher": refused "permission matcher extensions are not supported",
    "uri_template": applied,
    "sourced_metadata": applied "DYNAMIC metadata (ROUTE refused)",
});

fields!(pub(super) static PRINCIPAL = "envoy.config.rbac.v3.Principal" {
    "and_ids": applied,
    "or_ids": applied,
    "any": applied "true (false refused)",
    "authenticated": applied,
    "source_ip": applied,
    "direct_remote_ip": applied,
    "remote_ip": applied,
    "header": applied,
    "url_path": applied,
    "metadata": applied,
    "filter_state": applied "string_match on the object as a string (set_filter_state's objects, carried to an internal connection); address_match refused",
    "not_id": applied,
    "sourced_metadata": applied "DYNAMIC metadata (ROUTE refused)",
    "custom": refused "custom principal extensions are not supported",
});

pub(super) const HTTP_RBAC_TYPE: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
pub(super) const HTTP_RBAC_PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
pub(super) const NETWORK_RBAC_TYPE: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";

/// `envoy.extensions.filters.http.rbac.v3.RBAC`.
pub(super) fn http_rbac(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &http_rbac_pb::Rbac,
) -> Result<mr::HttpRbac, ConvertError> {
    let http_rbac_pb::Rbac {
        rules,
        rules_stat_prefix,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix,
        track_per_rule_stats,
    } = p;
    ctx.refuse(&HTTP_RBAC, field, "matcher", matcher.is_some())?;
    ctx.refuse(
        &HTTP_RBAC,
        field,
        "shadow_matcher",
        shadow_matcher.is_some(),
    )?;
    Ok(mr::HttpRbac {
        rules: rules
            .as_ref()
            .map(|r| rbac(ctx, &path(field, "rules"), r))
            .transpose()?,
        shadow_rules: shadow_rules
            .as_ref()
            .map(|r| rbac(ctx, &path(field, "shadow_rules"), r))
            .transpose()?,
        rules_stat_prefix: rules_stat_prefix.clone(),
        shadow_rules_stat_prefix: shadow_rules_stat_prefix.clone(),
        track_per_rule_stats: *track_per_rule_stats,
    })
}

/// `RBACPerRoute`: its `rbac` replaces the filter's rules for the route; an
/// entry without `rbac` turns the filter off there.
pub(super) fn http_rbac_per_route(
    ctx: &mut Ctx<'_>,
    field: &str,
    typed: Typed,
) -> Result<mr::HttpRbac, ConvertError> {
    let p: http_rbac_pb::RbacPerRoute = typed.decode().map_err(|e| ctx.err(field, e))?;
    let http_rbac_pb::RbacPerRoute { rbac } = &p;
    match rbac {
        Some(r) => http_rbac(ctx, &format!("{field}.rbac"), r),
        None => Ok(mr::HttpRbac::default()),
    }
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
pub(super) fn network_rbac(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &net_rbac_pb::Rbac,
) -> Result<mr::NetworkRbac, ConvertError> {
    use net_rbac_pb::rbac::EnforcementType;
    let net_rbac_pb::Rbac {
        rules,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix,
        stat_prefix,
        enforcement_type,
        delay_deny,
    } = p;
    if stat_prefix.is_empty() {
        return Err(ctx.err(
            format!("{field}.stat_prefix"),
            "the network RBAC filter needs a stat_prefix",
        ));
    }
    ctx.refuse(&NETWORK_RBAC, field, "matcher", matcher.is_some())?;
    ctx.refuse(
        &NETWORK_RBAC,
        field,
        "shadow_matcher",
        shadow_matcher.is_some(),
    )?;
    let enforcement = match EnforcementType::try_from(*enforcement_type) {
        Ok(EnforcementType::OneTimeOnFirstByte) => mr::Enforcement::OneTimeOnFirstByte,
        Ok(EnforcementType::Continuous) => mr::Enforcement::Continuous,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.enforcement_type"),
                format!("unknown value {enforcement_type}"),
            ));
        }
    };
    // A connection has no headers: Envoy refuses header rules here rather
    // than let them quietly never (or, inverted, always) match.
    let checked = |ctx: &mut Ctx<'_>, name: &str, r: &Option<rbac_pb::Rbac>| {
        let Some(r) = r else { return Ok(None) };
        let f = format!("{field}.{name}");
        let compiled = rbac(ctx, &f, r)?;
        for p in &compiled.policies {
            if p.permissions.iter().any(permission_has_header)
                || p.principals.iter().any(principal_has_header)
            {
                return Err(ctx.err(
                    format!("{f}.policies[{:?}]", p.name),
                    "header rules are not supported by the network RBAC filter",
                ));
            }
        }
        Ok(Some(compiled))
    };
    Ok(mr::NetworkRbac {
        stat_prefix: stat_prefix.clone(),
        rules: checked(ctx, "rules", rules)?,
        shadow_rules: checked(ctx, "shadow_rules", shadow_rules)?,
        shadow_rules_stat_prefix: shadow_rules_stat_prefix.clone(),
        enforcement,
        delay_deny: super::duration(delay_deny).filter(|d| !d.is_zero()),
    })
}

fn permission_has_header(p: &mr::Permission) -> bool {
    match p {
        mr::Permission::Header(_) => true,
        mr::Permission::And(all) | mr::Permission::Or(all) => all.iter().any(permission_has_header),
        mr::Permission::Not(p) => permission_has_header(p),
        _ => false,
    }
}

fn principal_has_header(p: &mr::Principal) -> bool {
    match p {
        mr::Principal::Header(_) => true,
        mr::Principal::And(all) | mr::Principal::Or(all) => all.iter().any(principal_has_header),
        mr::Principal::Not(p) => principal_has_header(p),
        _ => false,
    }
}

/// `envoy.config.rbac.v3.RBAC`.
fn rbac(ctx: &mut Ctx<'_>, field: &str, r: &rbac_pb::Rbac) -> Result<Arc<mr::Rbac>, ConvertError> {
    use rbac_pb::rbac::Action as A;
    let rbac_pb::Rbac {
        action: action_pb,
        policies: policies_pb,
        audit_logging_options,
    } = r;
    let action = match A::try_from(*action_pb) {
        Ok(A::Allow) => mr::Action::Allow,
        Ok(A::Deny) => mr::Action::Deny,
        Ok(A::Log) => mr::Action::Log,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.action"),
                format!("unknown action {action_pb}"),
            ));
        }
    };
    ctx.knob(
        &RBAC,
        field,
        "audit_logging_options",
        audit_logging_options.is_some(),
    );
    let mut names: Vec<&String> = policies_pb.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let Some(p) = policies_pb.get(name) else {
            continue;
        };
        let pf = format!("{field}.policies[{name:?}]");
        let rbac_pb::Policy {
            permissions: permissions_pb,
            principals: principals_pb,
            condition,
            checked_condition,
            cel_config,
        } = p;
        let _ = cel_config;
        ctx.refuse(&POLICY, &pf, "condition", condition.is_some())?;
        ctx.refuse(
            &POLICY,
            &pf,
            "checked_condition",
            checked_condition.is_some(),
        )?;
        let permissions = permissions_pb
            .iter()
            .enumerate()
            .map(|(i, x)| permission(ctx, &format!("{pf}.permissions[{i}]"), x))
            .collect::<Result<Vec<_>, _>>()?;
        let principals = principals_pb
            .iter()
            .enumerate()
            .map(|(i, x)| principal(ctx, &format!("{pf}.principals[{i}]"), x))
            .collect::<Result<Vec<_>, _>>()?;
        if permissions.is_empty() {
            return Err(ctx.err(
                format!("{pf}.permissions"),
                "a policy needs at least one permission",
            ));
        }
        if principals.is_empty() {
            return Err(ctx.err(
                format!("{pf}.principals"),
                "a policy needs at least one principal",
            ));
        }
        policies.push(mr::Policy {
            name: name.clone(),
            permissions,
            principals,
        });
    }
    Ok(Arc::new(mr::Rbac { action, policies }))
}

fn str_match(
    ctx: &Ctx<'_>,
    field: &str,
    s: &matcher_pb::StringMatcher,
) -> Result<mr::StrMatch, ConvertError> {
    use matcher_pb::string_matcher::MatchPattern as P;
    // Envoy's validation refuses empty prefixes, suffixes and substrings.
    match &s.match_pattern {
        Some(P::Prefix(v)) if v.is_empty() => {
            return Err(ctx.err(format!("{field}.prefix"), "must not be empty"));
        }
        Some(P::Suffix(v)) if v.is_empty() => {
            return Err(ctx.err(format!("{field}.suffix"), "must not be empty"));
        }
        Some(P::Contains(v)) if v.is_empty() => {
            return Err(ctx.err(format!("{field}.contains"), "must not be empty"));
        }
        _ => {}
    }
    Ok(mr::StrMatch {
        matcher: string_matcher(ctx, field, s)?,
        ignore_case: s.ignore_case,
    })
}

fn path_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    p: &matcher_pb::PathMatcher,
) -> Result<mr::StrMatch, ConvertError> {
    match &p.rule {
        Some(matcher_pb::path_matcher::Rule::Path(s)) => {
            str_match(ctx, &format!("{field}.path"), s)
        }
        None => Err(ctx.err(field, "a path matcher needs path")),
    }
}

#[allow(deprecated)] // `metadata` is deprecated for `sourced_metadata` but Istio sends it.
fn permission(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &rbac_pb::Permission,
) -> Result<mr::Permission, ConvertError> {
    use rbac_pb::permission::Rule as R;
    let set = |ctx: &mut Ctx<'_>, f: &str, rules: &[rbac_pb::Permission]| {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| permission(ctx, &format!("{field}.{f}.rules[{i}]"), r))
            .collect::<Result<Vec<_>, _>>()
    };
    let rbac_pb::Permission { rule } = p;
    Ok(match rule {
        Some(R::AndRules(s)) => mr::Permission::And(set(ctx, "and_rules", &s.rules)?),
        Some(R::OrRules(s)) => mr::Permission::Or(set(ctx, "or_rules", &s.rules)?),
        Some(R::Any(true)) => mr::Permission::Any,
        Some(R::Any(false)) => {
            return Err(ctx.err(format!("{field}.any"), "any must be true"));
        }
        Some(R::Header(h)) => {
            mr::Permission::Header(header_matcher(ctx, &format!("{field}.header"), h)?)
        }
        Some(R::UrlPath(u)) => {
            mr::Permission::UrlPath(path_matcher(ctx, &format!("{field}.url_path"), u)?)
        }
        Some(R::DestinationIp(c)) => {
            mr::Permission::DestinationIp(cidr(ctx, &format!("{field}.destination_ip"), c)?)
        }
        Some(R::DestinationPort(port)) => {
            let port = u16::try_from(*port).map_err(|_| {
                ctx.err(
                    format!("{field}.destination_port"),
                    format!("{port} is not a port"),
                )
            })?;
            mr::Permission::DestinationPort(port)
        }
        Some(R::DestinationPortRange(r)) => {
            let f = format!("{field}.destination_port_range");
            let bound = |v: i32, what: &str| {
                u32::try_from(v)
                    .ok()
                    .filter(|v| *v <= 65536)
                    .ok_or_else(|| ctx.err(&f, format!("range {what} {v} is out of bounds")))
            };
            let (start, end) = (bound(r.start, "start")?, bound(r.end, "end")?);
            if start >= end {
                return Err(ctx.err(
                    &f,
                    format!("range start {start} must be below range end {end}"),
                ));
            }
            mr::Permission::DestinationPortRange { start, end }
        }
        Some(R::Metadata(m)) => {
            mr::Permission::Metadata(metadata_matcher(ctx, &format!("{field}.metadata"), m)?)
        }
        Some(R::SourcedMetadata(s)) => mr::Permission::Metadata(sourced_metadata(
            ctx,
            &format!("{field}.sourced_metadata"),
            s,
        )?),
        Some(R::NotRule(n)) => {
            mr::Permission::Not(Box::new(permission(ctx, &format!("{field}.not_rule"), n)?))
        }
        Some(R::RequestedServerName(s)) => mr::Permission::RequestedServerName(str_match(
            ctx,
            &format!("{field}.requested_server_name"),
            s,
        )?),
        Some(R::UriTemplate(t)) => {
            let f = format!("{field}.uri_template");
            let Some(any) = &t.typed_config else {
                return Err(ctx.err(&f, "uri_template needs a typed_config"));
            };
            let typed = Typed::from_any(any).map_err(|e| ctx.err(&f, e))?;
            if typed.type_name()
                != "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
            {
                return Err(ctx.err(
                    format!("{f}.typed_config"),
                    format!("unsupported path matcher {}", typed.type_name()),
                ));
            }
            let c: uri_template_pb::UriTemplateMatchConfig =
                typed.decode().map_err(|e| ctx.err(&f, e))?;
            let re = uri_template(&c.path_template)
                .map_err(|e| ctx.err(format!("{f}.typed_config.path_template"), e))?;
            mr::Permission::UriTemplate(re)
        }
        Some(R::Matcher(_)) => {
            ctx.refuse(&PERMISSION, field, "matcher", true)?;
            return Err(ctx.err(field, "a permission needs a rule"));
        }
        None => return Err(ctx.err(field, "a permission needs a rule")),
    })
}

fn principal(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &rbac_pb::Principal,
) -> Result<mr::Principal, ConvertError> {
    use rbac_pb::principal::Identifier as I;
    let set = |ctx: &mut Ctx<'_>, f: &str, ids: &[rbac_pb::Principal]| {
        ids.iter()
            .enumerate()
            .map(|(i, r)| principal(ctx, &format!("{field}.{f}.ids[{i}]"), r))
            .collect::<Result<Vec<_>, _>>()
    };
    let rbac_pb::Principal { identifier } = p;
    #[allow(deprecated)] // source_ip is deprecated but still sent.
    Ok(match identifier {
        Some(I::AndIds(s)) => mr::Principal::And(set(ctx, "and_ids", &s.ids)?),
        Some(I::OrIds(s)) => mr::Principal::Or(set(ctx, "or_ids", &s.ids)?),
        Some(I::Any(true)) => mr::Principal::Any,
        Some(I::Any(false)) => return Err(ctx.err(format!("{field}.any"), "any must be true")),
        Some(I::Authenticated(a)) => mr::Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(|s| str_match(ctx, &format!("{field}.authenticated.principal_name"), s))
                .transpose()?,
        ),
        Some(I::SourceIp(c)) => {
            mr::Principal::SourceIp(cidr(ctx, &format!("{field}.source_ip"), c)?)
        }
        Some(I::DirectRemoteIp(c)) => {
            mr::Principal::DirectRemoteIp(cidr(ctx, &format!("{field}.direct_remote_ip"), c)?)
        }
        Some(I::RemoteIp(c)) => {
            mr::Principal::RemoteIp(cidr(ctx, &format!("{field}.remote_ip"), c)?)
        }
        Some(I::Header(h)) => {
            mr::Principal::Header(header_matcher(ctx, &format!("{field}.header"), h)?)
        }
        Some(I::UrlPath(u)) => {
            mr::Principal::UrlPath(path_matcher(ctx, &format!("{field}.url_path"), u)?)
        }
        Some(I::Metadata(m)) => {
            mr::Principal::Metadata(metadata_matcher(ctx, &format!("{field}.metadata"), m)?)
        }
        Some(I::SourcedMetadata(s)) => mr::Principal::Metadata(sourced_metadata(
            ctx,
            &format!("{field}.sourced_metadata"),
            s,
        )?),
        Some(I::NotId(n)) => {
            mr::Principal::Not(Box::new(principal(ctx, &format!("{field}.not_id"), n)?))
        }
        // The objects `set_filter_state` stored on the request, or that
        // came with an internal connection (Istio's `io.istio.peer_principal`).
        Some(I::FilterState(f)) => {
            let ff = format!("{field}.filter_state");
            let matcher_pb::FilterStateMatcher { key, matcher } = f;
            use matcher_pb::filter_state_matcher::Matcher as FM;
            match matcher {
                Some(FM::StringMatch(s)) => mr::Principal::FilterState(
                    key.clone(),
                    str_match(ctx, &format!("{ff}.string_match"), s)?,
                ),
                Some(FM::AddressMatch(_)) => {
                    return Err(ctx.err(
                        format!("{ff}.address_match"),
                        "matching a filter state address by CIDR is not supported",
                    ));
                }
                None => return Err(ctx.err(&ff, "a matcher is required")),
            }
        }
        Some(I::Custom(_)) => {
            ctx.refuse(&PRINCIPAL, field, "custom", true)?;
            return Err(ctx.err(field, "a principal needs an identifier"));
        }
        None => return Err(ctx.err(field, "a principal needs an identifier")),
    })
}

fn sourced_metadata(
    ctx: &Ctx<'_>,
    field: &str,
    s: &rbac_pb::SourcedMetadata,
) -> Result<mr::MetadataMatcher, ConvertError> {
    if s.metadata_source != rbac_pb::MetadataSource::Dynamic as i32 {
        return Err(ctx.err(
            format!("{field}.metadata_source"),
            "only DYNAMIC metadata is supported",
        ));
    }
    let Some(m) = &s.metadata_matcher else {
        return Err(ctx.err(
            format!("{field}.metadata_matcher"),
            "a metadata matcher is required",
        ));
    };
    metadata_matcher(ctx, &format!("{field}.metadata_matcher"), m)
}

pub(super) fn metadata_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    m: &matcher_pb::MetadataMatcher,
) -> Result<mr::MetadataMatcher, ConvertError> {
    use matcher_pb::metadata_matcher::path_segment::Segment;
    if m.path.is_empty() {
        return Err(ctx.err(format!("{field}.path"), "a metadata path is required"));
    }
    let path = m
        .path
        .iter()
        .enumerate()
        .map(|(i, s)| match &s.segment {
            Some(Segment::Key(k)) if !k.is_empty() => Ok(k.clone()),
            _ => Err(ctx.err(format!("{field}.path[{i}]"), "a path segment needs a key")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let Some(v) = &m.value else {
        return Err(ctx.err(format!("{field}.value"), "a value matcher is required"));
    };
    Ok(mr::MetadataMatcher {
        filter: m.filter.clone(),
        path,
        value: value_matcher(ctx, &format!("{field}.value"), v)?,
        invert: m.invert,
    })
}

fn value_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    v: &matcher_pb::ValueMatcher,
) -> Result<mr::ValueMatcher, ConvertError> {
    use matcher_pb::double_matcher::MatchPattern as D;
    use matcher_pb::list_matcher::MatchPattern as L;
    use matcher_pb::value_matcher::MatchPattern as P;
    Ok(match &v.match_pattern {
        Some(P::NullMatch(_)) => mr::ValueMatcher::Null,
        Some(P::DoubleMatch(d)) => match &d.match_pattern {
            Some(D::Exact(x)) => mr::ValueMatcher::DoubleExact(*x),
            Some(D::Range(r)) => mr::ValueMatcher::DoubleRange(r.start, r.end),
            None => {
                return Err(ctx.err(
                    format!("{field}.double_match"),
                    "a double matcher needs exact or range",
                ));
            }
        },
        Some(P::StringMatch(s)) => {
            mr::ValueMatcher::String(str_match(ctx, &format!("{field}.string_match"), s)?)
        }
        Some(P::BoolMatch(b)) => mr::ValueMatcher::Bool(*b),
        Some(P::PresentMatch(p)) => mr::ValueMatcher::Present(*p),
        Some(P::ListMatch(l)) => match &l.match_pattern {
            Some(L::OneOf(inner)) => mr::ValueMatcher::ListOneOf(Box::new(value_matcher(
                ctx,
                &format!("{field}.list_match.one_of"),
                inner,
            )?)),
            None => {
                return Err(ctx.err(format!("{field}.list_match"), "a list matcher needs one_of"));
            }
        },
        Some(P::OrMatch(o)) => mr::ValueMatcher::Or(
            o.value_matchers
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    value_matcher(ctx, &format!("{field}.or_match.value_matchers[{i}]"), v)
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => return Err(ctx.err(field, "a value matcher needs a match pattern")),
    })
}

/// Compiles an Envoy URI template (`/api/*/items/{id}`, `/**/x`) into a
/// regex matched against the whole path: `*` is one path segment, `**` any
/// number of them (slashes included), `{name}` one segment and
/// `{name=…}` its own pattern.
fn uri_template(t: &str) -> Result<regex::Regex, String> {
    if !t.starts_with('/') {
        return Err(format!("{t:?} must start with '/'"));
    }
    fn pattern(t: &str, out: &mut String) -> Result<(), String> {
        // Envoy's pchar set: unreserved, sub-delims, ':' and '@', and
        // percent-encodings.
        const SEGMENT: &str = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=]+";
        const SEGMENTS: &str = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=/]*";
        let mut rest = t;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("**") {
                out.push_str(SEGMENTS);
                rest = r;
            } else if let Some(r) = rest.strip_prefix('*') {
                out.push_str(SEGMENT);
                rest = r;
            } else if let Some(r) = rest.strip_prefix('{') {
                let end = r
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{{' in {t:?}"))?;
                let var = &r[..end];
                match var.split_once('=') {
                    Some((_, inner)) => pattern(inner, out)?,
                    None => out.push_str(SEGMENT),
                }
                rest = &r[end + 1..];
            } else {
                let next = rest.find(['*', '{']).unwrap_or(rest.len());
                out.push_str(&regex::escape(&rest[..next]));
                rest = &rest[next..];
            }
        }
        Ok(())
    }
    let mut re = String::from("^");
    pattern(t, &mut re)?;
    re.push('$');
    regex::Regex::new(&re).map_err(|e| format!("invalid template {t:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::uri_template;

    #[test]
    fn uri_templates() {
        let re = uri_template("/path/template/*").unwrap();
        assert!(re.is_match("/path/template/x"));
        assert!(!re.is_match("/path/template/x/y"));
        let re = uri_template("/**/path/template").unwrap();
        assert!(re.is_match("/a/b/path/template"));
        let re = uri_template("/api/{id}/items/{rest=**}").unwrap();
        assert!(re.is_match("/api/7/items/a/b"));
        assert!(!re.is_match("/api/7/8/items/a"));
        assert!(uri_template("no-slash").is_err());
    }
}
