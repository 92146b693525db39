//! `envoy.filters.network.http_connection_manager` (`HttpConnectionManager`)
//! → the model's connection manager: codec, routes (inline or RDS), the
//! HTTP filter chain, timeouts, who the client is (XFF, internal addresses,
//! IP detection extensions), client certificate forwarding, path
//! normalization, the `server` header and upgrades. The protocol options and
//! limits are in `http_protocol`, access logs in `access_log`, tracing and
//! the request id extension in `trace`; every field is classified below.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3 as router_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::envoy::extensions::http::original_ip_detection::custom_header::v3 as custom_header_pb;
use envoy_types::pb::envoy::extensions::http::original_ip_detection::xff::v3 as xff_pb;
use ferry_model as m;

use super::core_types::cidr;
use super::cors::CORS_TYPE;
use super::coverage::{fields, path};
use super::fault::{FAULT_TYPE, fault_config};
use super::istio::{self, ISTIO_STATS_TYPE, ISTIO_TOLERATED, WASM_TYPES, istio_stats};
use super::local_ratelimit::{RATELIMIT_TYPE, local_ratelimit};
use super::route::route_config_in;
use super::{
    ConvertError, Ctx, Typed, access_log, compressor, ext_authz, http_protocol, jwt_authn, rbac,
    timeout_or, trace,
};

fields!(pub(super) static HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" {
    "codec_type": applied "AUTO, HTTP1 and HTTP2 (HTTP3 refused)",
    "stat_prefix": applied,
    "http_filters": applied,
    "add_user_agent": refused "user-agent and x-envoy-downstream-service-cluster are not added",
    "tracing": applied,
    "common_http_protocol_options": applied,
    "http1_safe_max_connection_duration": applied "HTTP/1 connections close between requests when they reach max_connection_duration either way",
    "http_protocol_options": applied,
    "http2_protocol_options": applied,
    "http3_protocol_options": inert "read only by the HTTP/3 codec, which is refused",
    "server_name": applied "the server header of every response",
    "server_header_transformation": applied,
    "scheme_header_transformation": refused "the :scheme sent upstream is not rewritten",
    "max_request_headers_kb": applied,
    "stream_idle_timeout": applied,
    "stream_flush_timeout": warned "a stream blocked on flow control is bounded by stream_idle_timeout",
    "request_timeout": applied,
    "request_headers_timeout": applied,
    "drain_timeout": applied,
    "drain_timeout_jitter": warned "every connection drains for exactly drain_timeout",
    "delayed_close_timeout": warned "a connection closed after a local reply is closed once the reply is written",
    "access_log": applied,
    "access_log_flush_interval": refused "periodic access log entries are not supported (one entry per request, at its end)",
    "flush_access_log_on_new_request": refused "early access log entries are not supported (one entry per request, at its end)",
    "access_log_options": applied "its periodic and early flush settings are refused",
    "use_remote_address": applied,
    "xff_num_trusted_hops": applied,
    "original_ip_detection_extensions": applied "the XFF and custom header extensions; others refused",
    "early_header_mutation_extensions": refused "early header mutation extensions are not supported",
    "internal_address_config": applied,
    "skip_xff_append": applied,
    "via": refused "the via header is not added",
    "generate_request_id": applied,
    "preserve_external_request_id": applied,
    "always_set_request_id_in_response": refused "the request id is not copied into responses",
    "forward_client_cert_details": applied,
    "set_current_client_cert_details": applied "Subject, URI and DNS; Cert, Chain and Issuer draw a warning",
    "forward_client_cert_matcher": refused "per-request client certificate forwarding rules are not supported",
    "proxy_100_continue": refused "100-continue is answered by the proxy, not proxied",
    "represent_ipv4_remote_address_as_ipv4_mapped_ipv6": refused "remote addresses are written as they are",
    "upgrade_configs": applied "upgrade types allowed unless a route says otherwise; custom upgrade filter chains refused",
    "normalize_path": applied,
    "merge_slashes": applied,
    "path_with_escaped_slashes_action": applied,
    "request_id_extension": applied "Envoy's UUID extension with its defaults; others refused",
    "local_reply_config": refused "local reply mappers and formats are not supported",
    "strip_matching_host_port": refused "the host's port is not stripped before routing",
    "stream_error_on_invalid_http_message": warned "an invalid request ends its HTTP/1 connection and resets its HTTP/2 stream",
    "path_normalization_options": inert "not implemented by Envoy either",
    "strip_trailing_host_dot": refused "the host's trailing dot is not stripped before routing",
    "proxy_status_config": refused "the proxy-status header is not added",
    "typed_header_validation_config": refused "header validator extensions are not supported",
    "append_x_forwarded_port": refused "x-forwarded-port is not added",
    "append_local_overload": inert "there is no overload manager to report",
    "add_proxy_protocol_connection_state": inert "read only with the PROXY protocol, which is refused",
    "forward_proto_config": refused "x-forwarded-proto rewriting rules are not supported",
    "rds": applied,
    "route_config": applied,
    "scoped_routes": refused "scoped routes are not supported",
    "strip_any_host_port": refused "the host's port is not stripped before routing",
});

