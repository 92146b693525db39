//! Envoy v3 protos → `ferry-model`.
//!
//! Every error names the resource (`listener "x"`, `cluster "y"`) and the field
//! path inside it, so a bad bootstrap or a NACK tells the operator exactly what
//! to fix. Extensions Ferry does not implement are errors unless Envoy allows
//! skipping them (`is_optional` HTTP filters) or they are Istio's own filters
//! (peer metadata, alpn, authn, Wasm), which are accepted with a warning.
//! Istio's `istio.stats` is converted (Ferry reports Istio's metrics).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors_pb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3 as router_pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm_pb;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;
use envoy_types::pb::envoy::extensions::http::original_ip_detection::custom_header::v3 as custom_header_pb;
use envoy_types::pb::envoy::extensions::http::original_ip_detection::xff::v3 as xff_pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher_pb;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;
use prost::Message;

mod access_log;
mod http_protocol;
mod jwt_authn;
mod rbac;
mod tls;
mod trace;

pub use access_log::admin_access_logs;
pub use tls::secret;
use tls::{downstream_tls, upstream_tls};
pub use trace::bootstrap_provider;

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

/// Type URLs of Istio's own extensions: recognised, not (yet) implemented,
/// never a reason to reject a listener.
const ISTIO_TOLERATED: &[&str] = &[
    "envoy.tcp.metadataexchange.config.MetadataExchange",
    "io.istio.http.peer_metadata.Config",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "io.istio.network.authn.Config",
    "istio.mixer.v1.config.client.ClientConfig",
    "envoy.extensions.filters.network.wasm.v3.Wasm",
    "envoy.extensions.filters.http.wasm.v3.Wasm",
];

/// Istio's `istio.stats` configuration type.
const ISTIO_STATS_TYPE: &str = "stats.PluginConfig";

/// The fields of Istio's `stats.PluginConfig` Ferry applies; custom metric
/// definitions and tag overrides are not (they are Istio's own extension and
/// istiod only sets them from a Telemetry resource).
#[derive(Clone, PartialEq, Message)]
struct PluginConfig {
    #[prost(bool, tag = "6")]
    disable_host_header_fallback: bool,
    /// 0: UNSPECIFIED (the listener's direction decides), 1: SERVER_GATEWAY.
    #[prost(int32, tag = "10")]
    reporter: i32,
}

/// `istio.stats`: lenient, since unknown or malformed fields of Istio's own
/// extension must not cost the listener.
fn istio_stats(ctx: &Ctx<'_>, typed: Typed) -> m::IstioStats {
    let cfg = match typed {
        Typed::Proto { bytes, .. } => PluginConfig::decode(bytes.as_slice()).unwrap_or_else(|e| {
            tracing::debug!(xds.resource = %ctx.resource, error = %e, "istio.stats: undecodable config; defaults used");
            PluginConfig::default()
        }),
        Typed::Json { json, .. } => PluginConfig {
            disable_host_header_fallback: json
                .get("disable_host_header_fallback")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            reporter: i32::from(
                json.get("reporter").and_then(serde_json::Value::as_str) == Some("SERVER_GATEWAY"),
            ),
        },
    };
    let reporter = if cfg.reporter == 1 || ctx.inbound {
        m::Reporter::Destination
    } else {
        m::Reporter::Source
    };
    m::IstioStats {
        reporter,
        disable_host_header_fallback: cfg.disable_host_header_fallback,
    }
}

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

fn socket_address(
    ctx: &Ctx<'_>,
    field: &str,
    a: &Option<core_pb::Address>,
) -> Result<(String, u16), ConvertError> {
    use core_pb::address::Address as A;
    use core_pb::socket_address::PortSpecifier;
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(A::SocketAddress(sa)) => {
            if sa.protocol != core_pb::socket_address::Protocol::Tcp as i32 {
                return Err(ctx.err(
                    format!("{field}.socket_address.protocol"),
                    "only TCP is supported",
                ));
            }
            let port = match &sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => u16::try_from(*p).map_err(|_| {
                    ctx.err(
                        format!("{field}.socket_address.port_value"),
                        format!("{p} is not a port"),
                    )
                })?,
                Some(PortSpecifier::NamedPort(_)) => {
                    return Err(ctx.err(
                        format!("{field}.socket_address.named_port"),
                        "named ports are not supported",
                    ));
                }
                None => 0,
            };
            Ok((sa.address.clone(), port))
        }
        Some(_) => Err(ctx.err(field, "only socket_address is supported")),
        None => Err(ctx.err(field, "address is required")),
    }
}

fn ip_socket(
    ctx: &Ctx<'_>,
    field: &str,
    a: &Option<core_pb::Address>,
) -> Result<SocketAddr, ConvertError> {
    let (host, port) = socket_address(ctx, field, a)?;
    let ip: IpAddr = host.parse().map_err(|_| {
        ctx.err(
            format!("{field}.socket_address.address"),
            format!("{host:?} is not an IP address"),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// A metadata value as the string Envoy compares it with.
fn value_string(v: &envoy_types::pb::google::protobuf::Value) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        _ => String::new(),
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

/// The fingerprint of a listener's settings: the listener without its
/// filter chains, as Envoy's `filterChainOnlyChange` compares them.
fn settings_fingerprint(l: &listener_pb::Listener) -> u64 {
    let settings = listener_pb::Listener {
        filter_chains: Vec::new(),
        default_filter_chain: None,
        filter_chain_matcher: None,
        ..l.clone()
    };
    fingerprint(&settings)
}

// ---------------------------------------------------------------- listeners

pub fn listener(
    l: &listener_pb::Listener,
    warnings: &mut Warnings,
) -> Result<m::Listener, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("listener {:?}", l.name),
        warnings,
        inbound: l.traffic_direction == core_pb::TrafficDirection::Inbound as i32,
        outbound: l.traffic_direction == core_pb::TrafficDirection::Outbound as i32,
    };
    if l.name.is_empty() {
        return Err(ctx.err("name", "a listener needs a name"));
    }
    let address = ip_socket(&ctx, "address", &l.address)?;
    let mut additional_addresses = Vec::with_capacity(l.additional_addresses.len());
    for (i, a) in l.additional_addresses.iter().enumerate() {
        additional_addresses.push(ip_socket(
            &ctx,
            &format!("additional_addresses[{i}].address"),
            &a.address,
        )?);
    }
    let mut filters = m::ListenerFilters::default();
    for (i, lf) in l.listener_filters.iter().enumerate() {
        let field = format!("listener_filters[{i}]");
        let type_name = match &lf.config_type {
            Some(listener_pb::listener_filter::ConfigType::TypedConfig(any)) => {
                Typed::from_any(any)
                    .map_err(|e| ctx.err(format!("{field}.typed_config"), e))?
                    .type_name()
                    .to_string()
            }
            _ => String::new(),
        };
        match (type_name.as_str(), lf.name.as_str()) {
            ("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", _)
            | ("", "envoy.filters.listener.original_dst") => filters.original_dst = true,
            ("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", _)
            | ("", "envoy.filters.listener.tls_inspector") => filters.tls_inspector = true,
            ("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", _)
            | ("", "envoy.filters.listener.http_inspector") => filters.http_inspector = true,
            _ => {
                return Err(ctx.err(
                    field,
                    format!("unsupported listener filter {:?} ({type_name})", lf.name),
                ));
            }
        }
    }
    let mut chains = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        chains.push(Arc::new(filter_chain(
            &mut ctx,
            &format!("filter_chains[{i}]"),
            fc,
        )?));
    }
    let default_chain = match &l.default_filter_chain {
        Some(fc) => Some(Arc::new(filter_chain(
            &mut ctx,
            "default_filter_chain",
            fc,
        )?)),
        None => None,
    };
    if chains.is_empty() && default_chain.is_none() {
        return Err(ctx.err(
            "filter_chains",
            "a listener needs at least one filter chain",
        ));
    }
    let detection_timeout = timeout_or(&l.listener_filters_timeout, None);
    let access_logs = access_log::access_logs(&ctx, "access_log", &l.access_log)?;
    Ok(m::Listener {
        access_logs,
        name: l.name.clone(),
        fingerprint: fingerprint(l),
        settings_fingerprint: settings_fingerprint(l),
        address,
        additional_addresses,
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|v| v.value),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|v| v.value),
        listener_filters: filters,
        detection_timeout,
        filter_chains: chains,
        default_chain,
    })
}

fn cidr(ctx: &Ctx<'_>, field: &str, r: &core_pb::CidrRange) -> Result<m::CidrRange, ConvertError> {
    let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
        ctx.err(
            format!("{field}.address_prefix"),
            format!("{:?} is not an IP address", r.address_prefix),
        )
    })?;
    let len = r
        .prefix_len
        .as_ref()
        .map_or(if ip.is_ipv4() { 32 } else { 128 }, |v| v.value);
    u8::try_from(len)
        .ok()
        .and_then(|len| m::CidrRange::new(ip, len))
        .ok_or_else(|| {
            ctx.err(
                format!("{field}.prefix_len"),
                format!("{len} is too long for {ip}"),
            )
        })
}

