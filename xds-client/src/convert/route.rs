//! `envoy.config.route.v3`: `RouteConfiguration`, `VirtualHost`, `Route`,
//! `RouteMatch`, `RouteAction` (weighted clusters, rewrites, hash policies,
//! mirrors, upgrades), `HedgePolicy` and `RedirectAction`.
//!
//! What a route table, a virtual host and a route each set is folded into
//! the routes as Envoy resolves it: the route's own setting first, then its
//! virtual host's, then the table's (header mutations, per-filter
//! overrides, mirror policies, retry policies, body buffer limits).

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use ferry_model as m;

use super::core_types::DATA_SOURCE;
use super::cors::inline_cors;
use super::coverage::{Coverage, fields, path};
use super::header_mutation::header_mutations;
use super::local_ratelimit::rate_limits;
use super::matcher::{header_matcher, query_parameter_matcher, regex, regex_rewrite};
use super::per_filter::per_filter_configs;
use super::retry::retry_policy;
use super::{ConvertError, Ctx, Warnings, duration, timeout_or};

fields!(pub(super) static ROUTE_CONFIGURATION = "envoy.config.route.v3.RouteConfiguration" {
    "name": applied,
    "virtual_hosts": applied,
    "vhds": refused "on-demand virtual hosts (VHDS) are not supported",
    "internal_only_headers": applied "removed from requests that are not internal",
    "response_headers_to_add": applied,
    "response_headers_to_remove": applied,
    "request_headers_to_add": applied,
    "request_headers_to_remove": applied,
    "most_specific_header_mutations_wins": applied,
    "validate_clusters": applied,
    "max_direct_response_body_size_bytes": applied "a longer direct response body is refused (default 4096)",
    "cluster_specifier_plugins": refused "cluster specifier plugins are not supported",
    "request_mirror_policies": applied "the mirrors of virtual hosts and routes that set none",
    "ignore_port_in_host_matching": applied,
    "ignore_path_parameters_in_path_matching": applied,
    "typed_per_filter_config": applied "the least specific per-filter overrides",
    "metadata": inert "route metadata is read only by extensions Ferry does not run",
    "vhost_header": refused "choosing the virtual host by another header than :authority is not supported",
    "route_specifiers": refused "route specifier extensions are not supported",
});

fields!(pub(super) static VIRTUAL_HOST = "envoy.config.route.v3.VirtualHost" {
    "name": applied,
    "domains": applied,
    "routes": applied,
    "require_tls": applied "301 to https when x-forwarded-proto is not https (EXTERNAL_ONLY: unless x-envoy-internal)",
    "virtual_clusters": warned "virtual cluster statistics are not kept",
    "rate_limits": applied,
    "request_headers_to_add": applied,
    "cors": applied,
    "response_headers_to_add": applied,
    "response_headers_to_remove": applied,
    "request_headers_to_remove": applied,
    "include_request_attempt_count": applied,
    "typed_per_filter_config": applied,
    "retry_policy": applied "for the routes without their own",
    "hedge_policy": applied "only the default, no hedging (see HedgePolicy)",
    "per_request_buffer_limit_bytes": applied "the request body kept for retries and mirrors",
    "include_attempt_count_in_response": applied,
    "retry_policy_typed_config": refused "retry policy extensions are not supported",
    "matcher": refused "matcher-tree virtual hosts are not supported",
    "request_mirror_policies": applied "for the routes without their own",
    "include_is_timeout_retry_header": refused "x-envoy-is-timeout-retry is not added",
    "metadata": inert "route metadata is read only by extensions Ferry does not run",
    "request_body_buffer_limit": applied "the request body kept for retries and mirrors",
    "route_specifiers": refused "route specifier extensions are not supported",
});

fields!(pub(super) static ROUTE = "envoy.config.route.v3.Route" {
    "name": applied,
    "match": applied,
    "route": applied,
    "redirect": applied,
    "direct_response": applied,
    "filter_action": refused "filter actions are not supported",
    "non_forwarding_action": refused "non-forwarding actions are not supported",
    "metadata": inert "route metadata is read only by extensions Ferry does not run",
    "decorator": applied "the operation name of the route's spans",
    "request_headers_to_add": applied,
    "response_headers_to_add": applied,
    "response_headers_to_remove": applied,
    "request_headers_to_remove": applied,
    "typed_per_filter_config": applied,
    "tracing": refused "per-route tracing overrides are not supported",
    "per_request_buffer_limit_bytes": applied "the request body kept for retries and mirrors",
    "stat_prefix": warned "per-route statistics are not kept",
    "request_body_buffer_limit": applied "the request body kept for retries and mirrors",
    "route_specifiers": refused "route specifier extensions are not supported",
});

fields!(pub(super) static ROUTE_MATCH = "envoy.config.route.v3.RouteMatch" {
    "prefix": applied,
    "path": applied,
    "safe_regex": applied,
    "path_separated_prefix": applied,
    "connect_matcher": applied "CONNECT requests only; no other path matcher but an empty prefix matches a CONNECT",
    "path_match_policy": refused "path match extensions (URI templates) are not supported on routes",
    "case_sensitive": applied,
    "headers": applied,
    "query_parameters": applied,
    "grpc": applied,
    "runtime_fraction": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "tls_context": refused "TLS context matching is not supported",
    "dynamic_metadata": refused "dynamic metadata matching is not supported (no filter of Ferry's produces it)",
    "filter_state": refused "matching routes on filter state is not supported",
    "cookies": refused "cookie matching is not supported",
});

