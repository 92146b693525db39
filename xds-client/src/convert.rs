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
//! `header_mutation`), `http_connection_manager` and `tcp_proxy`. This file
//! holds the mechanism (errors, warnings, typed configs).

use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

mod access_log;
mod bootstrap;
mod circuit_breakers;
mod cluster;
mod compressor;
mod core_types;
mod cors;
mod coverage;
mod endpoint;
mod ext_authz;
mod fault;
mod filter_chain_matcher;
mod grpc_service;
mod header_mutation;
mod health_check;
mod http_connection_manager;
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
mod set_filter_state;
mod tcp_proxy;
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

pub use bootstrap::bootstrap_fields;
use http_connection_manager::{HTTP_TOLERATED, http_connection_manager};
use tcp_proxy::tcp_proxy;

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

    pub(super) fn warn(&mut self, field: &str, message: String) {
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
