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

use super::{ConvertError, Ctx, Typed, data_source, header_matcher, regex};

pub(super) const JWT_AUTHN_TYPE: &str =
    "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
pub(super) const JWT_PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";

/// `PerRouteConfig` of a route or virtual host.
pub(super) fn per_route(
    ctx: &Ctx<'_>,
    field: &str,
    typed: Typed,
) -> Result<mj::JwtPerRoute, ConvertError> {
    use pb::per_route_config::RequirementSpecifier as S;
    let p: pb::PerRouteConfig = typed.decode().map_err(|e| ctx.err(field, e))?;
    match p.requirement_specifier {
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
    if p.filter_state_rules.is_some() {
        return Err(ctx.err(
            format!("{field}.filter_state_rules"),
            "filter state rules are not supported",
        ));
    }
    let mut providers = BTreeMap::new();
    // Sorted, so errors and evaluation order do not depend on map order.
    let mut names: Vec<&String> = p.providers.keys().collect();
    names.sort();
    for name in names {
        let pf = format!("{field}.providers[{name:?}]");
        let src = &p.providers[name];
        // Outputs and caches that change no verdict: skipped, said so.
        for (set, f) in [
            (!src.header_in_metadata.is_empty(), "header_in_metadata"),
            (
                !src.failed_status_in_metadata.is_empty(),
                "failed_status_in_metadata",
            ),
            (src.clear_route_cache, "clear_route_cache"),
            (src.jwt_cache_config.is_some(), "jwt_cache_config"),
        ] {
            if set {
                ctx.warn(
                    &format!("{pf}.{f}"),
                    format!("{f} is not supported; ignored"),
                );
            }
        }
        let prov = provider(ctx, &pf, name, src)?;
        providers.insert(name.clone(), Arc::new(prov));
    }
    let mut requirement_map = BTreeMap::new();
    for (name, r) in &p.requirement_map {
        let rf = format!("{field}.requirement_map[{name:?}]");
        requirement_map.insert(name.clone(), requirement(ctx, &rf, r, &providers)?);
    }
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let rf = format!("{field}.rules[{i}]");
        let route_match = rule_match(ctx, &format!("{rf}.match"), r.r#match.as_ref())?;
        use pb::requirement_rule::RequirementType as T;
        let requires = match &r.requirement_type {
            None => None,
            Some(T::Requires(req)) => Some(requirement(
                ctx,
                &format!("{rf}.requires"),
                req,
                &providers,
            )?),
            Some(T::RequirementName(n)) => {
                Some(requirement_map.get(n).cloned().ok_or_else(|| {
                    ctx.err(
                        format!("{rf}.requirement_name"),
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
        bypass_cors_preflight: p.bypass_cors_preflight,
        strip_failure_response: p.strip_failure_response,
    })
}

fn provider(
    ctx: &Ctx<'_>,
    field: &str,
    name: &str,
    p: &pb::JwtProvider,
) -> Result<mj::JwtProvider, ConvertError> {
    use pb::jwt_provider::JwksSourceSpecifier as S;
    let refuse = |f: &str, what: &str| Err(ctx.err(format!("{field}.{f}"), what.to_string()));
    if p.subjects.is_some() {
        return refuse("subjects", "subject constraints are not supported");
    }
    if p.require_expiration {
        return refuse("require_expiration", "require_expiration is not supported");
    }
    if p.max_lifetime.is_some() {
        return refuse("max_lifetime", "max_lifetime is not supported");
    }
    if p.pad_forward_payload_header {
        return refuse(
            "pad_forward_payload_header",
            "a padded payload header is not supported",
        );
    }
    if p.claim_to_headers.iter().any(|c| !c.claim_path.is_empty()) {
        return refuse(
            "claim_to_headers.claim_path",
            "nested claim paths are not supported; use claim_name",
        );
    }
    let jwks_text = match &p.jwks_source_specifier {
        Some(S::LocalJwks(d)) => {
            let lf = format!("{field}.local_jwks");
            let bytes = data_source(ctx, &lf, Some(d))?;
            String::from_utf8(bytes).map_err(|_| ctx.err(&lf, "the JWKS is not UTF-8 text"))?
        }
        Some(S::RemoteJwks(_)) => {
            return refuse(
                "remote_jwks",
                "remote JWKS fetching is not supported; inline the JWKS with local_jwks",
            );
        }
        None => return refuse("local_jwks", "a provider needs local_jwks"),
    };
    let jwks = mj::Jwks::parse(&jwks_text)
        .map_err(|e| ctx.err(format!("{field}.local_jwks"), e.to_string()))?;
    let mut from_headers = Vec::with_capacity(p.from_headers.len());
    for (i, h) in p.from_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            return Err(ctx.err(
                format!("{field}.from_headers[{i}].name"),
                format!("{:?} is not a valid header name", h.name),
            ));
        }
        from_headers.push((h.name.to_ascii_lowercase(), h.value_prefix.clone()));
    }
    let header_name = |f: String, v: &str| -> Result<(), ConvertError> {
        http::HeaderName::from_bytes(v.as_bytes())
            .map(|_| ())
            .map_err(|_| ctx.err(f, format!("{v:?} is not a valid header name")))
    };
    if !p.forward_payload_header.is_empty() {
        header_name(
            format!("{field}.forward_payload_header"),
            &p.forward_payload_header,
        )?;
    }
    let mut claim_to_headers = Vec::new();
    for (i, c) in p.claim_to_headers.iter().enumerate() {
        header_name(
            format!("{field}.claim_to_headers[{i}].header_name"),
            &c.header_name,
        )?;
        claim_to_headers.push((c.claim_name.clone(), c.header_name.to_ascii_lowercase()));
    }
    Ok(mj::JwtProvider {
        name: name.to_string(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        jwks,
        forward: p.forward,
        from_headers,
        from_params: p.from_params.clone(),
        from_cookies: p.from_cookies.clone(),
        payload_in_metadata: (!p.payload_in_metadata.is_empty())
            .then(|| p.payload_in_metadata.clone()),
        space_delimited_claims: p
            .normalize_payload_in_metadata
            .as_ref()
            .map(|n| n.space_delimited_claims.clone())
            .unwrap_or_default(),
        forward_payload_header: (!p.forward_payload_header.is_empty())
            .then(|| p.forward_payload_header.to_ascii_lowercase()),
        claim_to_headers,
        clock_skew: if p.clock_skew_seconds == 0 {
            60
        } else {
            u64::from(p.clock_skew_seconds)
        },
    })
}

fn requirement(
    ctx: &Ctx<'_>,
    field: &str,
    r: &pb::JwtRequirement,
    providers: &BTreeMap<String, Arc<mj::JwtProvider>>,
) -> Result<mj::Requirement, ConvertError> {
    use pb::jwt_requirement::RequiresType as T;
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
    match &r.requires_type {
        Some(T::ProviderName(n)) => known(format!("{field}.provider_name"), n),
        Some(T::ProviderAndAudiences(_)) => Err(ctx.err(
            format!("{field}.provider_and_audiences"),
            "per-requirement audiences are not supported",
        )),
        Some(T::RequiresAny(l)) => Ok(mj::Requirement::Any(list("requires_any", &l.requirements)?)),
        Some(T::RequiresAll(l)) => Ok(mj::Requirement::All(list("requires_all", &l.requirements)?)),
        Some(T::AllowMissing(_)) => Ok(mj::Requirement::AllowMissing),
        Some(T::AllowMissingOrFailed(_)) => Ok(mj::Requirement::AllowMissingOrFailed),
        Some(T::ExtractOnlyWithoutValidation(_)) => Err(ctx.err(
            format!("{field}.extract_only_without_validation"),
            "extraction without validation is not supported",
        )),
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
    let rm = rm.ok_or_else(|| ctx.err(field, "a rule needs a match"))?;
    let path = match &rm.path_specifier {
        Some(P::Prefix(p)) => m::PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => m::PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(re)) => {
            m::PathMatch::Regex(regex(ctx, &format!("{field}.safe_regex"), re)?)
        }
        Some(P::PathSeparatedPrefix(p)) => m::PathMatch::SeparatedPrefix(p.clone()),
        _ => {
            return Err(ctx.err(
                field,
                "unsupported path specifier (prefix, path, safe_regex or path_separated_prefix)",
            ));
        }
    };
    if !rm.query_parameters.is_empty()
        || !rm.dynamic_metadata.is_empty()
        || !rm.cookies.is_empty()
        || rm.grpc.is_some()
        || rm.tls_context.is_some()
        || rm.runtime_fraction.is_some()
    {
        return Err(ctx.err(field, "a JWT rule may match on the path and headers only"));
    }
    let mut headers = Vec::with_capacity(rm.headers.len());
    for (i, h) in rm.headers.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{field}.headers[{i}]"), h)?);
    }
    Ok(m::RouteMatch {
        path,
        case_sensitive: rm.case_sensitive.as_ref().is_none_or(|v| v.value),
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
