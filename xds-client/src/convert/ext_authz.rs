//! `envoy.extensions.filters.http.ext_authz.v3.ExtAuthz` and
//! `ExtAuthzPerRoute` → `ferry_model::ext_authz`.
//!
//! The authorizer is asked over gRPC (`envoy_grpc` only) or plain HTTP, as
//! istiod's CUSTOM action configures it. What would change the verdict or
//! what reaches the authorizer and is not done as Envoy does it — other
//! metadata sources, header mutation rules, shadow mode, retries — is
//! refused by name: an authorizer asked differently than configured may
//! let requests in.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use ferry_model as m;
use ferry_model::ext_authz as me;

use super::core_types::runtime_fraction;
use super::coverage::{fields, path};
use super::header_mutation::header_mutations;
use super::matcher::string_matcher;
use super::{ConvertError, Ctx, Typed};

pub(super) const EXT_AUTHZ_TYPE: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
pub(super) const EXT_AUTHZ_PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";
pub(super) const NETWORK_EXT_AUTHZ_TYPE: &str =
    "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz";

/// Envoy's default for the gRPC service's `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

fields!(pub(super) static EXT_AUTHZ = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz" {
    "grpc_service": applied "envoy_grpc only",
    "http_service": applied,
    "transport_api_version": applied "V3 (AUTO reads as V3); V2 is refused, as Envoy 1.40 does",
    "failure_mode_allow": applied,
    "failure_mode_allow_header_add": applied "x-envoy-auth-failure-mode-allowed: true on the request",
    "with_request_body": applied "the check waits for the body (or its first max_request_bytes); a longer one is answered 413 unless allow_partial_message",
    "clear_route_cache": applied "the route is chosen again when the authorizer changed the request's headers",
    "status_on_error": applied "403 when unset or outside 100..=511",
    "validate_mutations": applied "an authorizer's header that is not a valid HTTP header always makes the check an error (Ferry cannot forward it either way)",
    "metadata_context_namespaces": refused "dynamic metadata is not sent to the authorizer",
    "typed_metadata_context_namespaces": refused "dynamic metadata is not sent to the authorizer",
    "route_metadata_context_namespaces": refused "route metadata is not sent to the authorizer",
    "route_typed_metadata_context_namespaces": refused "route metadata is not sent to the authorizer",
    "filter_enabled": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "filter_enabled_metadata": applied "the request's dynamic metadata (the RBAC filters' shadow results, JWT payloads)",
    "deny_at_disable": applied "the runtime's value for its runtime_key when a static layer holds one, else its default_value",
    "include_peer_certificate": refused "the peer certificate is not sent to the authorizer",
    "stat_prefix": applied,
    "bootstrap_metadata_labels_key": refused "node metadata labels are not sent to the authorizer",
    "allowed_headers": applied "all headers go to a gRPC authorizer when unset",
    "disallowed_headers": applied,
    "include_tls_session": applied "the SNI",
    "charge_cluster_response_stats": warned "a denial's status is not charged to the cluster's response code counters",
    "encode_raw_headers": applied "the headers go into header_map instead of headers",
    "decoder_header_mutation_rules": refused "header mutation rules are not supported",
    "enable_dynamic_metadata_ingestion": refused "false is not supported: the authorizer's dynamic metadata is always taken",
    "filter_metadata": refused "filter metadata is not emitted",
    "emit_filter_state_stats": refused "filter state stats are not emitted",
    "max_denied_response_body_bytes": applied,
    "enforce_response_header_limits": warned "the connection manager's header limits are not applied to the authorizer's headers",
    "shadow_mode": refused "shadow mode is not supported",
    "emit_client_span": warned "no client span is emitted for the check",
});

