//! `envoy.config.core.v3.HealthCheck` (a cluster's `health_checks`): the
//! timing, the thresholds and the checker (HTTP, TCP, gRPC), with Envoy's
//! validation and defaults. Custom checkers and event logs are refused.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::r#type::v3 as type_pb;
use ferry_model as m;
use m::health_check as hc;

use super::coverage::{fields, path};
use super::matcher::string_matcher;
use super::{ConvertError, Ctx, duration};

fields!(pub(super) static HEALTH_CHECK = "envoy.config.core.v3.HealthCheck" {
    "timeout": applied,
    "interval": applied,
    "initial_jitter": applied,
    "interval_jitter": applied,
    "interval_jitter_percent": applied,
    "unhealthy_threshold": applied,
    "healthy_threshold": applied,
    "alt_port": inert "not implemented by Envoy either",
    "reuse_connection": applied,
    "http_health_check": applied,
    "tcp_health_check": applied,
    "grpc_health_check": applied,
    "custom_health_check": refused "custom health checkers are not supported",
    "no_traffic_interval": applied,
    "no_traffic_healthy_interval": applied,
    "unhealthy_interval": applied,
    "unhealthy_edge_interval": applied,
    "healthy_edge_interval": applied,
    "event_log_path": refused "health check event logs are not written",
    "event_logger": refused "health check event logs are not written",
    "event_service": refused "health check event services are not supported",
    "always_log_health_check_failures": inert "read only by event logs, which are refused",
    "always_log_health_check_success": inert "read only by event logs, which are refused",
    "tls_options": warned "check connections offer the transport's own ALPN",
    "transport_socket_match_criteria": applied,
});

fields!(pub(super) static HTTP_HEALTH_CHECK = "envoy.config.core.v3.HealthCheck.HttpHealthCheck" {
    "host": applied,
    "path": applied,
    "send": refused "HTTP health checks with a request payload are not supported",
    "receive": refused "HTTP health checks matching the response payload are not supported",
    "response_buffer_size": inert "read only with receive, which is refused",
    "request_headers_to_add": applied "literal values (format strings refused)",
    "request_headers_to_remove": applied,
    "expected_statuses": applied,
    "retriable_statuses": applied,
    "codec_client_type": applied "HTTP1, HTTP2 (HTTP3 refused)",
    "service_name_matcher": applied,
    "method": applied,
});

fields!(pub(super) static TCP_HEALTH_CHECK = "envoy.config.core.v3.HealthCheck.TcpHealthCheck" {
    "send": applied,
    "receive": applied,
    "proxy_protocol_config": refused "PROXY protocol headers on health checks are not supported",
});

fields!(pub(super) static GRPC_HEALTH_CHECK = "envoy.config.core.v3.HealthCheck.GrpcHealthCheck" {
    "service_name": applied,
    "authority": applied,
    "initial_metadata": applied "literal values (format strings refused)",
});

fields!(pub(super) static PAYLOAD = "envoy.config.core.v3.HealthCheck.Payload" {
    "text": applied "hex-encoded bytes",
    "binary": applied,
});

fields!(pub(super) static ENDPOINT_HEALTH_CHECK_CONFIG = "envoy.config.endpoint.v3.Endpoint.HealthCheckConfig" {
    "port_value": applied,
    "hostname": applied,
    "address": applied,
    "disable_active_health_check": applied,
});

/// Envoy's default `no_traffic_interval`.
const NO_TRAFFIC_INTERVAL: Duration = Duration::from_secs(60);

/// A cluster's `health_checks`: none, or one check.
pub(super) fn health_checks(
    ctx: &mut Ctx<'_>,
    field: &str,
    checks: &[core_pb::HealthCheck],
) -> Result<Option<hc::HealthCheck>, ConvertError> {
    match checks {
        [] => Ok(None),
        [one] => health_check(ctx, &format!("{field}[0]"), one).map(Some),
        _ => Err(ctx.err(
            field,
            "more than one health check per cluster is not supported",
        )),
    }
}

