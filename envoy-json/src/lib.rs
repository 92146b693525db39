//! `ferry-envoy-json`: Envoy's JSON/YAML mapping of xDS protos, driven by the
//! v3 descriptor set (Envoy's API plus the Istio extension configs istiod sends).
//!
//! A message is parsed into a reflective `DynamicMessage` (which knows every
//! field, enum name and `Any` type of the xDS API), encoded, and decoded again
//! as the generated `envoy-types` struct. The reverse direction renders protos
//! for the admin endpoint in Envoy's snake_case JSON.

pub mod istio_ca;
pub mod istio_nds;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// Envoy's v3 API as a protobuf descriptor set (see `descriptors/README.md`).
const ENVOY_V3_DESCRIPTORS: &[u8] = include_bytes!("../descriptors/envoy-v3.bin");

/// Decodes the descriptor pool. It is not cached: the pool takes several
/// megabytes and is only needed while a configuration is read or dumped,
/// never on the data path, so it is dropped after each use.
fn pool() -> Result<DescriptorPool, String> {
    DescriptorPool::decode(ENVOY_V3_DESCRIPTORS)
        .map_err(|e| format!("xDS descriptor set is unreadable: {e}"))
}

/// The decoded descriptor set, for callers that convert many messages in a
/// row (a config dump, a directory of resources).
pub struct Descriptors(DescriptorPool);

impl Descriptors {
    pub fn load() -> Result<Self, String> {
        pool().map(Self)
    }

    /// Parses Envoy JSON (already loaded as a value) into the proto `M` whose
    /// full name is `full_name`. The error names the field path that failed.
    pub fn from_json<M: Message + Default>(
        &self,
        full_name: &str,
        value: serde_json::Value,
    ) -> Result<M, String> {
        let desc = self
            .0
            .get_message_by_name(full_name)
            .ok_or_else(|| format!("unknown message type {full_name}"))?;
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        let dynamic = DynamicMessage::deserialize(desc, de).map_err(|e| {
            let path = track.path().to_string();
            if path.is_empty() || path == "?" {
                e.to_string()
            } else {
                format!("{path}: {e}")
            }
        })?;
        M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| format!("{full_name}: {e}"))
    }

    /// Renders a proto as Envoy renders it in `/config_dump` (snake_case
    /// fields, `Any` expanded with `@type`).
    pub fn to_json<M: Message>(
        &self,
        full_name: &str,
        msg: &M,
    ) -> Result<serde_json::Value, String> {
        let desc = self
            .0
            .get_message_by_name(full_name)
            .ok_or_else(|| format!("unknown message type {full_name}"))?;
        let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
            .map_err(|e| format!("{full_name}: {e}"))?;
        let opts = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(true);
        dynamic
            .serialize_with_options(serde_json::value::Serializer, &opts)
            .map_err(|e| format!("{full_name}: {e}"))
    }
}

/// [`Descriptors::from_json`] with a descriptor set loaded for this call.
pub fn from_json<M: Message + Default>(
    full_name: &str,
    value: serde_json::Value,
) -> Result<M, String> {
    Descriptors::load()?.from_json(full_name, value)
}

/// [`Descriptors::to_json`] with a descriptor set loaded for this call.
pub fn to_json<M: Message>(full_name: &str, msg: &M) -> Result<serde_json::Value, String> {
    Descriptors::load()?.to_json(full_name, msg)
}

/// Decodes the JSON form of `google.protobuf.Struct` carried in a TypedStruct
/// into the proto named by its type URL.
pub fn struct_to_json(s: &prost_types_struct::Struct) -> serde_json::Value {
    prost_types_struct::to_json(s)
}

/// Conversion of `google.protobuf.Struct` (as `envoy-types` carries it) to JSON.
pub mod prost_types_struct {
    pub use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    pub fn to_json(s: &Struct) -> serde_json::Value {
        serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        )
    }

    fn value_to_json(v: &Value) -> serde_json::Value {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
                .map(|n| {
                    // Integral values go back as integers so that integer fields parse.
                    if n.as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    {
                        serde_json::Value::from(n.as_f64().unwrap_or_default() as i64)
                    } else {
                        serde_json::Value::Number(n)
                    }
                })
                .unwrap_or(serde_json::Value::Null),
            Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
            Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
            Some(Kind::StructValue(s)) => to_json(s),
            Some(Kind::ListValue(l)) => {
                serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn round_trip_and_field_errors() {
        let v = serde_json::json!({
            "name": "backend",
            "connect_timeout": "0.25s",
            "type": "STRICT_DNS",
            "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "localhost", "port_value": 8080}}}}
            ]}]}
        });
        let c: Cluster = from_json("envoy.config.cluster.v3.Cluster", v).unwrap();
        assert_eq!(c.name, "backend");
        assert_eq!(c.connect_timeout.unwrap().nanos, 250_000_000);
        let back = to_json("envoy.config.cluster.v3.Cluster", &c).unwrap();
        assert_eq!(back["type"], "STRICT_DNS");

        let bad = serde_json::json!({"name": "x", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"adress": {}}}]}]}});
        let err = from_json::<Cluster>("envoy.config.cluster.v3.Cluster", bad).unwrap_err();
        assert!(
            err.contains("load_assignment.endpoints[0].lb_endpoints[0].endpoint"),
            "{err}"
        );
        assert!(err.contains("adress"), "{err}");
    }
}
