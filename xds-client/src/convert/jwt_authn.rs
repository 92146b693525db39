//! `envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication` →
//! `ferry_model::jwt`.
//!
//! Providers need a local JWKS (inline or a file, as istiod sends them:
//! it fetches `jwksUri` itself). What Ferry would otherwise verify
//! differently from Envoy — remote JWKS, subject and lifetime constraints,
//! filter-state rules, extraction without validation — is refused with an
//! error naming the field, because a silently weaker check lets requests in.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use ferry_model as m;
use ferry_model::jwt as mj;

use super::core_types::data_source;
use super::coverage::{fields, path};
use super::matcher::{header_matcher, regex};
use super::{ConvertError, Ctx, Typed};

pub(super) const JWT_AUTHN_TYPE: &str =
    "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
pub(super) const JWT_PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";

fields!(pub(super) static JWT_AUTHENTICATION = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication" {
    "providers": applied,
    "rules": applied "the first rule whose match holds gives the requirement",
    "filter_state_rules": refused "filter state rules are not supported",
    "bypass_cors_preflight": applied,
    "requirement_map": applied,
    "strip_failure_response": applied "a failure answers with its status only",
    "stat_prefix": warned "the counters are http.<prefix>.jwt_authn.* without it",
});

fields!(pub(super) static JWT_PROVIDER = "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider" {
    "issuer": applied,
    "audiences": applied,
    "remote_jwks": refused "remote JWKS fetching is not supported; inline the JWKS with local_jwks",
    "local_jwks": applied "inline or a file; required",
    "forward": applied,
    "from_headers": applied,
    "from_params": applied,
    "forward_payload_header": applied,
    "payload_in_metadata": applied "read by the RBAC filters after it",
    "clock_skew_seconds": applied "60 s when 0",
    "pad_forward_payload_header": refused "a padded payload header is not supported",
    "jwt_cache_config": warned "verified tokens are not cached; each request is verified",
    "from_cookies": applied,
    "header_in_metadata": refused "the token's header is not put in the dynamic metadata (policies reading it would not match)",
    "claim_to_headers": applied,
    "failed_status_in_metadata": refused "the failure status is not put in the dynamic metadata (policies reading it would not match)",
    "clear_route_cache": applied "the route is chosen again once claim headers are added (or with payload_in_metadata)",
    "normalize_payload_in_metadata": applied,
    "subjects": refused "subject constraints are not supported",
    "require_expiration": refused "require_expiration is not supported",
    "max_lifetime": refused "max_lifetime is not supported",
});

fields!(pub(super) static JWT_HEADER = "envoy.extensions.filters.http.jwt_authn.v3.JwtHeader" {
    "name": applied,
    "value_prefix": applied,
});

fields!(pub(super) static JWT_CLAIM_TO_HEADER = "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader" {
    "header_name": applied,
    "claim_name": applied,
    "claim_path": refused "nested claim paths are not supported; use claim_name",
});

fields!(pub(super) static NORMALIZE_PAYLOAD = "envoy.extensions.filters.http.jwt_authn.v3.JwtProvider.NormalizePayload" {
    "space_delimited_claims": applied,
});

fields!(pub(super) static JWT_REQUIREMENT = "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement" {
    "provider_name": applied,
    "provider_and_audiences": refused "per-requirement audiences are not supported",
    "requires_any": applied,
    "requires_all": applied,
    "allow_missing_or_failed": applied,
    "allow_missing": applied,
    "extract_only_without_validation": refused "extraction without validation is not supported",
});

fields!(pub(super) static JWT_REQUIREMENT_OR_LIST = "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementOrList" {
    "requirements": applied,
});

fields!(pub(super) static JWT_REQUIREMENT_AND_LIST = "envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementAndList" {
    "requirements": applied,
});

fields!(pub(super) static REQUIREMENT_RULE = "envoy.extensions.filters.http.jwt_authn.v3.RequirementRule" {
    "match": applied,
    "requires": applied,
    "requirement_name": applied,
});

