//! The lists against the converters: every refused or warned field of a
//! message is set, in turn, on a configuration that converts, and the
//! conversion must refuse it by name or warn about it by name; no applied
//! or inert field may draw a tuning-knob warning. So a list cannot claim
//! what the code does not do.

use prost::Message;
use prost_reflect::{DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage, Value};

use super::super::{ConvertError, Warnings};
use super::tests::pool;
use super::{Coverage, Status, all};

/// A working resource of each kind, in Envoy's JSON.
pub(super) const LISTENER: &str = include_str!("../../../tests/data/probe-listener.json");

pub(super) const CLUSTER: &str = include_str!("../../../tests/data/probe-cluster.json");

/// A working listener whose chains a `filter_chain_matcher` chooses.
pub(super) const MATCHER_LISTENER: &str =
    include_str!("../../../tests/data/probe-matcher-listener.json");

/// Clusters with an HTTP, a TCP and a gRPC health check.
const HC_HTTP_CLUSTER: &str = r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "http_health_check": {"path": "/healthz"}}]}"#;
const HC_TCP_CLUSTER: &str = r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {"send": {"text": "00"}}}]}"#;
const HC_GRPC_CLUSTER: &str = r#"{"name": "c", "type": "STATIC", "health_checks": [{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "grpc_health_check": {}}]}"#;

const EDS_CLUSTER: &str =
    r#"{"name": "e", "type": "EDS", "eds_cluster_config": {"service_name": "e"}}"#;

/// Where a message sits: which resource, the path to it (`name`,
/// `name[i]`, `name{key}` for map entries, `name@` for an `Any`'s
/// contents), and what to set there first, if the base lacks it.
struct Site {
    base: &'static str,
    path: &'static str,
    /// A message set at a path (a field of an existing message) first.
    init: Option<(&'static str, &'static str)>,
}

/// An SDS validation context secret, the base of the `Secret` list.
const SECRET: &str =
    r#"{"name": "s", "validation_context": {"trusted_ca": {"inline_string": "@CA_PEM@"}}}"#;

/// Upstream TLS as istiod writes it (SDS certificate, combined validation
/// context with a SAN matcher and the SDS root), with TLS parameters.
const UPSTREAM_TLS: &str = r#"{"name": "envoy.transport_sockets.tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": "x", "common_tls_context": {"tls_params": {}, "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {"ads": {}}}], "combined_validation_context": {"default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/a/sa/b"}}]}, "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}}}}}}}"#;

/// Upstream TLS with an inline certificate and the SPIFFE validator.
const INTERNAL_UPSTREAM: &str = r#"{"name": "internal_upstream", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport", "passthrough_metadata": [{"kind": {"host": {}}, "name": "envoy.filters.listener.original_dst"}], "transport_socket": {"name": "raw_buffer", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}}"#;

const UPSTREAM_TLS_INLINE: &str = r#"{"name": "envoy.transport_sockets.tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "common_tls_context": {"tls_certificates": [{"certificate_chain": {"inline_string": "@CERT_PEM@"}, "private_key": {"inline_string": "@KEY_PEM@"}}], "validation_context": {"custom_validator_config": {"name": "envoy.tls.cert_validator.spiffe", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig", "trust_domains": [{"name": "cluster.local", "trust_bundle": {"inline_string": "@CA_PEM@"}}]}}}}}}"#;

/// Downstream TLS as istiod writes it for an inbound STRICT chain.
const DOWNSTREAM_TLS: &str = r#"{"name": "envoy.transport_sockets.tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", "require_client_certificate": true, "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {"ads": {}}}], "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}}}}}}"#;

/// A CA and a leaf it signed (PEM), made once for the TLS sites: the
/// `@CA_PEM@`, `@CERT_PEM@` and `@KEY_PEM@` of the JSON above.
fn pems() -> &'static [(&'static str, String); 3] {
    static PEMS: std::sync::OnceLock<[(&'static str, String); 3]> = std::sync::OnceLock::new();
    PEMS.get_or_init(|| {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key"))
                .expect("CA");
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().expect("URI"),
        )];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        let json = |pem: String| {
            serde_json::to_string(&pem).expect("JSON")[1..]
                .trim_end_matches('"')
                .to_string()
        };
        [
            ("@CA_PEM@", json(issuer.pem())),
            ("@CERT_PEM@", json(cert.pem())),
            ("@KEY_PEM@", json(key.serialize_pem())),
        ]
    })
}

/// An OpenTelemetry tracer exporting over gRPC, and one over HTTP.
const OTLP_GRPC: &str = r#"{"name": "envoy.tracers.opentelemetry", "typed_config": {"@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig", "grpc_service": {"envoy_grpc": {"cluster_name": "c"}, "timeout": "1s"}}}"#;
const OTLP_HTTP: &str = r#"{"name": "envoy.tracers.opentelemetry", "typed_config": {"@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig", "http_service": {"http_uri": {"uri": "collector:4318/v1/traces", "cluster": "c", "timeout": "1s"}}}}"#;

