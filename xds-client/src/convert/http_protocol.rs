//! The downstream limits and protocol options of an
//! `HttpConnectionManager` → `ferry_model::http_protocol::DownstreamProtocol`:
//! `max_request_headers_kb`, `request_headers_timeout`, `drain_timeout`,
//! `common_http_protocol_options`, `http_protocol_options` and
//! `http2_protocol_options`.
//!
//! Every field of those messages is either applied, refused by name (where
//! Ferry would let through traffic Envoy would not, or where Envoy itself
//! refuses it), or, for pure tuning knobs, accepted with a warning. Bounds
//! are Envoy's own (proto validation), so a configuration Envoy rejects is
//! rejected here too, with the field's name.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::google::protobuf::{UInt32Value, UInt64Value};
use ferry_model::http_protocol as mh;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, duration, timeout_or};

fields!(pub(super) static COMMON_HTTP_PROTOCOL_OPTIONS = "envoy.config.core.v3.HttpProtocolOptions" ("downstream") {
    "idle_timeout": applied "the connection manager's idle timeout, default 1 h",
    "max_connection_duration": applied "HTTP/1 connections close between requests once this old, HTTP/2 connections drain",
    "max_headers_count": applied "0 is refused (Envoy's bound)",
    "max_response_headers_kb": refused "cannot be set on http_connection_manager (it limits upstream responses: set it on the cluster)",
    "max_stream_duration": applied,
    "headers_with_underscores_action": applied,
    "max_requests_per_connection": applied,
    "max_connection_duration_jitter": applied "a percentage in [0, 100] (Envoy's bound)",
});

fields!(pub(super) static HTTP1_PROTOCOL_OPTIONS = "envoy.config.core.v3.Http1ProtocolOptions" ("downstream") {
    "allow_absolute_url": refused "false is not supported: absolute-form request targets are always accepted, their authority becoming the Host",
    "accept_http_10": applied,
    "default_host_for_http_10": applied,
    "header_key_format": applied,
    "enable_trailers": warned "already the behaviour: HTTP/1 trailers are always passed on",
    "allow_chunked_length": applied,
    "override_stream_error_on_invalid_http_message": warned "a connection that sent an invalid HTTP/1 message is always closed",
    "send_fully_qualified_url": warned "it has no effect on a connection manager (it concerns upstream requests)",
    "use_balsa_parser": warned "deprecated and has no effect",
    "allow_custom_methods": applied,
    "ignore_http_11_upgrade": refused "not supported: every Upgrade request is handled as an upgrade",
});

fields!(pub(super) static HTTP2_PROTOCOL_OPTIONS = "envoy.config.core.v3.Http2ProtocolOptions" ("downstream") {
    "hpack_table_size": applied,
    "max_concurrent_streams": applied "in [1, 2147483647] (Envoy's bounds)",
    "initial_stream_window_size": applied "in [65535, 2147483647] (Envoy's bounds)",
    "initial_connection_window_size": applied "in [65535, 2147483647] (Envoy's bounds)",
    "allow_connect": warned "classic CONNECT (HBONE) is accepted either way and ruled by upgrade_configs; extended CONNECT (upgrades over HTTP/2) is not offered to clients",
    "allow_metadata": warned "METADATA frames are not supported (as in Envoy, not implemented)",
    "max_outbound_frames": warned "the HTTP/2 codec bounds its outbound queue itself (flow-control windows, one pending PING and SETTINGS acknowledgement at a time)",
    "max_outbound_control_frames": applied "0 is refused (Envoy's bound)",
    "max_consecutive_inbound_frames_with_empty_payload": applied,
    "max_inbound_priority_frames_per_stream": applied,
    "max_inbound_window_update_frames_per_data_frame_sent": applied "0 is refused (Envoy's bound)",
    "stream_error_on_invalid_http_messaging": warned "the HTTP/2 codec decides between stream and connection errors as RFC 9113 says",
    "override_stream_error_on_invalid_http_message": warned "the HTTP/2 codec decides between stream and connection errors as RFC 9113 says",
    "custom_settings_parameters": refused "not supported: custom SETTINGS parameters cannot be sent",
    "connection_keepalive": applied "without an interval no PING is sent (with a warning)",
    "use_oghttp2_codec": warned "codec tuning",
    "max_metadata_size": warned "METADATA frames are not supported (as in Envoy, not implemented)",
    "enable_huffman_encoding": warned "codec tuning",
    "max_header_field_size_kb": warned "only the header list as a whole is bounded (max_request_headers_kb); a value above it is refused",
    "disallow_obs_text": applied,
    "stream_reset_burst": applied,
    "stream_reset_rate": applied,
});

