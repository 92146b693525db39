//! Envoy v3 protos → `ferry-model`.
//!
//! Every error names the resource (`listener "x"`, `cluster "y"`) and the field
//! path inside it, so a bad bootstrap or a NACK tells the operator exactly what
//! to fix. Extensions Ferry does not implement are errors unless Envoy allows
//! skipping them (`is_optional` HTTP filters) or they are Istio's own filters
//! (peer metadata, alpn, authn, Wasm), which are accepted with a warning.
//! Istio's `istio.stats` is converted (Ferry reports Istio's metrics).
//!
//! One module per part of Envoy's API, named as Envoy names it: `listener`
//! (listeners, filter chains), `route` (route tables, virtual hosts, routes),
//! `retry`, `per_filter` (`typed_per_filter_config`), `cluster`, `endpoint`,
//! `tls` (transport sockets), one per HTTP filter (`fault`, `cors`,
//! `local_ratelimit`, `rbac`, `jwt_authn`), `istio` (Istio's own
//! extensions), and the shared pieces (`core_types`, `matcher`,
//! `header_mutation`). This file holds the mechanism (errors, warnings,
//! typed configs), the HTTP connection manager and the TCP proxy.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3 as router_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;
use envoy_types::pb::envoy::extensions::http::original_ip_detection::custom_header::v3 as custom_header_pb;
use envoy_types::pb::envoy::extensions::http::original_ip_detection::xff::v3 as xff_pb;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;
use prost::Message;

mod access_log;
mod circuit_breakers;
mod cluster;
mod core_types;
mod cors;
mod coverage;
mod endpoint;
mod fault;
mod header_mutation;
mod http_protocol;
mod istio;
mod jwt_authn;
mod lb_config;
mod listener;
mod local_ratelimit;
mod matcher;
mod outlier_detection;
mod per_filter;
mod rbac;
mod retry;
mod route;
mod tls;
mod trace;
mod upstream_protocol;

pub use access_log::admin_access_logs;
pub use cluster::cluster;
pub use endpoint::cluster_load_assignment;
pub use listener::listener;
pub use route::route_config;
pub use tls::secret;
pub use trace::bootstrap_provider;

use core_types::cidr;
use cors::CORS_TYPE;
use fault::{FAULT_TYPE, fault_config};
use istio::{ISTIO_STATS_TYPE, ISTIO_TOLERATED, istio_stats};
use local_ratelimit::{RATELIMIT_TYPE, local_ratelimit};
use route::route_config_in;

/// A conversion error: which resource, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {field}: {message}")]
pub struct ConvertError {
    pub resource: String,
    pub field: String,
    pub message: String,
}

/// Non-fatal findings (skipped optional or recognised-but-unimplemented
/// extensions), reported by the caller as warnings and counted.
#[derive(Debug, Default, Clone)]
pub struct Warnings(pub Vec<String>);

struct Ctx<'a> {
    resource: String,
    warnings: &'a mut Warnings,
    /// The listener's `traffic_direction` is INBOUND: Istio's stats then
    /// report as the destination.
    inbound: bool,
    /// The listener's `traffic_direction` is OUTBOUND: its spans are egress.
    outbound: bool,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConvertError {
        ConvertError {
            resource: self.resource.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn warn(&mut self, field: &str, message: String) {
        self.warnings
            .0
            .push(format!("{}: {field}: {message}", self.resource));
    }
}

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// Messages wrapping a typed config as a JSON struct.
#[derive(Clone, PartialEq, Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// The message type of a typed config (unwrapping TypedStruct) and its bytes.
enum Typed {
    Proto {
        type_name: String,
        bytes: Vec<u8>,
    },
    Json {
        type_name: String,
        json: serde_json::Value,
    },
}

impl Typed {
    fn from_any(any: &Any) -> Result<Self, String> {
        let name = any
            .type_url
            .strip_prefix(TYPE_PREFIX)
            .unwrap_or(&any.type_url);
        if name == "udpa.type.v1.TypedStruct" || name == "xds.type.v3.TypedStruct" {
            let ts = TypedStruct::decode(any.value.as_slice())
                .map_err(|e| format!("undecodable {name}: {e}"))?;
            let inner = ts
                .type_url
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            let json = ts
                .value
                .as_ref()
                .map(crate::json::prost_types_struct::to_json)
                .unwrap_or_else(|| serde_json::json!({}));
            return Ok(Typed::Json {
                type_name: inner,
                json,
            });
        }
        Ok(Typed::Proto {
            type_name: name.to_string(),
            bytes: any.value.clone(),
        })
    }

    fn type_name(&self) -> &str {
        match self {
            Typed::Proto { type_name, .. } | Typed::Json { type_name, .. } => type_name,
        }
    }

    fn decode<M: Message + Default>(self) -> Result<M, String> {
        match self {
            Typed::Proto { type_name, bytes } => {
                M::decode(bytes.as_slice()).map_err(|e| format!("undecodable {type_name}: {e}"))
            }
            Typed::Json { type_name, json } => crate::json::from_json(&type_name, json),
        }
    }
}

fn duration(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> Option<Duration> {
    d.as_ref().map(|d| {
        Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
            + Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))
    })
}

/// Envoy's convention for timeouts: absent → default, zero → disabled.
fn timeout_or(
    d: &Option<envoy_types::pb::google::protobuf::Duration>,
    default: Option<Duration>,
) -> Option<Duration> {
    match duration(d) {
        None => default,
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    }
}

