//! `envoy.config.route.v3`: `RouteConfiguration`, `VirtualHost`, `Route`,
//! `RouteMatch`, `RouteAction` (weighted clusters, rewrites, hash policies,
//! mirrors) and `RedirectAction`.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use ferry_model as m;

use super::core_types::fraction;
use super::cors::inline_cors;
use super::header_mutation::header_mutations;
use super::local_ratelimit::rate_limits;
use super::matcher::{header_matcher, query_parameter_matcher, regex, regex_rewrite};
use super::per_filter::{PerFilter, per_filter_configs};
use super::retry::retry_policy;
use super::{ConvertError, Ctx, Warnings, duration, timeout_or};

/// A route configuration delivered on its own (RDS).
pub fn route_config(
    rc: &route_pb::RouteConfiguration,
    warnings: &mut Warnings,
) -> Result<m::RouteConfig, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("route_configuration {:?}", rc.name),
        warnings,
        inbound: false,
    };
    route_config_in(&mut ctx, "", rc)
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

pub(super) fn route_config_in(
    ctx: &mut Ctx<'_>,
    field: &str,
    rc: &route_pb::RouteConfiguration,
) -> Result<m::RouteConfig, ConvertError> {
    let table_request = header_mutations(
        ctx,
        &join(field, "request_headers_to_add"),
        &rc.request_headers_to_add,
        &join(field, "request_headers_to_remove"),
        &rc.request_headers_to_remove,
    )?;
    let table_response = header_mutations(
        ctx,
        &join(field, "response_headers_to_add"),
        &rc.response_headers_to_add,
        &join(field, "response_headers_to_remove"),
        &rc.response_headers_to_remove,
    )?;
    let mut vhosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vf = join(field, &format!("virtual_hosts[{i}]"));
        if vh.domains.is_empty() {
            return Err(ctx.err(
                format!("{vf}.domains"),
                format!("virtual host {:?} has no domains", vh.name),
            ));
        }
        let defaults = vhost_defaults(ctx, &vf, vh)?;
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (j, r) in vh.routes.iter().enumerate() {
            let mut rt = route(ctx, &format!("{vf}.routes[{j}]"), r)?;
            defaults.apply(r, &mut rt);
            rt.request_headers
                .ops
                .extend(table_request.ops.iter().cloned());
            rt.response_headers
                .ops
                .extend(table_response.ops.iter().cloned());
            routes.push(rt);
        }
        vhosts.push(m::VirtualHost {
            name: vh.name.clone(),
            domains: vh
                .domains
                .iter()
                .map(|d| m::DomainMatcher::parse(d))
                .collect(),
            routes,
        });
    }
    let mut internal_only_headers = Vec::with_capacity(rc.internal_only_headers.len());
    for (i, h) in rc.internal_only_headers.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    join(field, &format!("internal_only_headers[{i}]")),
                    format!("invalid header name {h:?}"),
                )
            })?;
        internal_only_headers.push(name);
    }
    Ok(m::RouteConfig {
        name: rc.name.clone(),
        internal_only_headers,
        virtual_hosts: vhosts,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
        validate_clusters: rc.validate_clusters.as_ref().is_some_and(|v| v.value),
    })
}