fields!(pub(super) static ROUTE_ACTION = "envoy.config.route.v3.RouteAction" {
    "cluster": applied,
    "cluster_header": applied,
    "weighted_clusters": applied,
    "cluster_specifier_plugin": refused "cluster specifier plugins are not supported",
    "inline_cluster_specifier_plugin": refused "cluster specifier plugins are not supported",
    "cluster_not_found_response_code": applied,
    "metadata_match": refused "subset load balancing (metadata_match under envoy.lb) is not supported",
    "prefix_rewrite": applied,
    "regex_rewrite": applied,
    "path_rewrite_policy": refused "path rewrite extensions are not supported",
    "path_rewrite": refused "path_rewrite is not supported",
    "host_rewrite_literal": applied,
    "auto_host_rewrite": applied,
    "host_rewrite_header": applied,
    "host_rewrite_path_regex": applied,
    "host_rewrite": applied,
    "append_x_forwarded_host": applied,
    "timeout": applied,
    "idle_timeout": applied,
    "flush_timeout": warned "the response is flushed as it comes",
    "early_data_policy": inert "early data is never accepted (no HTTP/3, no TLS 0-RTT)",
    "retry_policy": applied,
    "retry_policy_typed_config": refused "retry policy extensions are not supported",
    "request_mirror_policies": applied,
    "priority": refused "HIGH routing priority is not supported (DEFAULT thresholds apply)",
    "rate_limits": applied,
    "include_vh_rate_limits": refused "use the local rate limit filter's vh_rate_limits",
    "hash_policy": applied,
    "cors": applied,
    "max_grpc_timeout": applied "a gRPC request's timeout is its grpc-timeout, capped (0: no cap)",
    "grpc_timeout_offset": applied "subtracted from grpc-timeout when it leaves some time",
    "upgrade_configs": applied "only the listed types pass; CONNECT with connect_config is terminated here",
    "internal_redirect_policy": refused "internal redirects are not supported",
    "internal_redirect_action": refused "internal redirects are not supported",
    "max_internal_redirects": inert "read only with internal redirects, which are refused",
    "hedge_policy": applied "only the default, no hedging (see HedgePolicy)",
    "max_stream_duration": applied,
});

fields!(pub(super) static MAX_STREAM_DURATION = "envoy.config.route.v3.RouteAction.MaxStreamDuration" {
    "max_stream_duration": applied,
    "grpc_timeout_header_max": applied "a gRPC request's grpc-timeout, capped (0: no cap), is its maximum stream duration",
    "grpc_timeout_header_offset": applied "subtracted from grpc-timeout when it leaves some time",
});

fields!(pub(super) static UPGRADE_CONFIG = "envoy.config.route.v3.RouteAction.UpgradeConfig" {
    "upgrade_type": applied,
    "enabled": applied,
    "connect_config": applied "CONNECT only: the request is answered 200 once a TCP connection to the cluster is open, its bytes carried both ways",
});

fields!(pub(super) static CONNECT_CONFIG = "envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig" {
    "proxy_protocol_config": refused "a PROXY protocol header on terminated CONNECT streams is not supported",
    "allow_post": refused "terminating POST as CONNECT is not supported",
});

fields!(pub(super) static WEIGHTED_CLUSTER = "envoy.config.route.v3.WeightedCluster" {
    "clusters": applied,
    "total_weight": applied "the weights must add up to it",
    "runtime_key_prefix": inert "there is no runtime layer: the configured weights apply, as in Envoy without runtime overrides",
    "header_name": applied "its number, when the header holds one, picks the cluster",
    "use_hash_policy": refused "picking the cluster with the hash policy is not supported",
});

fields!(pub(super) static CLUSTER_WEIGHT = "envoy.config.route.v3.WeightedCluster.ClusterWeight" {
    "name": applied,
    "cluster_header": refused "a weighted cluster needs a name (cluster_header is not supported)",
    "weight": applied,
    "metadata_match": refused "subset load balancing (metadata_match under envoy.lb) is not supported",
    "request_headers_to_add": applied "before the route's",
    "request_headers_to_remove": applied "before the route's",
    "response_headers_to_add": applied "before the route's",
    "response_headers_to_remove": applied "before the route's",
    "typed_per_filter_config": applied "more specific than the route's",
    "host_rewrite_literal": applied,
});

fields!(pub(super) static HEDGE_POLICY = "envoy.config.route.v3.HedgePolicy" {
    "initial_requests": refused "request hedging is not supported",
    "additional_request_chance": refused "request hedging is not supported",
    "hedge_on_per_try_timeout": refused "request hedging is not supported",
});

fields!(pub(super) static MIRROR_POLICY = "envoy.config.route.v3.RouteAction.RequestMirrorPolicy" {
    "cluster": applied,
    "cluster_header": refused "only a fixed mirror cluster is supported",
    "runtime_fraction": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "trace_sampled": inert "read only with tracing",
    "disable_shadow_host_suffix_append": applied,
    "request_headers_mutations": refused "header mutations of mirrored requests are not supported",
    "host_rewrite_literal": applied,
});

fields!(pub(super) static REDIRECT_ACTION = "envoy.config.route.v3.RedirectAction" {
    "https_redirect": applied,
    "scheme_redirect": applied,
    "host_redirect": applied,
    "port_redirect": applied,
    "path_redirect": applied,
    "prefix_rewrite": applied,
    "regex_rewrite": refused "regex redirects are not supported",
    "path_rewrite": refused "path_rewrite redirects are not supported",
    "response_code": applied,
    "strip_query": applied,
});

fields!(pub(super) static DIRECT_RESPONSE = "envoy.config.route.v3.DirectResponseAction" {
    "status": applied,
    "body": applied "inline bodies (files and environment variables refused)",
    "body_format": refused "formatted direct response bodies are not supported",
});

fields!(pub(super) static HASH_POLICY = "envoy.config.route.v3.RouteAction.HashPolicy" {
    "header": applied "header_name (regex_rewrite refused)",
    "cookie": applied "name, ttl, path (attributes refused)",
    "connection_properties": applied "source_ip",
    "query_parameter": applied,
    "filter_state": applied "the request's hashable object under the key (set_filter_state's hashable strings and addresses); none, no hash",
    "terminal": applied,
});

/// Envoy's default `max_direct_response_body_size_bytes`.
const MAX_DIRECT_RESPONSE_BODY: u32 = 4096;

/// A route configuration delivered on its own (RDS).
pub fn route_config(
    rc: &route_pb::RouteConfiguration,
    warnings: &mut Warnings,
) -> Result<m::RouteConfig, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("route_configuration {:?}", rc.name),
        warnings,
        inbound: false,
        outbound: false,
    };
    route_config_in(&mut ctx, "", rc)
}

/// What a route table gives each of its routes.
struct TableDefaults {
    request_headers: m::HeaderMutations,
    response_headers: m::HeaderMutations,
    filters: m::FilterOverrides,
    mirrors: Vec<m::MirrorPolicy>,
    /// `most_specific_header_mutations_wins`.
    most_specific_wins: bool,
    ignore_path_parameters: bool,
    max_direct_response_body: u32,
}