#[allow(deprecated)] // `event_log_path` is deprecated but still sent.
fn health_check(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &core_pb::HealthCheck,
) -> Result<hc::HealthCheck, ConvertError> {
    use core_pb::health_check::HealthChecker as C;
    let cov = &HEALTH_CHECK;
    let core_pb::HealthCheck {
        timeout,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        unhealthy_threshold,
        healthy_threshold,
        alt_port,
        reuse_connection,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        event_log_path,
        event_logger,
        event_service,
        always_log_health_check_failures,
        always_log_health_check_success,
        tls_options,
        transport_socket_match_criteria,
        health_checker,
    } = h;
    let _ = (
        alt_port,
        always_log_health_check_failures,
        always_log_health_check_success,
    );
    ctx.refuse(cov, field, "event_log_path", !event_log_path.is_empty())?;
    ctx.refuse(cov, field, "event_logger", !event_logger.is_empty())?;
    ctx.refuse(cov, field, "event_service", event_service.is_some())?;
    ctx.knob(cov, field, "tls_options", tls_options.is_some());
    // Envoy's validation: both durations are required and positive.
    let positive =
        |name: &str, d: &Option<envoy_types::pb::google::protobuf::Duration>| match duration(d) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(ctx.err(path(field, name), "is required and must be greater than 0")),
        };
    let timeout = positive("timeout", timeout)?;
    let interval = positive("interval", interval)?;
    let optional_positive =
        |name: &str, d: &Option<envoy_types::pb::google::protobuf::Duration>| match duration(d) {
            Some(d) if d.is_zero() => Err(ctx.err(path(field, name), "must be greater than 0")),
            d => Ok(d),
        };
    let threshold = |name: &str, v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
        v.as_ref()
            .map(|v| v.value)
            .ok_or_else(|| ctx.err(path(field, name), "is required"))
    };
    let unhealthy_threshold = threshold("unhealthy_threshold", unhealthy_threshold)?;
    let healthy_threshold = threshold("healthy_threshold", healthy_threshold)?;
    let no_traffic = optional_positive("no_traffic_interval", no_traffic_interval)?
        .unwrap_or(NO_TRAFFIC_INTERVAL);
    let no_traffic_healthy =
        optional_positive("no_traffic_healthy_interval", no_traffic_healthy_interval)?
            .unwrap_or(no_traffic);
    let unhealthy =
        optional_positive("unhealthy_interval", unhealthy_interval)?.unwrap_or(interval);
    let unhealthy_edge =
        optional_positive("unhealthy_edge_interval", unhealthy_edge_interval)?.unwrap_or(unhealthy);
    let healthy_edge =
        optional_positive("healthy_edge_interval", healthy_edge_interval)?.unwrap_or(interval);
    let criteria = transport_socket_match_criteria.as_ref().map(|st| {
        st.fields
            .iter()
            .map(|(k, v)| (k.clone(), super::core_types::value_string(v)))
            .collect()
    });
    let checker = match health_checker {
        None => {
            return Err(ctx.err(
                field,
                "a health checker (http_health_check, tcp_health_check or grpc_health_check) is required",
            ));
        }
        Some(C::HttpHealthCheck(h)) => {
            hc::Checker::Http(http_check(ctx, &path(field, "http_health_check"), h)?)
        }
        Some(C::TcpHealthCheck(t)) => {
            hc::Checker::Tcp(tcp_check(ctx, &path(field, "tcp_health_check"), t)?)
        }
        Some(C::GrpcHealthCheck(g)) => {
            hc::Checker::Grpc(grpc_check(ctx, &path(field, "grpc_health_check"), g)?)
        }
        Some(C::CustomHealthCheck(c)) => {
            let e = ctx.refused(cov, field, "custom_health_check");
            return Err(ctx.err(e.field, format!("{} ({:?})", e.message, c.name)));
        }
    };
    Ok(hc::HealthCheck {
        timeout,
        interval,
        initial_jitter: duration(initial_jitter).unwrap_or_default(),
        interval_jitter: duration(interval_jitter).unwrap_or_default(),
        interval_jitter_percent: *interval_jitter_percent,
        unhealthy_threshold,
        healthy_threshold,
        no_traffic_interval: no_traffic,
        no_traffic_healthy_interval: no_traffic_healthy,
        unhealthy_interval: unhealthy,
        unhealthy_edge_interval: unhealthy_edge,
        healthy_edge_interval: healthy_edge,
        reuse_connection: reuse_connection.as_ref().is_none_or(|v| v.value),
        transport_socket_match_criteria: criteria,
        checker,
    })
}

