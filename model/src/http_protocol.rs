//! What a connection manager enforces on its downstream clients: the
//! protocol options and limits of Envoy's `HttpConnectionManager`
//! (`max_request_headers_kb`, `request_headers_timeout`, `drain_timeout`,
//! `common_http_protocol_options`, `http_protocol_options`,
//! `http2_protocol_options`), with Envoy's defaults for every field left
//! unset, so the data path never has to know which ones were.

use std::time::Duration;

/// Envoy's `max_request_headers_kb` default: 60 KiB.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
/// Envoy's upper bound for `max_request_headers_kb`: 8 MiB.
pub const MAX_REQUEST_HEADERS_KB: u32 = 8192;
/// Envoy's `max_headers_count` default.
pub const DEFAULT_MAX_HEADERS_COUNT: u32 = 100;
/// Envoy's `drain_timeout` default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The downstream protocol options of one connection manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamProtocol {
    /// `max_request_headers_kb` in bytes: the request line and headers of
    /// an HTTP/1 request as they arrived (Envoy counts the raw head), the
    /// header list of an HTTP/2 request. Beyond it: 431.
    pub max_request_headers_bytes: u32,
    /// `common_http_protocol_options.max_headers_count`: more header lines
    /// than this is a 431 (HTTP/1) or a reset stream (HTTP/2).
    pub max_headers_count: u32,
    /// `common_http_protocol_options.headers_with_underscores_action`.
    pub headers_with_underscores: UnderscoresAction,
    /// `request_headers_timeout`: from a request's first byte to the end of
    /// its headers; `None` (Envoy's default) disables it.
    pub request_headers_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration`: the
    /// connection drains once it is this old; `None`: no limit.
    pub max_connection_duration: Option<Duration>,
    /// `max_connection_duration_jitter`, in hundredths of a percent of the
    /// duration: each connection's limit is extended by a random amount up
    /// to that share.
    pub max_connection_duration_jitter: u32,
    /// `common_http_protocol_options.max_requests_per_connection`.
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.max_stream_duration`: the default of
    /// the routes that set no `max_stream_duration` of their own.
    pub max_stream_duration: Option<Duration>,
    /// `drain_timeout`: how long a draining HTTP/2 connection keeps its
    /// streams between the first GOAWAY and the close (Envoy default 5 s);
    /// also the grace a draining HTTP/1 connection gets once idle.
    pub drain_timeout: Duration,
    pub http1: Http1Options,
    pub http2: Http2Options,
}

impl Default for DownstreamProtocol {
    fn default() -> Self {
        Self {
            max_request_headers_bytes: DEFAULT_MAX_REQUEST_HEADERS_KB * 1024,
            max_headers_count: DEFAULT_MAX_HEADERS_COUNT,
            headers_with_underscores: UnderscoresAction::Allow,
            request_headers_timeout: None,
            max_connection_duration: None,
            max_connection_duration_jitter: 0,
            max_requests_per_connection: None,
            max_stream_duration: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            http1: Http1Options::default(),
            http2: Http2Options::default(),
        }
    }
}

/// `headers_with_underscores_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoresAction {
    #[default]
    Allow,
    /// 400 (HTTP/1), a reset stream (HTTP/2).
    RejectRequest,
    /// The header is removed before any filter sees the request.
    DropHeader,
}

/// `http_protocol_options` (`core.v3.Http1ProtocolOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Http1Options {
    /// `accept_http_10`: without it HTTP/1.0 requests are answered 426.
    pub accept_http_10: bool,
    /// `default_host_for_http_10`: the Host of an HTTP/1.0 request that
    /// has none (empty: no default).
    pub default_host_for_http_10: String,
    /// `allow_chunked_length`: a request with both `Content-Length` and
    /// `Transfer-Encoding: chunked` is served with the length removed
    /// instead of being refused with 400.
    pub allow_chunked_length: bool,
    /// `allow_custom_methods`: methods outside Envoy's list of known ones
    /// are accepted (any token) instead of refused with 400.
    pub allow_custom_methods: bool,
    /// `header_key_format`: how header names are written on the wire.
    pub header_case: HeaderCase,
}

/// `Http1ProtocolOptions.header_key_format`: the case HTTP/1 header names
/// are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderCase {
    /// Lower case, as Envoy stores them (the default).
    #[default]
    Lower,
    /// As they arrived (the `preserve_case` stateful formatter).
    Preserve,
    /// `proper_case_words`: upper case first letters of words.
    ProperCase,
}