/// A hash of a message's encoding. Map fields (`Struct`, metadata) encode
/// in an unspecified order, so equal messages may rarely hash apart: that
/// only makes an update treat an unchanged listener or chain as changed
/// (its connections drain), never the reverse.
fn fingerprint(msg: &impl Message) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    msg.encode_to_vec().hash(&mut h);
    h.finish()
}

fn tcp_proxy(
    ctx: &Ctx<'_>,
    field: &str,
    tp: &tcp_pb::TcpProxy,
) -> Result<m::TcpProxy, ConvertError> {
    use tcp_pb::tcp_proxy::ClusterSpecifier;
    let (cluster, weighted) = match &tp.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => (c.clone(), Vec::new()),
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            let mut out = Vec::with_capacity(wc.clusters.len());
            for (i, c) in wc.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    return Err(ctx.err(
                        format!("{field}.weighted_clusters.clusters[{i}].name"),
                        "a cluster name is required",
                    ));
                }
                if c.metadata_match.is_some() {
                    return Err(ctx.err(
                        format!("{field}.weighted_clusters.clusters[{i}].metadata_match"),
                        "subset metadata matches are not supported",
                    ));
                }
                // A zero weight never gets a connection (Envoy allows it).
                if c.weight > 0 {
                    out.push((c.name.clone(), c.weight));
                }
            }
            let Some((first, _)) = out.first() else {
                return Err(ctx.err(
                    format!("{field}.weighted_clusters.clusters"),
                    "at least one cluster with a positive weight is required",
                ));
            };
            (first.clone(), out)
        }
        _ => return Err(ctx.err(format!("{field}.cluster"), "tcp_proxy needs a cluster")),
    };
    let access_logs = access_log::tcp_proxy(ctx, field, tp)?;
    Ok(m::TcpProxy {
        access_logs,
        stat_prefix: tp.stat_prefix.clone(),
        cluster,
        weighted,
        idle_timeout: timeout_or(&tp.idle_timeout, Some(Duration::from_secs(3600))),
    })
}

const HTTP_TOLERATED: &[&str] = &["envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"];

fn http_connection_manager(
    ctx: &mut Ctx<'_>,
    field: &str,
    h: &hcm_pb::HttpConnectionManager,
) -> Result<m::HttpConnectionManager, ConvertError> {
    use hcm_pb::http_connection_manager::{CodecType, RouteSpecifier};
    let codec = match CodecType::try_from(h.codec_type) {
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
        match &h.route_specifier {
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
            _ => return Err(ctx.err(field, "http_connection_manager needs route_config")),
        };
    let mut has_router = false;
    let mut suppress_envoy_headers = false;
    let mut start_child_span = false;
    let mut http_filters = Vec::new();
    for (i, hf) in h.http_filters.iter().enumerate() {
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
    let idle = h
        .common_http_protocol_options
        .as_ref()
        .map(|o| timeout_or(&o.idle_timeout, Some(Duration::from_secs(3600))))
        .unwrap_or(Some(Duration::from_secs(3600)));
    use hcm_pb::http_connection_manager::ForwardClientCertDetails as F;
    let forward_client_cert = match F::try_from(h.forward_client_cert_details) {
        Ok(F::Sanitize) => m::listener::ForwardClientCert::Sanitize,
        Ok(F::ForwardOnly) => m::listener::ForwardClientCert::ForwardOnly,
        Ok(F::AlwaysForwardOnly) => m::listener::ForwardClientCert::AlwaysForwardOnly,
        Ok(F::AppendForward) => m::listener::ForwardClientCert::AppendForward,
        Ok(F::SanitizeSet) => m::listener::ForwardClientCert::SanitizeSet,
        Err(_) => {
            return Err(ctx.err(
                format!("{field}.forward_client_cert_details"),
                format!("unknown value {}", h.forward_client_cert_details),
            ));
        }
    };
    let details = h.set_current_client_cert_details.unwrap_or_default();
    if details.cert || details.chain || details.issuer {
        ctx.warn(
            &format!("{field}.set_current_client_cert_details"),
            "x-forwarded-client-cert Cert, Chain and Issuer are not added".into(),
        );
    }
    let use_remote_address = h.use_remote_address.as_ref().is_some_and(|v| v.value);
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
        stat_prefix: h.stat_prefix.clone(),
        codec,
        routes,
        generate_request_id: h.generate_request_id.as_ref().is_none_or(|v| v.value),
        idle_timeout: idle,
        stream_idle_timeout: timeout_or(&h.stream_idle_timeout, Some(Duration::from_secs(300))),
        request_timeout: timeout_or(&h.request_timeout, None),
        use_remote_address,
        http_filters,
        client_trust,
        suppress_envoy_headers,
        path_normalization: path_normalization(ctx, field, h)?,
        protocol: Arc::new(http_protocol::downstream(ctx, field, h)?),
    })
}

/// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`,
/// with Envoy's defaults when unset (its runtime keys left at theirs: no
/// normalization, escaped slashes kept). `path_normalization_options` is
/// not implemented by Envoy either (`not-implemented-hide`): it has no
/// effect there, so it is ignored with a warning.
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
    if h.path_normalization_options.is_some() {
        ctx.warn(
            &format!("{field}.path_normalization_options"),
            "not implemented by Envoy 1.40 either; ignored as Envoy does \
             (normalize_path and merge_slashes apply)"
                .into(),
        );
    }
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
