//! Naming rules shared by validation and translation: how Istio expands a
//! short host name to a fully qualified one, how wildcard hosts match, how
//! a port's protocol follows from its name or `appProtocol`, and the names
//! istiod gives clusters (`outbound|9080|v1|reviews.default.svc.cluster.local`).

/// The cluster's DNS suffix (`svc.cluster.local` hosts).
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// The namespace whose Sidecar and DestinationRule apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Expands a host as Istio does for a resource in `namespace`: a name
/// without dots is a Kubernetes service of that namespace; anything else
/// (dotted names, wildcards) is taken as written.
pub fn resolve_host(host: &str, namespace: &str, domain: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// The FQDN of a Kubernetes service.
pub fn service_fqdn(name: &str, namespace: &str, domain: &str) -> String {
    format!("{name}.{namespace}.svc.{domain}")
}

/// Whether `pattern` (exact or `*.suffix` / `*`) covers `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// `outbound|PORT|SUBSET|HOST`.
pub fn outbound_cluster(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// `inbound|PORT||`, the cluster to the local application.
pub fn inbound_cluster(port: u32) -> String {
    format!("inbound|{port}||")
}

/// The application protocol of a port, as Istio derives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
    /// No declared protocol: the sidecar sniffs (HTTP or raw TCP).
    Unknown,
}

impl Protocol {
    /// Parses a protocol name (`HTTP`, `grpc-web`, `tcp` …) case-insensitively.
    pub fn parse(name: &str) -> Protocol {
        match name.to_ascii_lowercase().as_str() {
            "http" | "http-web" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tcp" | "mongo" | "mysql" | "redis" | "udp" => Protocol::Tcp,
            _ => Protocol::Unknown,
        }
    }

    /// A Kubernetes service port: `appProtocol` wins, then the port name's
    /// prefix before the first `-` (`http-web` → HTTP, `tcp` → TCP).
    pub fn from_service_port(name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
        if let Some(p) = app_protocol {
            let parsed = Protocol::parse(p);
            if parsed != Protocol::Unknown {
                return parsed;
            }
        }
        match name {
            Some(n) => Protocol::parse(n.split('-').next().unwrap_or(n)),
            None => Protocol::Unknown,
        }
    }

    /// Whether the port is served through the HTTP connection manager.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Whether the upstream speaks HTTP/2 without negotiation.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_expand_in_the_resource_namespace() {
        assert_eq!(
            resolve_host("reviews", "default", DEFAULT_DOMAIN),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            resolve_host("api.example.com", "x", DEFAULT_DOMAIN),
            "api.example.com"
        );
        assert_eq!(
            resolve_host("*.example.com", "x", DEFAULT_DOMAIN),
            "*.example.com"
        );
    }

    #[test]
    fn wildcards_match_suffixes() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.org"));
        assert!(host_matches("*", "anything"));
        assert!(host_matches("A.b", "a.b"));
    }

    #[test]
    fn port_protocols_follow_istio_naming() {
        assert_eq!(
            Protocol::from_service_port(Some("http"), None),
            Protocol::Http
        );
        assert_eq!(
            Protocol::from_service_port(Some("grpc-web"), None),
            Protocol::Grpc
        );
        assert_eq!(
            Protocol::from_service_port(Some("tcp-echo"), None),
            Protocol::Tcp
        );
        assert_eq!(
            Protocol::from_service_port(Some("web"), Some("http")),
            Protocol::Http
        );
        assert_eq!(
            Protocol::from_service_port(Some("web"), None),
            Protocol::Unknown
        );
        assert_eq!(Protocol::from_service_port(None, None), Protocol::Unknown);
    }
}