fields!(pub(super) static RULE_MATCH = "envoy.config.route.v3.RouteMatch" ("jwt_authn rule") {
    "prefix": applied,
    "path": applied,
    "safe_regex": applied,
    "path_separated_prefix": applied,
    "connect_matcher": refused "a JWT rule may match on the path and headers only",
    "path_match_policy": refused "a JWT rule may match on the path and headers only",
    "case_sensitive": applied,
    "headers": applied,
    "query_parameters": refused "a JWT rule may match on the path and headers only",
    "grpc": refused "a JWT rule may match on the path and headers only",
    "runtime_fraction": refused "a JWT rule may match on the path and headers only",
    "tls_context": refused "a JWT rule may match on the path and headers only",
    "dynamic_metadata": refused "a JWT rule may match on the path and headers only",
    "filter_state": refused "a JWT rule may match on the path and headers only",
    "cookies": refused "a JWT rule may match on the path and headers only",
});

fields!(pub(super) static PER_ROUTE_CONFIG = "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig" {
    "disabled": applied "the route's requests pass unchecked",
    "requirement_name": applied "a requirement of requirement_map replaces the rules'",
});

/// `PerRouteConfig` of a route or virtual host.
pub(super) fn per_route(
    ctx: &Ctx<'_>,
    field: &str,
    typed: Typed,
) -> Result<mj::JwtPerRoute, ConvertError> {
    use pb::per_route_config::RequirementSpecifier as S;
    let p: pb::PerRouteConfig = typed.decode().map_err(|e| ctx.err(field, e))?;
    let pb::PerRouteConfig {
        requirement_specifier,
    } = p;
    match requirement_specifier {
        Some(S::Disabled(true)) => Ok(mj::JwtPerRoute::Disabled),
        Some(S::RequirementName(n)) if !n.is_empty() => Ok(mj::JwtPerRoute::RequirementName(n)),
        _ => Err(ctx.err(
            field,
            "a PerRouteConfig needs disabled: true or a requirement_name",
        )),
    }
}

