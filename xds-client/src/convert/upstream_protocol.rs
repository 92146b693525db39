//! A cluster's upstream HTTP settings: the typed
//! `envoy.extensions.upstreams.http.v3.HttpProtocolOptions` and the
//! deprecated cluster-level forms, with `core.v3.HttpProtocolOptions`,
//! `Http1ProtocolOptions`, `Http2ProtocolOptions` and
//! `UpstreamHttpProtocolOptions` as they apply to upstream connections.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http_pb;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, Typed, timeout_or};

fields!(pub(super) static HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
    "common_http_protocol_options": applied,
    "upstream_http_protocol_options": applied,
    "explicit_http_config": applied,
    "use_downstream_protocol_config": applied,
    "auto_config": applied "HTTP/1.1 (a protocol negotiated by ALPN is not used)",
    "http_filters": refused "upstream HTTP filters are not supported",
    "header_validation_config": refused "header validation extensions are not supported",
    "outlier_detection": refused "upstream error matchers for outlier detection are not supported",
    "request_mirror_policies": refused "cluster-level mirror policies are not supported",
    "hash_policy": refused "cluster-level hash policies are not supported",
    "retry_policy": refused "cluster-level retry policies are not supported",
});

fields!(pub(super) static EXPLICIT_HTTP_CONFIG = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig" {
    "http_protocol_options": applied "HTTP/1.1",
    "http2_protocol_options": applied "HTTP/2",
    "http3_protocol_options": refused "HTTP/3 upstreams are not supported",
});

fields!(pub(super) static USE_DOWNSTREAM_HTTP_CONFIG = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig" {
    "http_protocol_options": applied,
    "http2_protocol_options": applied,
    "http3_protocol_options": refused "HTTP/3 upstreams are not supported",
});

fields!(pub(super) static AUTO_HTTP_CONFIG = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig" {
    "http_protocol_options": applied,
    "http2_protocol_options": applied,
    "http3_protocol_options": refused "HTTP/3 upstreams are not supported",
    "alternate_protocols_cache_options": refused "alternate protocol caches (HTTP/3) are not supported",
});

fields!(pub(super) static COMMON_HTTP_PROTOCOL_OPTIONS = "envoy.config.core.v3.HttpProtocolOptions" ("upstream") {
    "idle_timeout": applied "default 1 h",
    "max_connection_duration": applied "the connection takes no new request once this old, and closes when idle",
    "max_connection_duration_jitter": warned "connections are recycled at max_connection_duration exactly",
    "max_headers_count": warned "responses may carry up to 100 headers (the HTTP codec's limit)",
    "max_response_headers_kb": warned "response heads are bounded by the HTTP codec's limit",
    "max_stream_duration": refused "a cluster-level maximum stream duration is not supported (set the route's)",
    "headers_with_underscores_action": inert "Envoy applies it to downstream requests only",
    "max_requests_per_connection": applied,
});

fields!(pub(super) static HTTP1_PROTOCOL_OPTIONS = "envoy.config.core.v3.Http1ProtocolOptions" ("upstream") {
    "allow_absolute_url": inert "Envoy reads it for downstream requests only",
    "accept_http_10": inert "Envoy reads it for downstream requests only",
    "default_host_for_http_10": inert "Envoy reads it for downstream requests only",
    "header_key_format": applied,
    "enable_trailers": warned "HTTP/1 trailers are passed as the codec parses them",
    "allow_chunked_length": warned "responses with both Content-Length and chunked are refused",
    "override_stream_error_on_invalid_http_message": warned "an invalid response ends its connection",
    "send_fully_qualified_url": refused "absolute-form request targets upstream are not supported",
    "use_balsa_parser": inert "a parser choice with the same results",
    "allow_custom_methods": inert "Envoy reads it for downstream requests only",
    "ignore_http_11_upgrade": inert "Envoy reads it for downstream requests only",
});

