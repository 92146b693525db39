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

    /// The descriptors one JSON value of `full_name` needs: the files that
    /// define it and every `@type` the value names, with their imports. A
    /// bootstrap needs about a third of Envoy's API, and the whole pool
    /// takes some 15 MiB while it is built: reading one value through the
    /// part it needs keeps the process's peak memory down.
    pub fn for_value(full_name: &str, value: &serde_json::Value) -> Result<Self, String> {
        use prost_reflect::prost_types::FileDescriptorSet;
        let set = FileDescriptorSet::decode(ENVOY_V3_DESCRIPTORS)
            .map_err(|e| format!("xDS descriptor set is unreadable: {e}"))?;
        let mut names = vec![full_name.to_string()];
        type_urls(value, &mut names);
        // Which file defines each top-level message or enum.
        let mut defined = std::collections::HashMap::new();
        for (i, f) in set.file.iter().enumerate() {
            let package = f.package();
            let top = f
                .message_type
                .iter()
                .map(|m| m.name())
                .chain(f.enum_type.iter().map(|e| e.name()));
            for name in top {
                defined.insert(format!("{package}.{name}"), i);
            }
        }
        let by_file: std::collections::HashMap<&str, usize> = set
            .file
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name(), i))
            .collect();
        let mut wanted = vec![false; set.file.len()];
        let mut todo: Vec<usize> = names
            .iter()
            .filter_map(|n| {
                // A nested type lives in its outermost message's file.
                let mut prefix = n.as_str();
                loop {
                    if let Some(&i) = defined.get(prefix) {
                        return Some(i);
                    }
                    prefix = &prefix[..prefix.rfind('.')?];
                }
            })
            .collect();
        while let Some(i) = todo.pop() {
            if std::mem::replace(&mut wanted[i], true) {
                continue;
            }
            todo.extend(
                set.file[i]
                    .dependency
                    .iter()
                    .filter_map(|d| by_file.get(d.as_str()).copied()),
            );
        }
        let file = set
            .file
            .into_iter()
            .zip(wanted)
            .filter_map(|(f, w)| w.then_some(f))
            .collect();
        DescriptorPool::from_file_descriptor_set(FileDescriptorSet { file })
            .map(Self)
            .map_err(|e| format!("xDS descriptor set is unreadable: {e}"))
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
    Descriptors::for_value(full_name, &value)?.from_json(full_name, value)
}

/// The message names of every `@type` in `value` (the part after the
/// type URL's last `/`).
fn type_urls(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("@type", serde_json::Value::String(url)) => {
                        out.push(url.rsplit('/').next().unwrap_or(url).to_string());
                    }
                    _ => type_urls(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| type_urls(v, out)),
        _ => {}
    }
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

    /// A value read through only the descriptors it names gives the same
    /// proto as through the whole pool, with a fraction of the files; a
    /// `@type` nested in another is found, and one Envoy does not know is
    /// refused as before.
    #[test]
    fn a_value_is_read_through_the_descriptors_it_needs() {
        use envoy_types::pb::envoy::config::listener::v3::Listener;
        let v = serde_json::json!({
            "name": "l",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "s",
                    "route_config": {"name": "r"},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    }}]
                }
            }]}]
        });
        let name = "envoy.config.listener.v3.Listener";
        let some = Descriptors::for_value(name, &v).unwrap();
        let all = Descriptors::load().unwrap();
        assert!(some.0.files().len() * 3 < all.0.files().len());
        let a: Listener = some.from_json(name, v.clone()).unwrap();
        let b: Listener = all.from_json(name, v.clone()).unwrap();
        assert_eq!(a, b);
        assert!(a.filter_chains[0].filters[0].config_type.is_some());

        let mut unknown = v;
        unknown["filter_chains"][0]["filters"][0]["typed_config"]["@type"] =
            "type.googleapis.com/envoy.extensions.filters.network.nothing.v3.Nothing".into();
        let e1 = from_json::<Listener>(name, unknown.clone()).unwrap_err();
        let e2 = all.from_json::<Listener>(name, unknown).unwrap_err();
        assert_eq!(e1, e2);
    }
}