#[allow(deprecated)] // `append` is deprecated but still sent; Envoy honours it.
fn route(ctx: &mut Ctx<'_>, field: &str, r: &route_pb::Route) -> Result<m::Route, ConvertError> {
    use route_pb::route::Action;
    use route_pb::route_match::PathSpecifier as P;
    let rm = r
        .r#match
        .as_ref()
        .ok_or_else(|| ctx.err(format!("{field}.match"), "a route needs a match"))?;
    let mf = format!("{field}.match");
    let path = match &rm.path_specifier {
        Some(P::Prefix(p)) => m::PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => m::PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(re)) => m::PathMatch::Regex(regex(ctx, &format!("{mf}.safe_regex"), re)?),
        Some(P::PathSeparatedPrefix(p)) => m::PathMatch::SeparatedPrefix(p.clone()),
        _ => {
            return Err(ctx.err(
                &mf,
                "unsupported path specifier (prefix, path, safe_regex or path_separated_prefix)",
            ));
        }
    };
    let mut query_parameters = Vec::with_capacity(rm.query_parameters.len());
    for (i, q) in rm.query_parameters.iter().enumerate() {
        query_parameters.push(query_parameter_matcher(
            ctx,
            &format!("{mf}.query_parameters[{i}]"),
            q,
        )?);
    }
    if !rm.dynamic_metadata.is_empty() {
        return Err(ctx.err(
            format!("{mf}.dynamic_metadata"),
            "dynamic metadata matching is not supported (no filter produces dynamic metadata)",
        ));
    }
    if !rm.cookies.is_empty() {
        return Err(ctx.err(
            format!("{mf}.cookies"),
            "cookie matching is not supported yet",
        ));
    }
    if rm.tls_context.is_some() {
        return Err(ctx.err(
            format!("{mf}.tls_context"),
            "TLS context matching is not supported yet",
        ));
    }
    let runtime_fraction = rm
        .runtime_fraction
        .as_ref()
        .map(|rf| fraction(&rf.default_value));
    let mut headers = Vec::with_capacity(rm.headers.len());
    for (i, h) in rm.headers.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{mf}.headers[{i}]"), h)?);
    }
    let action = match &r.action {
        Some(Action::Route(ra)) => route_action(ctx, &format!("{field}.route"), ra)?,
        Some(Action::DirectResponse(d)) => {
            let status =
                http::StatusCode::from_u16(u16::try_from(d.status).unwrap_or(0)).map_err(|_| {
                    ctx.err(
                        format!("{field}.direct_response.status"),
                        format!("{} is not an HTTP status", d.status),
                    )
                })?;
            use core_pb::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(Specifier::InlineString(s)) => Some(s.clone()),
                Some(Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(_) => {
                    return Err(ctx.err(
                        format!("{field}.direct_response.body"),
                        "only inline bodies are supported",
                    ));
                }
                None => None,
            };
            m::RouteAction::DirectResponse { status, body }
        }
        Some(Action::Redirect(rd)) => redirect(ctx, &format!("{field}.redirect"), rd)?,
        _ => return Err(ctx.err(field, "a route needs route, redirect or direct_response")),
    };
    let request_headers = header_mutations(
        ctx,
        &format!("{field}.request_headers_to_add"),
        &r.request_headers_to_add,
        &format!("{field}.request_headers_to_remove"),
        &r.request_headers_to_remove,
    )?;
    let response_headers = header_mutations(
        ctx,
        &format!("{field}.response_headers_to_add"),
        &r.response_headers_to_add,
        &format!("{field}.response_headers_to_remove"),
        &r.response_headers_to_remove,
    )?;
    let per_filter = per_filter_configs(
        ctx,
        &format!("{field}.typed_per_filter_config"),
        &r.typed_per_filter_config,
    )?;
    let inline_cors = match &r.action {
        #[allow(deprecated)]
        Some(Action::Route(ra)) => ra
            .cors
            .as_ref()
            .map(|c| inline_cors(ctx, &format!("{field}.route.cors"), c))
            .transpose()?,
        _ => None,
    };
    Ok(m::Route {
        name: r.name.clone(),
        route_match: m::RouteMatch {
            path,
            case_sensitive: rm.case_sensitive.as_ref().is_none_or(|v| v.value),
            headers,
            query_parameters,
            grpc: rm.grpc.is_some(),
            runtime_fraction,
        },
        action,
        request_headers,
        response_headers,
        fault_overrides: per_filter.fault,
        cors: m::RouteCors {
            per_filter: per_filter.cors,
            inline: inline_cors.into_iter().map(Arc::new).collect(),
        },
        ratelimit_overrides: per_filter.ratelimit,
        rbac_overrides: per_filter.rbac,
        jwt_overrides: per_filter.jwt,
        rate_limits: match &r.action {
            Some(Action::Route(ra)) => {
                rate_limits(ctx, &format!("{field}.route.rate_limits"), &ra.rate_limits)?
            }
            _ => Vec::new(),
        },
        vhost_rate_limits: Arc::default(),
        hash_policy: match &r.action {
            Some(Action::Route(ra)) => hash_policies(ctx, &format!("{field}.route"), ra)?,
            _ => Vec::new(),
        },
    })
}