fields!(pub(super) static HTTP2_PROTOCOL_OPTIONS = "envoy.config.core.v3.Http2ProtocolOptions" ("upstream") {
    "max_concurrent_streams": applied,
    "hpack_table_size": warned "the codec's HPACK table size applies",
    "initial_stream_window_size": warned "the codec's flow-control windows apply",
    "initial_connection_window_size": warned "the codec's flow-control windows apply",
    "allow_connect": inert "Envoy reads it for downstream connections only",
    "allow_metadata": inert "metadata frames are never sent",
    "max_outbound_frames": warned "the codec's flood protections apply",
    "max_outbound_control_frames": warned "the codec's flood protections apply",
    "max_consecutive_inbound_frames_with_empty_payload": warned "the codec's flood protections apply",
    "max_inbound_priority_frames_per_stream": warned "the codec's flood protections apply",
    "max_inbound_window_update_frames_per_data_frame_sent": warned "the codec's flood protections apply",
    "stream_error_on_invalid_http_messaging": warned "an invalid response resets its stream",
    "override_stream_error_on_invalid_http_message": warned "an invalid response resets its stream",
    "custom_settings_parameters": refused "custom HTTP/2 settings are not supported",
    "connection_keepalive": refused "HTTP/2 PING keepalive upstream is not supported",
    "use_oghttp2_codec": inert "a codec choice with the same results",
    "max_metadata_size": inert "metadata frames are never read",
    "enable_huffman_encoding": warned "the codec's header encoding applies",
    "max_header_field_size_kb": warned "the codec's header size limit applies",
    "disallow_obs_text": warned "the codec's header validation applies",
    "stream_reset_burst": inert "Envoy reads it for downstream connections only",
    "stream_reset_rate": inert "Envoy reads it for downstream connections only",
});

fields!(pub(super) static UPSTREAM_HTTP_PROTOCOL_OPTIONS = "envoy.config.core.v3.UpstreamHttpProtocolOptions" {
    "auto_sni": applied,
    "auto_san_validation": applied,
    "override_auto_sni_header": applied,
});

/// What a cluster's protocol options amount to.
#[derive(Debug)]
pub(super) struct ProtocolOptions {
    pub(super) protocol: m::UpstreamProtocol,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_requests: Option<u32>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) max_connection_duration: Option<Duration>,
    pub(super) auto_sni: m::cluster::AutoSni,
    pub(super) header_case: ferry_model::http_protocol::HeaderCase,
}

impl Default for ProtocolOptions {
    fn default() -> Self {
        Self {
            protocol: m::UpstreamProtocol::Http1,
            idle_timeout: Some(Duration::from_secs(3600)),
            max_requests: None,
            max_concurrent_streams: None,
            max_connection_duration: None,
            auto_sni: m::cluster::AutoSni::default(),
            header_case: Default::default(),
        }
    }
}

const TYPED_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Folds the cluster-level (deprecated) options, then the typed ones, into
/// `out`.
pub(super) fn protocol_options(
    ctx: &mut Ctx<'_>,
    out: &mut ProtocolOptions,
    common: Option<&core_pb::HttpProtocolOptions>,
    http1: Option<&core_pb::Http1ProtocolOptions>,
    http2: Option<&core_pb::Http2ProtocolOptions>,
    upstream: Option<&core_pb::UpstreamHttpProtocolOptions>,
    typed: &HashMap<String, Any>,
) -> Result<(), ConvertError> {
    if let Some(c) = common {
        common_options(ctx, "common_http_protocol_options", c, out)?;
    }
    if let Some(h) = http1 {
        http1_options(ctx, "http_protocol_options", h, out)?;
    }
    if let Some(h) = http2 {
        http2_options(ctx, "http2_protocol_options", h, out)?;
    }
    if let Some(u) = upstream {
        out.auto_sni = auto_sni(ctx, "upstream_http_protocol_options", u)?;
    }
    let mut keys: Vec<&String> = typed.keys().collect();
    keys.sort();
    for key in keys {
        let Some(any) = typed.get(key) else { continue };
        let field = format!("typed_extension_protocol_options[{key:?}]");
        let t = Typed::from_any(any).map_err(|e| ctx.err(&field, e))?;
        if t.type_name() != TYPED_OPTIONS {
            return Err(ctx.err(
                &field,
                format!("unsupported protocol options {}", t.type_name()),
            ));
        }
        let o: upstream_http_pb::HttpProtocolOptions =
            t.decode().map_err(|e| ctx.err(&field, e))?;
        typed_options(ctx, &field, &o, out)?;
    }
    Ok(())
}