/// `[start, end)` ranges of HTTP statuses (Envoy: within 100..600).
fn ranges(
    ctx: &Ctx<'_>,
    field: &str,
    rs: &[type_pb::Int64Range],
) -> Result<Vec<(u16, u16)>, ConvertError> {
    rs.iter()
        .enumerate()
        .map(|(i, r)| {
            let type_pb::Int64Range { start, end } = r;
            if !(100..600).contains(start) || !(101..=600).contains(end) || start >= end {
                return Err(ctx.err(
                    format!("{field}[{i}]"),
                    format!(
                        "invalid status range [{start}, {end}): statuses lie within [100, 600)"
                    ),
                ));
            }
            Ok((*start as u16, *end as u16))
        })
        .collect()
}

/// Literal headers of a check's request (a format string is refused: the
/// check has no request to format from).
fn literal_headers(
    ctx: &Ctx<'_>,
    field: &str,
    add: &[core_pb::HeaderValueOption],
) -> Result<Vec<hc::HeaderToAdd>, ConvertError> {
    let mutations = super::header_mutation::header_mutations(ctx, field, add, "", &[])?;
    let mut out = Vec::new();
    for (i, op) in mutations.ops.iter().enumerate() {
        let m::HeaderOp::Add(h) = op else { continue };
        let value = h
            .value
            .as_literal()
            .and_then(|v| http::HeaderValue::from_str(&v).ok())
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}[{i}].header.value"),
                    "format strings in health check headers are not supported",
                )
            })?;
        out.push(hc::HeaderToAdd {
            name: h.name.clone(),
            value,
            append: h.action == m::AppendAction::AppendIfExistsOrAdd,
        });
    }
    Ok(out)
}

fn http_check(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &core_pb::health_check::HttpHealthCheck,
) -> Result<hc::HttpCheck, ConvertError> {
    use core_pb::RequestMethod as M;
    let cov = &HTTP_HEALTH_CHECK;
    let core_pb::health_check::HttpHealthCheck {
        host,
        path: check_path,
        send,
        receive,
        response_buffer_size,
        request_headers_to_add,
        request_headers_to_remove,
        expected_statuses,
        retriable_statuses,
        codec_client_type,
        service_name_matcher,
        method,
    } = h;
    let _ = response_buffer_size;
    ctx.refuse(cov, field, "send", send.is_some())?;
    ctx.refuse(cov, field, "receive", !receive.is_empty())?;
    if check_path.is_empty() {
        return Err(ctx.err(path(field, "path"), "a path is required"));
    }
    let method = match M::try_from(*method) {
        Ok(M::MethodUnspecified | M::Get) => http::Method::GET,
        Ok(M::Head) => http::Method::HEAD,
        Ok(M::Post) => http::Method::POST,
        Ok(M::Put) => http::Method::PUT,
        Ok(M::Delete) => http::Method::DELETE,
        Ok(M::Options) => http::Method::OPTIONS,
        Ok(M::Trace) => http::Method::TRACE,
        Ok(M::Patch) => http::Method::PATCH,
        Ok(M::Connect) | Err(_) => {
            return Err(ctx.err(
                path(field, "method"),
                "CONNECT (or an unknown method) is not allowed",
            ));
        }
    };
    let http2 = match type_pb::CodecClientType::try_from(*codec_client_type) {
        Ok(type_pb::CodecClientType::Http1) => false,
        Ok(type_pb::CodecClientType::Http2) => true,
        _ => {
            return Err(ctx.err(
                path(field, "codec_client_type"),
                "only HTTP1 and HTTP2 health checks are supported",
            ));
        }
    };
    let mut headers_to_remove = Vec::new();
    for (i, n) in request_headers_to_remove.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{field}.request_headers_to_remove[{i}]"),
                    "not a valid header name",
                )
            })?;
        headers_to_remove.push(name);
    }
    let expected = ranges(ctx, &path(field, "expected_statuses"), expected_statuses)?;
    Ok(hc::HttpCheck {
        host: (!host.is_empty()).then(|| host.clone()),
        path: check_path.clone(),
        method,
        headers_to_add: literal_headers(
            ctx,
            &path(field, "request_headers_to_add"),
            request_headers_to_add,
        )?,
        headers_to_remove,
        expected_statuses: if expected.is_empty() {
            vec![(200, 201)]
        } else {
            expected
        },
        retriable_statuses: ranges(ctx, &path(field, "retriable_statuses"), retriable_statuses)?,
        http2,
        service_name_matcher: service_name_matcher
            .as_ref()
            .map(|s| string_matcher(ctx, &path(field, "service_name_matcher"), s))
            .transpose()?,
    })
}