fields!(pub(super) static NETWORK_EXT_AUTHZ = "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz" {
    "stat_prefix": applied "the counters are ext_authz.<prefix>.*",
    "grpc_service": applied "envoy_grpc only",
    "failure_mode_allow": applied,
    "include_peer_certificate": refused "the peer certificate is not sent to the authorizer",
    "transport_api_version": applied "V3 (AUTO reads as V3); V2 is refused, as Envoy 1.40 does",
    "filter_enabled_metadata": applied "the connection's dynamic metadata (the network RBAC filters' shadow results)",
    "bootstrap_metadata_labels_key": refused "node metadata labels are not sent to the authorizer",
    "include_tls_session": applied "the SNI",
    "send_tls_alert_on_denial": refused "a TLS alert on denial is not supported",
    "metadata_context_namespaces": refused "dynamic metadata is not sent to the authorizer",
    "typed_metadata_context_namespaces": refused "dynamic metadata is not sent to the authorizer",
    "shadow_mode": refused "shadow mode is not supported",
});

fields!(pub(super) static GRPC_SERVICE = "envoy.config.core.v3.GrpcService" ("ext_authz") {
    "envoy_grpc": applied,
    "google_grpc": refused "only envoy_grpc is supported",
    "timeout": applied "200 ms when unset",
    "initial_metadata": applied,
    "retry_policy": refused "retries of authorization checks are not supported",
});

fields!(pub(super) static ENVOY_GRPC = "envoy.config.core.v3.GrpcService.EnvoyGrpc" ("ext_authz") {
    "cluster_name": applied "required",
    "authority": applied "the cluster's name when empty",
    "retry_policy": refused "retries of authorization checks are not supported",
    "max_receive_message_length": warned "the authorizer's answers are read whole",
    "skip_envoy_headers": inert "the check carries no x-envoy-* headers either way; the verdict is the same",
});

fields!(pub(super) static HTTP_SERVICE = "envoy.extensions.filters.http.ext_authz.v3.HttpService" {
    "server_uri": applied "required",
    "path_prefix": applied,
    "path_override": refused "path_override is not supported",
    "authorization_request": applied,
    "authorization_response": applied,
    "retry_policy": refused "retries of authorization checks are not supported",
});

fields!(pub(super) static HTTP_URI = "envoy.config.core.v3.HttpUri" ("ext_authz") {
    "uri": applied "names the authorizer in logs; the check keeps the request's host, as Envoy's",
    "cluster": applied "required",
    "timeout": applied "required",
});

fields!(pub(super) static AUTHORIZATION_REQUEST = "envoy.extensions.filters.http.ext_authz.v3.AuthorizationRequest" {
    "allowed_headers": applied "beside authorization, :method, :path and :authority",
    "headers_to_add": applied "format strings, overwriting",
});

fields!(pub(super) static AUTHORIZATION_RESPONSE = "envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse" {
    "allowed_upstream_headers": applied,
    "allowed_upstream_headers_to_append": applied,
    "allowed_client_headers": applied "all but host when empty",
    "allowed_client_headers_on_success": applied,
    "dynamic_metadata_from_headers": refused "dynamic metadata from the authorizer's headers is not supported",
});

fields!(pub(super) static BUFFER_SETTINGS = "envoy.extensions.filters.http.ext_authz.v3.BufferSettings" {
    "max_request_bytes": applied "required, above 0",
    "allow_partial_message": applied "the first max_request_bytes are checked, with x-envoy-auth-partial-body: true",
    "pack_as_bytes": applied "raw_body instead of body in a gRPC check",
});

fields!(pub(super) static EXT_AUTHZ_PER_ROUTE = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute" {
    "disabled": applied,
    "check_settings": applied,
});

fields!(pub(super) static CHECK_SETTINGS = "envoy.extensions.filters.http.ext_authz.v3.CheckSettings" {
    "context_extensions": applied "merged across the route's levels, the most specific winning",
    "disable_request_body_buffering": applied,
    "with_request_body": applied "replaces the filter's buffer settings on the route",
    "emit_client_span": warned "no client span is emitted for the check",
    "grpc_service": refused "a per-route authorizer is not supported",
    "http_service": refused "a per-route authorizer is not supported",
});