fn filter_chain(
    ctx: &mut Ctx<'_>,
    field: &str,
    fc: &listener_pb::FilterChain,
) -> Result<m::FilterChain, ConvertError> {
    let mut fcm = m::FilterChainMatch::default();
    if let Some(mm) = &fc.filter_chain_match {
        let f = format!("{field}.filter_chain_match");
        fcm.destination_port = mm
            .destination_port
            .as_ref()
            .map(|p| p.value)
            .map(|p| {
                u16::try_from(p).map_err(|_| {
                    ctx.err(
                        format!("{f}.destination_port"),
                        format!("{p} is not a port"),
                    )
                })
            })
            .transpose()?;
        for (i, r) in mm.prefix_ranges.iter().enumerate() {
            fcm.prefix_ranges
                .push(cidr(ctx, &format!("{f}.prefix_ranges[{i}]"), r)?);
        }
        for (i, r) in mm.source_prefix_ranges.iter().enumerate() {
            fcm.source_prefix_ranges
                .push(cidr(ctx, &format!("{f}.source_prefix_ranges[{i}]"), r)?);
        }
        fcm.source_ports = mm
            .source_ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        fcm.server_names = mm.server_names.clone();
        fcm.transport_protocol =
            (!mm.transport_protocol.is_empty()).then(|| mm.transport_protocol.clone());
        fcm.application_protocols = mm.application_protocols.clone();
    }
    let mut tls = match &fc.transport_socket {
        Some(ts) => downstream_tls(ctx, &format!("{field}.transport_socket"), ts)?,
        None => None,
    };
    if let Some(t) = &mut tls {
        t.handshake_timeout = duration(&fc.transport_socket_connect_timeout);
    }
    let mut terminal = None;
    let mut network_rbac = Vec::new();
    let mut rbac_at = Vec::new();
    let mut stats = None;
    for (i, f) in fc.filters.iter().enumerate() {
        let ff = format!("{field}.filters[{i}]");
        let typed = match &f.config_type {
            Some(listener_pb::filter::ConfigType::TypedConfig(any)) => {
                Typed::from_any(any).map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?
            }
            _ => return Err(ctx.err(&ff, format!("filter {:?} has no typed_config", f.name))),
        };
        if terminal.is_some() {
            return Err(ctx.err(
                &ff,
                format!("filter {:?} follows a terminal filter", f.name),
            ));
        }
        match typed.type_name() {
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => {
                let tp: tcp_pb::TcpProxy = typed
                    .decode()
                    .map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?;
                terminal = Some(m::ChainKind::Tcp(tcp_proxy(ctx, &ff, &tp)?));
            }
            rbac::NETWORK_RBAC_TYPE => {
                let tf = format!("{ff}.typed_config");
                let r = typed.decode().map_err(|e| ctx.err(&tf, e))?;
                network_rbac.push(Arc::new(rbac::network_rbac(ctx, &tf, &r)?));
                rbac_at.push(i);
            }
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
                let h: hcm_pb::HttpConnectionManager = typed
                    .decode()
                    .map_err(|e| ctx.err(format!("{ff}.typed_config"), e))?;
                let hcm = http_connection_manager(ctx, &ff, &h)?;
                stats = stats.or_else(|| {
                    hcm.http_filters.iter().find_map(|f| match f.config {
                        m::HttpFilterConfig::IstioStats(s) => Some(s),
                        _ => None,
                    })
                });
                terminal = Some(m::ChainKind::Http(hcm));
            }
            ISTIO_STATS_TYPE => stats = Some(istio_stats(ctx, typed)),
            t if ISTIO_TOLERATED.contains(&t) => {
                ctx.warn(
                    &ff,
                    format!(
                        "network filter {:?} ({t}) is recognised but not implemented; skipped",
                        f.name
                    ),
                );
            }
            t => {
                return Err(ctx.err(
                    format!("{ff}.typed_config"),
                    format!("unsupported network filter {:?} ({t})", f.name),
                ));
            }
        }
    }
    let kind = terminal.ok_or_else(|| {
        ctx.err(
            format!("{field}.filters"),
            "the chain has no terminal filter (tcp_proxy or http_connection_manager)",
        )
    })?;
    let whole = fingerprint(fc);
    let fingerprint_without_network_rbac = if rbac_at.is_empty() {
        whole
    } else {
        let mut bare = fc.clone();
        let mut i = 0;
        bare.filters.retain(|_| {
            i += 1;
            !rbac_at.contains(&(i - 1))
        });
        fingerprint(&bare)
    };
    Ok(m::FilterChain {
        fingerprint: whole,
        fingerprint_without_network_rbac,
        name: if fc.name.is_empty() {
            field.to_string()
        } else {
            fc.name.clone()
        },
        filter_chain_match: fcm,
        tls,
        rbac: network_rbac,
        kind,
        istio_stats: stats,
    })
}

/// A transport socket: raw (plaintext) or TLS, whose settings are parsed
/// into the model. Returns the TLS context's type and bytes, if TLS.
fn transport_socket_typed(
    ctx: &Ctx<'_>,
    field: &str,
    ts: &core_pb::TransportSocket,
) -> Result<Option<Typed>, ConvertError> {
    let typed = match &ts.config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => {
            Typed::from_any(any).map_err(|e| ctx.err(format!("{field}.typed_config"), e))?
        }
        None if ts.name == "envoy.transport_sockets.raw_buffer" || ts.name == "raw_buffer" => {
            return Ok(None);
        }
        None => {
            return Err(ctx.err(
                field,
                format!("transport socket {:?} has no typed_config", ts.name),
            ));
        }
    };
    match typed.type_name() {
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Ok(None),
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
        | "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" => Ok(Some(typed)),
        t => Err(ctx.err(
            format!("{field}.typed_config"),
            format!("unsupported transport socket {:?} ({t})", ts.name),
        )),
    }
}

/// The bytes of a `DataSource`: inline, or read from a file (as Envoy
/// reads it when the configuration is loaded).
fn data_source(
    ctx: &Ctx<'_>,
    field: &str,
    d: Option<&core_pb::DataSource>,
) -> Result<Vec<u8>, ConvertError> {
    use core_pb::data_source::Specifier as S;
    match d.and_then(|d| d.specifier.as_ref()) {
        None => Ok(Vec::new()),
        Some(S::InlineBytes(b)) => Ok(b.clone()),
        Some(S::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(S::Filename(f)) => std::fs::read(f).map_err(|e| {
            ctx.err(
                format!("{field}.filename"),
                format!("cannot read {f:?}: {e}"),
            )
        }),
        Some(S::EnvironmentVariable(v)) => std::env::var(v).map(String::into_bytes).map_err(|_| {
            ctx.err(
                format!("{field}.environment_variable"),
                format!("environment variable {v:?} is not set"),
            )
        }),
    }
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

// ---------------------------------------------------------------- routes

/// A route configuration delivered on its own (RDS).
pub fn route_config(
    rc: &route_pb::RouteConfiguration,
    warnings: &mut Warnings,
) -> Result<m::RouteConfig, ConvertError> {
    let mut ctx = Ctx {
        resource: format!("route_configuration {:?}", rc.name),
        warnings,
        inbound: false,
        outbound: false,
    };
    route_config_in(&mut ctx, "", rc)
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

fn route_config_in(
    ctx: &mut Ctx<'_>,
    field: &str,
    rc: &route_pb::RouteConfiguration,
) -> Result<m::RouteConfig, ConvertError> {
    let table_request = header_mutations(
        ctx,
        &join(field, "request_headers_to_add"),
        &rc.request_headers_to_add,
        &join(field, "request_headers_to_remove"),
        &rc.request_headers_to_remove,
    )?;
    let table_response = header_mutations(
        ctx,
        &join(field, "response_headers_to_add"),
        &rc.response_headers_to_add,
        &join(field, "response_headers_to_remove"),
        &rc.response_headers_to_remove,
    )?;
    let mut vhosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vf = join(field, &format!("virtual_hosts[{i}]"));
        if vh.domains.is_empty() {
            return Err(ctx.err(
                format!("{vf}.domains"),
                format!("virtual host {:?} has no domains", vh.name),
            ));
        }
        let defaults = vhost_defaults(ctx, &vf, vh)?;
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (j, r) in vh.routes.iter().enumerate() {
            let mut rt = route(ctx, &format!("{vf}.routes[{j}]"), r)?;
            defaults.apply(r, &mut rt);
            rt.request_headers
                .ops
                .extend(table_request.ops.iter().cloned());
            rt.response_headers
                .ops
                .extend(table_response.ops.iter().cloned());
            routes.push(rt);
        }
        vhosts.push(m::VirtualHost {
            name: vh.name.clone(),
            domains: vh
                .domains
                .iter()
                .map(|d| m::DomainMatcher::parse(d))
                .collect(),
            routes,
        });
    }
    let mut internal_only_headers = Vec::with_capacity(rc.internal_only_headers.len());
    for (i, h) in rc.internal_only_headers.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    join(field, &format!("internal_only_headers[{i}]")),
                    format!("invalid header name {h:?}"),
                )
            })?;
        internal_only_headers.push(name);
    }
    Ok(m::RouteConfig {
        name: rc.name.clone(),
        internal_only_headers,
        virtual_hosts: vhosts,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
        validate_clusters: rc.validate_clusters.as_ref().is_some_and(|v| v.value),
    })
}

fn regex(
    ctx: &Ctx<'_>,
    field: &str,
    r: &matcher_pb::RegexMatcher,
) -> Result<regex::Regex, ConvertError> {
    // Envoy's safe_regex must match the whole value (RE2 full match).
    regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| {
        ctx.err(
            format!("{field}.regex"),
            format!("invalid regex {:?}: {e}", r.regex),
        )
    })
}

fn string_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    s: &matcher_pb::StringMatcher,
) -> Result<m::StringMatcher, ConvertError> {
    use matcher_pb::string_matcher::MatchPattern as P;
    Ok(match &s.match_pattern {
        Some(P::Exact(v)) => m::StringMatcher::Exact(v.clone()),
        Some(P::Prefix(v)) => m::StringMatcher::Prefix(v.clone()),
        Some(P::Suffix(v)) => m::StringMatcher::Suffix(v.clone()),
        Some(P::Contains(v)) => m::StringMatcher::Contains(v.clone()),
        Some(P::SafeRegex(r)) => {
            m::StringMatcher::Regex(regex(ctx, &format!("{field}.safe_regex"), r)?)
        }
        _ => return Err(ctx.err(field, "unsupported string matcher")),
    })
}

#[allow(deprecated)] // Envoy still sends the deprecated forms; both are honoured.
fn header_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    h: &route_pb::HeaderMatcher,
) -> Result<m::HeaderMatcher, ConvertError> {
    use route_pb::header_matcher::HeaderMatchSpecifier as S;
    let name = m::HeaderKey::parse(&h.name).ok_or_else(|| {
        ctx.err(
            format!("{field}.name"),
            format!("{:?} is not a valid header name", h.name),
        )
    })?;
    let mut present = true;
    let mut ignore_case = false;
    let matcher = match &h.header_match_specifier {
        None => None,
        Some(S::ExactMatch(v)) => Some(m::StringMatcher::Exact(v.clone())),
        Some(S::PrefixMatch(v)) => Some(m::StringMatcher::Prefix(v.clone())),
        Some(S::SuffixMatch(v)) => Some(m::StringMatcher::Suffix(v.clone())),
        Some(S::ContainsMatch(v)) => Some(m::StringMatcher::Contains(v.clone())),
        Some(S::SafeRegexMatch(r)) => Some(m::StringMatcher::Regex(regex(
            ctx,
            &format!("{field}.safe_regex_match"),
            r,
        )?)),
        Some(S::PresentMatch(p)) => {
            present = *p;
            None
        }
        Some(S::StringMatch(s)) => {
            ignore_case = s.ignore_case;
            Some(string_matcher(ctx, &format!("{field}.string_match"), s)?)
        }
        Some(S::RangeMatch(_)) => {
            return Err(ctx.err(
                format!("{field}.range_match"),
                "range_match is not supported yet",
            ));
        }
    };
    Ok(m::HeaderMatcher {
        name,
        matcher,
        ignore_case,
        invert: h.invert_match,
        present,
    })
}