fn typed_options(
    ctx: &mut Ctx<'_>,
    field: &str,
    o: &upstream_http_pb::HttpProtocolOptions,
    out: &mut ProtocolOptions,
) -> Result<(), ConvertError> {
    use upstream_http_pb::http_protocol_options::UpstreamProtocolOptions as U;
    use upstream_http_pb::http_protocol_options::explicit_http_config::ProtocolConfig as P;
    let cov = &HTTP_PROTOCOL_OPTIONS;
    let upstream_http_pb::HttpProtocolOptions {
        common_http_protocol_options,
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
        upstream_protocol_options,
    } = o;
    ctx.refuse(cov, field, "http_filters", !http_filters.is_empty())?;
    ctx.refuse(
        cov,
        field,
        "header_validation_config",
        header_validation_config.is_some(),
    )?;
    ctx.refuse(cov, field, "outlier_detection", outlier_detection.is_some())?;
    ctx.refuse(
        cov,
        field,
        "request_mirror_policies",
        !request_mirror_policies.is_empty(),
    )?;
    ctx.refuse(cov, field, "hash_policy", !hash_policy.is_empty())?;
    ctx.refuse(cov, field, "retry_policy", retry_policy.is_some())?;
    match upstream_protocol_options {
        Some(U::ExplicitHttpConfig(e)) => {
            let ef = path(field, "explicit_http_config");
            let upstream_http_pb::http_protocol_options::ExplicitHttpConfig { protocol_config } = e;
            match protocol_config {
                Some(P::Http2ProtocolOptions(h2)) => {
                    http2_options(ctx, &path(&ef, "http2_protocol_options"), h2, out)?;
                    out.protocol = m::UpstreamProtocol::Http2;
                }
                Some(P::HttpProtocolOptions(h1)) => {
                    http1_options(ctx, &path(&ef, "http_protocol_options"), h1, out)?;
                    out.protocol = m::UpstreamProtocol::Http1;
                }
                None => out.protocol = m::UpstreamProtocol::Http1,
                Some(P::Http3ProtocolOptions(_)) => {
                    ctx.refuse(&EXPLICIT_HTTP_CONFIG, &ef, "http3_protocol_options", true)?;
                }
            }
        }
        Some(U::UseDownstreamProtocolConfig(d)) => {
            let df = path(field, "use_downstream_protocol_config");
            let upstream_http_pb::http_protocol_options::UseDownstreamHttpConfig {
                http_protocol_options,
                http2_protocol_options,
                http3_protocol_options,
            } = d;
            ctx.refuse(
                &USE_DOWNSTREAM_HTTP_CONFIG,
                &df,
                "http3_protocol_options",
                http3_protocol_options.is_some(),
            )?;
            if let Some(h1) = http_protocol_options {
                http1_options(ctx, &path(&df, "http_protocol_options"), h1, out)?;
            }
            if let Some(h2) = http2_protocol_options {
                http2_options(ctx, &path(&df, "http2_protocol_options"), h2, out)?;
            }
            out.protocol = m::UpstreamProtocol::UseDownstream;
        }
        Some(U::AutoConfig(a)) => {
            let af = path(field, "auto_config");
            let upstream_http_pb::http_protocol_options::AutoHttpConfig {
                http_protocol_options,
                http2_protocol_options,
                http3_protocol_options,
                alternate_protocols_cache_options,
            } = a;
            ctx.refuse(
                &AUTO_HTTP_CONFIG,
                &af,
                "http3_protocol_options",
                http3_protocol_options.is_some(),
            )?;
            ctx.refuse(
                &AUTO_HTTP_CONFIG,
                &af,
                "alternate_protocols_cache_options",
                alternate_protocols_cache_options.is_some(),
            )?;
            if let Some(h1) = http_protocol_options {
                http1_options(ctx, &path(&af, "http_protocol_options"), h1, out)?;
            }
            if let Some(h2) = http2_protocol_options {
                http2_options(ctx, &path(&af, "http2_protocol_options"), h2, out)?;
            }
            out.protocol = m::UpstreamProtocol::Http1;
        }
        None => {}
    }
    if let Some(u) = upstream_http_protocol_options {
        out.auto_sni = auto_sni(ctx, &path(field, "upstream_http_protocol_options"), u)?;
    }
    if let Some(c) = common_http_protocol_options {
        common_options(ctx, &path(field, "common_http_protocol_options"), c, out)?;
    }
    Ok(())
}

fn common_options(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: &core_pb::HttpProtocolOptions,
    out: &mut ProtocolOptions,
) -> Result<(), ConvertError> {
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
    let _ = headers_with_underscores_action;
    ctx.refuse(
        cov,
        field,
        "max_stream_duration",
        max_stream_duration.is_some(),
    )?;
    ctx.knob(cov, field, "max_headers_count", max_headers_count.is_some());
    ctx.knob(
        cov,
        field,
        "max_response_headers_kb",
        max_response_headers_kb.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "max_connection_duration_jitter",
        max_connection_duration_jitter.is_some(),
    );
    out.idle_timeout = timeout_or(idle_timeout, Some(Duration::from_secs(3600)));
    if let Some(v) = max_requests_per_connection {
        out.max_requests = Some(v.value);
    }
    out.max_connection_duration = timeout_or(max_connection_duration, None);
    Ok(())
}

