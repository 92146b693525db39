//! Envoy's runtime (`layered_runtime`): the bootstrap's static layers read
//! into one key → value table, each key judged by name (applied, inert,
//! refused, or unknown and reported), and the process-wide snapshot the
//! converters and the data path read.
//!
//! istio-agent's bootstrap writes a static layer of Envoy feature flags and
//! RE2 limits, then an empty admin layer. The layers Ferry reads are the
//! static ones; an admin layer is accepted (its values are what
//! `/runtime_modify` would set, and Ferry refuses that endpoint, so it stays
//! empty); disk and RTDS layers are refused, since their values would change
//! behaviour Ferry never sees.
//!
//! Values are read when configuration is converted (fractions named by a
//! `runtime_key`) or when a connection starts (the fragment flag): the
//! static layers never change while the process runs.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap_pb;

/// Rejects a request target that carries a fragment (`#`) with 400 when
/// true (Envoy's default); strips the fragment when false.
pub const REJECT_PATH_WITH_FRAGMENT: &str =
    "envoy.reloadable_features.http_reject_path_with_fragment";
/// The RE2 program size above which Envoy refuses a regex.
pub const RE2_MAX_PROGRAM_SIZE_ERROR: &str = "re2.max_program_size.error_level";
/// Envoy's default for [`RE2_MAX_PROGRAM_SIZE_ERROR`].
pub const RE2_DEFAULT_ERROR_LEVEL: u64 = 100;

/// What a runtime key does in Ferry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Read and acted on.
    Applied(&'static str),
    /// Changes nothing observable in Ferry.
    Inert(&'static str),
    /// Changes traffic in a way Ferry cannot follow: the bootstrap is refused.
    Refused(&'static str),
    /// Not a key Ferry knows: reported, Envoy's default behaviour applies.
    Unknown,
}

/// Keys judged by exact name.
const KEYS: &[(&str, Disposition)] = &[
    (
        REJECT_PATH_WITH_FRAGMENT,
        Disposition::Applied(
            "true (the default) answers 400 to a request target (HTTP/1) or :path (HTTP/2) with '#'; false strips the fragment before routing and forwarding",
        ),
    ),
    (
        RE2_MAX_PROGRAM_SIZE_ERROR,
        Disposition::Inert(
            "only decides which regexes a configuration may hold (Envoy refuses one whose RE2 program is larger); Ferry does not count RE2 program sizes and accepts every regex its engine compiles, matching as RE2 does",
        ),
    ),
    (
        "re2.max_program_size.warn_level",
        Disposition::Inert("only logs a warning in Envoy"),
    ),
    (
        "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update",
        Disposition::Inert(
            "when load balancers are rebuilt during a batch of host updates is internal",
        ),
    ),
    (
        "envoy.reloadable_features.fixed_heap_use_allocated",
        Disposition::Inert("there is no fixed-heap resource monitor to feed"),
    ),
    (
        "overload.global_downstream_max_connections",
        Disposition::Refused("a global downstream connection limit is not supported"),
    ),
];

/// Keys judged by prefix: families of per-cluster and per-listener overrides.
const PREFIXES: &[(&str, Disposition)] = &[
    (
        "envoy.deprecated_features:",
        Disposition::Inert(
            "allows a deprecated field; Ferry's converters judge every field themselves",
        ),
    ),
    (
        "envoy.resource_limits.",
        Disposition::Refused(
            "runtime resource limits (listener connection limits) are not supported",
        ),
    ),
    (
        "circuit_breakers.",
        Disposition::Refused("runtime overrides of circuit breaker thresholds are not supported"),
    ),
    (
        "upstream.",
        Disposition::Refused(
            "runtime overrides of upstream load balancing (panic threshold, zone routing, weights) are not supported",
        ),
    ),
    (
        "outlier_detection.",
        Disposition::Refused("runtime overrides of outlier detection are not supported"),
    ),
    (
        "health_check.",
        Disposition::Refused("runtime overrides of health checking are not supported"),
    ),
];

/// Judges a key by name.
pub fn disposition(key: &str) -> Disposition {
    if let Some((_, d)) = KEYS.iter().find(|(k, _)| *k == key) {
        return *d;
    }
    PREFIXES
        .iter()
        .find(|(p, _)| key.starts_with(p))
        .map_or(Disposition::Unknown, |(_, d)| *d)
}

/// One runtime value, as the layer held it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Number(f64),
    String(String),
    /// A `FractionalPercent` written as a map (`numerator`, `denominator`).
    Fraction {
        numerator: u32,
        denominator: u32,
    },
}

impl Value {
    /// The value as Envoy's admin `/runtime` prints it.
    pub fn display(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => format!("{}", *n as i64),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            Value::Fraction {
                numerator,
                denominator,
            } => {
                let d = match denominator {
                    10_000 => "TEN_THOUSAND",
                    1_000_000 => "MILLION",
                    _ => "HUNDRED",
                };
                format!("numerator: {numerator}\ndenominator: {d}\n")
            }
        }
    }

    /// The value as a boolean, as Envoy reads one: `true`/`false` (a
    /// boolean or those strings); anything else is not a boolean.
    fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s == "true" => Some(true),
            Value::String(s) if s == "false" => Some(false),
            _ => None,
        }
    }

    /// The value as an unsigned integer: a whole non-negative number, or a
    /// string of digits.
    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// One layer, named as the bootstrap names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub name: String,
    /// `static` or `admin`.
    pub kind: &'static str,
    pub values: BTreeMap<String, Value>,
}