#[allow(deprecated)] // `append` is deprecated but still sent; Envoy honours it.
fn route(ctx: &mut Ctx<'_>, field: &str, r: &route_pb::Route) -> Result<m::Route, ConvertError> {
    use route_pb::route::Action;
    use route_pb::route_match::PathSpecifier as P;
    let rm = r
        .r#match
        .as_ref()
        .ok_or_else(|| ctx.err(format!("{field}.match"), "a route needs a match"))?;
    let mf = format!("{field}.match");
    let path = match &rm.path_specifier {
        Some(P::Prefix(p)) => m::PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => m::PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(re)) => m::PathMatch::Regex(regex(ctx, &format!("{mf}.safe_regex"), re)?),
        Some(P::PathSeparatedPrefix(p)) => m::PathMatch::SeparatedPrefix(p.clone()),
        _ => {
            return Err(ctx.err(
                &mf,
                "unsupported path specifier (prefix, path, safe_regex or path_separated_prefix)",
            ));
        }
    };
    let mut query_parameters = Vec::with_capacity(rm.query_parameters.len());
    for (i, q) in rm.query_parameters.iter().enumerate() {
        query_parameters.push(query_parameter_matcher(
            ctx,
            &format!("{mf}.query_parameters[{i}]"),
            q,
        )?);
    }
    if !rm.dynamic_metadata.is_empty() {
        return Err(ctx.err(
            format!("{mf}.dynamic_metadata"),
            "dynamic metadata matching is not supported (no filter produces dynamic metadata)",
        ));
    }
    if !rm.cookies.is_empty() {
        return Err(ctx.err(
            format!("{mf}.cookies"),
            "cookie matching is not supported yet",
        ));
    }
    if rm.tls_context.is_some() {
        return Err(ctx.err(
            format!("{mf}.tls_context"),
            "TLS context matching is not supported yet",
        ));
    }
    let runtime_fraction = rm
        .runtime_fraction
        .as_ref()
        .map(|rf| fraction(&rf.default_value));
    let mut headers = Vec::with_capacity(rm.headers.len());
    for (i, h) in rm.headers.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{mf}.headers[{i}]"), h)?);
    }
    let action = match &r.action {
        Some(Action::Route(ra)) => route_action(ctx, &format!("{field}.route"), ra)?,
        Some(Action::DirectResponse(d)) => {
            let status =
                http::StatusCode::from_u16(u16::try_from(d.status).unwrap_or(0)).map_err(|_| {
                    ctx.err(
                        format!("{field}.direct_response.status"),
                        format!("{} is not an HTTP status", d.status),
                    )
                })?;
            use core_pb::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(Specifier::InlineString(s)) => Some(s.clone()),
                Some(Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(_) => {
                    return Err(ctx.err(
                        format!("{field}.direct_response.body"),
                        "only inline bodies are supported",
                    ));
                }
                None => None,
            };
            m::RouteAction::DirectResponse { status, body }
        }
        Some(Action::Redirect(rd)) => redirect(ctx, &format!("{field}.redirect"), rd)?,
        _ => return Err(ctx.err(field, "a route needs route, redirect or direct_response")),
    };
    let request_headers = header_mutations(
        ctx,
        &format!("{field}.request_headers_to_add"),
        &r.request_headers_to_add,
        &format!("{field}.request_headers_to_remove"),
        &r.request_headers_to_remove,
    )?;
    let response_headers = header_mutations(
        ctx,
        &format!("{field}.response_headers_to_add"),
        &r.response_headers_to_add,
        &format!("{field}.response_headers_to_remove"),
        &r.response_headers_to_remove,
    )?;
    let per_filter = per_filter_configs(
        ctx,
        &format!("{field}.typed_per_filter_config"),
        &r.typed_per_filter_config,
    )?;
    let inline_cors = match &r.action {
        #[allow(deprecated)]
        Some(Action::Route(ra)) => ra
            .cors
            .as_ref()
            .map(|c| inline_cors(ctx, &format!("{field}.route.cors"), c))
            .transpose()?,
        _ => None,
    };
    Ok(m::Route {
        name: r.name.clone(),
        route_match: m::RouteMatch {
            path,
            case_sensitive: rm.case_sensitive.as_ref().is_none_or(|v| v.value),
            headers,
            query_parameters,
            grpc: rm.grpc.is_some(),
            runtime_fraction,
        },
        action,
        request_headers,
        response_headers,
        fault_overrides: per_filter.fault,
        cors: m::RouteCors {
            per_filter: per_filter.cors,
            inline: inline_cors.into_iter().map(Arc::new).collect(),
        },
        ratelimit_overrides: per_filter.ratelimit,
        rbac_overrides: per_filter.rbac,
        jwt_overrides: per_filter.jwt,
        rate_limits: match &r.action {
            Some(Action::Route(ra)) => {
                rate_limits(ctx, &format!("{field}.route.rate_limits"), &ra.rate_limits)?
            }
            _ => Vec::new(),
        },
        vhost_rate_limits: Arc::default(),
        hash_policy: match &r.action {
            Some(Action::Route(ra)) => hash_policies(ctx, &format!("{field}.route"), ra)?,
            _ => Vec::new(),
        },
        decorator: trace::decorator(ctx, field, r)?,
    })
}

/// `route.hash_policy`. Filter-state policies name values Ferry has no
/// filter to produce; they never yield a hash, so they are skipped.
fn hash_policies(
    ctx: &Ctx<'_>,
    field: &str,
    ra: &route_pb::RouteAction,
) -> Result<Vec<m::cluster::HashPolicy>, ConvertError> {
    use route_pb::route_action::hash_policy::PolicySpecifier as P;
    let mut out = Vec::with_capacity(ra.hash_policy.len());
    for (i, hp) in ra.hash_policy.iter().enumerate() {
        let f = format!("{field}.hash_policy[{i}]");
        let kind = match &hp.policy_specifier {
            Some(P::Header(h)) => {
                if h.header_name.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.header.header_name"),
                        "a header name is required",
                    ));
                }
                m::cluster::HashPolicyKind::Header(h.header_name.to_ascii_lowercase())
            }
            Some(P::Cookie(c)) => {
                if c.name.is_empty() {
                    return Err(ctx.err(format!("{f}.cookie.name"), "a cookie name is required"));
                }
                m::cluster::HashPolicyKind::Cookie {
                    name: c.name.clone(),
                    ttl: duration(&c.ttl),
                    path: (!c.path.is_empty()).then(|| c.path.clone()),
                }
            }
            Some(P::ConnectionProperties(cp)) if cp.source_ip => {
                m::cluster::HashPolicyKind::SourceIp
            }
            Some(P::ConnectionProperties(_)) | Some(P::FilterState(_)) | None => continue,
            Some(P::QueryParameter(q)) => {
                if q.name.is_empty() {
                    return Err(ctx.err(
                        format!("{f}.query_parameter.name"),
                        "a parameter name is required",
                    ));
                }
                m::cluster::HashPolicyKind::QueryParameter(q.name.clone())
            }
        };
        out.push(m::cluster::HashPolicy {
            kind,
            terminal: hp.terminal,
        });
    }
    Ok(out)
}

fn route_action(
    ctx: &mut Ctx<'_>,
    field: &str,
    ra: &route_pb::RouteAction,
) -> Result<m::RouteAction, ConvertError> {
    use route_pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let cluster = match &ra.cluster_specifier {
        Some(C::Cluster(c)) => m::ClusterSpecifier::Name(c.clone()),
        Some(C::WeightedClusters(wc)) => {
            let mut out = Vec::new();
            for (i, c) in wc.clusters.iter().enumerate() {
                let weight = c.weight.as_ref().map_or(0, |v| v.value);
                if c.name.is_empty() {
                    return Err(ctx.err(
                        format!("{field}.weighted_clusters.clusters[{i}].name"),
                        "cluster name is required",
                    ));
                }
                out.push(m::WeightedCluster {
                    name: c.name.clone(),
                    weight,
                });
            }
            if out.iter().map(|w| u64::from(w.weight)).sum::<u64>() == 0 {
                return Err(ctx.err(
                    format!("{field}.weighted_clusters"),
                    "the weights sum to zero",
                ));
            }
            m::ClusterSpecifier::Weighted(out)
        }
        Some(C::ClusterHeader(h)) => {
            let name =
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    ctx.err(
                        format!("{field}.cluster_header"),
                        format!("{h:?} is not a valid header name"),
                    )
                })?;
            m::ClusterSpecifier::Header(name)
        }
        _ => {
            return Err(ctx.err(
                field,
                "only cluster, weighted_clusters and cluster_header are supported",
            ));
        }
    };
    let host_rewrite = match &ra.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => Some(m::HostRewrite::Literal(h.clone())),
        Some(H::AutoHostRewrite(v)) => v.value.then_some(m::HostRewrite::Auto),
        Some(H::HostRewriteHeader(h)) => Some(m::HostRewrite::Header(
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{field}.host_rewrite_header"),
                    format!("{h:?} is not a valid header name"),
                )
            })?,
        )),
        Some(H::HostRewritePathRegex(r)) => Some(m::HostRewrite::PathRegex(regex_rewrite(
            ctx,
            &format!("{field}.host_rewrite_path_regex"),
            r,
        )?)),
        Some(H::HostRewrite(f)) => Some(m::HostRewrite::Format(
            m::format::HeaderFormat::parse(f)
                .map_err(|e| ctx.err(format!("{field}.host_rewrite"), e))?,
        )),
        None => None,
    };
    let regex_rewrite = ra
        .regex_rewrite
        .as_ref()
        .map(|r| regex_rewrite(ctx, &format!("{field}.regex_rewrite"), r))
        .transpose()?;
    if regex_rewrite.is_some() && !ra.prefix_rewrite.is_empty() {
        return Err(ctx.err(
            format!("{field}.regex_rewrite"),
            "only one of prefix_rewrite and regex_rewrite may be set",
        ));
    }
    if ra.path_rewrite_policy.is_some() {
        return Err(ctx.err(
            format!("{field}.path_rewrite_policy"),
            "path rewrite policies are not supported yet",
        ));
    }
    Ok(m::RouteAction::Route {
        cluster,
        prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        timeout: timeout_or(&ra.timeout, Some(Duration::from_secs(15))),
        retry_policy: ra
            .retry_policy
            .as_ref()
            .map(|p| retry_policy(ctx, &format!("{field}.retry_policy"), p))
            .transpose()?
            .map(Arc::new),
        // Unset and zero differ: unset leaves the connection manager's
        // `stream_idle_timeout` in force, zero disables it for the route.
        idle_timeout: duration(&ra.idle_timeout),
        mirrors: mirror_policies(
            ctx,
            &format!("{field}.request_mirror_policies"),
            &ra.request_mirror_policies,
        )?,
        max_stream_duration: ra
            .max_stream_duration
            .as_ref()
            .and_then(|m| timeout_or(&m.max_stream_duration, None)),
        attempt_count: m::AttemptCount::default(),
        cluster_not_found: match ra.cluster_not_found_response_code {
            0 => http::StatusCode::SERVICE_UNAVAILABLE,
            1 => http::StatusCode::NOT_FOUND,
            2 => http::StatusCode::INTERNAL_SERVER_ERROR,
            c => {
                return Err(ctx.err(
                    format!("{field}.cluster_not_found_response_code"),
                    format!("unknown response code {c}"),
                ));
            }
        },
    })
}