pub(super) fn route_config_in(
    ctx: &mut Ctx<'_>,
    field: &str,
    rc: &route_pb::RouteConfiguration,
) -> Result<m::RouteConfig, ConvertError> {
    let cov = &ROUTE_CONFIGURATION;
    let route_pb::RouteConfiguration {
        name,
        virtual_hosts,
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        validate_clusters,
        max_direct_response_body_size_bytes,
        cluster_specifier_plugins,
        request_mirror_policies,
        ignore_port_in_host_matching,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        metadata,
        vhost_header,
        route_specifiers,
    } = rc;
    let _ = metadata;
    ctx.refuse(cov, field, "vhds", vhds.is_some())?;
    ctx.refuse(
        cov,
        field,
        "cluster_specifier_plugins",
        !cluster_specifier_plugins.is_empty(),
    )?;
    ctx.refuse(cov, field, "vhost_header", !vhost_header.is_empty())?;
    ctx.refuse(cov, field, "route_specifiers", !route_specifiers.is_empty())?;
    let table = TableDefaults {
        request_headers: header_mutations(
            ctx,
            &path(field, "request_headers_to_add"),
            request_headers_to_add,
            &path(field, "request_headers_to_remove"),
            request_headers_to_remove,
        )?,
        response_headers: header_mutations(
            ctx,
            &path(field, "response_headers_to_add"),
            response_headers_to_add,
            &path(field, "response_headers_to_remove"),
            response_headers_to_remove,
        )?,
        filters: per_filter_configs(
            ctx,
            &path(field, "typed_per_filter_config"),
            typed_per_filter_config,
        )?,
        mirrors: mirror_policies(
            ctx,
            &path(field, "request_mirror_policies"),
            request_mirror_policies,
        )?,
        most_specific_wins: *most_specific_header_mutations_wins,
        ignore_path_parameters: *ignore_path_parameters_in_path_matching,
        max_direct_response_body: max_direct_response_body_size_bytes
            .as_ref()
            .map_or(MAX_DIRECT_RESPONSE_BODY, |v| v.value),
    };
    let mut vhosts = Vec::with_capacity(virtual_hosts.len());
    for (i, vh) in virtual_hosts.iter().enumerate() {
        vhosts.push(virtual_host(
            ctx,
            &path(field, &format!("virtual_hosts[{i}]")),
            vh,
            &table,
        )?);
    }
    let mut internal_only = Vec::with_capacity(internal_only_headers.len());
    for (i, h) in internal_only_headers.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    path(field, &format!("internal_only_headers[{i}]")),
                    format!("invalid header name {h:?}"),
                )
            })?;
        internal_only.push(name);
    }
    Ok(m::RouteConfig {
        name: name.clone(),
        internal_only_headers: internal_only,
        virtual_hosts: vhosts,
        ignore_port_in_host_matching: *ignore_port_in_host_matching,
        validate_clusters: validate_clusters.as_ref().is_some_and(|v| v.value),
    })
}

/// What a virtual host gives the routes that do not set it themselves.
struct VhostDefaults {
    retry_policy: Option<Arc<m::RetryPolicy>>,
    mirrors: Vec<m::MirrorPolicy>,
    attempt_count: m::AttemptCount,
    filters: m::FilterOverrides,
    inline_cors: Option<Arc<m::cors::CorsPolicy>>,
    request_headers: m::HeaderMutations,
    response_headers: m::HeaderMutations,
    rate_limits: Arc<Vec<m::ratelimit::RateLimitPolicy>>,
    body_buffer_limit: Option<u64>,
}

#[allow(deprecated)] // `cors` and `per_request_buffer_limit_bytes` are still sent.
fn virtual_host(
    ctx: &mut Ctx<'_>,
    field: &str,
    vh: &route_pb::VirtualHost,
    table: &TableDefaults,
) -> Result<m::VirtualHost, ConvertError> {
    use route_pb::virtual_host::TlsRequirementType as T;
    let cov = &VIRTUAL_HOST;
    let route_pb::VirtualHost {
        name,
        domains,
        routes,
        matcher,
        require_tls,
        virtual_clusters,
        rate_limits: vh_rate_limits,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy: vh_retry_policy,
        retry_policy_typed_config,
        hedge_policy: vh_hedge_policy,
        include_is_timeout_retry_header,
        per_request_buffer_limit_bytes,
        request_body_buffer_limit,
        request_mirror_policies,
        metadata,
        route_specifiers,
    } = vh;
    let _ = metadata;
    if domains.is_empty() {
        return Err(ctx.err(
            path(field, "domains"),
            format!("virtual host {name:?} has no domains"),
        ));
    }
    ctx.refuse(cov, field, "matcher", matcher.is_some())?;
    ctx.knob(cov, field, "virtual_clusters", !virtual_clusters.is_empty());
    ctx.refuse(
        cov,
        field,
        "retry_policy_typed_config",
        retry_policy_typed_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "include_is_timeout_retry_header",
        *include_is_timeout_retry_header,
    )?;
    ctx.refuse(cov, field, "route_specifiers", !route_specifiers.is_empty())?;
    hedge_policy(ctx, &path(field, "hedge_policy"), vh_hedge_policy.as_ref())?;
    let require_tls = match T::try_from(*require_tls) {
        Ok(T::None) => m::TlsRequirement::None,
        Ok(T::ExternalOnly) => m::TlsRequirement::ExternalOnly,
        Ok(T::All) => m::TlsRequirement::All,
        Err(_) => {
            return Err(ctx.err(
                path(field, "require_tls"),
                format!("unknown TLS requirement {require_tls}"),
            ));
        }
    };
    let mirrors = mirror_policies(
        ctx,
        &path(field, "request_mirror_policies"),
        request_mirror_policies,
    )?;
    let defaults = VhostDefaults {
        retry_policy: vh_retry_policy
            .as_ref()
            .map(|p| retry_policy(ctx, &path(field, "retry_policy"), p))
            .transpose()?
            .map(Arc::new),
        // A virtual host without mirrors inherits the table's.
        mirrors: if mirrors.is_empty() {
            table.mirrors.clone()
        } else {
            mirrors
        },
        attempt_count: m::AttemptCount {
            request: *include_request_attempt_count,
            response: *include_attempt_count_in_response,
        },
        filters: per_filter_configs(
            ctx,
            &path(field, "typed_per_filter_config"),
            typed_per_filter_config,
        )?,
        inline_cors: cors
            .as_ref()
            .map(|c| inline_cors(ctx, &path(field, "cors"), c))
            .transpose()?
            .map(Arc::new),
        request_headers: header_mutations(
            ctx,
            &path(field, "request_headers_to_add"),
            request_headers_to_add,
            &path(field, "request_headers_to_remove"),
            request_headers_to_remove,
        )?,
        response_headers: header_mutations(
            ctx,
            &path(field, "response_headers_to_add"),
            response_headers_to_add,
            &path(field, "response_headers_to_remove"),
            response_headers_to_remove,
        )?,
        rate_limits: Arc::new(rate_limits(
            ctx,
            &path(field, "rate_limits"),
            vh_rate_limits,
        )?),
        body_buffer_limit: body_buffer_limit(
            request_body_buffer_limit.as_ref(),
            per_request_buffer_limit_bytes.as_ref(),
        ),
    };
    let mut out = Vec::with_capacity(routes.len());
    for (j, r) in routes.iter().enumerate() {
        let mut rt = route(ctx, &format!("{field}.routes[{j}]"), r, table)?;
        defaults.apply(r, &mut rt, table);
        out.push(rt);
    }
    Ok(m::VirtualHost {
        name: name.clone(),
        domains: domains.iter().map(|d| m::DomainMatcher::parse(d)).collect(),
        routes: out,
        require_tls,
    })
}