fn site(message: &str, context: &str) -> Option<Site> {
    const HCM: &str = "filter_chains[0].filters[0].typed_config@";
    let s = |base, path, init: Option<&'static str>| {
        Some(Site {
            base,
            path,
            init: init.map(|i| (path, i)),
        })
    };
    let l = |path: &'static str| s(LISTENER, path, None);
    let c = |path: &'static str, init: Option<&'static str>| s(CLUSTER, path, init);
    macro_rules! hcm {
        ($p:literal) => {
            concat!("filter_chains[0].filters[0].typed_config@.", $p)
        };
    }
    macro_rules! route0 {
        ($p:literal) => {
            concat!(
                "filter_chains[0].filters[0].typed_config@.route_config.virtual_hosts[0].routes[0]",
                $p
            )
        };
    }
    macro_rules! vh {
        ($p:literal) => {
            concat!(
                "filter_chains[0].filters[0].typed_config@.route_config.virtual_hosts[0]",
                $p
            )
        };
    }
    macro_rules! up {
        ($p:literal) => {
            concat!(
                "typed_extension_protocol_options{envoy.extensions.upstreams.http.v3.HttpProtocolOptions}@",
                $p
            )
        };
    }
    macro_rules! list {
        () => {
            "filter_chain_matcher.on_no_match.matcher.matcher_list"
        };
    }
    macro_rules! ip {
        () => {
            "filter_chain_matcher.matcher_tree.custom_match.typed_config@"
        };
    }
    const LIST: &str = list!();
    const IP: &str = ip!();
    match (message, context) {
        ("envoy.config.listener.v3.Listener", _) => l(""),
        ("envoy.config.listener.v3.AdditionalAddress", _) => l("additional_addresses[0]"),
        ("envoy.config.listener.v3.ListenerFilter", _) => l("listener_filters[0]"),
        ("envoy.config.listener.v3.ListenerFilterChainMatchPredicate", _) => {
            l("listener_filters[0].filter_disabled")
        }
        ("envoy.config.listener.v3.FilterChain", _) => l("filter_chains[0]"),
        ("envoy.config.listener.v3.FilterChainMatch", _) => {
            l("filter_chains[0].filter_chain_match")
        }
        ("envoy.config.listener.v3.Filter", _) => l("filter_chains[0].filters[0]"),
        ("xds.type.matcher.v3.Matcher", _) => s(MATCHER_LISTENER, "filter_chain_matcher", None),
        ("xds.type.matcher.v3.Matcher.OnMatch", _) => {
            s(MATCHER_LISTENER, "filter_chain_matcher.on_no_match", None)
        }
        ("xds.type.matcher.v3.Matcher.MatcherList", _) => s(MATCHER_LISTENER, LIST, None),
        ("xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher", _) => {
            s(MATCHER_LISTENER, concat!(list!(), ".matchers[0]"), None)
        }
        ("xds.type.matcher.v3.Matcher.MatcherList.Predicate", _) => s(
            MATCHER_LISTENER,
            concat!(list!(), ".matchers[0].predicate"),
            None,
        ),
        ("xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList", _) => s(
            MATCHER_LISTENER,
            concat!(list!(), ".matchers[0].predicate.or_matcher"),
            None,
        ),
        ("xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate", _) => s(
            MATCHER_LISTENER,
            concat!(
                list!(),
                ".matchers[0].predicate.or_matcher.predicate[0].single_predicate"
            ),
            None,
        ),
        ("xds.type.matcher.v3.StringMatcher", _) => s(
            MATCHER_LISTENER,
            concat!(
                list!(),
                ".matchers[0].predicate.or_matcher.predicate[0].single_predicate.value_match"
            ),
            None,
        ),
        ("xds.type.matcher.v3.RegexMatcher", _) => s(
            MATCHER_LISTENER,
            concat!(
                list!(),
                ".matchers[0].predicate.or_matcher.predicate[0].single_predicate.value_match.safe_regex"
            ),
            None,
        ),
        ("xds.type.matcher.v3.Matcher.MatcherTree", _) => {
            s(MATCHER_LISTENER, "filter_chain_matcher.matcher_tree", None)
        }
        ("xds.core.v3.TypedExtensionConfig", _) => s(
            MATCHER_LISTENER,
            "filter_chain_matcher.matcher_tree.input",
            None,
        ),
        ("xds.type.matcher.v3.IPMatcher", _) => s(MATCHER_LISTENER, IP, None),
        ("xds.type.matcher.v3.IPMatcher.IPRangeMatcher", _) => {
            s(MATCHER_LISTENER, concat!(ip!(), ".range_matchers[0]"), None)
        }
        ("xds.core.v3.CidrRange", _) => s(
            MATCHER_LISTENER,
            concat!(ip!(), ".range_matchers[0].ranges[0]"),
            None,
        ),
        ("xds.type.matcher.v3.Matcher.MatcherTree.MatchMap", _) => s(
            MATCHER_LISTENER,
            concat!(
                ip!(),
                ".range_matchers[0].on_match.matcher.matcher_tree.exact_match_map"
            ),
            None,
        ),
        ("envoy.config.core.v3.Address", _) => l("address"),
        ("envoy.config.core.v3.SocketAddress", _) => l("address.socket_address"),
        ("envoy.config.core.v3.CidrRange", _) => {
            l("filter_chains[0].filter_chain_match.prefix_ranges[0]")
        }
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            _,
        ) => l(HCM),
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
            _,
        ) => l(hcm!("upgrade_configs[0]")),
        ("envoy.config.core.v3.HttpProtocolOptions", "downstream") => {
            s(LISTENER, hcm!("common_http_protocol_options"), Some("{}"))
        }
        ("envoy.config.core.v3.Http1ProtocolOptions", "downstream") => {
            s(LISTENER, hcm!("http_protocol_options"), Some("{}"))
        }
        ("envoy.config.core.v3.Http2ProtocolOptions", "downstream") => {
            s(LISTENER, hcm!("http2_protocol_options"), Some("{}"))
        }
        ("envoy.config.core.v3.KeepaliveSettings", "downstream") => Some(Site {
            base: LISTENER,
            path: hcm!("http2_protocol_options.connection_keepalive"),
            init: Some((
                hcm!("http2_protocol_options"),
                r#"{"connection_keepalive": {"interval": "10s"}}"#,
            )),
        }),
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.HcmAccessLogOptions",
            _,
        ) => s(LISTENER, hcm!("access_log_options"), Some("{}")),
        ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TcpAccessLogOptions", _) => s(
            LISTENER,
            "filter_chains[1].filters[3].typed_config@.access_log_options",
            Some("{}"),
        ),
        (
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing",
            _,
        ) => l(hcm!("tracing")),
        ("envoy.config.trace.v3.Tracing.Http", _) => l(hcm!("tracing.provider")),
        ("envoy.config.trace.v3.ZipkinConfig", _) => l(hcm!("tracing.provider.typed_config@")),
        ("envoy.config.trace.v3.OpenTelemetryConfig", _) => Some(Site {
            base: LISTENER,
            path: hcm!("tracing.provider.typed_config@"),
            init: Some((hcm!("tracing.provider"), OTLP_GRPC)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.Secret", _) => s(SECRET, "", None),
        (
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            _,
        ) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@",
            init: Some(("transport_socket", INTERNAL_UPSTREAM)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@",
            init: Some(("transport_socket", UPSTREAM_TLS)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context",
            init: Some(("transport_socket", UPSTREAM_TLS)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context.tls_certificate_sds_secret_configs[0]",
            init: Some(("transport_socket", UPSTREAM_TLS)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.TlsParameters", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context.tls_params",
            init: Some(("transport_socket", UPSTREAM_TLS)),
        }),
        (
            "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
            _,
        ) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context.combined_validation_context",
            init: Some(("transport_socket", UPSTREAM_TLS)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext", _) => {
            Some(Site {
                base: CLUSTER,
                path: "transport_socket.typed_config@.common_tls_context.combined_validation_context.default_validation_context",
                init: Some(("transport_socket", UPSTREAM_TLS)),
            })
        }
        ("envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names[0]",
            init: Some(("transport_socket", UPSTREAM_TLS)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context.validation_context.custom_validator_config.typed_config@",
            init: Some(("transport_socket", UPSTREAM_TLS_INLINE)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig.TrustDomain", _) => {
            Some(Site {
                base: CLUSTER,
                path: "transport_socket.typed_config@.common_tls_context.validation_context.custom_validator_config.typed_config@.trust_domains[0]",
                init: Some(("transport_socket", UPSTREAM_TLS_INLINE)),
            })
        }
        ("envoy.extensions.transport_sockets.tls.v3.TlsCertificate", _) => Some(Site {
            base: CLUSTER,
            path: "transport_socket.typed_config@.common_tls_context.tls_certificates[0]",
            init: Some(("transport_socket", UPSTREAM_TLS_INLINE)),
        }),
        ("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", _) => Some(Site {
            base: LISTENER,
            path: "filter_chains[0].transport_socket.typed_config@",
            init: Some(("filter_chains[0].transport_socket", DOWNSTREAM_TLS)),
        }),
        ("envoy.config.core.v3.GrpcService", "span export") => Some(Site {
            base: LISTENER,
            path: hcm!("tracing.provider.typed_config@.grpc_service"),
            init: Some((hcm!("tracing.provider"), OTLP_GRPC)),
        }),
        ("envoy.config.core.v3.GrpcService.EnvoyGrpc", "span export") => Some(Site {
            base: LISTENER,
            path: hcm!("tracing.provider.typed_config@.grpc_service.envoy_grpc"),
            init: Some((hcm!("tracing.provider"), OTLP_GRPC)),
        }),
        ("envoy.config.core.v3.HttpService", "span export") => Some(Site {
            base: LISTENER,
            path: hcm!("tracing.provider.typed_config@.http_service"),
            init: Some((hcm!("tracing.provider"), OTLP_HTTP)),
        }),
        ("envoy.config.core.v3.HttpUri", "span export") => Some(Site {
            base: LISTENER,
            path: hcm!("tracing.provider.typed_config@.http_service.http_uri"),
            init: Some((hcm!("tracing.provider"), OTLP_HTTP)),
        }),
        ("envoy.type.metadata.v3.MetadataKind", "custom tag") => {
            l(hcm!("tracing.custom_tags[3].metadata.kind"))
        }
        ("envoy.type.metadata.v3.MetadataKey", "custom tag") => {
            l(hcm!("tracing.custom_tags[3].metadata.metadata_key"))
        }
        ("envoy.config.core.v3.JsonFormatOptions", _) => s(
            LISTENER,
            hcm!("access_log[0].typed_config@.log_format.json_format_options"),
            Some("{}"),
        ),
        ("envoy.config.core.v3.RuntimeUInt32", "access log comparison") => l(hcm!(
            "access_log[0].filter.and_filter.filters[0].status_code_filter.comparison.value"
        )),
        ("envoy.type.tracing.v3.CustomTag", _) => l(hcm!("tracing.custom_tags[0]")),
        ("envoy.type.tracing.v3.CustomTag.Literal", _) => l(hcm!("tracing.custom_tags[0].literal")),
        ("envoy.type.tracing.v3.CustomTag.Environment", _) => {
            l(hcm!("tracing.custom_tags[1].environment"))
        }
        ("envoy.type.tracing.v3.CustomTag.Header", _) => {
            l(hcm!("tracing.custom_tags[2].request_header"))
        }
        ("envoy.type.tracing.v3.CustomTag.Metadata", _) => {
            l(hcm!("tracing.custom_tags[3].metadata"))
        }
        ("envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension", _) => {
            l(hcm!("request_id_extension"))
        }
        ("envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig", _) => {
            l(hcm!("request_id_extension.typed_config@"))
        }
        ("envoy.config.accesslog.v3.AccessLog", _) => l(hcm!("access_log[0]")),
        ("envoy.extensions.access_loggers.file.v3.FileAccessLog", _) => {
            l(hcm!("access_log[1].typed_config@"))
        }
        ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", _) => {
            l(hcm!("access_log[0].typed_config@"))
        }
        ("envoy.extensions.access_loggers.stream.v3.StderrAccessLog", _) => {
            l(hcm!("access_log[2].typed_config@"))
        }
        ("envoy.config.core.v3.SubstitutionFormatString", "set_filter_state value") => l(hcm!(
            "http_filters[10].typed_config@.on_request_headers[0].format_string"
        )),
        ("envoy.config.core.v3.SubstitutionFormatString", _) => {
            l(hcm!("access_log[0].typed_config@.log_format"))
        }
        ("envoy.config.accesslog.v3.AccessLogFilter", _) => l(hcm!("access_log[0].filter")),
        ("envoy.config.accesslog.v3.AndFilter", _) => l(hcm!("access_log[0].filter.and_filter")),
        ("envoy.config.accesslog.v3.StatusCodeFilter", _) => l(hcm!(
            "access_log[0].filter.and_filter.filters[0].status_code_filter"
        )),
        ("envoy.config.accesslog.v3.ComparisonFilter", _) => l(hcm!(
            "access_log[0].filter.and_filter.filters[0].status_code_filter.comparison"
        )),
        ("envoy.config.accesslog.v3.DurationFilter", _) => l(hcm!(
            "access_log[0].filter.and_filter.filters[1].duration_filter"
        )),
        ("envoy.config.accesslog.v3.OrFilter", _) => l(hcm!("access_log[1].filter.or_filter")),
        ("envoy.config.accesslog.v3.RuntimeFilter", _) => l(hcm!(
            "access_log[1].filter.or_filter.filters[0].runtime_filter"
        )),
        ("envoy.config.accesslog.v3.HeaderFilter", _) => l(hcm!(
            "access_log[1].filter.or_filter.filters[1].header_filter"
        )),
        ("envoy.config.accesslog.v3.ResponseFlagFilter", _) => {
            l(hcm!("access_log[2].filter.response_flag_filter"))
        }
        ("envoy.config.accesslog.v3.GrpcStatusFilter", _) => {
            l(hcm!("access_log[3].filter.grpc_status_filter"))
        }
        ("envoy.config.accesslog.v3.LogTypeFilter", _) => {
            l(hcm!("access_log[4].filter.log_type_filter"))
        }
        ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", _) => {
            l("filter_chains[1].filters[3].typed_config@")
        }
        ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TunnelingConfig", _) => s(
            LISTENER,
            "filter_chains[1].filters[3].typed_config@.tunneling_config",
            Some(r#"{"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}"#),
        ),
        ("envoy.type.v3.HashPolicy", "tcp_proxy") => {
            l("filter_chains[1].filters[3].typed_config@.hash_policy[0]")
        }
        ("envoy.config.route.v3.RouteConfiguration", _) => l(hcm!("route_config")),
        ("envoy.config.route.v3.VirtualHost", _) => l(vh!("")),
        ("envoy.config.route.v3.Route", _) => l(route0!("")),
        ("envoy.config.route.v3.RouteMatch", "") => l(route0!(".match")),
        ("envoy.config.route.v3.HeaderMatcher", _) => l(route0!(".match.headers[0]")),
        ("envoy.config.route.v3.QueryParameterMatcher", _) => {
            l(route0!(".match.query_parameters[0]"))
        }
        ("envoy.config.route.v3.RouteAction", _) => l(route0!(".route")),
        ("envoy.config.route.v3.WeightedCluster", _) => l(route0!(".route.weighted_clusters")),
        ("envoy.config.route.v3.WeightedCluster.ClusterWeight", _) => {
            l(route0!(".route.weighted_clusters.clusters[0]"))
        }
        ("envoy.config.route.v3.RouteAction.UpgradeConfig", _) => {
            l(route0!(".route.upgrade_configs[0]"))
        }
        ("envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig", _) => {
            l(route0!(".route.upgrade_configs[1].connect_config"))
        }
        ("envoy.extensions.filters.http.set_filter_state.v3.Config", _) => {
            l(hcm!("http_filters[10].typed_config@"))
        }
        ("envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue", _) => {
            l(hcm!("http_filters[10].typed_config@.on_request_headers[0]"))
        }
        ("envoy.config.route.v3.RouteAction.MaxStreamDuration", _) => {
            l(route0!(".route.max_stream_duration"))
        }
        ("envoy.config.route.v3.RouteAction.HashPolicy", _) => l(route0!(".route.hash_policy[0]")),
        ("envoy.config.route.v3.RouteAction.RequestMirrorPolicy", _) => {
            l(route0!(".route.request_mirror_policies[0]"))
        }
        ("envoy.config.route.v3.HedgePolicy", _) => l(route0!(".route.hedge_policy")),
        ("envoy.config.route.v3.RetryPolicy", _) => l(route0!(".route.retry_policy")),
        ("envoy.config.route.v3.CorsPolicy", _) => l(route0!(".route.cors")),
        ("envoy.config.route.v3.RedirectAction", _) => l(vh!(".routes[1].redirect")),
        ("envoy.config.route.v3.DirectResponseAction", _) => l(vh!(".routes[2].direct_response")),
        ("envoy.config.route.v3.FilterConfig", _) => l(route0!(".typed_per_filter_config{f}@")),
        ("envoy.config.route.v3.RateLimit", _) => l(route0!(".route.rate_limits[0]")),
        ("envoy.config.route.v3.RateLimit.Action", _) => {
            l(route0!(".route.rate_limits[0].actions[0]"))
        }
        ("envoy.config.route.v3.RateLimit.Action.GenericKey", _) => {
            l(route0!(".route.rate_limits[0].actions[1].generic_key"))
        }
        ("envoy.config.route.v3.RateLimit.Action.RequestHeaders", _) => {
            l(route0!(".route.rate_limits[0].actions[2].request_headers"))
        }
        ("envoy.config.route.v3.RateLimit.Action.HeaderValueMatch", _) => l(route0!(
            ".route.rate_limits[0].actions[3].header_value_match"
        )),
        ("envoy.config.route.v3.RateLimit.Action.MaskedRemoteAddress", _) => l(route0!(
            ".route.rate_limits[0].actions[4].masked_remote_address"
        )),
        ("envoy.config.route.v3.RateLimit.Action.QueryParameters", _) => {
            l(route0!(".route.rate_limits[0].actions[5].query_parameters"))
        }
        ("envoy.config.route.v3.RateLimit.Action.QueryParameterValueMatch", _) => l(route0!(
            ".route.rate_limits[0].actions[6].query_parameter_value_match"
        )),
        ("envoy.type.matcher.v3.StringMatcher", _) => l(route0!(".match.headers[0].string_match")),
        ("envoy.type.matcher.v3.RegexMatcher", _) => l(vh!(".routes[3].match.safe_regex")),
        ("envoy.type.matcher.v3.RegexMatchAndSubstitute", _) => {
            l(vh!(".routes[3].route.regex_rewrite"))
        }
        ("envoy.config.core.v3.HeaderValueOption", _) => {
            l(vh!(".routes[2].request_headers_to_add[0]"))
        }
        ("envoy.config.core.v3.HeaderValue", _) => {
            l(vh!(".routes[2].request_headers_to_add[0].header"))
        }
        ("envoy.config.core.v3.RuntimeFractionalPercent", _) => {
            l(route0!(".match.runtime_fraction"))
        }
        ("envoy.type.v3.FractionalPercent", _) => {
            l(route0!(".match.runtime_fraction.default_value"))
        }
        ("envoy.config.core.v3.DataSource", _) => l(vh!(".routes[2].direct_response.body")),
        ("envoy.extensions.filters.http.fault.v3.HTTPFault", _) => {
            l(hcm!("http_filters[0].typed_config@"))
        }
        ("envoy.extensions.filters.common.fault.v3.FaultDelay", _) => {
            l(hcm!("http_filters[0].typed_config@.delay"))
        }
        ("envoy.extensions.filters.http.fault.v3.FaultAbort", _) => {
            l(hcm!("http_filters[0].typed_config@.abort"))
        }
        ("envoy.extensions.filters.http.cors.v3.CorsPolicy", _) => {
            l(route0!(".typed_per_filter_config{cors}@"))
        }
        ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", _) => {
            l(hcm!("http_filters[2].typed_config@"))
        }
        ("envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor", _) => {
            l(hcm!("http_filters[2].typed_config@.descriptors[0]"))
        }
        ("envoy.type.v3.TokenBucket", _) => l(hcm!("http_filters[2].typed_config@.token_bucket")),
        ("envoy.extensions.filters.http.rbac.v3.RBAC", _) => {
            l(hcm!("http_filters[3].typed_config@"))
        }
        ("envoy.extensions.filters.http.rbac.v3.RBACPerRoute", _) => {
            l(route0!(".typed_per_filter_config{rbac}@"))
        }
        ("envoy.extensions.filters.network.rbac.v3.RBAC", _) => {
            l("filter_chains[1].filters[0].typed_config@")
        }
        ("envoy.config.rbac.v3.RBAC", _) => l(hcm!("http_filters[3].typed_config@.rules")),
        ("envoy.config.rbac.v3.Policy", _) => {
            l(hcm!("http_filters[3].typed_config@.rules.policies{p}"))
        }
        ("envoy.config.rbac.v3.Permission", _) => l(hcm!(
            "http_filters[3].typed_config@.rules.policies{p}.permissions[0]"
        )),
        ("envoy.config.rbac.v3.Principal", _) => l(hcm!(
            "http_filters[3].typed_config@.rules.policies{p}.principals[0]"
        )),
        ("envoy.extensions.filters.http.compressor.v3.Compressor", _) => {
            l(hcm!("http_filters[7].typed_config@"))
        }
        ("envoy.extensions.filters.http.compressor.v3.Compressor.CommonDirectionConfig", _) => l(
            hcm!("http_filters[7].typed_config@.response_direction_config.common_config"),
        ),
        ("envoy.extensions.filters.http.compressor.v3.Compressor.ResponseDirectionConfig", _) => l(
            hcm!("http_filters[7].typed_config@.response_direction_config"),
        ),
        ("envoy.extensions.filters.http.compressor.v3.Compressor.RequestDirectionConfig", _) => s(
            LISTENER,
            hcm!("http_filters[7].typed_config@.request_direction_config"),
            Some(r#"{"common_config": {"enabled": {"default_value": false}}}"#),
        ),
        ("envoy.config.core.v3.RuntimeFeatureFlag", _) => l(hcm!(
            "http_filters[7].typed_config@.response_direction_config.common_config.enabled"
        )),
        ("envoy.extensions.filters.http.compressor.v3.CompressorPerRoute", _) => {
            l(route0!(".typed_per_filter_config{comp}@"))
        }
        ("envoy.extensions.compression.gzip.compressor.v3.Gzip", _) => l(hcm!(
            "http_filters[7].typed_config@.compressor_library.typed_config@"
        )),
        ("envoy.extensions.compression.brotli.compressor.v3.Brotli", _) => l(hcm!(
            "http_filters[8].typed_config@.compressor_library.typed_config@"
        )),
        ("envoy.extensions.compression.zstd.compressor.v3.Zstd", _) => l(hcm!(
            "http_filters[9].typed_config@.compressor_library.typed_config@"
        )),
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", _) => {
            l(hcm!("http_filters[4].typed_config@"))
        }
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtProvider", _) => {
            l(hcm!("http_filters[4].typed_config@.providers{p}"))
        }
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtHeader", _) => l(hcm!(
            "http_filters[4].typed_config@.providers{p}.from_headers[0]"
        )),
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader", _) => l(hcm!(
            "http_filters[4].typed_config@.providers{p}.claim_to_headers[0]"
        )),
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtProvider.NormalizePayload", _) => l(hcm!(
            "http_filters[4].typed_config@.providers{p}.normalize_payload_in_metadata"
        )),
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement", _) => {
            l(hcm!("http_filters[4].typed_config@.rules[0].requires"))
        }
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementOrList", _) => l(hcm!(
            "http_filters[4].typed_config@.requirement_map{any}.requires_any"
        )),
        ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirementAndList", _) => l(hcm!(
            "http_filters[4].typed_config@.requirement_map{all}.requires_all"
        )),
        ("envoy.extensions.filters.http.jwt_authn.v3.RequirementRule", _) => {
            l(hcm!("http_filters[4].typed_config@.rules[0]"))
        }
        ("envoy.config.route.v3.RouteMatch", "jwt_authn rule") => {
            l(hcm!("http_filters[4].typed_config@.rules[0].match"))
        }
        ("envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig", _) => {
            l(route0!(".typed_per_filter_config{jwt}@"))
        }
        ("envoy.extensions.filters.network.set_filter_state.v3.Config", _) => {
            l("filter_chains[1].filters[2].typed_config@")
        }
        ("envoy.extensions.filters.network.ext_authz.v3.ExtAuthz", _) => {
            l("filter_chains[1].filters[1].typed_config@")
        }
        ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", _) => {
            l(hcm!("http_filters[5].typed_config@"))
        }
        ("envoy.config.core.v3.GrpcService", "ext_authz") => {
            l(hcm!("http_filters[5].typed_config@.grpc_service"))
        }
        ("envoy.config.core.v3.GrpcService.EnvoyGrpc", "ext_authz") => l(hcm!(
            "http_filters[5].typed_config@.grpc_service.envoy_grpc"
        )),
        ("envoy.extensions.filters.http.ext_authz.v3.HttpService", _) => {
            l(hcm!("http_filters[6].typed_config@.http_service"))
        }
        ("envoy.config.core.v3.HttpUri", "ext_authz") => l(hcm!(
            "http_filters[6].typed_config@.http_service.server_uri"
        )),
        ("envoy.extensions.filters.http.ext_authz.v3.AuthorizationRequest", _) => l(hcm!(
            "http_filters[6].typed_config@.http_service.authorization_request"
        )),
        ("envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse", _) => l(hcm!(
            "http_filters[6].typed_config@.http_service.authorization_response"
        )),
        ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", _) => {
            l(route0!(".typed_per_filter_config{ea}@"))
        }
        ("envoy.extensions.filters.http.ext_authz.v3.CheckSettings", _) => {
            l(route0!(".typed_per_filter_config{ea}@.check_settings"))
        }
        ("envoy.config.cluster.v3.Cluster", _) => c("", None),
        ("envoy.config.cluster.v3.Cluster.EdsClusterConfig", _) => {
            s(EDS_CLUSTER, "eds_cluster_config", None)
        }
        ("envoy.config.cluster.v3.Cluster.TransportSocketMatch", _) => {
            c("transport_socket_matches[0]", None)
        }
        ("envoy.config.core.v3.TransportSocket", _) => c("transport_socket", None),
        ("envoy.config.cluster.v3.UpstreamConnectionOptions", _) => {
            c("upstream_connection_options", Some("{}"))
        }
        ("envoy.config.core.v3.TcpKeepalive", _) => {
            c("upstream_connection_options.tcp_keepalive", Some("{}"))
        }
        ("envoy.config.core.v3.BindConfig", _) => c(
            "upstream_bind_config",
            Some(r#"{"source_address": {"address": "127.0.0.1", "port_value": 0}}"#),
        ),
        ("envoy.config.cluster.v3.Cluster.CommonLbConfig", _) => c("common_lb_config", Some("{}")),
        ("envoy.config.cluster.v3.Cluster.CommonLbConfig.ConsistentHashingLbConfig", _) => {
            c("common_lb_config.consistent_hashing_lb_config", Some("{}"))
        }
        ("envoy.config.cluster.v3.Cluster.SlowStartConfig", _) => c(
            "round_robin_lb_config.slow_start_config",
            Some(r#"{"slow_start_window": "1s"}"#),
        ),
        ("envoy.config.cluster.v3.Cluster.RoundRobinLbConfig", _) => {
            c("round_robin_lb_config", Some("{}"))
        }
        ("envoy.config.cluster.v3.Cluster.LeastRequestLbConfig", _) => {
            c("least_request_lb_config", Some("{}"))
        }
        ("envoy.config.cluster.v3.Cluster.RingHashLbConfig", _) => {
            c("ring_hash_lb_config", Some("{}"))
        }
        ("envoy.config.cluster.v3.Cluster.MaglevLbConfig", _) => c("maglev_lb_config", Some("{}")),
        ("envoy.config.cluster.v3.Cluster.OriginalDstLbConfig", _) => {
            c("original_dst_lb_config", Some("{}"))
        }
        ("envoy.config.cluster.v3.OutlierDetection", _) => c("outlier_detection", Some("{}")),
        ("envoy.config.cluster.v3.CircuitBreakers", _) => c("circuit_breakers", Some("{}")),
        ("envoy.config.cluster.v3.CircuitBreakers.Thresholds", _) => Some(Site {
            base: CLUSTER,
            path: "circuit_breakers.thresholds[0]",
            init: Some(("circuit_breakers", r#"{"thresholds": [{}]}"#)),
        }),
        ("envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget", _) => Some(Site {
            base: CLUSTER,
            path: "circuit_breakers.thresholds[0].retry_budget",
            init: Some((
                "circuit_breakers",
                r#"{"thresholds": [{"retry_budget": {}}]}"#,
            )),
        }),
        ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", _) => c(up!(""), None),
        ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig", _) => {
            c(up!(".explicit_http_config"), None)
        }
        ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig", _) => {
            c(up!(".use_downstream_protocol_config"), Some("{}"))
        }
        ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig", _) => {
            c(up!(".auto_config"), Some("{}"))
        }
        ("envoy.config.core.v3.HttpProtocolOptions", "upstream") => {
            c(up!(".common_http_protocol_options"), Some("{}"))
        }
        ("envoy.config.core.v3.Http1ProtocolOptions", "upstream") => {
            c(up!(".explicit_http_config.http_protocol_options"), None)
        }
        ("envoy.config.core.v3.Http2ProtocolOptions", "upstream") => Some(Site {
            base: CLUSTER,
            path: up!(".use_downstream_protocol_config.http2_protocol_options"),
            init: Some((
                up!(".use_downstream_protocol_config"),
                r#"{"http2_protocol_options": {}}"#,
            )),
        }),
        ("envoy.config.core.v3.UpstreamHttpProtocolOptions", _) => {
            c(up!(".upstream_http_protocol_options"), Some("{}"))
        }
        ("envoy.config.endpoint.v3.ClusterLoadAssignment", _) => c("load_assignment", None),
        ("envoy.config.endpoint.v3.ClusterLoadAssignment.Policy", _) => {
            c("load_assignment.policy", Some("{}"))
        }
        ("envoy.config.endpoint.v3.LocalityLbEndpoints", _) => {
            c("load_assignment.endpoints[0]", None)
        }
        ("envoy.config.endpoint.v3.LbEndpoint", _) => {
            c("load_assignment.endpoints[0].lb_endpoints[0]", None)
        }
        ("envoy.config.endpoint.v3.Endpoint", _) => c(
            "load_assignment.endpoints[0].lb_endpoints[0].endpoint",
            None,
        ),
        ("envoy.config.endpoint.v3.Endpoint.HealthCheckConfig", _) => c(
            "load_assignment.endpoints[0].lb_endpoints[0].endpoint.health_check_config",
            Some("{}"),
        ),
        ("envoy.config.core.v3.HealthCheck", _) => s(HC_HTTP_CLUSTER, "health_checks[0]", None),
        ("envoy.config.core.v3.HealthCheck.HttpHealthCheck", _) => {
            s(HC_HTTP_CLUSTER, "health_checks[0].http_health_check", None)
        }
        ("envoy.config.core.v3.HealthCheck.TcpHealthCheck", _) => {
            s(HC_TCP_CLUSTER, "health_checks[0].tcp_health_check", None)
        }
        ("envoy.config.core.v3.HealthCheck.Payload", _) => s(
            HC_TCP_CLUSTER,
            "health_checks[0].tcp_health_check.send",
            None,
        ),
        ("envoy.config.core.v3.HealthCheck.GrpcHealthCheck", _) => {
            s(HC_GRPC_CLUSTER, "health_checks[0].grpc_health_check", None)
        }
        ("envoy.config.core.v3.Pipe", _) => c(
            "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe",
            Some(r#"{"path": "/run/x.sock"}"#),
        ),
        _ => None,
    }
}