/// What a virtual host gives the routes that do not set it themselves: its
/// retry policy and mirror policies (a route's own replaces them whole) and
/// its per-filter fault overrides (a route's entry of the same filter wins).
struct VhostDefaults {
    retry_policy: Option<Arc<m::RetryPolicy>>,
    mirrors: Vec<m::MirrorPolicy>,
    attempt_count: m::AttemptCount,
    per_filter: PerFilter,
    inline_cors: Option<Arc<m::cors::CorsPolicy>>,
    request_headers: m::HeaderMutations,
    response_headers: m::HeaderMutations,
    rate_limits: Arc<Vec<m::ratelimit::RateLimitPolicy>>,
}

fn vhost_defaults(
    ctx: &mut Ctx<'_>,
    field: &str,
    vh: &route_pb::VirtualHost,
) -> Result<VhostDefaults, ConvertError> {
    Ok(VhostDefaults {
        retry_policy: vh
            .retry_policy
            .as_ref()
            .map(|p| retry_policy(ctx, &format!("{field}.retry_policy"), p))
            .transpose()?
            .map(Arc::new),
        mirrors: mirror_policies(
            ctx,
            &format!("{field}.request_mirror_policies"),
            &vh.request_mirror_policies,
        )?,
        attempt_count: m::AttemptCount {
            request: vh.include_request_attempt_count,
            response: vh.include_attempt_count_in_response,
        },
        per_filter: per_filter_configs(
            ctx,
            &format!("{field}.typed_per_filter_config"),
            &vh.typed_per_filter_config,
        )?,
        #[allow(deprecated)]
        inline_cors: vh
            .cors
            .as_ref()
            .map(|c| inline_cors(ctx, &format!("{field}.cors"), c))
            .transpose()?
            .map(Arc::new),
        request_headers: header_mutations(
            ctx,
            &format!("{field}.request_headers_to_add"),
            &vh.request_headers_to_add,
            &format!("{field}.request_headers_to_remove"),
            &vh.request_headers_to_remove,
        )?,
        response_headers: header_mutations(
            ctx,
            &format!("{field}.response_headers_to_add"),
            &vh.response_headers_to_add,
            &format!("{field}.response_headers_to_remove"),
            &vh.response_headers_to_remove,
        )?,
        rate_limits: Arc::new(rate_limits(
            ctx,
            &format!("{field}.rate_limits"),
            &vh.rate_limits,
        )?),
    })
}

impl VhostDefaults {
    fn apply(&self, proto: &route_pb::Route, rt: &mut m::Route) {
        use route_pb::route::Action;
        let own = match &proto.action {
            Some(Action::Route(ra)) => Some(ra),
            _ => None,
        };
        if let m::RouteAction::Route {
            retry_policy,
            mirrors,
            attempt_count,
            ..
        } = &mut rt.action
        {
            *attempt_count = self.attempt_count;
            if own.is_some_and(|ra| ra.retry_policy.is_none()) {
                retry_policy.clone_from(&self.retry_policy);
            }
            if mirrors.is_empty() {
                mirrors.clone_from(&self.mirrors);
            }
        }
        for (name, f) in &self.per_filter.fault {
            if !rt.fault_overrides.iter().any(|(n, _)| n == name) {
                rt.fault_overrides.push((name.clone(), f.clone()));
            }
        }
        for (name, f) in &self.per_filter.rbac {
            if !rt.rbac_overrides.iter().any(|(n, _)| n == name) {
                rt.rbac_overrides.push((name.clone(), f.clone()));
            }
        }
        for (name, f) in &self.per_filter.jwt {
            if !rt.jwt_overrides.iter().any(|(n, _)| n == name) {
                rt.jwt_overrides.push((name.clone(), f.clone()));
            }
        }
        for (name, f) in &self.per_filter.ratelimit {
            if !rt.ratelimit_overrides.iter().any(|(n, _)| n == name) {
                rt.ratelimit_overrides.push((name.clone(), f.clone()));
            }
        }
        // CORS settings fall back field by field: the route's policy first,
        // then the virtual host's.
        rt.cors
            .per_filter
            .extend(self.per_filter.cors.iter().cloned());
        rt.cors.inline.extend(self.inline_cors.iter().cloned());
        rt.request_headers
            .ops
            .extend(self.request_headers.ops.iter().cloned());
        rt.response_headers
            .ops
            .extend(self.response_headers.ops.iter().cloned());
        rt.vhost_rate_limits = self.rate_limits.clone();
    }
}

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";

fn retry_policy(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &route_pb::RetryPolicy,
) -> Result<m::RetryPolicy, ConvertError> {
    let (retry_on, unknown) = m::RetryOn::parse(&p.retry_on);
    if !unknown.is_empty() {
        ctx.warn(
            &format!("{field}.retry_on"),
            format!("unknown retry conditions {unknown:?} are ignored"),
        );
    }
    let mut out = m::RetryPolicy {
        retry_on,
        num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
        per_try_timeout: timeout_or(&p.per_try_timeout, None),
        ..Default::default()
    };
    for (i, code) in p.retriable_status_codes.iter().enumerate() {
        let code = u16::try_from(*code)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.retriable_status_codes[{i}]"),
                    format!("{code} is not an HTTP status"),
                )
            })?;
        out.retriable_status_codes.push(code);
    }
    if let Some(b) = &p.retry_back_off {
        let base = duration(&b.base_interval).ok_or_else(|| {
            ctx.err(
                format!("{field}.retry_back_off.base_interval"),
                "base_interval is required",
            )
        })?;
        if base.is_zero() {
            return Err(ctx.err(
                format!("{field}.retry_back_off.base_interval"),
                "base_interval must be greater than zero",
            ));
        }
        let max = duration(&b.max_interval).unwrap_or(base * 10);
        if max < base {
            return Err(ctx.err(
                format!("{field}.retry_back_off.max_interval"),
                "max_interval must not be less than base_interval",
            ));
        }
        out.backoff_base = base;
        out.backoff_max = max;
    }
    for (i, pred) in p.retry_host_predicate.iter().enumerate() {
        if pred.name == PREVIOUS_HOSTS {
            out.previous_hosts = true;
        } else {
            ctx.warn(
                &format!("{field}.retry_host_predicate[{i}]"),
                format!(
                    "retry host predicate {:?} is not supported; ignored",
                    pred.name
                ),
            );
        }
    }
    if p.host_selection_retry_max_attempts > 0 {
        out.host_selection_max_attempts =
            u32::try_from(p.host_selection_retry_max_attempts).unwrap_or(u32::MAX);
    }
    Ok(out)
}

fn fraction(f: &Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent>) -> m::Fraction {
    let Some(f) = f else {
        return m::Fraction {
            numerator: 0,
            denominator: 100,
        };
    };
    let denominator = match f.denominator {
        1 => 10_000,
        2 => 1_000_000,
        _ => 100,
    };
    m::Fraction {
        // Envoy clamps a numerator above the denominator to 100 %.
        numerator: f.numerator.min(denominator),
        denominator,
    }
}

fn mirror_policies(
    ctx: &Ctx<'_>,
    field: &str,
    ps: &[route_pb::route_action::RequestMirrorPolicy],
) -> Result<Vec<m::MirrorPolicy>, ConvertError> {
    let mut out = Vec::with_capacity(ps.len());
    for (i, p) in ps.iter().enumerate() {
        if p.cluster.is_empty() {
            return Err(ctx.err(
                format!("{field}[{i}].cluster"),
                "only a fixed mirror cluster is supported (cluster_header is not)",
            ));
        }
        out.push(m::MirrorPolicy {
            cluster: p.cluster.clone(),
            fraction: match &p.runtime_fraction {
                Some(rf) => fraction(&rf.default_value),
                None => m::Fraction::ALL,
            },
        });
    }
    Ok(out)
}

const FAULT_TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";

const CORS_TYPE: &str = "envoy.extensions.filters.http.cors.v3.Cors";
const CORS_POLICY_TYPE: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";
const RATELIMIT_TYPE: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// The entries of a `typed_per_filter_config` map Ferry's filters read, by
/// filter name; entries of other filters are left alone.
#[derive(Default)]
struct PerFilter {
    fault: Vec<(String, Arc<m::fault::FaultConfig>)>,
    cors: Vec<(String, Arc<m::cors::CorsPolicy>)>,
    ratelimit: Vec<(String, Arc<m::ratelimit::LocalRateLimit>)>,
    rbac: Vec<(String, Arc<m::rbac::HttpRbac>)>,
    jwt: Vec<(String, m::jwt::JwtPerRoute)>,
}

fn per_filter_configs(
    ctx: &mut Ctx<'_>,
    field: &str,
    map: &std::collections::HashMap<String, Any>,
) -> Result<PerFilter, ConvertError> {
    let mut out = PerFilter::default();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        let Some(any) = map.get(name) else { continue };
        let ef = format!("{field}[{name:?}]");
        let mut typed = Typed::from_any(any).map_err(|e| ctx.err(&ef, e))?;
        let mut disabled = false;
        if typed.type_name() == FILTER_CONFIG_TYPE {
            // The route-level wrapper: `disabled` turns the filter off for
            // the route.
            let fc: route_pb::FilterConfig = typed.decode().map_err(|e| ctx.err(&ef, e))?;
            disabled = fc.disabled;
            match fc.config.as_ref() {
                Some(inner) => typed = Typed::from_any(inner).map_err(|e| ctx.err(&ef, e))?,
                None if disabled => {
                    // Without a config the filter kind is unknown: a
                    // disabled entry of each kind, each filter reading its own.
                    out.fault
                        .push((name.clone(), Arc::new(m::fault::FaultConfig::default())));
                    out.cors.push((name.clone(), Arc::new(disabled_cors())));
                    out.ratelimit
                        .push((name.clone(), Arc::new(disabled_ratelimit())));
                    out.rbac
                        .push((name.clone(), Arc::new(m::rbac::HttpRbac::default())));
                    out.jwt.push((name.clone(), m::jwt::JwtPerRoute::Disabled));
                    continue;
                }
                None => continue,
            }
        }
        match typed.type_name() {
            FAULT_TYPE => {
                let cfg = if disabled {
                    m::fault::FaultConfig::default()
                } else {
                    let hf: fault_pb::HttpFault = typed.decode().map_err(|e| ctx.err(&ef, e))?;
                    fault_config(ctx, &ef, &hf)?
                };
                out.fault.push((name.clone(), Arc::new(cfg)));
            }
            CORS_POLICY_TYPE => {
                let cfg = if disabled {
                    disabled_cors()
                } else {
                    let p: cors_pb::CorsPolicy = typed.decode().map_err(|e| ctx.err(&ef, e))?;
                    cors_policy(ctx, &ef, &p)?
                };
                out.cors.push((name.clone(), Arc::new(cfg)));
            }
            RATELIMIT_TYPE => {
                let cfg = if disabled {
                    disabled_ratelimit()
                } else {
                    let p: ratelimit_pb::LocalRateLimit =
                        typed.decode().map_err(|e| ctx.err(&ef, e))?;
                    local_ratelimit(ctx, &ef, &p)?
                };
                out.ratelimit.push((name.clone(), Arc::new(cfg)));
            }
            rbac::HTTP_RBAC_PER_ROUTE_TYPE => {
                // A disabled entry has no rules: the filter lets everything through.
                let cfg = if disabled {
                    m::rbac::HttpRbac::default()
                } else {
                    rbac::http_rbac_per_route(ctx, &ef, typed)?
                };
                out.rbac.push((name.clone(), Arc::new(cfg)));
            }
            jwt_authn::JWT_PER_ROUTE_TYPE => {
                let cfg = if disabled {
                    m::jwt::JwtPerRoute::Disabled
                } else {
                    jwt_authn::per_route(ctx, &ef, typed)?
                };
                out.jwt.push((name.clone(), cfg));
            }
            _ => {}
        }
    }
    Ok(out)
}