fn duration(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> Option<Duration> {
    d.as_ref().map(|d| {
        Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
    })
}

fn name_list(
    ctx: &Ctx<'_>,
    field: &str,
    l: &Option<matcher_pb::ListStringMatcher>,
) -> Result<Option<me::NameList>, ConvertError> {
    let Some(l) = l else { return Ok(None) };
    let matcher_pb::ListStringMatcher { patterns } = l;
    let mut out = Vec::with_capacity(patterns.len());
    for (i, p) in patterns.iter().enumerate() {
        out.push(me::NameMatcher {
            matcher: string_matcher(ctx, &format!("{field}.patterns[{i}]"), p)?,
            ignore_case: p.ignore_case,
        });
    }
    Ok(Some(me::NameList(out)))
}

fn grpc_service(
    ctx: &mut Ctx<'_>,
    field: &str,
    g: &core_pb::GrpcService,
) -> Result<(me::Service, Duration), ConvertError> {
    let t = super::grpc_service::grpc_target(ctx, field, g, &GRPC_SERVICE, &ENVOY_GRPC)?;
    Ok((
        me::Service::Grpc {
            cluster: t.cluster,
            authority: t.authority,
            metadata: t.metadata,
        },
        t.timeout.unwrap_or(DEFAULT_TIMEOUT),
    ))
}

fn http_service(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &pb::HttpService,
) -> Result<(me::Service, Duration, Option<me::NameList>), ConvertError> {
    let cov = &HTTP_SERVICE;
    let pb::HttpService {
        server_uri,
        path_prefix,
        path_override,
        authorization_request,
        authorization_response,
        retry_policy,
    } = h;
    ctx.refuse(cov, field, "path_override", !path_override.is_empty())?;
    ctx.refuse(cov, field, "retry_policy", retry_policy.is_some())?;
    let uf = path(field, "server_uri");
    let Some(core_pb::HttpUri {
        uri,
        timeout,
        http_upstream_type,
    }) = server_uri
    else {
        return Err(ctx.err(uf, "server_uri is required"));
    };
    let cluster = match http_upstream_type {
        Some(core_pb::http_uri::HttpUpstreamType::Cluster(c)) if !c.is_empty() => c.clone(),
        _ => return Err(ctx.err(path(&uf, "cluster"), "a cluster is required")),
    };
    let Some(timeout) = duration(timeout) else {
        return Err(ctx.err(path(&uf, "timeout"), "a timeout is required"));
    };
    if !path_prefix.is_empty() && !path_prefix.starts_with('/') {
        return Err(ctx.err(
            path(field, "path_prefix"),
            "path_prefix must begin with '/'",
        ));
    }
    let (request_headers, headers_to_add) = match authorization_request {
        None => (None, m::HeaderMutations::default()),
        Some(r) => {
            let rf = path(field, "authorization_request");
            #[allow(deprecated)] // `allowed_headers` is still honoured by Envoy 1.40
            let pb::AuthorizationRequest {
                allowed_headers,
                headers_to_add,
            } = r;
            #[allow(deprecated)] // still honoured by Envoy 1.40
            let allowed = name_list(ctx, &path(&rf, "allowed_headers"), allowed_headers)?;
            // Plain header values, each replacing the request's own.
            let options: Vec<core_pb::HeaderValueOption> = headers_to_add
                .iter()
                .map(|h| core_pb::HeaderValueOption {
                    header: Some(h.clone()),
                    append_action:
                        core_pb::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
                            as i32,
                    ..Default::default()
                })
                .collect();
            let adds = header_mutations(ctx, &path(&rf, "headers_to_add"), &options, "", &[])?;
            (allowed, adds)
        }
    };
    let mut svc = me::HttpService {
        cluster,
        uri: uri.clone(),
        path_prefix: path_prefix.clone(),
        headers_to_add,
        upstream_headers: me::NameList::default(),
        upstream_headers_to_append: me::NameList::default(),
        client_headers: me::NameList::default(),
        client_headers_on_success: me::NameList::default(),
    };
    if let Some(r) = authorization_response {
        let rf = path(field, "authorization_response");
        let pb::AuthorizationResponse {
            allowed_upstream_headers,
            allowed_upstream_headers_to_append,
            allowed_client_headers,
            allowed_client_headers_on_success,
            dynamic_metadata_from_headers,
        } = r;
        ctx.refuse(
            &AUTHORIZATION_RESPONSE,
            &rf,
            "dynamic_metadata_from_headers",
            dynamic_metadata_from_headers
                .as_ref()
                .is_some_and(|l| !l.patterns.is_empty()),
        )?;
        let list = |ctx: &Ctx<'_>, name: &str, l| {
            name_list(ctx, &path(&rf, name), l).map(Option::unwrap_or_default)
        };
        svc.upstream_headers = list(ctx, "allowed_upstream_headers", allowed_upstream_headers)?;
        svc.upstream_headers_to_append = list(
            ctx,
            "allowed_upstream_headers_to_append",
            allowed_upstream_headers_to_append,
        )?;
        svc.client_headers = list(ctx, "allowed_client_headers", allowed_client_headers)?;
        svc.client_headers_on_success = list(
            ctx,
            "allowed_client_headers_on_success",
            allowed_client_headers_on_success,
        )?;
    }
    Ok((me::Service::Http(svc), timeout, request_headers))
}