/// The HTTP/2 flow-control windows Ferry advertises when none is configured.
pub const DEFAULT_WINDOW: u32 = 1024 * 1024;

/// `http2_protocol_options` (`core.v3.Http2ProtocolOptions`), with Envoy's
/// defaults but for the flow-control windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Options {
    /// `max_concurrent_streams` (Envoy default 1024).
    pub max_concurrent_streams: u32,
    /// `initial_stream_window_size`. Unset: 1 MiB, not Envoy's 16 MiB.
    /// Envoy advertises large windows but stops reading a connection whose
    /// buffers pass its 1 MiB buffer limit; the h2 codec instead buffers
    /// whatever the windows allow, so Ferry advertises only what it is
    /// willing to hold for a client that sends faster than the upstream
    /// reads.
    pub initial_stream_window_size: u32,
    /// `initial_connection_window_size`. Unset: 1 MiB (Envoy's 24 MiB: see
    /// above); it bounds what one connection can make Ferry buffer.
    pub initial_connection_window_size: u32,
    /// `hpack_table_size` (default 4096).
    pub hpack_table_size: u32,
    /// `max_consecutive_inbound_frames_with_empty_payload` (default 1).
    pub max_consecutive_empty_frames: u32,
    /// `max_inbound_priority_frames_per_stream` (default 100).
    pub max_priority_frames_per_stream: u32,
    /// `stream_reset_burst` (default 1000): RST_STREAM frames a client may
    /// send at once before the connection is closed (rapid reset).
    pub stream_reset_burst: u32,
    /// `stream_reset_rate` (default 33/s): the rate the burst refills at.
    pub stream_reset_rate: u32,
    /// `max_outbound_control_frames` (default 1000): bounds the resets the
    /// server itself may have to send for a misbehaving client.
    pub max_outbound_control_frames: u32,
    /// `max_inbound_window_update_frames_per_data_frame_sent` (default 10).
    pub max_window_updates_per_data_frame: u32,
    /// `disallow_obs_text`: header values with bytes 0x80-0xFF are refused.
    pub disallow_obs_text: bool,
    /// `connection_keepalive`: PING interval and timeout.
    pub keepalive: Option<Http2Keepalive>,
}

impl Default for Http2Options {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1024,
            initial_stream_window_size: DEFAULT_WINDOW,
            initial_connection_window_size: DEFAULT_WINDOW,
            hpack_table_size: 4096,
            max_consecutive_empty_frames: 1,
            max_priority_frames_per_stream: 100,
            stream_reset_burst: 1000,
            stream_reset_rate: 33,
            max_outbound_control_frames: 1000,
            max_window_updates_per_data_frame: 10,
            disallow_obs_text: false,
            keepalive: None,
        }
    }
}

/// `http2_protocol_options.connection_keepalive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Keepalive {
    pub interval: Duration,
    /// Envoy's default is 5 s.
    pub timeout: Duration,
}

/// The methods Envoy's HTTP/1 codec accepts without `allow_custom_methods`
/// (its list, `MSEARCH` without the dash included).
pub const KNOWN_METHODS: &[&str] = &[
    "ACL",
    "BIND",
    "CHECKOUT",
    "CONNECT",
    "COPY",
    "DELETE",
    "GET",
    "HEAD",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MOVE",
    "MSEARCH",
    "NOTIFY",
    "OPTIONS",
    "PATCH",
    "POST",
    "PROPFIND",
    "PROPPATCH",
    "PURGE",
    "PUT",
    "REBIND",
    "REPORT",
    "SEARCH",
    "SOURCE",
    "SUBSCRIBE",
    "TRACE",
    "UNBIND",
    "UNLINK",
    "UNLOCK",
    "UNSUBSCRIBE",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_envoys() {
        let d = DownstreamProtocol::default();
        assert_eq!(d.max_request_headers_bytes, 61440);
        assert_eq!(d.max_headers_count, 100);
        assert_eq!(d.drain_timeout, Duration::from_secs(5));
        assert!(!d.http1.accept_http_10);
        assert_eq!(d.http2.max_concurrent_streams, 1024);
        assert!(KNOWN_METHODS.windows(2).all(|w| w[0] < w[1]), "sorted");
    }
}