/// `route.hash_policy`. Filter-state policies name values Ferry has no
/// filter to produce; they never yield a hash, so they are skipped.
fn hash_policies(
    ctx: &Ctx<'_>,
    field: &str,
    ra: &route_pb::RouteAction,
) -> Result<Vec<m::cluster::HashPolicy>, ConvertError> {
    use route_pb::route_action::hash_policy::PolicySpecifier as P;
    let mut out = Vec::with_capacity(ra.hash_policy.len());
    for (i, hp) in ra.hash_policy.iter().enumerate() {
        let f = format!("{field}.hash_policy[{i}]");
        let kind = match &hp.policy_specifier {
            Some(P::Header(h)) => {
                if h.header_name.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.header.header_name"),
                        "a header name is required",
                    ));
                }
                m::cluster::HashPolicyKind::Header(h.header_name.to_ascii_lowercase())
            }
            Some(P::Cookie(c)) => {
                if c.name.is_empty() {
                    return Err(ctx.err(format!("{f}.cookie.name"), "a cookie name is required"));
                }
                m::cluster::HashPolicyKind::Cookie {
                    name: c.name.clone(),
                    ttl: duration(&c.ttl),
                    path: (!c.path.is_empty()).then(|| c.path.clone()),
                }
            }
            Some(P::ConnectionProperties(cp)) if cp.source_ip => {
                m::cluster::HashPolicyKind::SourceIp
            }
            Some(P::ConnectionProperties(_)) | Some(P::FilterState(_)) | None => continue,
            Some(P::QueryParameter(q)) => {
                if q.name.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.query_parameter.name"),
                        "a parameter name is required",
                    ));
                }
                m::cluster::HashPolicyKind::QueryParameter(q.name.clone())
            }
        };
        out.push(m::cluster::HashPolicy {
            kind,
            terminal: hp.terminal,
        });
    }
    Ok(out)
}

fn route_action(
    ctx: &mut Ctx<'_>,
    field: &str,
    ra: &route_pb::RouteAction,
) -> Result<m::RouteAction, ConvertError> {
    use route_pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let cluster = match &ra.cluster_specifier {
        Some(C::Cluster(c)) => m::ClusterSpecifier::Name(c.clone()),
        Some(C::WeightedClusters(wc)) => {
            let mut out = Vec::new();
            for (i, c) in wc.clusters.iter().enumerate() {
                let weight = c.weight.as_ref().map_or(0, |v| v.value);
                if c.name.is_empty() {
                    return Err(ctx.err(
                        format!("{field}.weighted_clusters.clusters[{i}].name"),
                        "cluster name is required",
                    ));
                }
                out.push(m::WeightedCluster {
                    name: c.name.clone(),
                    weight,
                });
            }
            if out.iter().map(|w| u64::from(w.weight)).sum::<u64>() == 0 {
                return Err(ctx.err(
                    format!("{field}.weighted_clusters"),
                    "the weights sum to zero",
                ));
            }
            m::ClusterSpecifier::Weighted(out)
        }
        Some(C::ClusterHeader(h)) => {
            let name =
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    ctx.err(
                        format!("{field}.cluster_header"),
                        format!("{h:?} is not a valid header name"),
                    )
                })?;
            m::ClusterSpecifier::Header(name)
        }
        _ => {
            return Err(ctx.err(
                field,
                "only cluster, weighted_clusters and cluster_header are supported",
            ));
        }
    };
    let host_rewrite = match &ra.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => Some(m::HostRewrite::Literal(h.clone())),
        Some(H::AutoHostRewrite(v)) => v.value.then_some(m::HostRewrite::Auto),
        Some(H::HostRewriteHeader(h)) => Some(m::HostRewrite::Header(
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{field}.host_rewrite_header"),
                    format!("{h:?} is not a valid header name"),
                )
            })?,
        )),
        Some(H::HostRewritePathRegex(r)) => Some(m::HostRewrite::PathRegex(regex_rewrite(
            ctx,
            &format!("{field}.host_rewrite_path_regex"),
            r,
        )?)),
        Some(H::HostRewrite(f)) => Some(m::HostRewrite::Format(
            m::format::HeaderFormat::parse(f)
                .map_err(|e| ctx.err(format!("{field}.host_rewrite"), e))?,
        )),
        None => None,
    };
    let regex_rewrite = ra
        .regex_rewrite
        .as_ref()
        .map(|r| regex_rewrite(ctx, &format!("{field}.regex_rewrite"), r))
        .transpose()?;
    if regex_rewrite.is_some() && !ra.prefix_rewrite.is_empty() {
        return Err(ctx.err(
            format!("{field}.regex_rewrite"),
            "only one of prefix_rewrite and regex_rewrite may be set",
        ));
    }
    if ra.path_rewrite_policy.is_some() {
        return Err(ctx.err(
            format!("{field}.path_rewrite_policy"),
            "path rewrite policies are not supported yet",
        ));
    }
    Ok(m::RouteAction::Route {
        cluster,
        prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        timeout: timeout_or(&ra.timeout, Some(Duration::from_secs(15))),
        retry_policy: ra
            .retry_policy
            .as_ref()
            .map(|p| retry_policy(ctx, &format!("{field}.retry_policy"), p))
            .transpose()?
            .map(Arc::new),
        idle_timeout: timeout_or(&ra.idle_timeout, None),
        mirrors: mirror_policies(
            ctx,
            &format!("{field}.request_mirror_policies"),
            &ra.request_mirror_policies,
        )?,
        max_stream_duration: ra
            .max_stream_duration
            .as_ref()
            .and_then(|m| timeout_or(&m.max_stream_duration, None)),
        attempt_count: m::AttemptCount::default(),
        cluster_not_found: match ra.cluster_not_found_response_code {
            0 => http::StatusCode::SERVICE_UNAVAILABLE,
            1 => http::StatusCode::NOT_FOUND,
            2 => http::StatusCode::INTERNAL_SERVER_ERROR,
            c => {
                return Err(ctx.err(
                    format!("{field}.cluster_not_found_response_code"),
                    format!("unknown response code {c}"),
                ));
            }
        },
    })
}