/// `BufferSettings`; Envoy's validation wants `max_request_bytes` above 0.
fn buffer_settings(
    ctx: &Ctx<'_>,
    field: &str,
    b: &pb::BufferSettings,
) -> Result<me::BufferSettings, ConvertError> {
    let pb::BufferSettings {
        max_request_bytes,
        allow_partial_message,
        pack_as_bytes,
    } = b;
    if *max_request_bytes == 0 {
        return Err(ctx.err(
            path(field, "max_request_bytes"),
            "max_request_bytes must be above 0",
        ));
    }
    Ok(me::BufferSettings {
        max_request_bytes: *max_request_bytes,
        allow_partial_message: *allow_partial_message,
        pack_as_bytes: *pack_as_bytes,
    })
}

/// The filter's configuration.
pub(super) fn ext_authz(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &pb::ExtAuthz,
) -> Result<me::ExtAuthz, ConvertError> {
    let cov = &EXT_AUTHZ;
    let pb::ExtAuthz {
        transport_api_version,
        failure_mode_allow,
        failure_mode_allow_header_add,
        with_request_body,
        clear_route_cache,
        status_on_error,
        validate_mutations,
        metadata_context_namespaces,
        typed_metadata_context_namespaces,
        route_metadata_context_namespaces,
        route_typed_metadata_context_namespaces,
        filter_enabled,
        filter_enabled_metadata,
        deny_at_disable,
        include_peer_certificate,
        stat_prefix,
        bootstrap_metadata_labels_key,
        allowed_headers,
        disallowed_headers,
        include_tls_session,
        charge_cluster_response_stats,
        encode_raw_headers,
        decoder_header_mutation_rules,
        enable_dynamic_metadata_ingestion,
        filter_metadata,
        emit_filter_state_stats,
        max_denied_response_body_bytes,
        enforce_response_header_limits,
        shadow_mode,
        emit_client_span,
        services,
    } = p;
    #[allow(deprecated)] // V2 is named to be refused
    let v2 = core_pb::ApiVersion::V2 as i32;
    if *transport_api_version == v2 {
        return Err(ctx.err(
            path(field, "transport_api_version"),
            "the V2 transport API is not supported; use V3",
        ));
    }
    let with_request_body = match with_request_body {
        None => None,
        Some(b) => Some(buffer_settings(ctx, &path(field, "with_request_body"), b)?),
    };
    ctx.refuse(
        cov,
        field,
        "metadata_context_namespaces",
        !metadata_context_namespaces.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "typed_metadata_context_namespaces",
        !typed_metadata_context_namespaces.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "route_metadata_context_namespaces",
        !route_metadata_context_namespaces.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "route_typed_metadata_context_namespaces",
        !route_typed_metadata_context_namespaces.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "include_peer_certificate",
        *include_peer_certificate,
    )?;
    ctx.refuse(
        cov,
        field,
        "bootstrap_metadata_labels_key",
        !bootstrap_metadata_labels_key.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "decoder_header_mutation_rules",
        decoder_header_mutation_rules.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "enable_dynamic_metadata_ingestion",
        enable_dynamic_metadata_ingestion
            .as_ref()
            .is_some_and(|b| !b.value),
    )?;
    ctx.refuse(cov, field, "filter_metadata", filter_metadata.is_some())?;
    ctx.refuse(
        cov,
        field,
        "emit_filter_state_stats",
        *emit_filter_state_stats,
    )?;
    ctx.refuse(cov, field, "shadow_mode", *shadow_mode)?;
    ctx.knob(
        cov,
        field,
        "charge_cluster_response_stats",
        charge_cluster_response_stats.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "enforce_response_header_limits",
        *enforce_response_header_limits,
    );
    ctx.knob(
        cov,
        field,
        "emit_client_span",
        emit_client_span.as_ref().is_some_and(|b| b.value),
    );
    let _ = (validate_mutations, clear_route_cache);
    let top_allowed = name_list(ctx, &path(field, "allowed_headers"), allowed_headers)?;
    let (service, timeout, allowed_headers) = match services {
        Some(pb::ext_authz::Services::GrpcService(g)) => {
            let (s, t) = grpc_service(ctx, &path(field, "grpc_service"), g)?;
            (s, t, top_allowed)
        }
        Some(pb::ext_authz::Services::HttpService(h)) => {
            let hf = path(field, "http_service");
            let (s, t, own) = http_service(ctx, &hf, h)?;
            if own.is_some() && top_allowed.is_some() {
                return Err(ctx.err(
                    path(&hf, "authorization_request.allowed_headers"),
                    "allowed_headers is set twice (here and in the filter); Envoy refuses it",
                ));
            }
            // An HTTP authorizer always gets these, as Envoy sends them.
            let mut list = own.or(top_allowed).unwrap_or_default();
            for h in ["authorization", ":method", ":path", ":authority"] {
                list.0.push(me::NameMatcher {
                    matcher: m::StringMatcher::Exact(h.into()),
                    ignore_case: false,
                });
            }
            (s, t, Some(list))
        }
        None => {
            return Err(ctx.err(field, "a grpc_service or http_service is required"));
        }
    };
    // Envoy answers 403 for a status outside 100..=511.
    let status_on_error = status_on_error
        .as_ref()
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|c| (100..=511).contains(c))
        .and_then(|c| http::StatusCode::from_u16(c).ok())
        .unwrap_or(http::StatusCode::FORBIDDEN);
    let filter_enabled_metadata = match filter_enabled_metadata {
        None => None,
        Some(mm) => Some(super::rbac::metadata_matcher(
            ctx,
            &path(field, "filter_enabled_metadata"),
            mm,
        )?),
    };
    let deny_at_disable = deny_at_disable.as_ref().is_some_and(|f| {
        let core_pb::RuntimeFeatureFlag {
            default_value,
            runtime_key,
        } = f;
        crate::runtime::current().flag(runtime_key, default_value.as_ref().is_some_and(|b| b.value))
    });
    Ok(me::ExtAuthz {
        service,
        timeout,
        failure_mode_allow: *failure_mode_allow,
        failure_mode_allow_header_add: *failure_mode_allow_header_add,
        status_on_error,
        filter_enabled: runtime_fraction(filter_enabled),
        filter_enabled_metadata,
        deny_at_disable,
        allowed_headers,
        disallowed_headers: name_list(ctx, &path(field, "disallowed_headers"), disallowed_headers)?
            .unwrap_or_default(),
        include_tls_session: *include_tls_session,
        stat_prefix: stat_prefix.clone(),
        clear_route_cache: *clear_route_cache,
        encode_raw_headers: *encode_raw_headers,
        max_denied_response_body_bytes: *max_denied_response_body_bytes,
        with_request_body,
    })
}