/// The filter's configuration.
pub(super) fn jwt_authn(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &pb::JwtAuthentication,
) -> Result<mj::JwtAuthn, ConvertError> {
    let cov = &JWT_AUTHENTICATION;
    let pb::JwtAuthentication {
        providers: providers_pb,
        rules: rules_pb,
        filter_state_rules,
        bypass_cors_preflight,
        requirement_map: requirement_map_pb,
        strip_failure_response,
        stat_prefix,
    } = p;
    ctx.refuse(
        cov,
        field,
        "filter_state_rules",
        filter_state_rules.is_some(),
    )?;
    ctx.knob(cov, field, "stat_prefix", !stat_prefix.is_empty());
    let mut providers = BTreeMap::new();
    // Sorted, so errors and evaluation order do not depend on map order.
    let mut names: Vec<&String> = providers_pb.keys().collect();
    names.sort();
    for name in names {
        let pf = format!("{field}.providers[{name:?}]");
        let prov = provider(ctx, &pf, name, &providers_pb[name])?;
        providers.insert(name.clone(), Arc::new(prov));
    }
    let mut requirement_map = BTreeMap::new();
    let mut names: Vec<&String> = requirement_map_pb.keys().collect();
    names.sort();
    for name in names {
        let rf = format!("{field}.requirement_map[{name:?}]");
        requirement_map.insert(
            name.clone(),
            requirement(ctx, &rf, &requirement_map_pb[name], &providers)?,
        );
    }
    let mut rules = Vec::with_capacity(rules_pb.len());
    for (i, r) in rules_pb.iter().enumerate() {
        let rf = format!("{field}.rules[{i}]");
        let pb::RequirementRule {
            r#match,
            requirement_type,
        } = r;
        let route_match = rule_match(ctx, &path(&rf, "match"), r#match.as_ref())?;
        use pb::requirement_rule::RequirementType as T;
        let requires = match requirement_type {
            None => None,
            Some(T::Requires(req)) => {
                Some(requirement(ctx, &path(&rf, "requires"), req, &providers)?)
            }
            Some(T::RequirementName(n)) => {
                Some(requirement_map.get(n).cloned().ok_or_else(|| {
                    ctx.err(
                        path(&rf, "requirement_name"),
                        format!("{n:?} is not in requirement_map"),
                    )
                })?)
            }
        };
        rules.push(mj::JwtRule {
            route_match,
            requires,
        });
    }
    Ok(mj::JwtAuthn {
        providers,
        rules,
        requirement_map,
        bypass_cors_preflight: *bypass_cors_preflight,
        strip_failure_response: *strip_failure_response,
    })
}

fn provider(
    ctx: &mut Ctx<'_>,
    field: &str,
    name: &str,
    p: &pb::JwtProvider,
) -> Result<mj::JwtProvider, ConvertError> {
    use pb::jwt_provider::JwksSourceSpecifier as S;
    let cov = &JWT_PROVIDER;
    let pb::JwtProvider {
        issuer,
        audiences,
        subjects,
        require_expiration,
        max_lifetime,
        forward,
        from_headers: from_headers_pb,
        from_params,
        from_cookies,
        forward_payload_header,
        pad_forward_payload_header,
        payload_in_metadata,
        normalize_payload_in_metadata,
        header_in_metadata,
        failed_status_in_metadata,
        clock_skew_seconds,
        jwt_cache_config,
        claim_to_headers: claim_to_headers_pb,
        clear_route_cache,
        jwks_source_specifier,
    } = p;
    ctx.refuse(cov, field, "subjects", subjects.is_some())?;
    ctx.refuse(cov, field, "require_expiration", *require_expiration)?;
    ctx.refuse(cov, field, "max_lifetime", max_lifetime.is_some())?;
    ctx.refuse(
        cov,
        field,
        "pad_forward_payload_header",
        *pad_forward_payload_header,
    )?;
    ctx.refuse(
        cov,
        field,
        "header_in_metadata",
        !header_in_metadata.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "failed_status_in_metadata",
        !failed_status_in_metadata.is_empty(),
    )?;
    ctx.knob(cov, field, "jwt_cache_config", jwt_cache_config.is_some());
    let jwks_text = match jwks_source_specifier {
        Some(S::LocalJwks(d)) => {
            let lf = path(field, "local_jwks");
            let bytes = data_source(ctx, &lf, Some(d))?;
            String::from_utf8(bytes).map_err(|_| ctx.err(&lf, "the JWKS is not UTF-8 text"))?
        }
        Some(S::RemoteJwks(_)) => return Err(ctx.refused(cov, field, "remote_jwks")),
        None => return Err(ctx.err(path(field, "local_jwks"), "a provider needs local_jwks")),
    };
    let jwks = mj::Jwks::parse(&jwks_text)
        .map_err(|e| ctx.err(path(field, "local_jwks"), e.to_string()))?;
    let mut from_headers = Vec::with_capacity(from_headers_pb.len());
    for (i, h) in from_headers_pb.iter().enumerate() {
        let pb::JwtHeader { name, value_prefix } = h;
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ctx.err(
                format!("{field}.from_headers[{i}].name"),
                format!("{name:?} is not a valid header name"),
            ));
        }
        from_headers.push((name.to_ascii_lowercase(), value_prefix.clone()));
    }
    let header_name = |f: String, v: &str| -> Result<(), ConvertError> {
        http::HeaderName::from_bytes(v.as_bytes())
            .map(|_| ())
            .map_err(|_| ctx.err(f, format!("{v:?} is not a valid header name")))
    };
    if !forward_payload_header.is_empty() {
        header_name(
            path(field, "forward_payload_header"),
            forward_payload_header,
        )?;
    }
    let mut claim_to_headers = Vec::new();
    for (i, c) in claim_to_headers_pb.iter().enumerate() {
        let cf = format!("{field}.claim_to_headers[{i}]");
        let pb::JwtClaimToHeader {
            header_name: header,
            claim_name,
            claim_path,
        } = c;
        ctx.refuse(
            &JWT_CLAIM_TO_HEADER,
            &cf,
            "claim_path",
            !claim_path.is_empty(),
        )?;
        header_name(path(&cf, "header_name"), header)?;
        claim_to_headers.push((claim_name.clone(), header.to_ascii_lowercase()));
    }
    let space_delimited_claims = match normalize_payload_in_metadata {
        Some(n) => {
            let pb::jwt_provider::NormalizePayload {
                space_delimited_claims,
            } = n;
            space_delimited_claims.clone()
        }
        None => Vec::new(),
    };
    Ok(mj::JwtProvider {
        name: name.to_string(),
        issuer: issuer.clone(),
        audiences: audiences.clone(),
        jwks,
        forward: *forward,
        from_headers,
        from_params: from_params.clone(),
        from_cookies: from_cookies.clone(),
        payload_in_metadata: (!payload_in_metadata.is_empty()).then(|| payload_in_metadata.clone()),
        space_delimited_claims,
        forward_payload_header: (!forward_payload_header.is_empty())
            .then(|| forward_payload_header.to_ascii_lowercase()),
        claim_to_headers,
        clock_skew: if *clock_skew_seconds == 0 {
            60
        } else {
            u64::from(*clock_skew_seconds)
        },
        clear_route_cache: *clear_route_cache,
    })
}