/// What a virtual host gives the routes that do not set it themselves: its
/// retry policy and mirror policies (a route's own replaces them whole) and
/// its per-filter fault overrides (a route's entry of the same filter wins).
struct VhostDefaults {
    retry_policy: Option<Arc<m::RetryPolicy>>,
    mirrors: Vec<m::MirrorPolicy>,
    attempt_count: m::AttemptCount,
    per_filter: PerFilter,
    inline_cors: Option<Arc<m::cors::CorsPolicy>>,
    request_headers: m::HeaderMutations,
    response_headers: m::HeaderMutations,
    rate_limits: Arc<Vec<m::ratelimit::RateLimitPolicy>>,
}

fn vhost_defaults(
    ctx: &mut Ctx<'_>,
    field: &str,
    vh: &route_pb::VirtualHost,
) -> Result<VhostDefaults, ConvertError> {
    Ok(VhostDefaults {
        retry_policy: vh
            .retry_policy
            .as_ref()
            .map(|p| retry_policy(ctx, &format!("{field}.retry_policy"), p))
            .transpose()?
            .map(Arc::new),
        mirrors: mirror_policies(
            ctx,
            &format!("{field}.request_mirror_policies"),
            &vh.request_mirror_policies,
        )?,
        attempt_count: m::AttemptCount {
            request: vh.include_request_attempt_count,
            response: vh.include_attempt_count_in_response,
        },
        per_filter: per_filter_configs(
            ctx,
            &format!("{field}.typed_per_filter_config"),
            &vh.typed_per_filter_config,
        )?,
        #[allow(deprecated)]
        inline_cors: vh
            .cors
            .as_ref()
            .map(|c| inline_cors(ctx, &format!("{field}.cors"), c))
            .transpose()?
            .map(Arc::new),
        request_headers: header_mutations(
            ctx,
            &format!("{field}.request_headers_to_add"),
            &vh.request_headers_to_add,
            &format!("{field}.request_headers_to_remove"),
            &vh.request_headers_to_remove,
        )?,
        response_headers: header_mutations(
            ctx,
            &format!("{field}.response_headers_to_add"),
            &vh.response_headers_to_add,
            &format!("{field}.response_headers_to_remove"),
            &vh.response_headers_to_remove,
        )?,
        rate_limits: Arc::new(rate_limits(
            ctx,
            &format!("{field}.rate_limits"),
            &vh.rate_limits,
        )?),
    })
}

