//! What is known of one finished HTTP request or TCP connection, as Envoy's
//! `StreamInfo` holds it for access logs: times, sizes, the response code and
//! its details, response flags, addresses, the route and cluster, and the
//! request and response headers the configured formats and filters read.
//!
//! Pure data: the proxy fills it in along the request's way, the access log
//! formats ([`crate::format::LogTemplate`]) and filters
//! ([`crate::access_log::Filter`]) read it.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Envoy's `AccessLogType`: why an entry is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogType {
    #[default]
    NotSet,
    /// A TCP proxy connection closed.
    TcpConnectionEnd,
    /// An HTTP stream finished (or was reset).
    DownstreamEnd,
}

impl LogType {
    /// The name `%ACCESS_LOG_TYPE%` prints, Envoy's enum value name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogType::NotSet => "NotSet",
            LogType::TcpConnectionEnd => "TcpConnectionEnd",
            LogType::DownstreamEnd => "DownstreamEnd",
        }
    }

    /// The `AccessLogType` enum number of the proto, for `log_type_filter`.
    pub fn number(self) -> i32 {
        match self {
            LogType::NotSet => 0,
            LogType::TcpConnectionEnd => 3,
            LogType::DownstreamEnd => 6,
        }
    }
}

/// The request head as the formats see it: the pseudo-headers, and the
/// regular headers the configuration reads (not necessarily all of them).
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    pub method: String,
    /// The path with its query.
    pub path: String,
    pub authority: String,
    pub scheme: &'static str,
    pub headers: HeaderMap,
}

/// The address of the client end of an internal connection (an
/// in-process connection to an internal listener has no socket): the
/// downstream remote address on the internal listener's side, the upstream
/// local address on the side that connected. No socket has it as a peer or
/// a connected local address.
pub const INTERNAL_CLIENT_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// How Envoy prints [`INTERNAL_CLIENT_ADDRESS`] (its
/// `EnvoyInternalInstance("internal_client_address")`), with or without
/// port; it has no port of its own (printed empty).
pub const INTERNAL_CLIENT_TEXT: &str = "envoy://internal_client_address/";

/// One finished stream (an HTTP request, or a TCP connection).
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub log_type: LogType,
    pub start_time: SystemTime,
    /// From the start to the last byte sent downstream (or the close).
    pub duration: Option<Duration>,
    /// From the start to the last byte of the request received.
    pub request_complete: Option<Duration>,
    /// From the start to the upstream response's headers.
    pub first_upstream_rx: Option<Duration>,
    /// Body bytes received from downstream (TCP: every byte).
    pub bytes_received: u64,
    /// Body bytes sent downstream (TCP: every byte).
    pub bytes_sent: u64,
    /// `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`; `None` for TCP.
    pub protocol: Option<&'static str>,
    /// The HTTP version spoken to the upstream.
    pub upstream_protocol: Option<&'static str>,
    pub response_code: Option<u16>,
    pub response_code_details: Option<String>,
    pub connection_termination_details: Option<String>,
    /// Envoy's short response flags joined with `,`; empty for none.
    pub response_flags: String,
    /// The upstream host chosen (an IP socket or a Unix socket).
    pub upstream_host: Option<crate::cluster::HostAddr>,
    pub upstream_cluster: Option<String>,
    pub upstream_local: Option<SocketAddr>,
    pub upstream_transport_failure_reason: Option<String>,
    /// Attempts sent upstream (retries included).
    pub attempt_count: Option<u32>,
    pub downstream_local: Option<SocketAddr>,
    /// The internal listener's own address (`envoy://listener/endpoint
    /// id`), when the connection came to an internal listener and nothing
    /// restored a destination: it is then the local address the formats
    /// print (it has no IP and no port), `downstream_local` holding the
    /// placeholder [`INTERNAL_CLIENT_ADDRESS`].
    pub downstream_local_internal: Option<crate::cluster::InternalAddr>,
    /// The client as the connection manager decided it (`x-forwarded-for`
    /// when trusted), else the peer.
    pub downstream_remote: Option<SocketAddr>,
    /// The peer of the connection.
    pub downstream_direct_remote: Option<SocketAddr>,
    /// SNI, when the client sent one.
    pub requested_server_name: Option<String>,
    pub route_name: Option<String>,
    pub connection_id: u64,
    pub request: RequestHead,
    /// The response headers the configuration reads.
    pub response_headers: HeaderMap,
    pub response_trailers: HeaderMap,
    /// The body of a response Ferry generated itself.
    pub local_reply_body: Option<String>,
    /// The trace this request belongs to, when it is traced.
    pub trace_id: Option<String>,
    /// The request was sampled for tracing (`traceable_filter`).
    pub traceable: bool,
    /// A health check answered by the proxy itself (Ferry has no health
    /// check filter: always false).
    pub health_check: bool,
    /// The machine's host name (`%HOSTNAME%`).
    pub hostname: &'static str,
    /// The stream's filter state (the connection's, for a TCP entry), read
    /// by `%FILTER_STATE%`.
    pub filter_state: Option<std::sync::Arc<crate::filter_state::FilterState>>,
}