fn requirement(
    ctx: &Ctx<'_>,
    field: &str,
    r: &pb::JwtRequirement,
    providers: &BTreeMap<String, Arc<mj::JwtProvider>>,
) -> Result<mj::Requirement, ConvertError> {
    use pb::jwt_requirement::RequiresType as T;
    let cov = &JWT_REQUIREMENT;
    let pb::JwtRequirement { requires_type } = r;
    let known = |f: String, n: &str| {
        if providers.contains_key(n) {
            Ok(mj::Requirement::Provider(n.to_string()))
        } else {
            Err(ctx.err(f, format!("provider {n:?} is not configured")))
        }
    };
    let list = |f: &str, items: &[pb::JwtRequirement]| {
        items
            .iter()
            .enumerate()
            .map(|(i, r)| requirement(ctx, &format!("{field}.{f}.requirements[{i}]"), r, providers))
            .collect::<Result<Vec<_>, _>>()
    };
    match requires_type {
        Some(T::ProviderName(n)) => known(path(field, "provider_name"), n),
        Some(T::ProviderAndAudiences(_)) => Err(ctx.refused(cov, field, "provider_and_audiences")),
        Some(T::RequiresAny(l)) => {
            let pb::JwtRequirementOrList { requirements } = l;
            Ok(mj::Requirement::Any(list("requires_any", requirements)?))
        }
        Some(T::RequiresAll(l)) => {
            let pb::JwtRequirementAndList { requirements } = l;
            Ok(mj::Requirement::All(list("requires_all", requirements)?))
        }
        Some(T::AllowMissing(_)) => Ok(mj::Requirement::AllowMissing),
        Some(T::AllowMissingOrFailed(_)) => Ok(mj::Requirement::AllowMissingOrFailed),
        Some(T::ExtractOnlyWithoutValidation(_)) => {
            Err(ctx.refused(cov, field, "extract_only_without_validation"))
        }
        None => Err(ctx.err(field, "a requirement needs a type")),
    }
}