/// The request body bound of a route or virtual host: the newer
/// `request_body_buffer_limit` wins over `per_request_buffer_limit_bytes`.
fn body_buffer_limit(
    newer: Option<&envoy_types::pb::google::protobuf::UInt64Value>,
    older: Option<&envoy_types::pb::google::protobuf::UInt32Value>,
) -> Option<u64> {
    newer
        .map(|v| v.value)
        .or_else(|| older.map(|v| u64::from(v.value)))
}

/// A hedge policy: accepted only when it hedges nothing (Envoy's defaults:
/// one initial request, no additional chance, no hedging on per-try
/// timeouts).
fn hedge_policy(
    ctx: &Ctx<'_>,
    field: &str,
    h: Option<&route_pb::HedgePolicy>,
) -> Result<(), ConvertError> {
    let Some(h) = h else { return Ok(()) };
    let cov = &HEDGE_POLICY;
    let route_pb::HedgePolicy {
        initial_requests,
        additional_request_chance,
        hedge_on_per_try_timeout,
    } = h;
    ctx.refuse(
        cov,
        field,
        "initial_requests",
        initial_requests.as_ref().is_some_and(|v| v.value > 1),
    )?;
    ctx.refuse(
        cov,
        field,
        "additional_request_chance",
        additional_request_chance
            .as_ref()
            .is_some_and(|f| f.numerator > 0),
    )?;
    ctx.refuse(
        cov,
        field,
        "hedge_on_per_try_timeout",
        *hedge_on_per_try_timeout,
    )?;
    Ok(())
}

#[allow(deprecated)] // `per_request_buffer_limit_bytes` is still sent.
fn route(
    ctx: &mut Ctx<'_>,
    field: &str,
    r: &route_pb::Route,
    table: &TableDefaults,
) -> Result<m::Route, ConvertError> {
    use route_pb::route::Action;
    let cov = &ROUTE;
    let route_pb::Route {
        name,
        r#match,
        metadata,
        decorator,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        tracing,
        per_request_buffer_limit_bytes,
        stat_prefix,
        request_body_buffer_limit,
        route_specifiers,
        action,
    } = r;
    // Route metadata is read by no filter Ferry runs; the decorator and
    // the refused tracing overrides are read by `trace::decorator`.
    let _ = (metadata, decorator, tracing);
    let decorator = super::trace::decorator(ctx, field, r)?;
    ctx.knob(cov, field, "stat_prefix", !stat_prefix.is_empty());
    ctx.refuse(cov, field, "route_specifiers", !route_specifiers.is_empty())?;
    let rm = r#match
        .as_ref()
        .ok_or_else(|| ctx.err(path(field, "match"), "a route needs a match"))?;
    let route_match = route_match(ctx, &path(field, "match"), rm, table)?;
    let mut rate = Vec::new();
    let mut hash = Vec::new();
    let mut inline = None;
    let mut upgrades = Vec::new();
    let mut connect_terminate = false;
    let action = match action {
        Some(Action::Route(ra)) => {
            let af = path(field, "route");
            rate = rate_limits(ctx, &path(&af, "rate_limits"), &ra.rate_limits)?;
            hash = hash_policies(ctx, &af, &ra.hash_policy)?;
            inline = ra
                .cors
                .as_ref()
                .map(|c| inline_cors(ctx, &path(&af, "cors"), c))
                .transpose()?;
            (upgrades, connect_terminate) = upgrade_configs(ctx, &af, &ra.upgrade_configs)?;
            route_action(ctx, &af, ra)?
        }
        Some(Action::DirectResponse(d)) => {
            direct_response(ctx, &path(field, "direct_response"), d, table)?
        }
        Some(Action::Redirect(rd)) => redirect(ctx, &path(field, "redirect"), rd)?,
        Some(Action::FilterAction(_)) => {
            ctx.refuse(cov, field, "filter_action", true)?;
            unreachable_action()
        }
        Some(Action::NonForwardingAction(_)) => {
            ctx.refuse(cov, field, "non_forwarding_action", true)?;
            unreachable_action()
        }
        None => return Err(ctx.err(field, "a route needs route, redirect or direct_response")),
    };
    let request_headers = header_mutations(
        ctx,
        &path(field, "request_headers_to_add"),
        request_headers_to_add,
        &path(field, "request_headers_to_remove"),
        request_headers_to_remove,
    )?;
    let response_headers = header_mutations(
        ctx,
        &path(field, "response_headers_to_add"),
        response_headers_to_add,
        &path(field, "response_headers_to_remove"),
        response_headers_to_remove,
    )?;
    let filters = per_filter_configs(
        ctx,
        &path(field, "typed_per_filter_config"),
        typed_per_filter_config,
    )?;
    Ok(m::Route {
        name: name.clone(),
        route_match,
        action,
        request_headers,
        response_headers,
        fault_overrides: filters.fault,
        cors: m::RouteCors {
            per_filter: filters.cors,
            inline: inline.into_iter().map(Arc::new).collect(),
        },
        ratelimit_overrides: filters.ratelimit,
        rbac_overrides: filters.rbac,
        jwt_overrides: filters.jwt,
        ext_authz_overrides: filters.ext_authz,
        compressor_overrides: filters.compressor,
        rate_limits: rate,
        vhost_rate_limits: Arc::default(),
        hash_policy: hash,
        upgrades,
        connect_terminate,
        request_body_buffer_limit: body_buffer_limit(
            request_body_buffer_limit.as_ref(),
            per_request_buffer_limit_bytes.as_ref(),
        ),
        decorator,
    })
}