/// A value that sets `field` to something other than its default; some
/// fields need a specific one to mean anything (`Message.field`).
fn special(key: &str) -> Option<&'static str> {
    Some(match key {
        "envoy.config.cluster.v3.Cluster.lb_subset_config" => {
            r#"{"subset_selectors": [{"keys": ["version"]}]}"#
        }
        "envoy.config.route.v3.HedgePolicy.additional_request_chance" => r#"{"numerator": 1}"#,
        "envoy.config.route.v3.RouteAction.metadata_match"
        | "envoy.config.route.v3.WeightedCluster.ClusterWeight.metadata_match" => {
            r#"{"filter_metadata": {"envoy.lb": {"version": "v1"}}}"#
        }
        // A file the probe may open.
        "envoy.extensions.access_loggers.file.v3.FileAccessLog.path" => "/dev/stderr",
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz.enable_dynamic_metadata_ingestion" => {
            "false"
        }
        "envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse.dynamic_metadata_from_headers" => {
            r#"{"patterns": [{"exact": "x"}]}"#
        }
        "envoy.config.cluster.v3.Cluster.wait_for_warm_on_init"
        | "envoy.config.core.v3.Http1ProtocolOptions.allow_absolute_url"
        | "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig.pack_trace_reason"
        | "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig.use_request_id_for_trace_sampling" => {
            "false"
        }
        _ => return None,
    })
}