fields!(pub(super) static KEEPALIVE_SETTINGS = "envoy.config.core.v3.KeepaliveSettings" ("downstream") {
    "interval": applied "PINGs every interval; none without one",
    "timeout": applied "default 5 s",
    "interval_jitter": warned "PINGs are sent at the interval exactly",
    "connection_idle_interval": warned "PINGs are sent at the interval whether or not the connection is idle",
});

/// The downstream protocol options of `h`, at `field`.
pub(super) fn downstream(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<mh::DownstreamProtocol, ConvertError> {
    let mut p = mh::DownstreamProtocol::default();
    if let Some(kb) = h.max_request_headers_kb.as_ref().map(|v| v.value) {
        if kb == 0 || kb > mh::MAX_REQUEST_HEADERS_KB {
            return Err(ctx.err(
                format!("{field}.max_request_headers_kb"),
                format!("must be in (0, {}], got {kb}", mh::MAX_REQUEST_HEADERS_KB),
            ));
        }
        p.max_request_headers_bytes = kb * 1024;
    }
    p.request_headers_timeout = timeout_or(&h.request_headers_timeout, None);
    if let Some(d) = duration(&h.drain_timeout) {
        p.drain_timeout = d;
    }
    // `drain_timeout_jitter`, `delayed_close_timeout` and
    // `stream_flush_timeout` are tuning knobs the connection manager's own
    // list warns about.
    // `http1_safe_max_connection_duration` asks HTTP/1 connections to close
    // only between requests when they reach their age; Ferry's HTTP/1
    // connections never close otherwise, so both values are honoured.
    if let Some(c) = &h.common_http_protocol_options {
        common(ctx, &path(field, "common_http_protocol_options"), c, &mut p)?;
    }
    if let Some(o) = &h.http_protocol_options {
        p.http1 = http1(ctx, &path(field, "http_protocol_options"), o)?;
    }
    if let Some(o) = &h.http2_protocol_options {
        p.http2 = http2(
            ctx,
            &path(field, "http2_protocol_options"),
            o,
            p.max_request_headers_bytes,
        )?;
    }
    Ok(p)
}

fn common(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: &core_pb::HttpProtocolOptions,
    p: &mut mh::DownstreamProtocol,
) -> Result<(), ConvertError> {
    use core_pb::http_protocol_options::HeadersWithUnderscoresAction as U;
    let cov = &COMMON_HTTP_PROTOCOL_OPTIONS;
    let core_pb::HttpProtocolOptions {
        idle_timeout,
        max_connection_duration,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
        max_connection_duration_jitter,
    } = c;
    // `idle_timeout` is read by the connection manager (`hcm.idle_timeout`).
    let _ = idle_timeout;
    p.max_connection_duration = timeout_or(max_connection_duration, None);
    if let Some(j) = max_connection_duration_jitter {
        if !(0.0..=100.0).contains(&j.value) {
            return Err(ctx.err(
                path(field, "max_connection_duration_jitter"),
                format!("must be a percentage in [0, 100], got {}", j.value),
            ));
        }
        p.max_connection_duration_jitter = (j.value * 100.0).round() as u32;
    }
    if let Some(n) = max_headers_count.as_ref().map(|v| v.value) {
        if n == 0 {
            return Err(ctx.err(path(field, "max_headers_count"), "must be at least 1"));
        }
        p.max_headers_count = n;
    }
    // As Envoy: the field belongs to clusters.
    ctx.refuse(
        cov,
        field,
        "max_response_headers_kb",
        max_response_headers_kb.is_some(),
    )?;
    p.max_stream_duration = timeout_or(max_stream_duration, None);
    p.headers_with_underscores = match U::try_from(*headers_with_underscores_action) {
        Ok(U::Allow) => mh::UnderscoresAction::Allow,
        Ok(U::RejectRequest) => mh::UnderscoresAction::RejectRequest,
        Ok(U::DropHeader) => mh::UnderscoresAction::DropHeader,
        Err(_) => {
            return Err(ctx.err(
                path(field, "headers_with_underscores_action"),
                format!("unknown value {headers_with_underscores_action}"),
            ));
        }
    };
    p.max_requests_per_connection = max_requests_per_connection
        .as_ref()
        .map(|v| v.value)
        .filter(|n| *n > 0);
    Ok(())
}

#[allow(deprecated)] // use_balsa_parser is read to warn about it
fn http1(
    ctx: &mut Ctx<'_>,
    field: &str,
    o: &core_pb::Http1ProtocolOptions,
) -> Result<mh::Http1Options, ConvertError> {
    let cov = &HTTP1_PROTOCOL_OPTIONS;
    let core_pb::Http1ProtocolOptions {
        allow_absolute_url,
        accept_http_10,
        default_host_for_http_10,
        header_key_format,
        enable_trailers,
        allow_chunked_length,
        override_stream_error_on_invalid_http_message,
        send_fully_qualified_url,
        use_balsa_parser,
        allow_custom_methods,
        ignore_http_11_upgrade,
    } = o;
    ctx.refuse(
        cov,
        field,
        "allow_absolute_url",
        allow_absolute_url.as_ref().is_some_and(|v| !v.value),
    )?;
    ctx.refuse(
        cov,
        field,
        "ignore_http_11_upgrade",
        !ignore_http_11_upgrade.is_empty(),
    )?;
    let header_case = header_case(
        ctx,
        &path(field, "header_key_format"),
        header_key_format.as_ref(),
    )?;
    ctx.knob(cov, field, "enable_trailers", *enable_trailers);
    ctx.knob(
        cov,
        field,
        "override_stream_error_on_invalid_http_message",
        override_stream_error_on_invalid_http_message
            .as_ref()
            .is_some_and(|v| v.value),
    );
    ctx.knob(
        cov,
        field,
        "send_fully_qualified_url",
        *send_fully_qualified_url,
    );
    ctx.knob(cov, field, "use_balsa_parser", use_balsa_parser.is_some());
    Ok(mh::Http1Options {
        accept_http_10: *accept_http_10,
        default_host_for_http_10: default_host_for_http_10.clone(),
        allow_chunked_length: *allow_chunked_length,
        allow_custom_methods: *allow_custom_methods,
        header_case,
    })
}

const PRESERVE_CASE: &str =
    "envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig";

/// `header_key_format` (downstream and upstream alike): lower case by
/// default, as Envoy; `proper_case_words`; the `preserve_case` stateful
/// formatter. Proper case upper-cases the first letter and each letter
/// after a `-` (Envoy's also after any other non-alphanumeric character:
/// names with `_` or other symbols differ).
pub(super) fn header_case(
    ctx: &mut Ctx<'_>,
    field: &str,
    f: Option<&core_pb::http1_protocol_options::HeaderKeyFormat>,
) -> Result<mh::HeaderCase, ConvertError> {
    use core_pb::http1_protocol_options::header_key_format::HeaderFormat;
    use envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3 as pc;
    let Some(f) = f else {
        return Ok(mh::HeaderCase::Lower);
    };
    match &f.header_format {
        None => Ok(mh::HeaderCase::Lower),
        Some(HeaderFormat::ProperCaseWords(_)) => Ok(mh::HeaderCase::ProperCase),
        Some(HeaderFormat::StatefulFormatter(ext)) => {
            let tf = path(&path(field, "stateful_formatter"), "typed_config");
            let Some(any) = &ext.typed_config else {
                return Err(ctx.err(&tf, "the stateful formatter has no typed_config"));
            };
            let typed = super::Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
            if typed.type_name() != PRESERVE_CASE {
                return Err(ctx.err(
                    &tf,
                    format!("unsupported header formatter {}", typed.type_name()),
                ));
            }
            let pc::PreserveCaseFormatterConfig {
                forward_reason_phrase,
                formatter_type_on_envoy_headers,
            } = typed.decode().map_err(|e| ctx.err(&tf, e))?;
            if forward_reason_phrase {
                ctx.warn(
                    &path(&tf, "forward_reason_phrase"),
                    "tuning knob not applied: the reason phrase is the status code's own".into(),
                );
            }
            if formatter_type_on_envoy_headers != 0 {
                ctx.warn(
                    &path(&tf, "formatter_type_on_envoy_headers"),
                    "tuning knob not applied: headers the proxy adds are written in lower case"
                        .into(),
                );
            }
            Ok(mh::HeaderCase::Preserve)
        }
    }
}

#[allow(deprecated)] // stream_error_on_invalid_http_messaging is read to warn about it
fn http2(
    ctx: &mut Ctx<'_>,
    field: &str,
    o: &core_pb::Http2ProtocolOptions,
    max_headers_bytes: u32,
) -> Result<mh::Http2Options, ConvertError> {
    let cov = &HTTP2_PROTOCOL_OPTIONS;
    let core_pb::Http2ProtocolOptions {
        hpack_table_size,
        max_concurrent_streams,
        initial_stream_window_size,
        initial_connection_window_size,
        allow_connect,
        allow_metadata,
        max_outbound_frames,
        max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging,
        override_stream_error_on_invalid_http_message,
        custom_settings_parameters,
        connection_keepalive,
        use_oghttp2_codec,
        max_metadata_size,
        enable_huffman_encoding,
        max_header_field_size_kb,
        disallow_obs_text,
        stream_reset_burst,
        stream_reset_rate,
    } = o;
    let mut h = mh::Http2Options::default();
    let ranged =
        |v: &Option<UInt32Value>, name: &str, lo: u32, hi: u32| ranged(ctx, field, v, name, lo, hi);
    const MAX: u32 = 2_147_483_647;
    if let Some(v) = ranged(hpack_table_size, "hpack_table_size", 0, u32::MAX)? {
        h.hpack_table_size = v;
    }
    if let Some(v) = ranged(max_concurrent_streams, "max_concurrent_streams", 1, MAX)? {
        h.max_concurrent_streams = v;
    }
    if let Some(v) = ranged(
        initial_stream_window_size,
        "initial_stream_window_size",
        65535,
        MAX,
    )? {
        h.initial_stream_window_size = v;
    }
    if let Some(v) = ranged(
        initial_connection_window_size,
        "initial_connection_window_size",
        65535,
        MAX,
    )? {
        h.initial_connection_window_size = v;
    }
    let any = |v: &Option<UInt32Value>| v.as_ref().map(|v| v.value);
    if let Some(v) = any(max_consecutive_inbound_frames_with_empty_payload) {
        h.max_consecutive_empty_frames = v;
    }
    if let Some(v) = any(max_inbound_priority_frames_per_stream) {
        h.max_priority_frames_per_stream = v;
    }
    if let Some(v) = ranged(
        max_inbound_window_update_frames_per_data_frame_sent,
        "max_inbound_window_update_frames_per_data_frame_sent",
        1,
        u32::MAX,
    )? {
        h.max_window_updates_per_data_frame = v;
    }
    if let Some(v) = ranged(
        max_outbound_control_frames,
        "max_outbound_control_frames",
        1,
        u32::MAX,
    )? {
        h.max_outbound_control_frames = v;
    }
    let outbound = ranged(max_outbound_frames, "max_outbound_frames", 1, u32::MAX)?;
    ctx.knob(
        cov,
        field,
        "max_outbound_frames",
        outbound.is_some_and(|v| v != 10_000),
    );
    let wide = |v: &Option<UInt64Value>| {
        v.as_ref()
            .map(|v| u32::try_from(v.value).unwrap_or(u32::MAX))
    };
    if let Some(v) = wide(stream_reset_burst) {
        h.stream_reset_burst = v;
    }
    if let Some(v) = wide(stream_reset_rate) {
        h.stream_reset_rate = v;
    }
    if let Some(kb) = any(max_header_field_size_kb)
        && u64::from(kb) * 1024 > u64::from(max_headers_bytes)
    {
        return Err(ctx.err(
            path(field, "max_header_field_size_kb"),
            "must not exceed max_request_headers_kb",
        ));
    }
    ctx.knob(
        cov,
        field,
        "max_header_field_size_kb",
        max_header_field_size_kb.is_some(),
    );
    h.disallow_obs_text = disallow_obs_text.as_ref().is_some_and(|v| v.value);
    if let Some(k) = connection_keepalive {
        let at = path(field, "connection_keepalive");
        let kov = &KEEPALIVE_SETTINGS;
        let core_pb::KeepaliveSettings {
            interval,
            timeout,
            interval_jitter,
            connection_idle_interval,
        } = k;
        let interval = duration(interval).filter(|d| !d.is_zero());
        let timeout = duration(timeout).unwrap_or(Duration::from_secs(5));
        if interval.is_none() {
            ctx.warn(&at, "no interval: keepalive PINGs are not sent".into());
        }
        ctx.knob(kov, &at, "interval_jitter", interval_jitter.is_some());
        ctx.knob(
            kov,
            &at,
            "connection_idle_interval",
            connection_idle_interval.is_some(),
        );
        h.keepalive = interval.map(|interval| mh::Http2Keepalive { interval, timeout });
    }
    ctx.knob(cov, field, "allow_connect", *allow_connect);
    ctx.knob(cov, field, "allow_metadata", *allow_metadata);
    ctx.knob(cov, field, "max_metadata_size", max_metadata_size.is_some());
    ctx.knob(
        cov,
        field,
        "stream_error_on_invalid_http_messaging",
        *stream_error_on_invalid_http_messaging,
    );
    ctx.knob(
        cov,
        field,
        "override_stream_error_on_invalid_http_message",
        override_stream_error_on_invalid_http_message
            .as_ref()
            .is_some_and(|v| v.value),
    );
    ctx.refuse(
        cov,
        field,
        "custom_settings_parameters",
        !custom_settings_parameters.is_empty(),
    )?;
    ctx.knob(cov, field, "use_oghttp2_codec", use_oghttp2_codec.is_some());
    ctx.knob(
        cov,
        field,
        "enable_huffman_encoding",
        enable_huffman_encoding.is_some(),
    );
    Ok(h)
}

/// A number Envoy bounds to `[lo, hi]`.
fn ranged(
    ctx: &Ctx<'_>,
    field: &str,
    v: &Option<UInt32Value>,
    name: &str,
    lo: u32,
    hi: u32,
) -> Result<Option<u32>, ConvertError> {
    match v {
        None => Ok(None),
        Some(v) if (lo..=hi).contains(&v.value) => Ok(Some(v.value)),
        Some(v) => Err(ctx.err(
            format!("{field}.{name}"),
            format!("must be in [{lo}, {hi}], got {}", v.value),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Warnings;
    use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration};

    fn convert(
        h: &hcm_pb::HttpConnectionManager,
    ) -> (Result<mh::DownstreamProtocol, ConvertError>, Warnings) {
        let mut w = Warnings::default();
        let mut ctx = Ctx {
            resource: "listener \"l\"".into(),
            warnings: &mut w,
            inbound: false,
            outbound: false,
        };
        let r = downstream(&mut ctx, "hcm", h);
        (r, w)
    }

    fn secs(s: i64) -> Option<PbDuration> {
        Some(PbDuration {
            seconds: s,
            nanos: 0,
        })
    }

    #[test]
    fn unset_fields_take_envoys_defaults() {
        let (p, w) = convert(&hcm_pb::HttpConnectionManager::default());
        assert_eq!(p.unwrap(), mh::DownstreamProtocol::default());
        assert!(w.0.is_empty());
    }

    #[test]
    fn set_fields_are_applied() {
        let h = hcm_pb::HttpConnectionManager {
            max_request_headers_kb: Some(UInt32Value { value: 2 }),
            request_headers_timeout: secs(3),
            drain_timeout: secs(1),
            common_http_protocol_options: Some(core_pb::HttpProtocolOptions {
                max_headers_count: Some(UInt32Value { value: 10 }),
                headers_with_underscores_action: 2,
                max_connection_duration: secs(60),
                max_requests_per_connection: Some(UInt32Value { value: 5 }),
                ..Default::default()
            }),
            http_protocol_options: Some(core_pb::Http1ProtocolOptions {
                accept_http_10: true,
                default_host_for_http_10: "h".into(),
                allow_chunked_length: true,
                ..Default::default()
            }),
            http2_protocol_options: Some(core_pb::Http2ProtocolOptions {
                max_concurrent_streams: Some(UInt32Value { value: 7 }),
                initial_stream_window_size: Some(UInt32Value { value: 65535 }),
                stream_reset_burst: Some(UInt64Value { value: 3 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (p, _) = convert(&h);
        let p = p.unwrap();
        assert_eq!(p.max_request_headers_bytes, 2048);
        assert_eq!(p.request_headers_timeout, Some(Duration::from_secs(3)));
        assert_eq!(p.drain_timeout, Duration::from_secs(1));
        assert_eq!(p.max_headers_count, 10);
        assert_eq!(
            p.headers_with_underscores,
            mh::UnderscoresAction::DropHeader
        );
        assert_eq!(p.max_connection_duration, Some(Duration::from_secs(60)));
        assert_eq!(p.max_requests_per_connection, Some(5));
        assert!(p.http1.accept_http_10 && p.http1.allow_chunked_length);
        assert_eq!(p.http1.default_host_for_http_10, "h");
        assert_eq!(p.http2.max_concurrent_streams, 7);
        assert_eq!(p.http2.initial_stream_window_size, 65535);
        assert_eq!(p.http2.stream_reset_burst, 3);
    }

    #[test]
    fn out_of_range_and_unsupported_fields_are_refused_by_name() {
        let cases: Vec<(hcm_pb::HttpConnectionManager, &str)> = vec![
            (
                hcm_pb::HttpConnectionManager {
                    max_request_headers_kb: Some(UInt32Value { value: 9000 }),
                    ..Default::default()
                },
                "hcm.max_request_headers_kb",
            ),
            (
                hcm_pb::HttpConnectionManager {
                    common_http_protocol_options: Some(core_pb::HttpProtocolOptions {
                        max_response_headers_kb: Some(UInt32Value { value: 10 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "hcm.common_http_protocol_options.max_response_headers_kb",
            ),
            (
                hcm_pb::HttpConnectionManager {
                    http_protocol_options: Some(core_pb::Http1ProtocolOptions {
                        allow_absolute_url: Some(BoolValue { value: false }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "hcm.http_protocol_options.allow_absolute_url",
            ),
            (
                hcm_pb::HttpConnectionManager {
                    http2_protocol_options: Some(core_pb::Http2ProtocolOptions {
                        initial_stream_window_size: Some(UInt32Value { value: 1000 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "hcm.http2_protocol_options.initial_stream_window_size",
            ),
        ];
        for (h, field) in cases {
            let e = convert(&h).0.unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn tuning_knobs_warn() {
        let h = hcm_pb::HttpConnectionManager {
            http_protocol_options: Some(core_pb::Http1ProtocolOptions {
                enable_trailers: true,
                ..Default::default()
            }),
            http2_protocol_options: Some(core_pb::Http2ProtocolOptions {
                max_outbound_frames: Some(UInt32Value { value: 20 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (p, w) = convert(&h);
        assert!(p.is_ok());
        assert_eq!(w.0.len(), 2, "{:?}", w.0);
        assert!(w.0.iter().all(|w| w.contains("tuning knob")), "{:?}", w.0);
    }
}