/// The placeholder after a refusal that always returns: never built.
fn unreachable_action() -> m::RouteAction {
    m::RouteAction::DirectResponse {
        status: http::StatusCode::INTERNAL_SERVER_ERROR,
        body: None,
    }
}

fn route_match(
    ctx: &mut Ctx<'_>,
    field: &str,
    rm: &route_pb::RouteMatch,
    table: &TableDefaults,
) -> Result<m::RouteMatch, ConvertError> {
    use route_pb::route_match::PathSpecifier as P;
    let cov = &ROUTE_MATCH;
    let route_pb::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers,
        query_parameters,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
        cookies,
        path_specifier,
    } = rm;
    let path_match = match path_specifier {
        Some(P::Prefix(p)) => m::PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => m::PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(re)) => m::PathMatch::Regex(regex(ctx, &path(field, "safe_regex"), re)?),
        Some(P::PathSeparatedPrefix(p)) => m::PathMatch::SeparatedPrefix(p.clone()),
        Some(P::ConnectMatcher(route_pb::route_match::ConnectMatcher {})) => m::PathMatch::Connect,
        Some(P::PathMatchPolicy(_)) => {
            ctx.refuse(cov, field, "path_match_policy", true)?;
            m::PathMatch::Prefix(String::new())
        }
        None => {
            return Err(ctx.err(
                field,
                "a path specifier is required (prefix, path, safe_regex or path_separated_prefix)",
            ));
        }
    };
    ctx.refuse(cov, field, "tls_context", tls_context.is_some())?;
    ctx.refuse(cov, field, "dynamic_metadata", !dynamic_metadata.is_empty())?;
    ctx.refuse(cov, field, "filter_state", !filter_state.is_empty())?;
    ctx.refuse(cov, field, "cookies", !cookies.is_empty())?;
    let mut qs = Vec::with_capacity(query_parameters.len());
    for (i, q) in query_parameters.iter().enumerate() {
        qs.push(query_parameter_matcher(
            ctx,
            &format!("{field}.query_parameters[{i}]"),
            q,
        )?);
    }
    let mut hs = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        hs.push(header_matcher(ctx, &format!("{field}.headers[{i}]"), h)?);
    }
    Ok(m::RouteMatch {
        path: path_match,
        ignore_path_parameters: table.ignore_path_parameters,
        case_sensitive: case_sensitive.as_ref().is_none_or(|v| v.value),
        headers: hs,
        query_parameters: qs,
        grpc: grpc.is_some(),
        runtime_fraction: super::core_types::runtime_fraction(runtime_fraction),
    })
}

fn direct_response(
    ctx: &Ctx<'_>,
    field: &str,
    d: &route_pb::DirectResponseAction,
    table: &TableDefaults,
) -> Result<m::RouteAction, ConvertError> {
    use core_pb::data_source::Specifier;
    let cov = &DIRECT_RESPONSE;
    let route_pb::DirectResponseAction {
        status,
        body,
        body_format,
    } = d;
    ctx.refuse(cov, field, "body_format", body_format.is_some())?;
    let code = http::StatusCode::from_u16(u16::try_from(*status).unwrap_or(0))
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()))
        .ok_or_else(|| {
            ctx.err(
                path(field, "status"),
                format!("{status} is not an HTTP status in [200, 600)"),
            )
        })?;
    let specifier = match body {
        Some(core_pb::DataSource {
            watched_directory,
            specifier,
        }) => {
            ctx.refuse(
                &DATA_SOURCE,
                &path(field, "body"),
                "watched_directory",
                watched_directory.is_some(),
            )?;
            specifier.as_ref()
        }
        None => None,
    };
    let body = match specifier {
        Some(Specifier::InlineString(s)) => Some(s.clone()),
        Some(Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(_) => {
            return Err(ctx.err(path(field, "body"), "only inline bodies are supported"));
        }
        None => None,
    };
    if let Some(b) = &body
        && b.len() > table.max_direct_response_body as usize
    {
        // Envoy's wording for a body over max_direct_response_body_size_bytes.
        return Err(ctx.err(
            path(field, "body"),
            format!(
                "response body size is {} bytes; maximum is {}",
                b.len(),
                table.max_direct_response_body
            ),
        ));
    }
    Ok(m::RouteAction::DirectResponse { status: code, body })
}

/// `route.upgrade_configs`: the route's verdict per upgrade type, and
/// whether an enabled CONNECT is terminated here (`connect_config`).
fn upgrade_configs(
    ctx: &Ctx<'_>,
    field: &str,
    ucs: &[route_pb::route_action::UpgradeConfig],
) -> Result<(Vec<(String, bool)>, bool), ConvertError> {
    let mut out: Vec<(String, bool)> = Vec::with_capacity(ucs.len());
    let mut terminate = false;
    for (i, uc) in ucs.iter().enumerate() {
        let uf = format!("{field}.upgrade_configs[{i}]");
        let route_pb::route_action::UpgradeConfig {
            upgrade_type,
            enabled,
            connect_config,
        } = uc;
        let t = upgrade_type.to_ascii_lowercase();
        let enabled = enabled.as_ref().is_none_or(|v| v.value);
        if let Some(cc) = connect_config {
            // Envoy: "Non-CONNECT upgrade type … has ConnectConfig".
            if t != "connect" {
                return Err(ctx.err(
                    path(&uf, "connect_config"),
                    format!("Non-CONNECT upgrade type {upgrade_type} has ConnectConfig"),
                ));
            }
            let route_pb::route_action::upgrade_config::ConnectConfig {
                proxy_protocol_config,
                allow_post,
            } = cc;
            let cf = path(&uf, "connect_config");
            ctx.refuse(
                &CONNECT_CONFIG,
                &cf,
                "proxy_protocol_config",
                proxy_protocol_config.is_some(),
            )?;
            ctx.refuse(&CONNECT_CONFIG, &cf, "allow_post", *allow_post)?;
            terminate = enabled;
        }
        if out.iter().any(|(u, _)| *u == t) {
            return Err(ctx.err(
                path(&uf, "upgrade_type"),
                format!("Duplicate upgrade {upgrade_type}"),
            ));
        }
        out.push((t, enabled));
    }
    Ok((out, terminate))
}