/// A non-default value of a field's type (a single element for lists, one
/// entry for maps).
fn value_for(fd: &prost_reflect::FieldDescriptor) -> Value {
    let one = |kind: Kind| -> Value {
        match kind {
            Kind::Bool => Value::Bool(true),
            Kind::String => Value::String("x".into()),
            Kind::Bytes => Value::Bytes(b"x".to_vec().into()),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(2),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(2),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(2),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(2),
            Kind::Float => Value::F32(0.5),
            Kind::Double => Value::F64(0.5),
            Kind::Enum(e) => Value::EnumNumber(
                e.values()
                    .map(|v| v.number())
                    .find(|n| *n != 0)
                    .unwrap_or(0),
            ),
            Kind::Message(m) => Value::Message(message_value(&m)),
        }
    };
    if fd.is_map() {
        let Kind::Message(entry) = fd.kind() else {
            return fd.default_value();
        };
        let v = one(entry.map_entry_value_field().kind());
        let mut map = std::collections::HashMap::new();
        map.insert(MapKey::String("x".into()), v);
        return Value::Map(map);
    }
    let v = one(fd.kind());
    if fd.is_list() {
        Value::List(vec![v])
    } else {
        v
    }
}

/// A message "set" to something: wrappers hold a non-default value.
fn message_value(m: &MessageDescriptor) -> DynamicMessage {
    let mut msg = DynamicMessage::new(m.clone());
    match m.full_name() {
        "google.protobuf.BoolValue" => msg.set_field_by_name("value", Value::Bool(true)),
        "google.protobuf.UInt32Value" => msg.set_field_by_name("value", Value::U32(2)),
        "google.protobuf.UInt64Value" => msg.set_field_by_name("value", Value::U64(2)),
        "google.protobuf.Int32Value" => msg.set_field_by_name("value", Value::I32(2)),
        "google.protobuf.Int64Value" => msg.set_field_by_name("value", Value::I64(2)),
        "google.protobuf.DoubleValue" => msg.set_field_by_name("value", Value::F64(0.5)),
        "google.protobuf.StringValue" => msg.set_field_by_name("value", Value::String("x".into())),
        "google.protobuf.Duration" => msg.set_field_by_name("seconds", Value::I64(1)),
        "envoy.type.v3.Percent" => msg.set_field_by_name("value", Value::F64(20.0)),
        _ => {}
    }
    msg
}