/// `envoy.filters.network.ext_authz`.
pub(super) fn network_ext_authz(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &envoy_types::pb::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz,
) -> Result<me::NetworkExtAuthz, ConvertError> {
    use envoy_types::pb::envoy::extensions::filters::network::ext_authz::v3::ExtAuthz as Net;
    let cov = &NETWORK_EXT_AUTHZ;
    let Net {
        stat_prefix,
        grpc_service: grpc,
        failure_mode_allow,
        include_peer_certificate,
        transport_api_version,
        filter_enabled_metadata,
        bootstrap_metadata_labels_key,
        include_tls_session,
        send_tls_alert_on_denial,
        metadata_context_namespaces,
        typed_metadata_context_namespaces,
        shadow_mode,
    } = p;
    #[allow(deprecated)] // V2 is named to be refused
    let v2 = core_pb::ApiVersion::V2 as i32;
    if *transport_api_version == v2 {
        return Err(ctx.err(
            path(field, "transport_api_version"),
            "the V2 transport API is not supported; use V3",
        ));
    }
    ctx.refuse(
        cov,
        field,
        "include_peer_certificate",
        *include_peer_certificate,
    )?;
    ctx.refuse(
        cov,
        field,
        "bootstrap_metadata_labels_key",
        !bootstrap_metadata_labels_key.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "send_tls_alert_on_denial",
        *send_tls_alert_on_denial,
    )?;
    ctx.refuse(
        cov,
        field,
        "metadata_context_namespaces",
        !metadata_context_namespaces.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "typed_metadata_context_namespaces",
        !typed_metadata_context_namespaces.is_empty(),
    )?;
    ctx.refuse(cov, field, "shadow_mode", *shadow_mode)?;
    let gf = path(field, "grpc_service");
    let Some(g) = grpc else {
        return Err(ctx.err(gf, "a grpc_service is required"));
    };
    let (service, timeout) = grpc_service(ctx, &gf, g)?;
    let me::Service::Grpc {
        cluster,
        authority,
        metadata,
    } = service
    else {
        return Err(ctx.err(gf, "an envoy_grpc service is required"));
    };
    let filter_enabled_metadata = match filter_enabled_metadata {
        None => None,
        Some(mm) => Some(super::rbac::metadata_matcher(
            ctx,
            &path(field, "filter_enabled_metadata"),
            mm,
        )?),
    };
    Ok(me::NetworkExtAuthz {
        stat_prefix: stat_prefix.clone(),
        cluster,
        authority,
        metadata,
        timeout,
        failure_mode_allow: *failure_mode_allow,
        filter_enabled_metadata,
        include_tls_session: *include_tls_session,
    })
}