fields!(pub(super) static UPGRADE_CONFIG = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig" {
    "upgrade_type": applied,
    "filters": refused "upgrade-specific filter chains are not supported",
    "enabled": applied,
});

/// `server_name` and `server_header_transformation`.
fn server_header(
    ctx: &Ctx<'_>,
    field: &str,
    name: &str,
    transformation: i32,
) -> Result<m::listener::ServerHeader, ConvertError> {
    use hcm_pb::http_connection_manager::ServerHeaderTransformation as T;
    use m::listener::ServerHeader as S;
    let value = || {
        let name = if name.is_empty() { "envoy" } else { name };
        http::HeaderValue::from_str(name).map_err(|_| {
            ctx.err(
                path(field, "server_name"),
                format!("{name:?} is not a header value"),
            )
        })
    };
    Ok(match T::try_from(transformation) {
        Ok(T::Overwrite) => S::Overwrite(value()?),
        Ok(T::AppendIfAbsent) => S::AppendIfAbsent(value()?),
        Ok(T::PassThrough) => S::PassThrough,
        Err(_) => {
            return Err(ctx.err(
                path(field, "server_header_transformation"),
                format!("unknown value {transformation}"),
            ));
        }
    })
}

/// `upgrade_configs`: the upgrade types the connection manager lets through.
fn upgrades(
    ctx: &Ctx<'_>,
    field: &str,
    configs: &[hcm_pb::http_connection_manager::UpgradeConfig],
) -> Result<Vec<(String, bool)>, ConvertError> {
    let mut out = Vec::with_capacity(configs.len());
    for (i, u) in configs.iter().enumerate() {
        let hcm_pb::http_connection_manager::UpgradeConfig {
            upgrade_type,
            filters,
            enabled,
        } = u;
        let at = format!("{field}.upgrade_configs[{i}]");
        ctx.refuse(&UPGRADE_CONFIG, &at, "filters", !filters.is_empty())?;
        let kind = upgrade_type.to_ascii_lowercase();
        if out.iter().any(|(t, _)| *t == kind) {
            // Envoy: "Error: multiple upgrade configs with the same name".
            return Err(ctx.err(
                path(&at, "upgrade_type"),
                format!("{upgrade_type:?} is configured twice"),
            ));
        }
        out.push((kind, enabled.as_ref().is_none_or(|v| v.value)));
    }
    Ok(out)
}

pub(super) const HTTP_TOLERATED: &[&str] =
    &["envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"];