pub(super) fn parse(desc: &MessageDescriptor, json: &str) -> DynamicMessage {
    let mut json = json.to_string();
    if json.contains("_PEM@") {
        for (placeholder, pem) in pems() {
            json = json.replace(placeholder, pem);
        }
    }
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    DynamicMessage::deserialize(desc.clone(), v).expect("message")
}

/// The descriptors, decoded once for the whole probe.
pub(super) fn descriptors() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(pool)
}

/// The first step of a path and the rest (dots inside `{}` are a map key's).
fn split(path: &str) -> Option<(&str, &str)> {
    if path.is_empty() {
        return None;
    }
    let mut depth = 0;
    for (i, ch) in path.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            '.' if depth == 0 => return Some((&path[..i], &path[i + 1..])),
            _ => {}
        }
    }
    Some((path, ""))
}

/// The path of the message holding the last step, and that step.
fn parent(path: &str) -> (&str, &str) {
    let mut depth = 0;
    for (i, ch) in path.char_indices().rev() {
        match ch {
            '}' => depth += 1,
            '{' => depth -= 1,
            '.' if depth == 0 => return (&path[..i], &path[i + 1..]),
            _ => {}
        }
    }
    ("", path)
}

/// Sets the site's initial message, if it has one.
fn init(base: &mut DynamicMessage, site: &Site) {
    let Some((path, json)) = site.init else {
        return;
    };
    let (holder, last) = parent(path);
    at(base, holder, &mut |m| {
        let fd = m
            .descriptor()
            .get_field_by_name(last)
            .unwrap_or_else(|| panic!("init: {} has no {last}", m.descriptor().full_name()));
        let Kind::Message(md) = fd.kind() else {
            panic!("init of a scalar")
        };
        m.set_field(&fd, Value::Message(parse(&md, json)));
    });
}