/// The layers, in order (a later layer overrides an earlier one).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Runtime {
    pub layers: Vec<Layer>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("layered_runtime.{field}: {message}")]
pub struct RuntimeError {
    pub field: String,
    pub message: String,
}

impl Runtime {
    /// Reads `layered_runtime`; `warn` receives a message for each key
    /// Ferry does not act on. A refused key, a disk or RTDS layer, or a
    /// value Ferry cannot read for a key it applies is an error.
    pub fn from_proto(
        lr: &bootstrap_pb::LayeredRuntime,
        warn: &mut dyn FnMut(String, String),
    ) -> Result<Runtime, RuntimeError> {
        use bootstrap_pb::runtime_layer::LayerSpecifier as L;
        let mut layers = Vec::with_capacity(lr.layers.len());
        for (i, layer) in lr.layers.iter().enumerate() {
            let field = format!("layers[{i}]");
            let (kind, values) = match &layer.layer_specifier {
                Some(L::StaticLayer(s)) => {
                    let mut values = BTreeMap::new();
                    flatten("", s, &mut values);
                    ("static", values)
                }
                Some(L::AdminLayer(_)) => ("admin", BTreeMap::new()),
                Some(L::DiskLayer(_)) => {
                    return Err(RuntimeError {
                        field: format!("{field}.disk_layer"),
                        message: "disk runtime layers are not supported (their files would override behaviour Ferry never reads); use a static_layer".into(),
                    });
                }
                Some(L::RtdsLayer(_)) => {
                    return Err(RuntimeError {
                        field: format!("{field}.rtds_layer"),
                        message: "runtime discovery (RTDS) is not supported".into(),
                    });
                }
                None => {
                    return Err(RuntimeError {
                        field,
                        message: "a layer needs static_layer or admin_layer".into(),
                    });
                }
            };
            for (key, value) in &values {
                let kf = format!("{field}.static_layer[{key:?}]");
                match disposition(key) {
                    Disposition::Applied(_) => {
                        check_applied(key, value).map_err(|message| RuntimeError {
                            field: kf.clone(),
                            message,
                        })?
                    }
                    Disposition::Inert(why) => warn(kf, format!("accepted: {why}")),
                    Disposition::Refused(why) => {
                        return Err(RuntimeError {
                            field: kf,
                            message: format!("runtime key {key:?}: {why}"),
                        });
                    }
                    Disposition::Unknown => warn(
                        kf,
                        format!(
                            "runtime key {key:?} is not one Ferry knows: Envoy's default behaviour applies (a configuration's runtime_key naming it reads its value)"
                        ),
                    ),
                }
            }
            layers.push(Layer {
                name: layer.name.clone(),
                kind,
                values,
            });
        }
        Ok(Runtime { layers })
    }