pub(super) fn http_connection_manager(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<m::HttpConnectionManager, ConvertError> {
    use hcm_pb::http_connection_manager::{CodecType, RouteSpecifier};
    let cov = &HCM;
    #[allow(deprecated)] // `access_log_flush_interval`, `flush_access_log_on_new_request`
    let hcm_pb::HttpConnectionManager {
        codec_type,
        stat_prefix,
        http_filters: filter_configs,
        add_user_agent,
        tracing: _,
        common_http_protocol_options,
        http1_safe_max_connection_duration: _,
        http_protocol_options: _,
        http2_protocol_options: _,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        max_request_headers_kb: _,
        stream_idle_timeout,
        stream_flush_timeout,
        request_timeout,
        request_headers_timeout: _,
        drain_timeout: _,
        drain_timeout_jitter,
        delayed_close_timeout,
        access_log: _,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options: _,
        use_remote_address,
        xff_num_trusted_hops: _,
        original_ip_detection_extensions: _,
        early_header_mutation_extensions,
        internal_address_config: _,
        skip_xff_append: _,
        via,
        generate_request_id,
        preserve_external_request_id: _,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        upgrade_configs,
        normalize_path: _,
        merge_slashes: _,
        path_with_escaped_slashes_action: _,
        request_id_extension: _,
        local_reply_config,
        strip_matching_host_port,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
        route_specifier,
        strip_port_mode,
    } = h;
    // The fields bound to `_` above are read by the helpers this function
    // calls with the whole message (`client_trust`, `path_normalization`,
    // `http_protocol::downstream`, `access_log`, `trace`).
    // Inert: read only by refused features, or not implemented by Envoy.
    let _ = (
        http3_protocol_options,
        path_normalization_options,
        append_local_overload,
        add_proxy_protocol_connection_state,
    );
    ctx.refuse(
        cov,
        field,
        "add_user_agent",
        add_user_agent.as_ref().is_some_and(|v| v.value),
    )?;
    ctx.refuse(
        cov,
        field,
        "scheme_header_transformation",
        scheme_header_transformation.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "access_log_flush_interval",
        access_log_flush_interval.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "flush_access_log_on_new_request",
        *flush_access_log_on_new_request,
    )?;
    ctx.refuse(
        cov,
        field,
        "early_header_mutation_extensions",
        !early_header_mutation_extensions.is_empty(),
    )?;
    ctx.refuse(cov, field, "via", !via.is_empty())?;
    ctx.refuse(
        cov,
        field,
        "always_set_request_id_in_response",
        *always_set_request_id_in_response,
    )?;
    ctx.refuse(
        cov,
        field,
        "forward_client_cert_matcher",
        forward_client_cert_matcher.is_some(),
    )?;
    ctx.refuse(cov, field, "proxy_100_continue", *proxy_100_continue)?;
    ctx.refuse(
        cov,
        field,
        "represent_ipv4_remote_address_as_ipv4_mapped_ipv6",
        *represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
    )?;
    ctx.refuse(
        cov,
        field,
        "local_reply_config",
        local_reply_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "strip_matching_host_port",
        *strip_matching_host_port,
    )?;
    ctx.refuse(
        cov,
        field,
        "strip_trailing_host_dot",
        *strip_trailing_host_dot,
    )?;
    ctx.refuse(
        cov,
        field,
        "proxy_status_config",
        proxy_status_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "typed_header_validation_config",
        typed_header_validation_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "append_x_forwarded_port",
        *append_x_forwarded_port,
    )?;
    ctx.refuse(
        cov,
        field,
        "forward_proto_config",
        forward_proto_config.is_some(),
    )?;
    if strip_port_mode.is_some() {
        return Err(ctx.refused(cov, field, "strip_any_host_port"));
    }
    ctx.knob(
        cov,
        field,
        "stream_flush_timeout",
        stream_flush_timeout.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "drain_timeout_jitter",
        drain_timeout_jitter.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "delayed_close_timeout",
        delayed_close_timeout.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "stream_error_on_invalid_http_message",
        stream_error_on_invalid_http_message
            .as_ref()
            .is_some_and(|v| v.value),
    );
    let server_header = server_header(ctx, field, server_name, *server_header_transformation)?;
    let upgrades = upgrades(ctx, field, upgrade_configs)?;
    let codec = match CodecType::try_from(*codec_type) {
        Ok(CodecType::Auto) => m::HttpCodec::Auto,
        Ok(CodecType::Http1) => m::HttpCodec::Http1,
        Ok(CodecType::Http2) => m::HttpCodec::Http2,
        _ => {
            return Err(ctx.err(
                format!("{field}.codec_type"),
                "only AUTO, HTTP1 and HTTP2 are supported",
            ));
        }
    };
    let routes =
        match route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => m::RouteSource::Inline(Arc::new(
                route_config_in(ctx, &format!("{field}.route_config"), rc)?,
            )),
            Some(RouteSpecifier::Rds(rds)) => {
                if rds.route_config_name.is_empty() {
                    return Err(ctx.err(
                        format!("{field}.rds.route_config_name"),
                        "a route configuration name is required",
                    ));
                }
                m::RouteSource::Rds(rds.route_config_name.clone())
            }
            Some(RouteSpecifier::ScopedRoutes(_)) => {
                return Err(ctx.refused(cov, field, "scoped_routes"));
            }
            None => return Err(ctx.err(field, "http_connection_manager needs route_config")),
        };
    let mut has_router = false;
    let mut suppress_envoy_headers = false;
    let mut start_child_span = false;
    let mut http_filters = Vec::new();
    for (i, hf) in filter_configs.iter().enumerate() {
        let ff = format!("{field}.http_filters[{i}]");
        if has_router {
            return Err(ctx.err(&ff, format!("http filter {:?} follows the router", hf.name)));
        }
        let mut typed = None;
        let type_name = match &hf.config_type {
            Some(hcm_pb::http_filter::ConfigType::TypedConfig(any)) => {
                let t =
                    Typed::from_any(any).map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?;
                let name = t.type_name().to_string();
                typed = Some(t);
                name
            }
            _ if hf.name == "envoy.filters.http.router" => {
                "envoy.extensions.filters.http.router.v3.Router".into()
            }
            _ => {
                return Err(ctx.err(
                    &ff,
                    format!("http filter {:?} has no typed_config", hf.name),
                ));
            }
        };
        if hf.disabled {
            continue;
        }
        match type_name.as_str() {
            "envoy.extensions.filters.http.router.v3.Router" => {
                has_router = true;
                if let Some(t) = typed {
                    let tf = format!("{ff}.typed_config");
                    let cfg: router_pb::Router = t.decode().map_err(|e| ctx.err(&tf, e))?;
                    suppress_envoy_headers = cfg.suppress_envoy_headers;
                    #[allow(deprecated)]
                    {
                        start_child_span = cfg.start_child_span;
                    }
                    if !cfg.upstream_log.is_empty() {
                        return Err(ctx.err(
                            format!("{tf}.upstream_log"),
                            "upstream access logs are not supported",
                        ));
                    }
                    if cfg.respect_expected_rq_timeout {
                        return Err(ctx.err(
                            format!("{tf}.respect_expected_rq_timeout"),
                            "taking the route timeout from x-envoy-expected-rq-timeout-ms is not supported",
                        ));
                    }
                }
            }
            FAULT_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the fault filter needs a typed_config"));
                };
                let hf_cfg: fault_pb::HttpFault = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::Fault(Arc::new(fault_config(ctx, &tf, &hf_cfg)?)),
                });
            }
            ISTIO_STATS_TYPE => {
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "istio.stats needs a typed_config"));
                };
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::IstioStats(istio_stats(ctx, t)),
                });
            }
            CORS_TYPE => http_filters.push(m::HttpFilter {
                name: hf.name.clone(),
                config: m::HttpFilterConfig::Cors,
            }),
            RATELIMIT_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the local rate limit filter needs a typed_config"));
                };
                let cfg: ratelimit_pb::LocalRateLimit = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::LocalRateLimit(Arc::new(local_ratelimit(
                        ctx, &tf, &cfg,
                    )?)),
                });
            }
            rbac::HTTP_RBAC_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the RBAC filter needs a typed_config"));
                };
                let cfg = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::Rbac(Arc::new(rbac::http_rbac(ctx, &tf, &cfg)?)),
                });
            }
            compressor::COMPRESSOR_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the compressor filter needs a typed_config"));
                };
                let cfg = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::Compressor(Arc::new(compressor::compressor(
                        ctx, &tf, &cfg,
                    )?)),
                });
            }
            jwt_authn::JWT_AUTHN_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the JWT filter needs a typed_config"));
                };
                let cfg = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::JwtAuthn(Arc::new(jwt_authn::jwt_authn(
                        ctx, &tf, &cfg,
                    )?)),
                });
            }
            ext_authz::EXT_AUTHZ_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the ext_authz filter needs a typed_config"));
                };
                let cfg = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::ExtAuthz(Arc::new(ext_authz::ext_authz(
                        ctx, &tf, &cfg,
                    )?)),
                });
            }
            super::set_filter_state::SET_FILTER_STATE_TYPE => {
                let tf = format!("{ff}.typed_config");
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "the set_filter_state filter needs a typed_config"));
                };
                let cfg = t.decode().map_err(|e| ctx.err(&tf, e))?;
                http_filters.push(m::HttpFilter {
                    name: hf.name.clone(),
                    config: m::HttpFilterConfig::SetFilterState(Arc::new(
                        super::set_filter_state::set_filter_state(ctx, &tf, &cfg)?,
                    )),
                });
            }
            t if WASM_TYPES.contains(&t) => {
                let Some(t) = typed else {
                    return Err(ctx.err(&ff, "a Wasm filter needs a typed_config"));
                };
                istio::wasm(ctx, &ff, "http", &hf.name, t)?;
            }
            t if HTTP_TOLERATED.contains(&t) || ISTIO_TOLERATED.contains(&t) => {
                ctx.warn(
                    &ff,
                    format!(
                        "http filter {:?} ({t}) is recognised but not implemented; skipped",
                        hf.name
                    ),
                );
            }
            t if hf.is_optional => {
                ctx.warn(
                    &ff,
                    format!(
                        "optional http filter {:?} ({t}) is not supported; skipped",
                        hf.name
                    ),
                );
            }
            t => {
                return Err(ctx.err(
                    format!("{ff}.typed_config"),
                    format!("unsupported http filter {:?} ({t})", hf.name),
                ));
            }
        }
    }
    if !has_router {
        return Err(ctx.err(
            format!("{field}.http_filters"),
            "the last http filter must be envoy.filters.http.router",
        ));
    }
    let idle = common_http_protocol_options
        .as_ref()
        .map(|o| timeout_or(&o.idle_timeout, Some(Duration::from_secs(3600))))
        .unwrap_or(Some(Duration::from_secs(3600)));
    use hcm_pb::http_connection_manager::ForwardClientCertDetails as F;
    let forward_client_cert = match F::try_from(*forward_client_cert_details) {
        Ok(F::Sanitize) => m::listener::ForwardClientCert::Sanitize,
        Ok(F::ForwardOnly) => m::listener::ForwardClientCert::ForwardOnly,
        Ok(F::AlwaysForwardOnly) => m::listener::ForwardClientCert::AlwaysForwardOnly,
        Ok(F::AppendForward) => m::listener::ForwardClientCert::AppendForward,
        Ok(F::SanitizeSet) => m::listener::ForwardClientCert::SanitizeSet,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.forward_client_cert_details"),
                format!("unknown value {forward_client_cert_details}"),
            ));
        }
    };
    let details = set_current_client_cert_details.unwrap_or_default();
    if details.cert || details.chain || details.issuer {
        ctx.warn(
            &format!("{field}.set_current_client_cert_details"),
            "x-forwarded-client-cert Cert, Chain and Issuer are not added".into(),
        );
    }
    let use_remote_address = use_remote_address.as_ref().is_some_and(|v| v.value);
    let client_trust = client_trust(ctx, field, h, use_remote_address)?;
    let client_cert_details = m::listener::ClientCertDetails {
        subject: details.subject.is_some_and(|v| v.value),
        uri: details.uri,
        dns: details.dns,
    };
    let access_logs = access_log::http_connection_manager(ctx, field, h)?;
    let tracing = trace::http_connection_manager(ctx, field, h, start_child_span)?;
    Ok(m::HttpConnectionManager {
        access_logs,
        tracing,
        forward_client_cert,
        client_cert_details,
        stat_prefix: stat_prefix.clone(),
        codec,
        routes,
        generate_request_id: generate_request_id.as_ref().is_none_or(|v| v.value),
        idle_timeout: idle,
        stream_idle_timeout: timeout_or(stream_idle_timeout, Some(Duration::from_secs(300))),
        request_timeout: timeout_or(request_timeout, None),
        use_remote_address,
        http_filters,
        client_trust,
        suppress_envoy_headers,
        path_normalization: path_normalization(ctx, field, h)?,
        protocol: Arc::new(http_protocol::downstream(ctx, field, h)?),
        server_header,
        upgrades,
    })
}

/// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`,
/// with Envoy's defaults when unset (its runtime keys left at theirs: no
/// normalization, escaped slashes kept). `path_normalization_options` is
/// not implemented by Envoy either (`not-implemented-hide`): inert.
fn path_normalization(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<m::PathNormalization, ConvertError> {
    use hcm_pb::http_connection_manager::PathWithEscapedSlashesAction as P;
    use m::EscapedSlashesAction as A;
    let escaped_slashes = match P::try_from(h.path_with_escaped_slashes_action) {
        Ok(P::ImplementationSpecificDefault | P::KeepUnchanged) => A::KeepUnchanged,
        Ok(P::RejectRequest) => A::RejectRequest,
        Ok(P::UnescapeAndRedirect) => A::UnescapeAndRedirect,
        Ok(P::UnescapeAndForward) => A::UnescapeAndForward,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.path_with_escaped_slashes_action"),
                format!("unknown value {}", h.path_with_escaped_slashes_action),
            ));
        }
    };
    Ok(m::PathNormalization {
        normalize_path: h.normalize_path.as_ref().is_some_and(|v| v.value),
        merge_slashes: h.merge_slashes,
        escaped_slashes,
    })
}

/// The settings that decide who the client is: `xff_num_trusted_hops`,
/// `skip_xff_append`, `internal_address_config` and the
/// `original_ip_detection_extensions` (XFF and custom header), as Envoy
/// validates them.
fn client_trust(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
    use_remote_address: bool,
) -> Result<m::forwarded::ClientTrust, ConvertError> {
    use m::forwarded::{InternalAddresses, IpDetection};
    let internal = match &h.internal_address_config {
        None => InternalAddresses::None,
        Some(c) => {
            if c.unix_sockets {
                // No HTTP listener of Ferry's is a Unix socket: nothing to trust.
                ctx.warn(
                    &format!("{field}.internal_address_config.unix_sockets"),
                    "Ferry serves HTTP on TCP only; unix_sockets has no effect".into(),
                );
            }
            if c.cidr_ranges.is_empty() {
                InternalAddresses::Private
            } else {
                let ranges = c
                    .cidr_ranges
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        cidr(
                            ctx,
                            &format!("{field}.internal_address_config.cidr_ranges[{i}]"),
                            r,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                InternalAddresses::Ranges(ranges)
            }
        }
    };
    let mut detection = Vec::with_capacity(h.original_ip_detection_extensions.len());
    if !h.original_ip_detection_extensions.is_empty()
        && (use_remote_address || h.xff_num_trusted_hops > 0)
    {
        // As Envoy: the extensions replace those two settings.
        return Err(ctx.err(
            format!("{field}.original_ip_detection_extensions"),
            "original IP detection extensions cannot be combined with use_remote_address or xff_num_trusted_hops",
        ));
    }
    for (i, ext) in h.original_ip_detection_extensions.iter().enumerate() {
        let ef = format!("{field}.original_ip_detection_extensions[{i}]");
        let tf = format!("{ef}.typed_config");
        let Some(any) = &ext.typed_config else {
            return Err(ctx.err(&ef, format!("extension {:?} has no typed_config", ext.name)));
        };
        let t = Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
        match t.type_name() {
            "envoy.extensions.http.original_ip_detection.xff.v3.XffConfig" => {
                let cfg: xff_pb::XffConfig = t.decode().map_err(|e| ctx.err(&tf, e))?;
                let trusted_cidrs = match &cfg.xff_trusted_cidrs {
                    None => None,
                    Some(_) if cfg.xff_num_trusted_hops > 0 => {
                        return Err(ctx.err(
                            &tf,
                            "only one of xff_num_trusted_hops and xff_trusted_cidrs can be set",
                        ));
                    }
                    Some(c) => Some(
                        c.cidrs
                            .iter()
                            .enumerate()
                            .map(|(j, r)| {
                                cidr(ctx, &format!("{tf}.xff_trusted_cidrs.cidrs[{j}]"), r)
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                detection.push(IpDetection::Xff {
                    num_trusted_hops: cfg.xff_num_trusted_hops,
                    trusted_cidrs,
                    skip_xff_append: cfg.skip_xff_append.as_ref().is_none_or(|v| v.value),
                });
            }
            "envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig" => {
                let cfg: custom_header_pb::CustomHeaderConfig =
                    t.decode().map_err(|e| ctx.err(&tf, e))?;
                let header = cfg.header_name.to_ascii_lowercase();
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(ctx.err(
                        format!("{tf}.header_name"),
                        format!("invalid header name {:?}", cfg.header_name),
                    ));
                }
                let reject_with = cfg.reject_with_status.map(|s| {
                    u16::try_from(s.code)
                        .ok()
                        .filter(|c| (400..=511).contains(c))
                        .unwrap_or(403)
                });
                detection.push(IpDetection::CustomHeader {
                    header,
                    trusted: cfg.allow_extension_to_set_address_as_trusted,
                    reject_with,
                });
            }
            other => {
                return Err(ctx.err(
                    &tf,
                    format!(
                        "unsupported original IP detection extension {:?} ({other})",
                        ext.name
                    ),
                ));
            }
        }
    }
    Ok(m::forwarded::ClientTrust {
        xff_num_trusted_hops: h.xff_num_trusted_hops,
        skip_xff_append: h.skip_xff_append,
        internal,
        detection,
        preserve_external_request_id: h.preserve_external_request_id,
    })
}