impl VhostDefaults {
    fn apply(&self, proto: &route_pb::Route, rt: &mut m::Route) {
        use route_pb::route::Action;
        let own = match &proto.action {
            Some(Action::Route(ra)) => Some(ra),
            _ => None,
        };
        if let m::RouteAction::Route {
            retry_policy,
            mirrors,
            attempt_count,
            ..
        } = &mut rt.action
        {
            *attempt_count = self.attempt_count;
            if own.is_some_and(|ra| ra.retry_policy.is_none()) {
                retry_policy.clone_from(&self.retry_policy);
            }
            if mirrors.is_empty() {
                mirrors.clone_from(&self.mirrors);
            }
        }
        for (name, f) in &self.per_filter.fault {
            if !rt.fault_overrides.iter().any(|(n, _)| n == name) {
                rt.fault_overrides.push((name.clone(), f.clone()));
            }
        }
        for (name, f) in &self.per_filter.rbac {
            if !rt.rbac_overrides.iter().any(|(n, _)| n == name) {
                rt.rbac_overrides.push((name.clone(), f.clone()));
            }
        }
        for (name, f) in &self.per_filter.jwt {
            if !rt.jwt_overrides.iter().any(|(n, _)| n == name) {
                rt.jwt_overrides.push((name.clone(), f.clone()));
            }
        }
        for (name, f) in &self.per_filter.ratelimit {
            if !rt.ratelimit_overrides.iter().any(|(n, _)| n == name) {
                rt.ratelimit_overrides.push((name.clone(), f.clone()));
            }
        }
        // CORS settings fall back field by field: the route's policy first,
        // then the virtual host's.
        rt.cors
            .per_filter
            .extend(self.per_filter.cors.iter().cloned());
        rt.cors.inline.extend(self.inline_cors.iter().cloned());
        rt.request_headers
            .ops
            .extend(self.request_headers.ops.iter().cloned());
        rt.response_headers
            .ops
            .extend(self.response_headers.ops.iter().cloned());
        rt.vhost_rate_limits = self.rate_limits.clone();
    }
}

fn mirror_policies(
    ctx: &Ctx<'_>,
    field: &str,
    ps: &[route_pb::route_action::RequestMirrorPolicy],
) -> Result<Vec<m::MirrorPolicy>, ConvertError> {
    let mut out = Vec::with_capacity(ps.len());
    for (i, p) in ps.iter().enumerate() {
        if p.cluster.is_empty() {
            return Err(ctx.err(
                format!("{field}[{i}].cluster"),
                "only a fixed mirror cluster is supported (cluster_header is not)",
            ));
        }
        out.push(m::MirrorPolicy {
            cluster: p.cluster.clone(),
            fraction: match &p.runtime_fraction {
                Some(rf) => fraction(&rf.default_value),
                None => m::Fraction::ALL,
            },
        });
    }
    Ok(out)
}

fn redirect(
    ctx: &Ctx<'_>,
    field: &str,
    rd: &route_pb::RedirectAction,
) -> Result<m::RouteAction, ConvertError> {
    use route_pb::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let status = match rd.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        c => {
            return Err(ctx.err(
                format!("{field}.response_code"),
                format!("unknown response code {c}"),
            ));
        }
    };
    let (path, prefix_rewrite) = match &rd.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None),
        Some(P::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(_) => return Err(ctx.err(field, "regex redirects are not supported yet")),
        None => (None, None),
    };
    Ok(m::RouteAction::Redirect {
        status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::MOVED_PERMANENTLY),
        scheme: match &rd.scheme_rewrite_specifier {
            Some(S::SchemeRedirect(s)) => Some(s.clone()),
            Some(S::HttpsRedirect(true)) => Some("https".into()),
            _ => None,
        },
        host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
        port: (rd.port_redirect != 0).then(|| u16::try_from(rd.port_redirect).unwrap_or(0)),
        path,
        prefix_rewrite,
        strip_query: rd.strip_query,
    })
}