    /// The final value of a key: the last layer that holds it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.layers.iter().rev().find_map(|l| l.values.get(key))
    }

    /// [`REJECT_PATH_WITH_FRAGMENT`], true unless a layer sets it false.
    pub fn reject_path_with_fragment(&self) -> bool {
        self.get(REJECT_PATH_WITH_FRAGMENT)
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    /// [`RE2_MAX_PROGRAM_SIZE_ERROR`], Envoy's 100 unless a layer sets it.
    pub fn re2_max_program_size(&self) -> u64 {
        self.get(RE2_MAX_PROGRAM_SIZE_ERROR)
            .and_then(Value::as_u64)
            .unwrap_or(RE2_DEFAULT_ERROR_LEVEL)
    }

    /// A `RuntimeFeatureFlag`'s value: the layer's boolean for `key`, else
    /// `default`.
    pub fn flag(&self, key: &str, default: bool) -> bool {
        if key.is_empty() {
            return default;
        }
        self.get(key).and_then(Value::as_bool).unwrap_or(default)
    }

    /// A `RuntimeFractionalPercent`'s value: the layer's, when a layer
    /// holds `key` in a form Envoy reads (an integer percentage, with the
    /// default's denominator, or a `FractionalPercent` map), else `default`
    /// (`numerator`, `denominator` as 100, 10 000 or 1 000 000).
    pub fn fraction(&self, key: &str, default: (u32, u32)) -> (u32, u32) {
        if key.is_empty() {
            return default;
        }
        match self.get(key) {
            Some(Value::Fraction {
                numerator,
                denominator,
            }) => ((*numerator).min(*denominator), *denominator),
            Some(v) => match v.as_u64() {
                // An integer is a percentage of the default's denominator;
                // Envoy takes more than 100 as always.
                Some(n) if n > 100 => (default.1, default.1),
                Some(n) => (n as u32, default.1),
                None => default,
            },
            None => default,
        }
    }
}

/// Checks the value of a key Ferry applies can be read.
fn check_applied(key: &str, value: &Value) -> Result<(), String> {
    let ok = match key {
        REJECT_PATH_WITH_FRAGMENT => value.as_bool().is_some(),
        RE2_MAX_PROGRAM_SIZE_ERROR => value.as_u64().is_some(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "runtime key {key:?}: value {:?} is not a {}",
            value.display(),
            if key == REJECT_PATH_WITH_FRAGMENT {
                "boolean"
            } else {
                "whole number"
            }
        ))
    }
}

/// Envoy flattens a static layer's nested maps into dotted keys, except a
/// map with `numerator` (a `FractionalPercent`).
fn flatten(
    prefix: &str,
    s: &envoy_types::pb::google::protobuf::Struct,
    out: &mut BTreeMap<String, Value>,
) {
    use envoy_types::pb::google::protobuf::value::Kind;
    for (k, v) in &s.fields {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &v.kind {
            Some(Kind::BoolValue(b)) => {
                out.insert(key, Value::Bool(*b));
            }
            Some(Kind::NumberValue(n)) => {
                out.insert(key, Value::Number(*n));
            }
            Some(Kind::StringValue(s)) => {
                out.insert(key, Value::String(s.clone()));
            }
            Some(Kind::StructValue(inner)) if inner.fields.contains_key("numerator") => {
                let num = |name: &str| match inner.fields.get(name).and_then(|v| v.kind.as_ref()) {
                    Some(Kind::NumberValue(n)) if *n >= 0.0 => Some(*n as u32),
                    Some(Kind::StringValue(s)) => match s.as_str() {
                        "HUNDRED" => Some(100),
                        "TEN_THOUSAND" => Some(10_000),
                        "MILLION" => Some(1_000_000),
                        _ => s.parse().ok(),
                    },
                    _ => None,
                };
                let numerator = num("numerator").unwrap_or(0);
                let denominator = num("denominator").unwrap_or(100);
                out.insert(
                    key,
                    Value::Fraction {
                        numerator,
                        denominator,
                    },
                );
            }
            Some(Kind::StructValue(inner)) => flatten(&key, inner, out),
            // Lists and nulls are no runtime value Envoy reads.
            Some(Kind::ListValue(_)) | Some(Kind::NullValue(_)) | None => {}
        }
    }
}