fn payload(
    ctx: &Ctx<'_>,
    field: &str,
    p: &core_pb::health_check::Payload,
) -> Result<Vec<u8>, ConvertError> {
    use core_pb::health_check::payload::Payload as P;
    match &p.payload {
        Some(P::Binary(b)) => Ok(b.clone()),
        Some(P::Text(t)) => hex_bytes(t).ok_or_else(|| {
            ctx.err(
                path(field, "text"),
                format!("{t:?} is not hex-encoded bytes"),
            )
        }),
        None => Err(ctx.err(field, "a payload (text or binary) is required")),
    }
}

/// Envoy's `text` payloads are hex strings (case-insensitive, even length).
fn hex_bytes(t: &str) -> Option<Vec<u8>> {
    if t.is_empty() || !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

fn tcp_check(
    ctx: &mut Ctx<'_>,
    field: &str,
    t: &core_pb::health_check::TcpHealthCheck,
) -> Result<hc::TcpCheck, ConvertError> {
    let core_pb::health_check::TcpHealthCheck {
        send,
        receive,
        proxy_protocol_config,
    } = t;
    ctx.refuse(
        &TCP_HEALTH_CHECK,
        field,
        "proxy_protocol_config",
        proxy_protocol_config.is_some(),
    )?;
    Ok(hc::TcpCheck {
        send: send
            .as_ref()
            .map(|p| payload(ctx, &path(field, "send"), p))
            .transpose()?
            .unwrap_or_default(),
        receive: receive
            .iter()
            .enumerate()
            .map(|(i, p)| payload(ctx, &format!("{field}.receive[{i}]"), p))
            .collect::<Result<_, _>>()?,
    })
}

fn grpc_check(
    ctx: &mut Ctx<'_>,
    field: &str,
    g: &core_pb::health_check::GrpcHealthCheck,
) -> Result<hc::GrpcCheck, ConvertError> {
    let core_pb::health_check::GrpcHealthCheck {
        service_name,
        authority,
        initial_metadata,
    } = g;
    Ok(hc::GrpcCheck {
        service_name: service_name.clone(),
        authority: (!authority.is_empty()).then(|| authority.clone()),
        metadata: literal_headers(ctx, &path(field, "initial_metadata"), initial_metadata)?,
    })
}

/// An endpoint's `health_check_config`.
pub(super) fn endpoint_check(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: Option<&envoy_types::pb::envoy::config::endpoint::v3::endpoint::HealthCheckConfig>,
) -> Result<hc::EndpointCheck, ConvertError> {
    let Some(c) = c else {
        return Ok(hc::EndpointCheck::default());
    };
    let envoy_types::pb::envoy::config::endpoint::v3::endpoint::HealthCheckConfig {
        port_value,
        hostname,
        address,
        disable_active_health_check,
    } = c;
    let port = match *port_value {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| ctx.err(path(field, "port_value"), format!("{p} is not a port")))?,
        ),
    };
    let address = match address {
        Some(_) => Some(super::core_types::host_addr(
            ctx,
            &path(field, "address"),
            address,
        )?),
        None => None,
    };
    Ok(hc::EndpointCheck {
        port,
        address,
        hostname: (!hostname.is_empty()).then(|| std::sync::Arc::from(hostname.as_str())),
        disabled: *disable_active_health_check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{Warnings, cluster};

    fn convert(json: &str) -> Result<m::Cluster, ConvertError> {
        let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            crate::convert::coverage::cluster_from_json(json);
        cluster(&c, &mut Warnings::default())
    }

    #[test]
    fn hex_payloads() {
        assert_eq!(hex_bytes("0a0B"), Some(vec![0x0a, 0x0b]));
        assert_eq!(hex_bytes("abc"), None);
        assert_eq!(hex_bytes("zz"), None);
        assert_eq!(hex_bytes(""), None);
    }

    #[test]
    fn http_check_with_envoy_defaults() {
        let c = convert(
            r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s",
              "interval": "2s", "unhealthy_threshold": 3, "healthy_threshold": 2,
              "http_health_check": {"path": "/healthz"}}]}"#,
        )
        .expect("converts");
        let h = c.health_check.expect("a health check");
        assert_eq!(h.timeout, Duration::from_secs(1));
        assert_eq!(h.interval, Duration::from_secs(2));
        assert_eq!(h.unhealthy_interval, Duration::from_secs(2));
        assert_eq!(h.unhealthy_edge_interval, Duration::from_secs(2));
        assert_eq!(h.healthy_edge_interval, Duration::from_secs(2));
        assert_eq!(h.no_traffic_interval, Duration::from_secs(60));
        assert_eq!(h.no_traffic_healthy_interval, Duration::from_secs(60));
        assert_eq!((h.unhealthy_threshold, h.healthy_threshold), (3, 2));
        assert!(h.reuse_connection);
        let hc::Checker::Http(http) = h.checker else {
            panic!("an HTTP check")
        };
        assert_eq!(http.path, "/healthz");
        assert_eq!(http.method, http::Method::GET);
        assert_eq!(http.expected_statuses, vec![(200, 201)]);
        assert!(!http.http2);
        assert!(http.host.is_none());
    }

    #[test]
    fn http_check_settings() {
        let c = convert(
            r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s",
              "interval": "2s", "unhealthy_threshold": 3, "healthy_threshold": 2,
              "unhealthy_interval": "5s", "no_traffic_interval": "3s",
              "reuse_connection": false,
              "transport_socket_match_criteria": {"tlsMode": "istio"},
              "http_health_check": {"path": "/h", "host": "svc", "method": "HEAD",
                "codec_client_type": "HTTP2",
                "expected_statuses": [{"start": 200, "end": 300}],
                "retriable_statuses": [{"start": 503, "end": 504}],
                "request_headers_to_add": [{"header": {"key": "x-hc", "value": "1"}}],
                "request_headers_to_remove": ["User-Agent"],
                "service_name_matcher": {"prefix": "svc"}}}]}"#,
        )
        .expect("converts");
        let h = c.health_check.expect("a health check");
        assert_eq!(h.unhealthy_edge_interval, Duration::from_secs(5));
        assert_eq!(h.no_traffic_healthy_interval, Duration::from_secs(3));
        assert!(!h.reuse_connection);
        assert_eq!(
            h.transport_socket_match_criteria,
            Some(vec![("tlsMode".to_string(), "istio".to_string())])
        );
        let hc::Checker::Http(http) = h.checker else {
            panic!("an HTTP check")
        };
        assert_eq!(http.host.as_deref(), Some("svc"));
        assert_eq!(http.method, http::Method::HEAD);
        assert!(http.http2);
        assert_eq!(http.expected_statuses, vec![(200, 300)]);
        assert!(hc::in_ranges(&http.retriable_statuses, 503));
        assert_eq!(http.headers_to_add[0].name, "x-hc");
        assert_eq!(http.headers_to_remove[0], "user-agent");
        assert!(http.service_name_matcher.is_some());
    }

    #[test]
    fn tcp_and_grpc_checks() {
        let c = convert(
            r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s",
              "interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1,
              "tcp_health_check": {"send": {"text": "50494e47"},
                "receive": [{"text": "504f4e47"}, {"binary": "IQ=="}]}}]}"#,
        )
        .expect("converts");
        let hc::Checker::Tcp(t) = c.health_check.expect("check").checker else {
            panic!("a TCP check")
        };
        assert_eq!(t.send, b"PING");
        assert_eq!(t.receive, vec![b"PONG".to_vec(), b"!".to_vec()]);
        let c = convert(
            r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s",
              "interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1,
              "grpc_health_check": {"service_name": "svc", "authority": "a.b"}}]}"#,
        )
        .expect("converts");
        let hc::Checker::Grpc(g) = c.health_check.expect("check").checker else {
            panic!("a gRPC check")
        };
        assert_eq!(g.service_name, "svc");
        assert_eq!(g.authority.as_deref(), Some("a.b"));
    }

    #[test]
    fn invalid_or_unsupported_checks_are_refused_by_name() {
        let base = r#""timeout": "1s", "interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1"#;
        let cases = [
            (
                format!(r#"{{{base}, "custom_health_check": {{"name": "envoy.health_checkers.redis"}}}}"#),
                "custom_health_check",
            ),
            (
                format!(r#"{{{base}, "event_log_path": "/tmp/x", "tcp_health_check": {{}}}}"#),
                "event_log_path",
            ),
            (format!(r#"{{{base}}}"#), "health_checks[0]"),
            (
                r#"{"interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}}"#.to_string(),
                "timeout",
            ),
            (
                r#"{"timeout": "1s", "interval": "2s", "healthy_threshold": 1, "tcp_health_check": {}}"#.to_string(),
                "unhealthy_threshold",
            ),
            (
                format!(r#"{{{base}, "tcp_health_check": {{"send": {{"text": "xyz"}}}}}}"#),
                "send.text",
            ),
            (
                format!(r#"{{{base}, "http_health_check": {{"path": "/", "codec_client_type": "HTTP3"}}}}"#),
                "codec_client_type",
            ),
            (
                format!(r#"{{{base}, "http_health_check": {{"path": "/", "request_headers_to_add": [{{"header": {{"key": "x", "value": "%START_TIME%"}}}}]}}}}"#),
                "request_headers_to_add[0]",
            ),
            (
                format!(r#"{{{base}, "http_health_check": {{"path": "/", "expected_statuses": [{{"start": 200, "end": 700}}]}}}}"#),
                "expected_statuses[0]",
            ),
        ];
        for (check, field) in cases {
            let json = format!(r#"{{"name": "c", "type": "STATIC", "health_checks": [{check}]}}"#);
            let e = convert(&json).expect_err(&check);
            assert!(e.field.contains(field), "{check}: {e}");
        }
        let two = format!(
            r#"{{"name": "c", "type": "STATIC", "health_checks": [{{{base}, "tcp_health_check": {{}}}}, {{{base}, "tcp_health_check": {{}}}}]}}"#
        );
        assert!(convert(&two).is_err());
    }

    #[test]
    fn endpoint_health_check_config_is_read() {
        let c = convert(
            r#"{"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c",
              "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address":
              {"address": "127.0.0.1", "port_value": 80}}, "health_check_config":
              {"port_value": 8080, "hostname": "h.example"}}}]}]}}"#,
        )
        .expect("converts");
        let m::ClusterKind::Static(eps) = c.kind else {
            panic!("static")
        };
        let hc = eps[0].health_check();
        assert_eq!(hc.port, Some(8080));
        assert_eq!(hc.hostname.as_deref(), Some("h.example"));
        assert_eq!(
            hc.target(&eps[0].address).to_string(),
            "127.0.0.1:8080".to_string()
        );
    }
}