/// `route.hash_policy`.
fn hash_policies(
    ctx: &Ctx<'_>,
    field: &str,
    policies: &[route_pb::route_action::HashPolicy],
) -> Result<Vec<m::cluster::HashPolicy>, ConvertError> {
    use route_pb::route_action::hash_policy::PolicySpecifier as P;
    let mut out = Vec::with_capacity(policies.len());
    for (i, hp) in policies.iter().enumerate() {
        let f = format!("{field}.hash_policy[{i}]");
        let route_pb::route_action::HashPolicy {
            terminal,
            policy_specifier,
        } = hp;
        let kind = match policy_specifier {
            Some(P::Header(h)) => {
                let route_pb::route_action::hash_policy::Header {
                    header_name,
                    regex_rewrite,
                } = h;
                if header_name.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.header.header_name"),
                        "a header name is required",
                    ));
                }
                if regex_rewrite.is_some() {
                    return Err(ctx.err(
                        format!("{f}.header.regex_rewrite"),
                        "rewriting the hashed header is not supported",
                    ));
                }
                m::cluster::HashPolicyKind::Header(header_name.to_ascii_lowercase())
            }
            Some(P::Cookie(c)) => {
                let route_pb::route_action::hash_policy::Cookie {
                    name,
                    ttl,
                    path: cookie_path,
                    attributes,
                } = c;
                if name.is_empty() {
                    return Err(ctx.err(format!("{f}.cookie.name"), "a cookie name is required"));
                }
                if !attributes.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.cookie.attributes"),
                        "attributes of generated cookies are not supported",
                    ));
                }
                m::cluster::HashPolicyKind::Cookie {
                    name: name.clone(),
                    ttl: duration(ttl),
                    path: (!cookie_path.is_empty()).then(|| cookie_path.clone()),
                }
            }
            Some(P::ConnectionProperties(cp)) => {
                let route_pb::route_action::hash_policy::ConnectionProperties { source_ip } = cp;
                // Without source_ip it hashes nothing, as in Envoy.
                if !source_ip {
                    continue;
                }
                m::cluster::HashPolicyKind::SourceIp
            }
            Some(P::QueryParameter(q)) => {
                let route_pb::route_action::hash_policy::QueryParameter { name } = q;
                if name.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.query_parameter.name"),
                        "a parameter name is required",
                    ));
                }
                m::cluster::HashPolicyKind::QueryParameter(name.clone())
            }
            Some(P::FilterState(fs)) => {
                let route_pb::route_action::hash_policy::FilterState { key } = fs;
                if key.is_empty() {
                    return Err(ctx.err(format!("{f}.filter_state.key"), "a key is required"));
                }
                m::cluster::HashPolicyKind::FilterState(key.clone())
            }
            None => continue,
        };
        out.push(m::cluster::HashPolicy {
            kind,
            terminal: *terminal,
        });
    }
    Ok(out)
}

/// Refuses a `metadata_match` that selects a subset (`envoy.lb` criteria);
/// Envoy ignores one without them.
fn metadata_match(
    ctx: &Ctx<'_>,
    cov: &Coverage,
    field: &str,
    md: Option<&core_pb::Metadata>,
) -> Result<(), ConvertError> {
    let selects = md
        .and_then(|md| md.filter_metadata.get("envoy.lb"))
        .is_some_and(|s| !s.fields.is_empty());
    ctx.refuse(cov, field, "metadata_match", selects)
}