const NEVER: m::Fraction = m::Fraction {
    numerator: 0,
    denominator: 100,
};

fn disabled_cors() -> m::cors::CorsPolicy {
    m::cors::CorsPolicy {
        filter_enabled: Some(NEVER),
        ..Default::default()
    }
}

fn disabled_ratelimit() -> m::ratelimit::LocalRateLimit {
    m::ratelimit::LocalRateLimit {
        stat_prefix: String::new(),
        status: http::StatusCode::TOO_MANY_REQUESTS,
        bucket: None,
        filter_enabled: NEVER,
        filter_enforced: NEVER,
        response_headers: m::HeaderMutations::default(),
        request_headers_when_not_enforced: m::HeaderMutations::default(),
        grpc_resource_exhausted: false,
        descriptors: Vec::new(),
        stage: 0,
        always_consume_default: true,
        vh_rate_limits: m::ratelimit::VhRateLimits::Override,
        x_ratelimit_headers: false,
        per_connection: false,
    }
}

fn origin_matchers(
    ctx: &Ctx<'_>,
    field: &str,
    ms: &[matcher_pb::StringMatcher],
) -> Result<Vec<(m::StringMatcher, bool)>, ConvertError> {
    ms.iter()
        .enumerate()
        .map(|(i, s)| {
            Ok((
                string_matcher(ctx, &format!("{field}.allow_origin_string_match[{i}]"), s)?,
                s.ignore_case,
            ))
        })
        .collect()
}

fn runtime_fraction(f: &Option<core_pb::RuntimeFractionalPercent>) -> Option<m::Fraction> {
    f.as_ref().map(|f| fraction(&f.default_value))
}

fn cors_policy(
    ctx: &Ctx<'_>,
    field: &str,
    p: &cors_pb::CorsPolicy,
) -> Result<m::cors::CorsPolicy, ConvertError> {
    Ok(m::cors::CorsPolicy {
        allow_origins: origin_matchers(ctx, field, &p.allow_origin_string_match)?,
        allow_methods: p.allow_methods.clone(),
        allow_headers: p.allow_headers.clone(),
        expose_headers: p.expose_headers.clone(),
        max_age: p.max_age.clone(),
        allow_credentials: p.allow_credentials.as_ref().map(|v| v.value),
        allow_private_network_access: p.allow_private_network_access.as_ref().map(|v| v.value),
        filter_enabled: runtime_fraction(&p.filter_enabled),
        shadow_enabled: runtime_fraction(&p.shadow_enabled),
        forward_not_matching_preflights: p
            .forward_not_matching_preflights
            .as_ref()
            .map(|v| v.value),
    })
}

/// The deprecated `cors` of a route action or virtual host.
fn inline_cors(
    ctx: &Ctx<'_>,
    field: &str,
    p: &route_pb::CorsPolicy,
) -> Result<m::cors::CorsPolicy, ConvertError> {
    use route_pb::cors_policy::EnabledSpecifier;
    Ok(m::cors::CorsPolicy {
        allow_origins: origin_matchers(ctx, field, &p.allow_origin_string_match)?,
        allow_methods: p.allow_methods.clone(),
        allow_headers: p.allow_headers.clone(),
        expose_headers: p.expose_headers.clone(),
        max_age: p.max_age.clone(),
        allow_credentials: p.allow_credentials.as_ref().map(|v| v.value),
        allow_private_network_access: p.allow_private_network_access.as_ref().map(|v| v.value),
        filter_enabled: p
            .enabled_specifier
            .as_ref()
            .map(|EnabledSpecifier::FilterEnabled(f)| fraction(&f.default_value)),
        shadow_enabled: runtime_fraction(&p.shadow_enabled),
        forward_not_matching_preflights: p
            .forward_not_matching_preflights
            .as_ref()
            .map(|v| v.value),
    })
}

fn local_ratelimit(
    ctx: &Ctx<'_>,
    field: &str,
    p: &ratelimit_pb::LocalRateLimit,
) -> Result<m::ratelimit::LocalRateLimit, ConvertError> {
    if p.stat_prefix.is_empty() {
        return Err(ctx.err(format!("{field}.stat_prefix"), "a stat_prefix is required"));
    }
    if p.local_cluster_rate_limit.is_some() {
        return Err(ctx.err(
            format!("{field}.local_cluster_rate_limit"),
            "cluster-wide local rate limits are not supported",
        ));
    }
    if p.enable_x_ratelimit_headers > 1 {
        return Err(ctx.err(
            format!("{field}.enable_x_ratelimit_headers"),
            format!(
                "unknown X-RateLimit header version {}",
                p.enable_x_ratelimit_headers
            ),
        ));
    }
    let status = match p.status.as_ref() {
        None => http::StatusCode::TOO_MANY_REQUESTS,
        Some(s) => u16::try_from(s.code)
            .ok()
            .filter(|c| (200..600).contains(c))
            .and_then(|c| http::StatusCode::from_u16(c).ok())
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.status.code"),
                    format!("{} is not an HTTP status in [200, 600)", s.code),
                )
            })?,
    };
    let bucket = p
        .token_bucket
        .as_ref()
        .map(|tb| token_bucket(ctx, &format!("{field}.token_bucket"), tb))
        .transpose()?;
    let mut descriptors = Vec::with_capacity(p.descriptors.len());
    for (i, d) in p.descriptors.iter().enumerate() {
        let df = format!("{field}.descriptors[{i}]");
        if d.entries.is_empty() {
            return Err(ctx.err(format!("{df}.entries"), "a descriptor needs entries"));
        }
        let mut entries = Vec::with_capacity(d.entries.len());
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.is_empty() || e.value.is_empty() {
                return Err(ctx.err(
                    format!("{df}.entries[{j}]"),
                    "entries need a key and a value (wildcard values are not supported yet)",
                ));
            }
            entries.push((e.key.clone(), e.value.clone()));
        }
        let tb = d.token_bucket.as_ref().ok_or_else(|| {
            ctx.err(
                format!("{df}.token_bucket"),
                "a descriptor needs a token_bucket",
            )
        })?;
        descriptors.push(m::ratelimit::Descriptor {
            entries,
            bucket: token_bucket(ctx, &format!("{df}.token_bucket"), tb)?,
        });
    }
    if p.stage > 10 {
        return Err(ctx.err(format!("{field}.stage"), "stage must be 0 to 10"));
    }
    Ok(m::ratelimit::LocalRateLimit {
        stat_prefix: p.stat_prefix.clone(),
        status,
        bucket,
        filter_enabled: runtime_fraction(&p.filter_enabled).unwrap_or(NEVER),
        filter_enforced: runtime_fraction(&p.filter_enforced).unwrap_or(NEVER),
        response_headers: header_mutations(
            ctx,
            &format!("{field}.response_headers_to_add"),
            &p.response_headers_to_add,
            "",
            &[],
        )?,
        request_headers_when_not_enforced: header_mutations(
            ctx,
            &format!("{field}.request_headers_to_add_when_not_enforced"),
            &p.request_headers_to_add_when_not_enforced,
            "",
            &[],
        )?,
        grpc_resource_exhausted: p.rate_limited_as_resource_exhausted,
        descriptors,
        stage: p.stage,
        always_consume_default: p
            .always_consume_default_token_bucket
            .as_ref()
            .is_none_or(|v| v.value),
        vh_rate_limits: match p.vh_rate_limits {
            1 => m::ratelimit::VhRateLimits::Include,
            2 => m::ratelimit::VhRateLimits::Ignore,
            _ => m::ratelimit::VhRateLimits::Override,
        },
        x_ratelimit_headers: p.enable_x_ratelimit_headers == 1,
        per_connection: p.local_rate_limit_per_downstream_connection,
    })
}

fn token_bucket(
    ctx: &Ctx<'_>,
    tf: &str,
    tb: &envoy_types::pb::envoy::r#type::v3::TokenBucket,
) -> Result<m::ratelimit::TokenBucket, ConvertError> {
    let interval = duration(&tb.fill_interval)
        .ok_or_else(|| ctx.err(format!("{tf}.fill_interval"), "fill_interval is required"))?;
    if interval < Duration::from_millis(50) {
        return Err(ctx.err(
            format!("{tf}.fill_interval"),
            "fill_interval must be at least 50ms",
        ));
    }
    if tb.max_tokens == 0 {
        return Err(ctx.err(
            format!("{tf}.max_tokens"),
            "max_tokens must be greater than zero",
        ));
    }
    let per_fill = tb.tokens_per_fill.as_ref().map_or(1, |v| v.value);
    if per_fill == 0 {
        return Err(ctx.err(
            format!("{tf}.tokens_per_fill"),
            "tokens_per_fill must be greater than zero",
        ));
    }
    Ok(m::ratelimit::TokenBucket::new(
        tb.max_tokens,
        per_fill,
        interval,
    ))
}