#[allow(deprecated)] // `use_balsa_parser` is deprecated but accepted.
fn http1_options(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &core_pb::Http1ProtocolOptions,
    out: &mut ProtocolOptions,
) -> Result<(), ConvertError> {
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
    } = h;
    // Envoy reads these for downstream requests only.
    let _ = (
        allow_absolute_url,
        accept_http_10,
        default_host_for_http_10,
        use_balsa_parser,
        allow_custom_methods,
        ignore_http_11_upgrade,
    );
    out.header_case = super::http_protocol::header_case(
        ctx,
        &path(field, "header_key_format"),
        header_key_format.as_ref(),
    )?;
    ctx.refuse(
        cov,
        field,
        "send_fully_qualified_url",
        *send_fully_qualified_url,
    )?;
    ctx.knob(cov, field, "enable_trailers", *enable_trailers);
    ctx.knob(cov, field, "allow_chunked_length", *allow_chunked_length);
    ctx.knob(
        cov,
        field,
        "override_stream_error_on_invalid_http_message",
        override_stream_error_on_invalid_http_message.is_some(),
    );
    Ok(())
}

#[allow(deprecated)] // `stream_error_on_invalid_http_messaging` is deprecated but accepted.
fn http2_options(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &core_pb::Http2ProtocolOptions,
    out: &mut ProtocolOptions,
) -> Result<(), ConvertError> {
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
    } = h;
    let _ = (
        allow_connect,
        allow_metadata,
        use_oghttp2_codec,
        max_metadata_size,
        stream_reset_burst,
        stream_reset_rate,
    );
    ctx.refuse(
        cov,
        field,
        "custom_settings_parameters",
        !custom_settings_parameters.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "connection_keepalive",
        connection_keepalive.is_some(),
    )?;
    for (name, set) in [
        ("hpack_table_size", hpack_table_size.is_some()),
        (
            "initial_stream_window_size",
            initial_stream_window_size.is_some(),
        ),
        (
            "initial_connection_window_size",
            initial_connection_window_size.is_some(),
        ),
        ("max_outbound_frames", max_outbound_frames.is_some()),
        (
            "max_outbound_control_frames",
            max_outbound_control_frames.is_some(),
        ),
        (
            "max_consecutive_inbound_frames_with_empty_payload",
            max_consecutive_inbound_frames_with_empty_payload.is_some(),
        ),
        (
            "max_inbound_priority_frames_per_stream",
            max_inbound_priority_frames_per_stream.is_some(),
        ),
        (
            "max_inbound_window_update_frames_per_data_frame_sent",
            max_inbound_window_update_frames_per_data_frame_sent.is_some(),
        ),
        (
            "stream_error_on_invalid_http_messaging",
            *stream_error_on_invalid_http_messaging,
        ),
        (
            "override_stream_error_on_invalid_http_message",
            override_stream_error_on_invalid_http_message.is_some(),
        ),
        ("enable_huffman_encoding", enable_huffman_encoding.is_some()),
        (
            "max_header_field_size_kb",
            max_header_field_size_kb.is_some(),
        ),
        ("disallow_obs_text", disallow_obs_text.is_some()),
    ] {
        ctx.knob(cov, field, name, set);
    }
    if let Some(v) = max_concurrent_streams {
        out.max_concurrent_streams = Some(v.value);
    }
    Ok(())
}

/// `UpstreamHttpProtocolOptions`: SNI and server-name validation from each
/// request's host.
fn auto_sni(
    ctx: &Ctx<'_>,
    field: &str,
    u: &core_pb::UpstreamHttpProtocolOptions,
) -> Result<m::cluster::AutoSni, ConvertError> {
    let core_pb::UpstreamHttpProtocolOptions {
        auto_sni,
        auto_san_validation,
        override_auto_sni_header,
    } = u;
    let header = if override_auto_sni_header.is_empty() {
        None
    } else {
        let h = override_auto_sni_header.to_ascii_lowercase();
        http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
            ctx.err(
                format!("{field}.override_auto_sni_header"),
                format!("{override_auto_sni_header:?} is not a header name"),
            )
        })?;
        Some(h)
    };
    Ok(m::cluster::AutoSni {
        sni: *auto_sni,
        san_validation: *auto_san_validation,
        header,
    })
}