/// A rule's `match`: path forms and headers.
fn rule_match(
    ctx: &Ctx<'_>,
    field: &str,
    rm: Option<&route_pb::RouteMatch>,
) -> Result<m::RouteMatch, ConvertError> {
    use route_pb::route_match::PathSpecifier as P;
    let cov = &RULE_MATCH;
    let rm = rm.ok_or_else(|| ctx.err(field, "a rule needs a match"))?;
    let route_pb::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers: headers_pb,
        query_parameters,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
        cookies,
        path_specifier,
    } = rm;
    ctx.refuse(cov, field, "query_parameters", !query_parameters.is_empty())?;
    ctx.refuse(cov, field, "grpc", grpc.is_some())?;
    ctx.refuse(cov, field, "runtime_fraction", runtime_fraction.is_some())?;
    ctx.refuse(cov, field, "tls_context", tls_context.is_some())?;
    ctx.refuse(cov, field, "dynamic_metadata", !dynamic_metadata.is_empty())?;
    ctx.refuse(cov, field, "filter_state", !filter_state.is_empty())?;
    ctx.refuse(cov, field, "cookies", !cookies.is_empty())?;
    let path_match = match path_specifier {
        Some(P::Prefix(p)) => m::PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => m::PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(re)) => m::PathMatch::Regex(regex(ctx, &path(field, "safe_regex"), re)?),
        Some(P::PathSeparatedPrefix(p)) => m::PathMatch::SeparatedPrefix(p.clone()),
        Some(P::ConnectMatcher(_)) => return Err(ctx.refused(cov, field, "connect_matcher")),
        Some(P::PathMatchPolicy(_)) => return Err(ctx.refused(cov, field, "path_match_policy")),
        None => return Err(ctx.err(field, "a rule's match needs a path specifier")),
    };
    let mut headers = Vec::with_capacity(headers_pb.len());
    for (i, h) in headers_pb.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{field}.headers[{i}]"), h)?);
    }
    Ok(m::RouteMatch {
        ignore_path_parameters: false,
        path: path_match,
        case_sensitive: case_sensitive.as_ref().is_none_or(|v| v.value),
        headers,
        query_parameters: Vec::new(),
        grpc: false,
        runtime_fraction: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Warnings;
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};

    const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"k","n":"AQAB","e":"AQAB"}]}"#;

    fn convert(p: &pb::JwtAuthentication) -> Result<mj::JwtAuthn, ConvertError> {
        let mut w = Warnings::default();
        let mut ctx = Ctx {
            resource: "listener in".into(),
            warnings: &mut w,
            inbound: true,
            outbound: false,
        };
        jwt_authn(&mut ctx, "http_filters[0].typed_config", p)
    }

    fn provider(jwks: &str) -> pb::JwtProvider {
        pb::JwtProvider {
            issuer: "iss".into(),
            jwks_source_specifier: Some(pb::jwt_provider::JwksSourceSpecifier::LocalJwks(
                DataSource {
                    specifier: Some(data_source::Specifier::InlineString(jwks.into())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    fn with(p: pb::JwtProvider, requires: pb::JwtRequirement) -> pb::JwtAuthentication {
        pb::JwtAuthentication {
            providers: [("p".to_string(), p)].into_iter().collect(),
            rules: vec![pb::RequirementRule {
                r#match: Some(route_pb::RouteMatch {
                    path_specifier: Some(route_pb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                requirement_type: Some(pb::requirement_rule::RequirementType::Requires(requires)),
            }],
            ..Default::default()
        }
    }

    fn by_name(n: &str) -> pb::JwtRequirement {
        pb::JwtRequirement {
            requires_type: Some(pb::jwt_requirement::RequiresType::ProviderName(n.into())),
        }
    }

    #[test]
    fn providers_rules_and_defaults() {
        let cfg = convert(&with(provider(JWKS), by_name("p"))).expect("converts");
        let p = &cfg.providers["p"];
        assert_eq!(p.clock_skew, 60);
        assert_eq!(p.jwks.keys.len(), 1);
        assert_eq!(p.header_locations(), [("authorization", "Bearer ")]);
        assert_eq!(p.param_locations(), ["access_token"]);
        assert_eq!(
            cfg.rules[0].requires,
            Some(mj::Requirement::Provider("p".into()))
        );
    }

    #[test]
    fn what_would_verify_differently_is_refused_by_field() {
        let field = |p: &pb::JwtAuthentication| convert(p).expect_err("refused").field;
        let mut remote = provider(JWKS);
        remote.jwks_source_specifier = Some(pb::jwt_provider::JwksSourceSpecifier::RemoteJwks(
            pb::RemoteJwks::default(),
        ));
        assert_eq!(
            field(&with(remote, by_name("p"))),
            "http_filters[0].typed_config.providers[\"p\"].remote_jwks"
        );
        assert_eq!(
            field(&with(provider("{}"), by_name("p"))),
            "http_filters[0].typed_config.providers[\"p\"].local_jwks"
        );
        let mut subjects = provider(JWKS);
        subjects.require_expiration = true;
        assert!(field(&with(subjects, by_name("p"))).ends_with(".require_expiration"));
        assert_eq!(
            field(&with(provider(JWKS), by_name("nobody"))),
            "http_filters[0].typed_config.rules[0].requires.provider_name"
        );
        let unknown_name = pb::JwtAuthentication {
            rules: vec![pb::RequirementRule {
                r#match: Some(route_pb::RouteMatch {
                    path_specifier: Some(route_pb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                requirement_type: Some(pb::requirement_rule::RequirementType::RequirementName(
                    "missing".into(),
                )),
            }],
            ..with(provider(JWKS), by_name("p"))
        };
        assert_eq!(
            field(&unknown_name),
            "http_filters[0].typed_config.rules[0].requirement_name"
        );
    }
}