/// `ExtAuthzPerRoute` of a route, virtual host or table.
pub(super) fn per_route(
    ctx: &mut Ctx<'_>,
    field: &str,
    typed: Typed,
) -> Result<me::ExtAuthzPerRoute, ConvertError> {
    use pb::ext_authz_per_route::Override;
    let p: pb::ExtAuthzPerRoute = typed.decode().map_err(|e| ctx.err(field, e))?;
    let pb::ExtAuthzPerRoute { r#override } = p;
    match r#override {
        Some(Override::Disabled(true)) => Ok(me::ExtAuthzPerRoute {
            disabled: true,
            ..Default::default()
        }),
        Some(Override::CheckSettings(s)) => {
            let cf = path(field, "check_settings");
            let pb::CheckSettings {
                context_extensions,
                disable_request_body_buffering,
                with_request_body,
                emit_client_span,
                service_override,
            } = s;
            let cov = &CHECK_SETTINGS;
            if disable_request_body_buffering && with_request_body.is_some() {
                // As Envoy, which refuses the pair.
                return Err(ctx.err(
                    path(&cf, "with_request_body"),
                    "only one of disable_request_body_buffering and with_request_body may be set",
                ));
            }
            let with_request_body = match &with_request_body {
                None => None,
                Some(b) => Some(buffer_settings(ctx, &path(&cf, "with_request_body"), b)?),
            };
            use pb::check_settings::ServiceOverride;
            match service_override {
                Some(ServiceOverride::GrpcService(_)) => {
                    return Err(ctx.refused(cov, &cf, "grpc_service"));
                }
                Some(ServiceOverride::HttpService(_)) => {
                    return Err(ctx.refused(cov, &cf, "http_service"));
                }
                None => {}
            }
            ctx.knob(
                cov,
                &cf,
                "emit_client_span",
                emit_client_span.as_ref().is_some_and(|b| b.value),
            );
            Ok(me::ExtAuthzPerRoute {
                disabled: false,
                context_extensions: context_extensions.into_iter().collect::<BTreeMap<_, _>>(),
                disable_request_body_buffering,
                with_request_body,
            })
        }
        _ => Err(ctx.err(
            field,
            "an ExtAuthzPerRoute needs disabled: true or check_settings",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Warnings;

    fn convert(p: &pb::ExtAuthz) -> Result<me::ExtAuthz, ConvertError> {
        let mut w = Warnings::default();
        let mut ctx = Ctx {
            resource: "listener in".into(),
            warnings: &mut w,
            inbound: true,
            outbound: false,
        };
        ext_authz(&mut ctx, "http_filters[0].typed_config", p)
    }

    fn names(l: &[&str]) -> Option<matcher_pb::ListStringMatcher> {
        Some(matcher_pb::ListStringMatcher {
            patterns: l
                .iter()
                .map(|n| matcher_pb::StringMatcher {
                    match_pattern: Some(matcher_pb::string_matcher::MatchPattern::Exact(
                        (*n).into(),
                    )),
                    ignore_case: false,
                })
                .collect(),
        })
    }

    fn http(allowed: Option<matcher_pb::ListStringMatcher>) -> pb::ExtAuthz {
        #[allow(deprecated)]
        let request = pb::AuthorizationRequest {
            allowed_headers: allowed,
            headers_to_add: vec![],
        };
        pb::ExtAuthz {
            services: Some(pb::ext_authz::Services::HttpService(pb::HttpService {
                server_uri: Some(core_pb::HttpUri {
                    uri: "http://authz".into(),
                    timeout: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    http_upstream_type: Some(core_pb::http_uri::HttpUpstreamType::Cluster(
                        "authz".into(),
                    )),
                }),
                authorization_request: Some(request),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn an_http_authorizer_always_gets_the_request_line_and_authorization() {
        let cfg = convert(&http(names(&["x-ext-authz"]))).expect("converts");
        let allowed = cfg.allowed_headers.expect("a list");
        for h in [
            "x-ext-authz",
            "authorization",
            ":method",
            ":path",
            ":authority",
        ] {
            assert!(allowed.matches(h), "{h}");
        }
        assert!(!allowed.matches("cookie"));
        // Set in both places: Envoy refuses it.
        let mut twice = http(names(&["a"]));
        twice.allowed_headers = names(&["b"]);
        let e = convert(&twice).expect_err("refused");
        assert!(
            e.field.ends_with("authorization_request.allowed_headers"),
            "{e}"
        );
    }

    #[test]
    fn a_grpc_authorizer_gets_every_header_unless_listed() {
        let grpc = pb::ExtAuthz {
            services: Some(pb::ext_authz::Services::GrpcService(core_pb::GrpcService {
                target_specifier: Some(core_pb::grpc_service::TargetSpecifier::EnvoyGrpc(
                    core_pb::grpc_service::EnvoyGrpc {
                        cluster_name: "authz".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })),
            status_on_error: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 999 }),
            ..Default::default()
        };
        let cfg = convert(&grpc).expect("converts");
        assert!(cfg.allowed_headers.is_none());
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        // Out of range: Envoy answers 403.
        assert_eq!(cfg.status_on_error, http::StatusCode::FORBIDDEN);
        let mut v2 = grpc.clone();
        #[allow(deprecated)]
        let old = core_pb::ApiVersion::V2 as i32;
        v2.transport_api_version = old;
        assert!(convert(&v2).is_err());
        let none = pb::ExtAuthz::default();
        assert!(convert(&none).is_err());
    }
}