static CURRENT: RwLock<Option<Arc<Runtime>>> = RwLock::new(None);

/// Makes `rt` the process's runtime (the bootstrap's, once at start-up).
pub fn install(rt: Runtime) {
    let mut w = CURRENT.write().unwrap_or_else(|p| p.into_inner());
    *w = Some(Arc::new(rt));
}

/// The process's runtime (empty until a bootstrap installs one).
pub fn current() -> Arc<Runtime> {
    CURRENT
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(json: serde_json::Value) -> bootstrap_pb::LayeredRuntime {
        crate::json::from_json("envoy.config.bootstrap.v3.LayeredRuntime", json).unwrap()
    }

    #[test]
    fn istio_agent_layers_are_read_and_judged() {
        let lr = layer(serde_json::json!({"layers": [
            {"name": "global config", "static_layer": {
                "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": true,
                "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": false,
                "envoy.reloadable_features.fixed_heap_use_allocated": true,
                "envoy.reloadable_features.http_reject_path_with_fragment": false,
                "re2.max_program_size.error_level": "32768",
                "some.unknown.key": 3,
            }},
            {"name": "admin", "admin_layer": {}}
        ]}));
        let mut warned = Vec::new();
        let rt = Runtime::from_proto(&lr, &mut |f, m| warned.push((f, m))).unwrap();
        assert!(!rt.reject_path_with_fragment());
        assert_eq!(rt.re2_max_program_size(), 32768);
        assert_eq!(rt.layers.len(), 2);
        assert_eq!(rt.layers[1].kind, "admin");
        assert!(
            warned
                .iter()
                .any(|(f, m)| f.contains("some.unknown.key") && m.contains("not one Ferry knows"))
        );
        assert_eq!(warned.len(), 5, "{warned:?}");
    }

    #[test]
    fn defaults_without_layers() {
        let rt = Runtime::default();
        assert!(rt.reject_path_with_fragment());
        assert_eq!(rt.re2_max_program_size(), 100);
        assert_eq!(rt.fraction("x", (5, 100)), (5, 100));
    }

    #[test]
    fn refused_and_unreadable_keys_are_errors() {
        for (json, field) in [
            (
                serde_json::json!({"layers": [{"name": "a", "static_layer": {"upstream": {"healthy_panic_threshold": 0}}}]}),
                "upstream.healthy_panic_threshold",
            ),
            (
                serde_json::json!({"layers": [{"name": "a", "static_layer": {"envoy.reloadable_features.http_reject_path_with_fragment": "maybe"}}]}),
                "http_reject_path_with_fragment",
            ),
            (
                serde_json::json!({"layers": [{"name": "a", "disk_layer": {"symlink_root": "/x"}}]}),
                "disk_layer",
            ),
        ] {
            let e = Runtime::from_proto(&layer(json), &mut |_, _| {}).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn fractions_read_integers_and_maps_and_later_layers_win() {
        let lr = layer(serde_json::json!({"layers": [
            {"name": "a", "static_layer": {"f": {"int": 30, "map": {"numerator": 7, "denominator": "TEN_THOUSAND"}, "big": 250}}},
            {"name": "b", "static_layer": {"f.int": 40}},
        ]}));
        let rt = Runtime::from_proto(&lr, &mut |_, _| {}).unwrap();
        assert_eq!(rt.fraction("f.int", (0, 100)), (40, 100));
        assert_eq!(rt.fraction("f.map", (0, 100)), (7, 10_000));
        assert_eq!(rt.fraction("f.big", (0, 10_000)), (10_000, 10_000));
        assert_eq!(rt.fraction("", (3, 100)), (3, 100));
    }
}