/// Applies `f` to the message at `path` in `msg`.
fn at(msg: &mut DynamicMessage, path: &str, f: &mut dyn FnMut(&mut DynamicMessage)) {
    let pool = descriptors();
    let Some((step, rest)) = split(path) else {
        return f(msg);
    };
    let (name, any) = match step.strip_suffix('@') {
        Some(n) => (n, true),
        None => (step, false),
    };
    let (name, index, key) = if let Some((n, i)) = name.split_once('[') {
        (n, i.trim_end_matches(']').parse::<usize>().ok(), None)
    } else if let Some((n, k)) = name.split_once('{') {
        (n, None, Some(k.trim_end_matches('}').to_string()))
    } else {
        (name, None, None)
    };
    let fd = msg
        .descriptor()
        .get_field_by_name(name)
        .unwrap_or_else(|| panic!("{} has no field {name}", msg.descriptor().full_name()));
    let slot = msg.get_field_mut(&fd);
    let target: &mut Value = match (index, key, slot) {
        (Some(i), None, Value::List(l)) => {
            l.get_mut(i).unwrap_or_else(|| panic!("{path}: no [{i}]"))
        }
        (None, Some(k), Value::Map(m)) => m
            .get_mut(&MapKey::String(k.clone()))
            .unwrap_or_else(|| panic!("{path}: no {{{k}}}")),
        (None, None, v) => v,
        _ => panic!("{path}: bad step {step}"),
    };
    let Value::Message(inner) = target else {
        panic!("{path}: {step} is not a message");
    };
    if any {
        let type_url = inner
            .get_field_by_name("type_url")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let bytes = inner
            .get_field_by_name("value")
            .and_then(|v| v.as_bytes().cloned())
            .unwrap_or_default();
        let desc = pool
            .get_message_by_name(type_url.rsplit('/').next().unwrap_or_default())
            .unwrap_or_else(|| panic!("unknown type {type_url}"));
        let mut decoded = DynamicMessage::decode(desc, bytes.as_ref()).expect("Any contents");
        at(&mut decoded, rest, f);
        inner.set_field_by_name("value", Value::Bytes(decoded.encode_to_vec().into()));
    } else {
        at(inner, rest, f);
    }
}