/// A route's or virtual host's `rate_limits`.
fn rate_limits(
    ctx: &Ctx<'_>,
    field: &str,
    rls: &[route_pb::RateLimit],
) -> Result<Vec<m::ratelimit::RateLimitPolicy>, ConvertError> {
    use m::ratelimit::RateLimitAction as R;
    use route_pb::rate_limit::action::ActionSpecifier as A;
    let mut out = Vec::with_capacity(rls.len());
    for (i, rl) in rls.iter().enumerate() {
        let rf = format!("{field}[{i}]");
        if rl.limit.is_some() {
            return Err(ctx.err(
                format!("{rf}.limit"),
                "dynamic limit overrides are not supported",
            ));
        }
        let mut actions = Vec::with_capacity(rl.actions.len());
        for (j, a) in rl.actions.iter().enumerate() {
            let af = format!("{rf}.actions[{j}]");
            let no_default = |name: &str, d: &str| {
                if d.is_empty() {
                    Ok(())
                } else {
                    Err(ctx.err(
                        format!("{af}.{name}.default_value"),
                        "default values are not supported yet",
                    ))
                }
            };
            let key_or = |k: &str, d: &str| {
                if k.is_empty() {
                    d.to_string()
                } else {
                    k.to_string()
                }
            };
            actions.push(match &a.action_specifier {
                Some(A::RemoteAddress(_)) => R::RemoteAddress,
                Some(A::DestinationCluster(_)) => R::DestinationCluster,
                Some(A::GenericKey(g)) => {
                    no_default("generic_key", &g.default_value)?;
                    R::GenericKey {
                        key: key_or(&g.descriptor_key, "generic_key"),
                        value: g.descriptor_value.clone(),
                    }
                }
                Some(A::RequestHeaders(h)) => R::RequestHeaders {
                    header: m::HeaderKey::parse(&h.header_name).ok_or_else(|| {
                        ctx.err(
                            format!("{af}.request_headers.header_name"),
                            format!("{:?} is not a valid header name", h.header_name),
                        )
                    })?,
                    key: h.descriptor_key.clone(),
                    skip_if_absent: h.skip_if_absent,
                },
                Some(A::HeaderValueMatch(h)) => {
                    no_default("header_value_match", &h.default_value)?;
                    let mut headers = Vec::with_capacity(h.headers.len());
                    for (k, hm) in h.headers.iter().enumerate() {
                        headers.push(header_matcher(
                            ctx,
                            &format!("{af}.header_value_match.headers[{k}]"),
                            hm,
                        )?);
                    }
                    R::HeaderValueMatch {
                        key: key_or(&h.descriptor_key, "header_match"),
                        value: h.descriptor_value.clone(),
                        expect_match: h.expect_match.as_ref().is_none_or(|v| v.value),
                        headers,
                    }
                }
                Some(A::MaskedRemoteAddress(mr)) => {
                    let len = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>,
                               max: u32,
                               name: &str| {
                        let n = v.as_ref().map_or(max, |v| v.value);
                        if n > max {
                            return Err(ctx.err(
                                format!("{af}.masked_remote_address.{name}"),
                                format!("{n} is more than {max}"),
                            ));
                        }
                        Ok(n as u8)
                    };
                    R::MaskedRemoteAddress {
                        v4_len: len(&mr.v4_prefix_mask_len, 32, "v4_prefix_mask_len")?,
                        v6_len: len(&mr.v6_prefix_mask_len, 128, "v6_prefix_mask_len")?,
                    }
                }
                Some(A::QueryParameters(q)) => {
                    if q.query_parameter_name.is_empty() || q.descriptor_key.is_empty() {
                        return Err(ctx.err(
                            format!("{af}.query_parameters"),
                            "query_parameter_name and descriptor_key are required",
                        ));
                    }
                    R::QueryParameter {
                        name: q.query_parameter_name.clone(),
                        key: q.descriptor_key.clone(),
                        skip_if_absent: q.skip_if_absent,
                    }
                }
                Some(A::QueryParameterValueMatch(q)) => {
                    no_default("query_parameter_value_match", &q.default_value)?;
                    let mut matchers = Vec::with_capacity(q.query_parameters.len());
                    for (k, qm) in q.query_parameters.iter().enumerate() {
                        matchers.push(query_parameter_matcher(
                            ctx,
                            &format!("{af}.query_parameter_value_match.query_parameters[{k}]"),
                            qm,
                        )?);
                    }
                    R::QueryParameterValueMatch {
                        key: key_or(&q.descriptor_key, "query_match"),
                        value: q.descriptor_value.clone(),
                        expect_match: q.expect_match.as_ref().is_none_or(|v| v.value),
                        matchers,
                    }
                }
                _ => {
                    return Err(ctx.err(
                        &af,
                        "only remote_address, masked_remote_address, destination_cluster, generic_key, request_headers, query_parameters, header_value_match and query_parameter_value_match actions are supported",
                    ));
                }
            });
        }
        out.push(m::ratelimit::RateLimitPolicy {
            stage: rl.stage.as_ref().map_or(0, |v| v.value),
            actions,
        });
    }
    Ok(out)
}

/// A level's `*_headers_to_remove` then `*_headers_to_add`, values compiled
/// as format strings.
#[allow(deprecated)] // `append` is deprecated but still sent; Envoy honours it.
fn header_mutations(
    ctx: &Ctx<'_>,
    add_field: &str,
    add: &[core_pb::HeaderValueOption],
    remove_field: &str,
    remove: &[String],
) -> Result<m::HeaderMutations, ConvertError> {
    use core_pb::header_value_option::HeaderAppendAction as A;
    let mut ops = Vec::with_capacity(add.len() + remove.len());
    for (i, h) in remove.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{remove_field}[{i}]"),
                    format!("{h:?} is not a valid header name"),
                )
            })?;
        if name == http::header::HOST {
            return Err(ctx.err(
                format!("{remove_field}[{i}]"),
                ":-prefixed or host headers may not be removed",
            ));
        }
        ops.push(m::HeaderOp::Remove(name));
    }
    for (i, hv) in add.iter().enumerate() {
        let hf = format!("{add_field}[{i}]");
        let h = hv
            .header
            .as_ref()
            .ok_or_else(|| ctx.err(&hf, "header is required"))?;
        let name =
            http::HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{hf}.header.key"),
                    format!("{:?} is not a valid header name", h.key),
                )
            })?;
        if name == http::header::HOST {
            return Err(ctx.err(
                format!("{hf}.header.key"),
                ":-prefixed or host headers may not be modified",
            ));
        }
        let raw = if h.value.is_empty() && !h.raw_value.is_empty() {
            String::from_utf8(h.raw_value.clone()).map_err(|_| {
                ctx.err(format!("{hf}.header.raw_value"), "not a valid header value")
            })?
        } else {
            h.value.clone()
        };
        let value = m::format::HeaderFormat::parse(&raw)
            .map_err(|e| ctx.err(format!("{hf}.header.value"), e))?;
        if let Some(lit) = value.as_literal()
            && http::HeaderValue::from_str(&lit).is_err()
        {
            return Err(ctx.err(format!("{hf}.header.value"), "not a valid header value"));
        }
        let action = match hv.append.as_ref() {
            // The deprecated `append` wins when it is set.
            Some(v) if v.value => m::AppendAction::AppendIfExistsOrAdd,
            Some(_) => m::AppendAction::OverwriteIfExistsOrAdd,
            None => match A::try_from(hv.append_action) {
                Ok(A::AppendIfExistsOrAdd) => m::AppendAction::AppendIfExistsOrAdd,
                Ok(A::AddIfAbsent) => m::AppendAction::AddIfAbsent,
                Ok(A::OverwriteIfExistsOrAdd) => m::AppendAction::OverwriteIfExistsOrAdd,
                Ok(A::OverwriteIfExists) => m::AppendAction::OverwriteIfExists,
                Err(_) => {
                    return Err(ctx.err(
                        format!("{hf}.append_action"),
                        format!("unknown append action {}", hv.append_action),
                    ));
                }
            },
        };
        ops.push(m::HeaderOp::Add(m::HeaderToAdd {
            name,
            value,
            action,
            keep_empty: hv.keep_empty_value,
        }));
    }
    Ok(m::HeaderMutations { ops })
}

fn query_parameter_matcher(
    ctx: &Ctx<'_>,
    field: &str,
    q: &route_pb::QueryParameterMatcher,
) -> Result<m::QueryParameterMatcher, ConvertError> {
    use route_pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
    if q.name.is_empty() {
        return Err(ctx.err(format!("{field}.name"), "a parameter name is required"));
    }
    let kind = match &q.query_parameter_match_specifier {
        None => m::QueryMatch::Present,
        Some(Q::PresentMatch(p)) => m::QueryMatch::PresentMatch(*p),
        Some(Q::StringMatch(sm)) => m::QueryMatch::String {
            matcher: string_matcher(ctx, &format!("{field}.string_match"), sm)?,
            ignore_case: sm.ignore_case,
        },
    };
    Ok(m::QueryParameterMatcher {
        name: q.name.clone(),
        kind,
    })
}

/// `RegexMatchAndSubstitute`: the pattern is searched (not anchored) and
/// every match replaced; RE2's `\N` group references become `${N}`.
fn regex_rewrite(
    ctx: &Ctx<'_>,
    field: &str,
    r: &matcher_pb::RegexMatchAndSubstitute,
) -> Result<m::RegexRewrite, ConvertError> {
    let pattern = r
        .pattern
        .as_ref()
        .ok_or_else(|| ctx.err(format!("{field}.pattern"), "a pattern is required"))?;
    let re = regex::Regex::new(&pattern.regex).map_err(|e| {
        ctx.err(
            format!("{field}.pattern.regex"),
            format!("invalid regex {:?}: {e}", pattern.regex),
        )
    })?;
    let substitution = re2_substitution(&r.substitution, re.captures_len())
        .map_err(|e| ctx.err(format!("{field}.substitution"), e))?;
    Ok(m::RegexRewrite {
        pattern: re,
        substitution,
    })
}

/// RE2's rewrite string (`\0`..`\9`, `\\`) in the `regex` crate's
/// syntax (`${N}`, `$$` for a literal `$`).
fn re2_substitution(s: &str, groups: usize) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some(d) if d.is_ascii_digit() => {
                    let n = d as usize - '0' as usize;
                    if n >= groups {
                        return Err(format!(
                            "{s:?} refers to group {n}, the pattern has {} groups",
                            groups - 1
                        ));
                    }
                    out.push_str(&format!("${{{n}}}"));
                }
                _ => return Err(format!("{s:?}: a '\\' must be followed by a digit or '\\'")),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