#[allow(deprecated)] // Envoy still accepts the deprecated fields; each is handled.
fn route_action(
    ctx: &mut Ctx<'_>,
    field: &str,
    ra: &route_pb::RouteAction,
) -> Result<m::RouteAction, ConvertError> {
    use route_pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let cov = &ROUTE_ACTION;
    let route_pb::RouteAction {
        cluster_not_found_response_code,
        metadata_match: md_match,
        prefix_rewrite,
        regex_rewrite: rx_rewrite,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        timeout,
        idle_timeout,
        flush_timeout,
        early_data_policy,
        retry_policy: ra_retry_policy,
        retry_policy_typed_config,
        request_mirror_policies,
        priority,
        // Read by `route`, beside the action.
        rate_limits: _,
        include_vh_rate_limits,
        hash_policy: _,
        cors: _,
        upgrade_configs: _,
        max_grpc_timeout,
        grpc_timeout_offset,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy: ra_hedge_policy,
        max_stream_duration,
        cluster_specifier,
        host_rewrite_specifier,
    } = ra;
    // Only read with internal redirects, refused below.
    let _ = (max_internal_redirects, early_data_policy);
    metadata_match(ctx, cov, field, md_match.as_ref())?;
    ctx.refuse(
        cov,
        field,
        "path_rewrite_policy",
        path_rewrite_policy.is_some(),
    )?;
    ctx.refuse(cov, field, "path_rewrite", !path_rewrite.is_empty())?;
    ctx.knob(cov, field, "flush_timeout", flush_timeout.is_some());
    ctx.refuse(
        cov,
        field,
        "retry_policy_typed_config",
        retry_policy_typed_config.is_some(),
    )?;
    // RoutingPriority: DEFAULT = 0, HIGH = 1.
    ctx.refuse(cov, field, "priority", *priority != 0)?;
    ctx.refuse(
        cov,
        field,
        "include_vh_rate_limits",
        include_vh_rate_limits.as_ref().is_some_and(|v| v.value),
    )?;
    ctx.refuse(
        cov,
        field,
        "internal_redirect_policy",
        internal_redirect_policy.is_some(),
    )?;
    // InternalRedirectAction: PASS_THROUGH = 0.
    ctx.refuse(
        cov,
        field,
        "internal_redirect_action",
        *internal_redirect_action != 0,
    )?;
    hedge_policy(ctx, &path(field, "hedge_policy"), ra_hedge_policy.as_ref())?;
    let mut grpc_timeouts = m::GrpcTimeouts::default();
    let max_stream = match max_stream_duration {
        // Envoy reads max_grpc_timeout only without max_stream_duration.
        None => {
            grpc_timeouts.route_timeout = max_grpc_timeout.as_ref().map(|max| m::GrpcTimeout {
                max: duration(&Some(*max)).unwrap_or_default(),
                offset: duration(grpc_timeout_offset),
            });
            None
        }
        Some(msd) => {
            let route_pb::route_action::MaxStreamDuration {
                max_stream_duration,
                grpc_timeout_header_max,
                grpc_timeout_header_offset,
            } = msd;
            grpc_timeouts.stream_duration =
                grpc_timeout_header_max.as_ref().map(|max| m::GrpcTimeout {
                    max: duration(&Some(*max)).unwrap_or_default(),
                    offset: duration(grpc_timeout_header_offset),
                });
            timeout_or(max_stream_duration, None)
        }
    };
    let cluster = match cluster_specifier {
        Some(C::Cluster(c)) => m::ClusterSpecifier::Name(c.clone()),
        Some(C::WeightedClusters(wc)) => m::ClusterSpecifier::Weighted(weighted_clusters(
            ctx,
            &path(field, "weighted_clusters"),
            wc,
        )?),
        Some(C::ClusterHeader(h)) => {
            let name =
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    ctx.err(
                        path(field, "cluster_header"),
                        format!("{h:?} is not a valid header name"),
                    )
                })?;
            m::ClusterSpecifier::Header(name)
        }
        Some(C::ClusterSpecifierPlugin(_)) => {
            ctx.refuse(cov, field, "cluster_specifier_plugin", true)?;
            m::ClusterSpecifier::Name(String::new())
        }
        Some(C::InlineClusterSpecifierPlugin(_)) => {
            ctx.refuse(cov, field, "inline_cluster_specifier_plugin", true)?;
            m::ClusterSpecifier::Name(String::new())
        }
        None => {
            return Err(ctx.err(
                field,
                "a cluster is required (cluster, weighted_clusters or cluster_header)",
            ));
        }
    };
    let host_rewrite = match host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => Some(m::HostRewrite::Literal(h.clone())),
        Some(H::AutoHostRewrite(v)) => v.value.then_some(m::HostRewrite::Auto),
        Some(H::HostRewriteHeader(h)) => Some(m::HostRewrite::Header(
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    path(field, "host_rewrite_header"),
                    format!("{h:?} is not a valid header name"),
                )
            })?,
        )),
        Some(H::HostRewritePathRegex(r)) => Some(m::HostRewrite::PathRegex(regex_rewrite(
            ctx,
            &path(field, "host_rewrite_path_regex"),
            r,
        )?)),
        Some(H::HostRewrite(f)) => Some(m::HostRewrite::Format(
            m::format::HeaderFormat::parse(f)
                .map_err(|e| ctx.err(path(field, "host_rewrite"), e))?,
        )),
        None => None,
    };
    let regex_rewrite = rx_rewrite
        .as_ref()
        .map(|r| regex_rewrite(ctx, &path(field, "regex_rewrite"), r))
        .transpose()?;
    if regex_rewrite.is_some() && !prefix_rewrite.is_empty() {
        return Err(ctx.err(
            path(field, "regex_rewrite"),
            "only one of prefix_rewrite and regex_rewrite may be set",
        ));
    }
    Ok(m::RouteAction::Route {
        cluster,
        prefix_rewrite: (!prefix_rewrite.is_empty()).then(|| prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        timeout: timeout_or(timeout, Some(Duration::from_secs(15))),
        retry_policy: ra_retry_policy
            .as_ref()
            .map(|p| retry_policy(ctx, &path(field, "retry_policy"), p))
            .transpose()?
            .map(Arc::new),
        // Unset and zero differ: unset leaves the connection manager's
        // `stream_idle_timeout` in force, zero disables it for the route.
        idle_timeout: duration(idle_timeout),
        mirrors: mirror_policies(
            ctx,
            &path(field, "request_mirror_policies"),
            request_mirror_policies,
        )?,
        max_stream_duration: max_stream,
        attempt_count: m::AttemptCount::default(),
        cluster_not_found: match cluster_not_found_response_code {
            0 => http::StatusCode::SERVICE_UNAVAILABLE,
            1 => http::StatusCode::NOT_FOUND,
            2 => http::StatusCode::INTERNAL_SERVER_ERROR,
            c => {
                return Err(ctx.err(
                    path(field, "cluster_not_found_response_code"),
                    format!("unknown response code {c}"),
                ));
            }
        },
        append_x_forwarded_host: *append_x_forwarded_host,
        grpc_timeouts: Box::new(grpc_timeouts),
    })
}

#[allow(deprecated)] // `total_weight` is deprecated but still honoured by Envoy.
fn weighted_clusters(
    ctx: &mut Ctx<'_>,
    field: &str,
    wc: &route_pb::WeightedCluster,
) -> Result<m::WeightedClusters, ConvertError> {
    use route_pb::weighted_cluster::RandomValueSpecifier as R;
    use route_pb::weighted_cluster::cluster_weight::HostRewriteSpecifier as H;
    let cov = &WEIGHTED_CLUSTER;
    let route_pb::WeightedCluster {
        clusters,
        total_weight,
        runtime_key_prefix,
        random_value_specifier,
    } = wc;
    let _ = runtime_key_prefix;
    let random_header = match random_value_specifier {
        None => None,
        Some(R::HeaderName(h)) => Some(
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    path(field, "header_name"),
                    format!("{h:?} is not a valid header name"),
                )
            })?,
        ),
        Some(R::UseHashPolicy(v)) => {
            ctx.refuse(cov, field, "use_hash_policy", v.value)?;
            None
        }
    };
    let mut out = Vec::with_capacity(clusters.len());
    for (i, c) in clusters.iter().enumerate() {
        let cf = format!("{field}.clusters[{i}]");
        let route_pb::weighted_cluster::ClusterWeight {
            name,
            cluster_header,
            weight,
            metadata_match: md_match,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            typed_per_filter_config,
            host_rewrite_specifier,
        } = c;
        ctx.refuse(
            &CLUSTER_WEIGHT,
            &cf,
            "cluster_header",
            !cluster_header.is_empty(),
        )?;
        if name.is_empty() {
            return Err(ctx.err(path(&cf, "name"), "cluster name is required"));
        }
        metadata_match(ctx, &CLUSTER_WEIGHT, &cf, md_match.as_ref())?;
        let request_headers = header_mutations(
            ctx,
            &path(&cf, "request_headers_to_add"),
            request_headers_to_add,
            &path(&cf, "request_headers_to_remove"),
            request_headers_to_remove,
        )?;
        let response_headers = header_mutations(
            ctx,
            &path(&cf, "response_headers_to_add"),
            response_headers_to_add,
            &path(&cf, "response_headers_to_remove"),
            response_headers_to_remove,
        )?;
        out.push(m::WeightedCluster {
            name: name.clone(),
            weight: weight.as_ref().map_or(0, |v| v.value),
            request_headers,
            response_headers,
            host_rewrite: match host_rewrite_specifier {
                Some(H::HostRewriteLiteral(h)) if !h.is_empty() => Some(h.clone()),
                _ => None,
            },
            filters: per_filter_configs(
                ctx,
                &path(&cf, "typed_per_filter_config"),
                typed_per_filter_config,
            )?,
        });
    }
    let sum: u64 = out.iter().map(|w| u64::from(w.weight)).sum();
    if sum == 0 {
        return Err(ctx.err(field, "the weights sum to zero"));
    }
    if let Some(t) = total_weight
        && t.value > 0
        && u64::from(t.value) != sum
    {
        return Err(ctx.err(
            path(field, "total_weight"),
            format!(
                "Sum of weights in the weighted_cluster must add up to total_weight: {sum} != {}",
                t.value
            ),
        ));
    }
    Ok(m::WeightedClusters {
        clusters: out,
        random_header,
    })
}