/// Converts a resource given as a dynamic message of its kind.
fn convert(kind: &str, msg: &DynamicMessage) -> (Result<(), ConvertError>, Vec<String>) {
    use envoy_types::pb::envoy::config::{cluster::v3 as c, listener::v3 as l};
    let bytes = msg.encode_to_vec();
    let mut w = Warnings::default();
    let r = match kind {
        "envoy.config.listener.v3.Listener" => super::super::listener::listener(
            &l::Listener::decode(bytes.as_slice()).expect("decode"),
            &mut w,
        )
        .map(|_| ()),
        "envoy.config.cluster.v3.Cluster" => super::super::cluster::cluster(
            &c::Cluster::decode(bytes.as_slice()).expect("decode"),
            &mut w,
        )
        .map(|_| ()),
        "envoy.extensions.transport_sockets.tls.v3.Secret" => super::super::tls::secret(
            &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(
                bytes.as_slice(),
            )
            .expect("decode"),
            &mut w,
        )
        .map(|_| ()),
        other => panic!("no converter for {other}"),
    };
    (r, w.0)
}

fn base_kind(base: &str) -> &'static str {
    if base == SECRET {
        "envoy.extensions.transport_sockets.tls.v3.Secret"
    } else if base.contains("\"filter_chains\"") {
        "envoy.config.listener.v3.Listener"
    } else {
        "envoy.config.cluster.v3.Cluster"
    }
}