fn fault_config(
    ctx: &mut Ctx<'_>,
    field: &str,
    hf: &fault_pb::HttpFault,
) -> Result<m::fault::FaultConfig, ConvertError> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier as D;
    use fault_pb::fault_abort::ErrorType as E;
    let delay = match &hf.delay {
        None => None,
        Some(d) => Some(m::fault::FaultDelay {
            source: match &d.fault_delay_secifier {
                Some(D::FixedDelay(fd)) => {
                    m::fault::DelaySource::Fixed(duration(&Some(*fd)).unwrap_or_default())
                }
                Some(D::HeaderDelay(_)) => m::fault::DelaySource::Header,
                None => {
                    return Err(ctx.err(
                        format!("{field}.delay"),
                        "fixed_delay or header_delay is required",
                    ));
                }
            },
            percentage: fraction(&d.percentage),
        }),
    };
    let abort = match &hf.abort {
        None => None,
        Some(a) => Some(m::fault::FaultAbort {
            source: match &a.error_type {
                Some(E::HttpStatus(s)) => {
                    let s = u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| {
                            ctx.err(
                                format!("{field}.abort.http_status"),
                                format!("{s} is not in [200, 600)"),
                            )
                        })?;
                    m::fault::AbortSource::Http(s)
                }
                Some(E::GrpcStatus(s)) => m::fault::AbortSource::Grpc(*s),
                Some(E::HeaderAbort(_)) => m::fault::AbortSource::Header,
                None => {
                    return Err(ctx.err(
                        format!("{field}.abort"),
                        "http_status, grpc_status or header_abort is required",
                    ));
                }
            },
            percentage: fraction(&a.percentage),
        }),
    };
    let mut headers = Vec::with_capacity(hf.headers.len());
    for (i, h) in hf.headers.iter().enumerate() {
        headers.push(header_matcher(ctx, &format!("{field}.headers[{i}]"), h)?);
    }
    if hf.response_rate_limit.is_some() {
        ctx.warn(
            &format!("{field}.response_rate_limit"),
            "response rate limiting is not supported; ignored".into(),
        );
    }
    Ok(m::fault::FaultConfig {
        delay,
        abort,
        headers,
        upstream_cluster: (!hf.upstream_cluster.is_empty()).then(|| hf.upstream_cluster.clone()),
        downstream_nodes: hf.downstream_nodes.clone(),
        max_active_faults: hf.max_active_faults.as_ref().map(|v| v.value),
    })
}

fn redirect(
    ctx: &Ctx<'_>,
    field: &str,
    rd: &route_pb::RedirectAction,
) -> Result<m::RouteAction, ConvertError> {
    use route_pb::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let status = match rd.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        c => {
            return Err(ctx.err(
                format!("{field}.response_code"),
                format!("unknown response code {c}"),
            ));
        }
    };
    let (path, prefix_rewrite) = match &rd.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => (Some(p.clone()), None),
        Some(P::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(_) => return Err(ctx.err(field, "regex redirects are not supported yet")),
        None => (None, None),
    };
    Ok(m::RouteAction::Redirect {
        status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::MOVED_PERMANENTLY),
        scheme: match &rd.scheme_rewrite_specifier {
            Some(S::SchemeRedirect(s)) => Some(s.clone()),
            Some(S::HttpsRedirect(true)) => Some("https".into()),
            _ => None,
        },
        host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
        port: (rd.port_redirect != 0).then(|| u16::try_from(rd.port_redirect).unwrap_or(0)),
        path,
        prefix_rewrite,
        strip_query: rd.strip_query,
    })
}

// ---------------------------------------------------------------- clusters

#[allow(deprecated)] // Cluster-level protocol options are deprecated but still sent.
pub fn cluster(
    c: &cluster_pb::Cluster,
    warnings: &mut Warnings,
) -> Result<m::Cluster, ConvertError> {
    use cluster_pb::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let mut ctx = Ctx {
        resource: format!("cluster {:?}", c.name),
        warnings,
        inbound: false,
        outbound: false,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "a cluster needs a name"));
    }
    let discovery = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
            .map_err(|_| ctx.err("type", format!("unknown discovery type {t}")))?,
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(ctx.err(
                "cluster_type",
                format!("custom cluster type {:?} is not supported", ct.name),
            ));
        }
    };
    let kind = match discovery {
        DiscoveryType::Static => {
            let eps = endpoints(&ctx, c.load_assignment.as_ref())?;
            if eps.is_empty() {
                m::ClusterKind::BlackHole
            } else {
                m::ClusterKind::Static(eps)
            }
        }
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
            m::ClusterKind::StrictDns(dns_endpoints(&ctx, c.load_assignment.as_ref())?)
        }
        DiscoveryType::OriginalDst => m::ClusterKind::OriginalDst,
        DiscoveryType::Eds => {
            let service_name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone());
            m::ClusterKind::Eds { service_name }
        }
    };
    let tls = match &c.transport_socket {
        Some(ts) => upstream_tls(&mut ctx, "transport_socket", ts)?,
        None => None,
    };
    let mut transport_socket_matches = Vec::with_capacity(c.transport_socket_matches.len());
    for (i, tsm) in c.transport_socket_matches.iter().enumerate() {
        let field = format!("transport_socket_matches[{i}]");
        let criteria = tsm
            .r#match
            .as_ref()
            .map(|st| {
                st.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_string(v)))
                    .collect()
            })
            .unwrap_or_default();
        let tls = match &tsm.transport_socket {
            Some(ts) => upstream_tls(&mut ctx, &format!("{field}.transport_socket"), ts)?,
            None => None,
        };
        transport_socket_matches.push(m::cluster::TransportSocketMatch {
            name: tsm.name.clone(),
            criteria,
            tls,
        });
    }
    for (i, f) in c.filters.iter().enumerate() {
        let type_name = match &f.typed_config {
            Some(any) => Typed::from_any(any)
                .map_err(|e| ctx.err(format!("filters[{i}].typed_config"), e))?
                .type_name()
                .to_string(),
            None => String::new(),
        };
        if !ISTIO_TOLERATED.contains(&type_name.as_str()) {
            return Err(ctx.err(
                format!("filters[{i}]"),
                format!(
                    "unsupported upstream network filter {:?} ({type_name})",
                    f.name
                ),
            ));
        }
    }
    let lb_policy = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => m::LbPolicy::RoundRobin,
        Ok(LbPolicy::LeastRequest) => m::LbPolicy::LeastRequest,
        Ok(LbPolicy::Random) => m::LbPolicy::Random,
        Ok(LbPolicy::RingHash) => m::LbPolicy::RingHash,
        Ok(LbPolicy::Maglev) => m::LbPolicy::Maglev,
        Ok(LbPolicy::ClusterProvided) => m::LbPolicy::ClusterProvided,
        _ => {
            return Err(ctx.err(
                "lb_policy",
                format!("unsupported lb_policy {}", c.lb_policy),
            ));
        }
    };
    let mut protocol = if c.http2_protocol_options.is_some() {
        m::UpstreamProtocol::Http2
    } else {
        m::UpstreamProtocol::Http1
    };
    let mut idle_timeout = c
        .common_http_protocol_options
        .as_ref()
        .map(|o| timeout_or(&o.idle_timeout, Some(Duration::from_secs(3600))))
        .unwrap_or(Some(Duration::from_secs(3600)));
    let mut max_requests = c.max_requests_per_connection.as_ref().map(|v| v.value);
    let mut max_concurrent_streams = c
        .http2_protocol_options
        .as_ref()
        .and_then(|o| o.max_concurrent_streams.as_ref())
        .map(|v| v.value);
    #[allow(deprecated)]
    let mut auto_sni = match &c.upstream_http_protocol_options {
        Some(u) => upstream_http_protocol_options(&ctx, "upstream_http_protocol_options", u)?,
        None => m::cluster::AutoSni::default(),
    };
    for (key, any) in &c.typed_extension_protocol_options {
        let field = format!("typed_extension_protocol_options[{key:?}]");
        let typed = Typed::from_any(any).map_err(|e| ctx.err(&field, e))?;
        if typed.type_name() != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
            return Err(ctx.err(
                &field,
                format!("unsupported protocol options {}", typed.type_name()),
            ));
        }
        let o: upstream_http_pb::HttpProtocolOptions =
            typed.decode().map_err(|e| ctx.err(&field, e))?;
        use upstream_http_pb::http_protocol_options::UpstreamProtocolOptions as U;
        use upstream_http_pb::http_protocol_options::explicit_http_config::ProtocolConfig as P;
        protocol = match &o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(P::Http2ProtocolOptions(h2)) => {
                    if let Some(v) = &h2.max_concurrent_streams {
                        max_concurrent_streams = Some(v.value);
                    }
                    m::UpstreamProtocol::Http2
                }
                Some(P::HttpProtocolOptions(_)) | None => m::UpstreamProtocol::Http1,
                Some(P::Http3ProtocolOptions(_)) => {
                    return Err(ctx.err(&field, "HTTP/3 upstreams are not supported"));
                }
            },
            Some(U::UseDownstreamProtocolConfig(_)) => m::UpstreamProtocol::UseDownstream,
            Some(U::AutoConfig(_)) => m::UpstreamProtocol::Http1,
            None => protocol,
        };
        if let Some(u) = &o.upstream_http_protocol_options {
            auto_sni = upstream_http_protocol_options(
                &ctx,
                &format!("{field}.upstream_http_protocol_options"),
                u,
            )?;
        }
        if let Some(common) = &o.common_http_protocol_options {
            idle_timeout = timeout_or(&common.idle_timeout, Some(Duration::from_secs(3600)));
            if let Some(mr) = common.max_requests_per_connection.as_ref().map(|v| v.value) {
                max_requests = Some(mr);
            }
        }
    }
    let bind_source = match &c.upstream_bind_config {
        Some(b) => {
            let addr = b.source_address.as_ref().ok_or_else(|| {
                ctx.err(
                    "upstream_bind_config.source_address",
                    "source_address is required",
                )
            })?;
            let ip = addr.address.parse().map_err(|_| {
                ctx.err(
                    "upstream_bind_config.source_address.address",
                    format!("{:?} is not an IP address", addr.address),
                )
            })?;
            Some(ip)
        }
        None => None,
    };
    Ok(m::Cluster {
        name: c.name.clone(),
        kind,
        bind_source,
        tls,
        transport_socket_matches,
        connect_timeout: duration(&c.connect_timeout).unwrap_or(Duration::from_secs(5)),
        lb_policy,
        protocol,
        idle_timeout,
        max_requests_per_connection: max_requests.filter(|v| *v > 0),
        lb: lb_config(&ctx, c)?,
        outlier_detection: c.outlier_detection.as_ref().map(outlier_detection),
        circuit_breakers: circuit_breakers(&ctx, "circuit_breakers", c.circuit_breakers.as_ref())?,
        max_concurrent_streams,
        istio_service: istio_service(c),
        auto_sni,
    })
}