impl VhostDefaults {
    /// Completes a route with what it inherits from its virtual host and
    /// route table, in Envoy's order of precedence.
    fn apply(&self, proto: &route_pb::Route, rt: &mut m::Route, table: &TableDefaults) {
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
        // Per-filter overrides: the route's entry, else the virtual host's,
        // else the table's.
        for level in [&self.filters, &table.filters] {
            inherit(&mut rt.fault_overrides, &level.fault);
            inherit(&mut rt.rbac_overrides, &level.rbac);
            inherit(&mut rt.jwt_overrides, &level.jwt);
            merge_ext_authz(&mut rt.ext_authz_overrides, &level.ext_authz);
            inherit(&mut rt.compressor_overrides, &level.compressor);
            inherit(&mut rt.ratelimit_overrides, &level.ratelimit);
            // CORS settings fall back field by field: every level is kept,
            // most specific first.
            rt.cors.per_filter.extend(level.cors.iter().cloned());
        }
        rt.cors.inline.extend(self.inline_cors.iter().cloned());
        // Header mutations: most specific first (Envoy's default), or
        // least specific first with `most_specific_header_mutations_wins`,
        // so that the later, more specific level wins.
        let levels =
            |route: &m::HeaderMutations, vh: &m::HeaderMutations, t: &m::HeaderMutations| {
                let order = if table.most_specific_wins {
                    [t, vh, route]
                } else {
                    [route, vh, t]
                };
                m::HeaderMutations {
                    ops: order.iter().flat_map(|l| l.ops.iter().cloned()).collect(),
                }
            };
        rt.request_headers = levels(
            &rt.request_headers,
            &self.request_headers,
            &table.request_headers,
        );
        rt.response_headers = levels(
            &rt.response_headers,
            &self.response_headers,
            &table.response_headers,
        );
        rt.vhost_rate_limits = self.rate_limits.clone();
        if rt.request_body_buffer_limit.is_none() {
            rt.request_body_buffer_limit = self.body_buffer_limit;
        }
    }
}

/// Adds the entries of a less specific level for filters the route has
/// none for.
fn inherit<T: Clone>(route: &mut Vec<(String, T)>, level: &[(String, T)]) {
    for (name, f) in level {
        if !route.iter().any(|(n, _)| n == name) {
            route.push((name.clone(), f.clone()));
        }
    }
}

/// `ExtAuthzPerRoute` as Envoy merges it: the most specific level's
/// `disabled`, and the context extensions of every level, the most
/// specific winning a key.
fn merge_ext_authz(
    route: &mut Vec<(String, m::ext_authz::ExtAuthzPerRoute)>,
    level: &[(String, m::ext_authz::ExtAuthzPerRoute)],
) {
    for (name, f) in level {
        match route.iter_mut().find(|(n, _)| n == name) {
            Some((_, own)) => {
                for (k, v) in &f.context_extensions {
                    own.context_extensions
                        .entry(k.clone())
                        .or_insert_with(|| v.clone());
                }
            }
            None => route.push((name.clone(), f.clone())),
        }
    }
}

fn mirror_policies(
    ctx: &Ctx<'_>,
    field: &str,
    ps: &[route_pb::route_action::RequestMirrorPolicy],
) -> Result<Vec<m::MirrorPolicy>, ConvertError> {
    let cov = &MIRROR_POLICY;
    let mut out = Vec::with_capacity(ps.len());
    for (i, p) in ps.iter().enumerate() {
        let pf = format!("{field}[{i}]");
        let route_pb::route_action::RequestMirrorPolicy {
            cluster,
            cluster_header,
            runtime_fraction,
            trace_sampled,
            disable_shadow_host_suffix_append,
            request_headers_mutations,
            host_rewrite_literal,
        } = p;
        let _ = trace_sampled;
        ctx.refuse(cov, &pf, "cluster_header", !cluster_header.is_empty())?;
        ctx.refuse(
            cov,
            &pf,
            "request_headers_mutations",
            !request_headers_mutations.is_empty(),
        )?;
        if cluster.is_empty() {
            return Err(ctx.err(path(&pf, "cluster"), "a mirror cluster is required"));
        }
        out.push(m::MirrorPolicy {
            cluster: cluster.clone(),
            fraction: super::core_types::runtime_fraction(runtime_fraction)
                .unwrap_or(m::Fraction::ALL),
            host_rewrite: (!host_rewrite_literal.is_empty()).then(|| host_rewrite_literal.clone()),
            host_suffix: !disable_shadow_host_suffix_append,
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
    let cov = &REDIRECT_ACTION;
    let route_pb::RedirectAction {
        host_redirect,
        port_redirect,
        response_code,
        strip_query,
        scheme_rewrite_specifier,
        path_rewrite_specifier,
    } = rd;
    let status = match response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        c => {
            return Err(ctx.err(
                path(field, "response_code"),
                format!("unknown response code {c}"),
            ));
        }
    };
    let (redirect_path, prefix_rewrite) = match path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None),
        Some(P::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(P::RegexRewrite(_)) => {
            ctx.refuse(cov, field, "regex_rewrite", true)?;
            (None, None)
        }
        Some(P::PathRewrite(_)) => {
            ctx.refuse(cov, field, "path_rewrite", true)?;
            (None, None)
        }
        None => (None, None),
    };
    let port = u16::try_from(*port_redirect).map_err(|_| {
        ctx.err(
            path(field, "port_redirect"),
            format!("{port_redirect} is not a port"),
        )
    })?;
    Ok(m::RouteAction::Redirect {
        status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::MOVED_PERMANENTLY),
        scheme: match scheme_rewrite_specifier {
            Some(S::SchemeRedirect(s)) => Some(s.clone()),
            Some(S::HttpsRedirect(true)) => Some("https".into()),
            Some(S::HttpsRedirect(false)) | None => None,
        },
        host: (!host_redirect.is_empty()).then(|| host_redirect.clone()),
        port: (port != 0).then_some(port),
        path: redirect_path,
        prefix_rewrite,
        strip_query: *strip_query,
    })
}