/// Whether an error or warning path names `field` as one of its steps.
fn names(path: &str, field: &str) -> bool {
    path.split('.')
        .map(|s| s.split(['[', '{']).next().unwrap_or(s))
        .any(|s| s == field)
}

#[test]
fn refused_and_warned_fields_are_refused_and_warned_by_name() {
    let pool = descriptors();
    let mut problems = Vec::new();
    let mut unprobed = Vec::new();
    for c in all() {
        let Some(site) = site(c.message, c.context) else {
            unprobed.push(c.message);
            continue;
        };
        let kind = base_kind(site.base);
        let desc = pool.get_message_by_name(kind).expect("kind");
        let mut base = parse(&desc, site.base);
        init(&mut base, &site);
        // The base itself converts, without warnings about this message.
        let (r, _) = convert(kind, &base);
        if let Err(e) = r {
            problems.push(format!("{}: the base does not convert: {e}", c.message));
            continue;
        }
        for f in c.fields {
            let mut msg = base.clone();
            at(&mut msg, site.path, &mut |m| {
                let fd = m
                    .descriptor()
                    .get_field_by_name(f.name)
                    .unwrap_or_else(|| panic!("{}.{}", c.message, f.name));
                let key = format!("{}.{}", c.message, f.name);
                let v = match (special(&key), fd.kind()) {
                    (Some(json), Kind::Message(md)) => Value::Message(parse(&md, json)),
                    (Some("false"), _) => Value::Bool(false),
                    (Some(s), Kind::String) => Value::String(s.into()),
                    _ => value_for(&fd),
                };
                m.set_field(&fd, v);
            });
            let (r, warnings) = convert(kind, &msg);
            let warned = warnings.iter().any(|w| {
                w.contains("tuning knob") && names(w.split(": ").nth(1).unwrap_or(""), f.name)
            });
            match f.status {
                Status::Refused => match &r {
                    Err(e) if names(&e.field, f.name) => {}
                    other => problems.push(format!(
                        "{}.{} is listed refused; setting it gave {other:?}",
                        c.message, f.name
                    )),
                },
                Status::Warned => {
                    if !warned {
                        problems.push(format!(
                            "{}.{} is listed warned; setting it gave {r:?} and warnings {warnings:?}",
                            c.message, f.name
                        ));
                    }
                }
                Status::Applied | Status::Inert => {
                    if warned {
                        problems.push(format!(
                            "{}.{} is listed {} but draws a tuning-knob warning",
                            c.message,
                            f.name,
                            f.status.name()
                        ));
                    }
                }
            }
        }
    }
    // Every list is probed, or says here why not.
    // The bootstrap's `tracing` is read from a bootstrap, which the probe
    // does not build (its provider is the connection manager's, probed).
    // ext_authz's BufferSettings is only read under `with_request_body`,
    // which is refused (probed on ExtAuthz). The bootstrap's own fields
    // likewise (`convert/bootstrap.rs`, tested in `bootstrap.rs`).
    let exempt = [
        "envoy.config.cluster.v3.Filter",
        "envoy.config.trace.v3.Tracing",
        "envoy.extensions.filters.http.ext_authz.v3.BufferSettings",
        "envoy.config.bootstrap.v3.Bootstrap",
        "envoy.config.metrics.v3.StatsConfig",
        "envoy.config.overload.v3.OverloadManager",
        "envoy.config.bootstrap.v3.ClusterManager",
        "envoy.config.bootstrap.v3.Admin",
    ];
    unprobed.retain(|m| !exempt.contains(m));
    assert!(
        unprobed.is_empty(),
        "lists without a probe site: {unprobed:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A list and its message agree on what they are about (a sanity check of
/// the sites: the message at each path is the listed one).
#[test]
fn probe_sites_hold_their_messages() {
    let pool = descriptors();
    for c in all() {
        let Some(site) = site(c.message, c.context) else {
            continue;
        };
        let desc = pool
            .get_message_by_name(base_kind(site.base))
            .expect("kind");
        let mut base = parse(&desc, site.base);
        init(&mut base, &site);
        let mut seen = String::new();
        at(&mut base, site.path, &mut |m| {
            seen = m.descriptor().full_name().to_string();
        });
        assert_eq!(seen, c.message, "site {}", site.path);
        let _: &Coverage = c;
    }
}