impl StreamInfo {
    pub fn new(log_type: LogType, start_time: SystemTime) -> Self {
        Self {
            log_type,
            start_time,
            duration: None,
            request_complete: None,
            first_upstream_rx: None,
            bytes_received: 0,
            bytes_sent: 0,
            protocol: None,
            upstream_protocol: None,
            response_code: None,
            response_code_details: None,
            connection_termination_details: None,
            response_flags: String::new(),
            upstream_host: None,
            upstream_cluster: None,
            upstream_local: None,
            upstream_transport_failure_reason: None,
            attempt_count: None,
            downstream_local: None,
            downstream_local_internal: None,
            downstream_remote: None,
            downstream_direct_remote: None,
            requested_server_name: None,
            route_name: None,
            connection_id: 0,
            request: RequestHead::default(),
            response_headers: HeaderMap::new(),
            response_trailers: HeaderMap::new(),
            local_reply_body: None,
            trace_id: None,
            traceable: false,
            health_check: false,
            hostname: "",
            filter_state: None,
        }
    }

    /// Whether a response flag is set.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.response_flags.split(',').any(|f| f == flag)
    }

    /// Adds a response flag (after those already set).
    pub fn add_flag(&mut self, flag: &str) {
        if self.has_flag(flag) {
            return;
        }
        if !self.response_flags.is_empty() {
            self.response_flags.push(',');
        }
        self.response_flags.push_str(flag);
    }

    /// The gRPC status of the response: `grpc-status` from the trailers,
    /// else the headers (a trailers-only answer).
    pub fn grpc_status(&self) -> Option<u32> {
        self.response_trailers
            .get("grpc-status")
            .or_else(|| self.response_headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

/// Envoy's response flags: the short form and the long one
/// (`%RESPONSE_FLAGS_LONG%`).
pub const RESPONSE_FLAGS: &[(&str, &str)] = &[
    ("LH", "FailedLocalHealthCheck"),
    ("UH", "NoHealthyUpstream"),
    ("UT", "UpstreamRequestTimeout"),
    ("LR", "LocalReset"),
    ("UR", "UpstreamRemoteReset"),
    ("UF", "UpstreamConnectionFailure"),
    ("UC", "UpstreamConnectionTermination"),
    ("UO", "UpstreamOverflow"),
    ("NR", "NoRouteFound"),
    ("DI", "DelayInjected"),
    ("FI", "FaultInjected"),
    ("RL", "RateLimited"),
    ("UAEX", "UnauthorizedExternalService"),
    ("RLSE", "RateLimitServiceError"),
    ("DC", "DownstreamConnectionTermination"),
    ("URX", "UpstreamRetryLimitExceeded"),
    ("SI", "StreamIdleTimeout"),
    ("IH", "InvalidEnvoyRequestHeaders"),
    ("DPE", "DownstreamProtocolError"),
    ("UMSDR", "UpstreamMaxStreamDurationReached"),
    ("RFCF", "ResponseFromCacheFilter"),
    ("NFCF", "NoFilterConfigFound"),
    ("DT", "DurationTimeout"),
    ("UPE", "UpstreamProtocolError"),
    ("NC", "NoClusterFound"),
    ("OM", "OverloadManagerTerminated"),
    ("DF", "DnsResolutionFailed"),
    ("DO", "DropOverload"),
    ("DR", "DownstreamRemoteReset"),
    ("UDO", "UnconditionalDropOverload"),
];

/// The long form of a list of short flags (`UF,URX` →
/// `UpstreamConnectionFailure,UpstreamRetryLimitExceeded`).
pub fn long_flags(short: &str) -> String {
    short
        .split(',')
        .filter(|f| !f.is_empty())
        .map(|f| {
            RESPONSE_FLAGS
                .iter()
                .find(|(s, _)| *s == f)
                .map_or(f, |(_, l)| l)
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        let mut s = StreamInfo::new(LogType::DownstreamEnd, SystemTime::UNIX_EPOCH);
        assert!(!s.has_flag("UF"));
        s.add_flag("URX");
        s.add_flag("UF");
        s.add_flag("UF");
        assert_eq!(s.response_flags, "URX,UF");
        assert!(s.has_flag("UF") && s.has_flag("URX") && !s.has_flag("U"));
        assert_eq!(
            long_flags(&s.response_flags),
            "UpstreamRetryLimitExceeded,UpstreamConnectionFailure"
        );
    }
}