/// `UpstreamHttpProtocolOptions`: SNI and server-name validation from each
/// request's host.
fn upstream_http_protocol_options(
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

/// `metadata.filter_metadata.istio.services[0].host`, as istiod sets it.
fn istio_service(c: &cluster_pb::Cluster) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let istio = c.metadata.as_ref()?.filter_metadata.get("istio")?;
    let Some(Kind::ListValue(list)) = istio.fields.get("services")?.kind.as_ref() else {
        return None;
    };
    let Some(Kind::StructValue(svc)) = list.values.first()?.kind.as_ref() else {
        return None;
    };
    match svc.fields.get("host")?.kind.as_ref() {
        Some(Kind::StringValue(h)) if !h.is_empty() => Some(h.clone()),
        _ => None,
    }
}

fn lb_config(ctx: &Ctx<'_>, c: &cluster_pb::Cluster) -> Result<m::cluster::LbConfig, ConvertError> {
    use cluster_pb::cluster::LbConfig as L;
    use cluster_pb::cluster::common_lb_config::LocalityConfigSpecifier;
    let mut lb = m::cluster::LbConfig::default();
    match &c.lb_config {
        Some(L::LeastRequestLbConfig(lr)) => {
            if let Some(n) = &lr.choice_count {
                if n.value < 2 {
                    return Err(
                        ctx.err("least_request_lb_config.choice_count", "must be at least 2")
                    );
                }
                lb.choice_count = n.value;
            }
        }
        Some(L::RingHashLbConfig(rh)) => {
            if let Some(v) = &rh.minimum_ring_size {
                lb.min_ring_size = v.value;
            }
            if let Some(v) = &rh.maximum_ring_size {
                lb.max_ring_size = v.value;
            }
            if lb.min_ring_size > lb.max_ring_size {
                return Err(ctx.err(
                    "ring_hash_lb_config",
                    "minimum_ring_size exceeds maximum_ring_size",
                ));
            }
            if lb.max_ring_size > 8 * 1024 * 1024 {
                return Err(ctx.err("ring_hash_lb_config.maximum_ring_size", "at most 8M"));
            }
        }
        Some(L::MaglevLbConfig(mg)) => {
            if let Some(v) = &mg.table_size {
                if !is_prime(v.value) || v.value > 5_000_011 {
                    return Err(ctx.err(
                        "maglev_lb_config.table_size",
                        format!("{} is not a prime up to 5000011", v.value),
                    ));
                }
                lb.maglev_table_size = v.value;
            }
        }
        _ => {}
    }
    if let Some(common) = &c.common_lb_config {
        lb.locality_weighted = matches!(
            common.locality_config_specifier,
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        );
    }
    if let Some(p) = c.load_assignment.as_ref().and_then(|a| a.policy.as_ref())
        && let Some(f) = &p.overprovisioning_factor
    {
        lb.overprovisioning_factor = f.value;
    }
    lb.peak_ewma = c
        .metadata
        .as_ref()
        .and_then(|md| md.filter_metadata.get("ferry"))
        .and_then(|st| st.fields.get("lb"))
        .is_some_and(|v| value_string(v) == "peak_ewma");
    Ok(lb)
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn outlier_detection(o: &cluster_pb::OutlierDetection) -> m::cluster::OutlierDetection {
    let d = m::cluster::OutlierDetection::default();
    let u = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, dflt: u32| {
        v.as_ref().map_or(dflt, |v| v.value)
    };
    let base_ejection_time = duration(&o.base_ejection_time).unwrap_or(d.base_ejection_time);
    m::cluster::OutlierDetection {
        consecutive_5xx: u(&o.consecutive_5xx, d.consecutive_5xx),
        consecutive_gateway_failure: u(
            &o.consecutive_gateway_failure,
            d.consecutive_gateway_failure,
        ),
        consecutive_local_origin_failure: u(
            &o.consecutive_local_origin_failure,
            d.consecutive_local_origin_failure,
        ),
        enforcing_consecutive_5xx: u(&o.enforcing_consecutive_5xx, d.enforcing_consecutive_5xx),
        enforcing_consecutive_gateway_failure: u(
            &o.enforcing_consecutive_gateway_failure,
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: u(
            &o.enforcing_consecutive_local_origin_failure,
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_success_rate: u(&o.enforcing_success_rate, d.enforcing_success_rate),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        interval: duration(&o.interval).unwrap_or(d.interval),
        // Envoy: the cap is never below the base time.
        max_ejection_time: duration(&o.max_ejection_time)
            .unwrap_or(d.max_ejection_time)
            .max(base_ejection_time),
        base_ejection_time,
        max_ejection_percent: u(&o.max_ejection_percent, d.max_ejection_percent).min(100),
        success_rate_minimum_hosts: u(&o.success_rate_minimum_hosts, d.success_rate_minimum_hosts),
        success_rate_request_volume: u(
            &o.success_rate_request_volume,
            d.success_rate_request_volume,
        ),
        success_rate_stdev_factor: u(&o.success_rate_stdev_factor, d.success_rate_stdev_factor),
    }
}

fn circuit_breakers(
    ctx: &Ctx<'_>,
    field: &str,
    cb: Option<&cluster_pb::CircuitBreakers>,
) -> Result<m::cluster::CircuitBreakers, ConvertError> {
    let mut out = m::cluster::CircuitBreakers::default();
    for (i, t) in cb
        .into_iter()
        .flat_map(|cb| cb.thresholds.iter())
        .enumerate()
    {
        let d = m::cluster::Thresholds::default();
        let u = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, dflt: u32| {
            v.as_ref().map_or(dflt, |v| v.value)
        };
        let th = m::cluster::Thresholds {
            max_connections: u(&t.max_connections, d.max_connections),
            max_pending_requests: u(&t.max_pending_requests, d.max_pending_requests),
            max_requests: u(&t.max_requests, d.max_requests),
            max_retries: u(&t.max_retries, d.max_retries),
            retry_budget: match &t.retry_budget {
                None => None,
                Some(b) => {
                    let dflt = m::cluster::RetryBudget::default();
                    let budget_ppm = match &b.budget_percent {
                        None => dflt.budget_ppm,
                        Some(p) if (0.0..=100.0).contains(&p.value) => {
                            (p.value * 10_000.0).round() as u32
                        }
                        Some(p) => {
                            return Err(ctx.err(
                                format!("{field}.thresholds[{i}].retry_budget.budget_percent"),
                                format!("{} is not a percentage (0 to 100)", p.value),
                            ));
                        }
                    };
                    Some(m::cluster::RetryBudget {
                        budget_ppm,
                        min_retry_concurrency: u(
                            &b.min_retry_concurrency,
                            dflt.min_retry_concurrency,
                        ),
                    })
                }
            },
        };
        // RoutingPriority: DEFAULT = 0, HIGH = 1.
        if t.priority == 1 {
            out.high = th;
        } else {
            out.default = th;
        }
    }
    Ok(out)
}

fn lb_endpoints(
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> impl Iterator<Item = (usize, usize, &endpoint_pb::LbEndpoint)> {
    cla.into_iter().flat_map(|cla| {
        cla.endpoints.iter().enumerate().flat_map(|(i, lle)| {
            lle.lb_endpoints
                .iter()
                .enumerate()
                .map(move |(j, e)| (i, j, e))
        })
    })
}

fn endpoint_address<'a>(
    ctx: &Ctx<'_>,
    field: &str,
    e: &'a endpoint_pb::LbEndpoint,
) -> Result<&'a Option<core_pb::Address>, ConvertError> {
    use endpoint_pb::lb_endpoint::HostIdentifier;
    match &e.host_identifier {
        Some(HostIdentifier::Endpoint(ep)) => Ok(&ep.address),
        _ => Err(ctx.err(field, "only inline endpoints are supported")),
    }
}

fn endpoints(
    ctx: &Ctx<'_>,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Vec<m::Endpoint>, ConvertError> {
    // Unhealthy endpoints are kept (marked): they count towards their
    // priority's size when Envoy computes the healthy share.
    let mut out = Vec::new();
    for (i, j, e) in lb_endpoints(cla) {
        let field = format!("endpoints[{i}].lb_endpoints[{j}].endpoint.address");
        let addr = endpoint_address(ctx, &field, e)?;
        let address = ip_socket(ctx, &field, addr)?;
        let transport_socket_match = e
            .metadata
            .as_ref()
            .and_then(|md| md.filter_metadata.get("envoy.transport_socket_match"))
            .map(|st| {
                st.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), value_string(v)))
                    .collect()
            })
            .unwrap_or_default();
        let lle = cla.and_then(|c| c.endpoints.get(i));
        let priority = lle.map_or(0, |l| l.priority);
        let locality_weight = lle
            .and_then(|l| l.load_balancing_weight.as_ref())
            .map_or(1, |v| v.value);
        use endpoint_pb::lb_endpoint::HostIdentifier;
        let hostname = match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) if !ep.hostname.is_empty() => {
                Some(Arc::from(ep.hostname.as_str()))
            }
            _ => None,
        };
        out.push(m::Endpoint {
            address,
            hostname,
            weight: e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |v| v.value)
                .max(1),
            transport_socket_match,
            priority,
            locality: u32::try_from(i).unwrap_or(u32::MAX),
            locality_weight,
            // HealthStatus: UNHEALTHY 2, DRAINING 3, TIMEOUT 4, DEGRADED 5.
            health: match e.health_status {
                2..=4 => m::cluster::EndpointHealth::Unhealthy,
                5 => m::cluster::EndpointHealth::Degraded,
                _ => m::cluster::EndpointHealth::Healthy,
            },
        });
    }
    // Every priority is kept: the balancer fails over from one level to the
    // next as the healthy share of the preferred ones shrinks.
    out.sort_by_key(|e| e.priority);
    Ok(out)
}

/// The endpoints of an EDS assignment.
pub fn cluster_load_assignment(
    cla: &endpoint_pb::ClusterLoadAssignment,
    warnings: &mut Warnings,
) -> Result<Vec<m::Endpoint>, ConvertError> {
    let ctx = Ctx {
        resource: format!("cluster_load_assignment {:?}", cla.cluster_name),
        warnings,
        inbound: false,
        outbound: false,
    };
    endpoints(&ctx, Some(cla))
}

fn dns_endpoints(
    ctx: &Ctx<'_>,
    cla: Option<&endpoint_pb::ClusterLoadAssignment>,
) -> Result<Vec<m::cluster::DnsEndpoint>, ConvertError> {
    let mut out = Vec::new();
    for (i, j, e) in lb_endpoints(cla) {
        let field = format!("load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address");
        let (host, port) = socket_address(ctx, &field, endpoint_address(ctx, &field, e)?)?;
        out.push(m::cluster::DnsEndpoint {
            host,
            port,
            weight: e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |v| v.value)
                .max(1),
        });
    }
    if out.is_empty() {
        return Err(ctx.err("load_assignment", "a DNS cluster needs at least one host"));
    }
    Ok(out)
}
