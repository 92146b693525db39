//! The dynamic half of `/config_dump`: every resource received over xDS with
//! its version and last-updated time, and the last rejected update (NACK)
//! of each type as Envoy reports it (`error_state` on the resources it
//! names).

use std::time::SystemTime;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use ferry_envoy_json::Descriptors;
use prost::Message;
use serde_json::{Value, json};

use crate::ads::XdsState;
use crate::store::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};

/// RFC 3339 (UTC, seconds) for dump timestamps.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

fn render<M: Message + Default>(d: &Descriptors, name: &str, raw: &[u8]) -> Result<Value, String> {
    let msg = M::decode(raw).map_err(|e| e.to_string())?;
    let mut v = d.to_json(name, &msg)?;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "@type".into(),
            Value::String(format!("type.googleapis.com/{name}")),
        );
    }
    Ok(v)
}

/// The names a NACK's error message mentions, for one resource kind.
fn named(error: &str, kind: &str) -> Vec<String> {
    error
        .split("; ")
        .filter_map(|e| e.strip_prefix(&format!("{kind} \"")))
        .filter_map(|rest| rest.split_once('"').map(|(n, _)| n.to_string()))
        .collect()
}

/// Adds the dynamic resources to a dump made of the bootstrap's.
pub fn add_dynamic(dump: &mut Value, xds: &XdsState) -> Result<(), String> {
    let d = Descriptors::load()?;
    let store = xds.store.lock().unwrap_or_else(|p| p.into_inner());
    let versions = xds
        .versions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let nacks = xds
        .last_nack
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let sections: [(&str, &str, &str, &str, &str); 5] = [
        (
            LISTENER,
            "ListenersConfigDump",
            "dynamic_listeners",
            "listener",
            "envoy.config.listener.v3.Listener",
        ),
        (
            CLUSTER,
            "ClustersConfigDump",
            "dynamic_active_clusters",
            "cluster",
            "envoy.config.cluster.v3.Cluster",
        ),
        (
            ROUTE,
            "RoutesConfigDump",
            "dynamic_route_configs",
            "route_config",
            "envoy.config.route.v3.RouteConfiguration",
        ),
        (
            ENDPOINT,
            "EndpointsConfigDump",
            "dynamic_endpoint_configs",
            "endpoint_config",
            "envoy.config.endpoint.v3.ClusterLoadAssignment",
        ),
        (
            SECRET,
            "SecretsConfigDump",
            "dynamic_active_secrets",
            "secret",
            "envoy.extensions.transport_sockets.tls.v3.Secret",
        ),
    ];
    let configs = dump["configs"]
        .as_array_mut()
        .ok_or("config dump without configs")?;
    for (type_url, section, key, field, msg) in sections {
        let mut entries = Vec::new();
        for (name, e) in store.of(type_url) {
            let rendered = match type_url {
                LISTENER => render::<Listener>(&d, msg, &e.raw)?,
                CLUSTER => render::<Cluster>(&d, msg, &e.raw)?,
                ROUTE => render::<RouteConfiguration>(&d, msg, &e.raw)?,
                SECRET => render::<Secret>(&d, msg, &e.raw)?,
                _ => render::<ClusterLoadAssignment>(&d, msg, &e.raw)?,
            };
            let mut state = json!({
                "version_info": e.version,
                field: rendered,
                "last_updated": timestamp(e.last_updated),
            });
            if type_url == SECRET {
                state["name"] = Value::String(name.clone());
            }
            entries.push(if type_url == LISTENER {
                json!({"name": name, "active_state": state})
            } else {
                state
            });
        }
        if let Some(n) = nacks.get(type_url) {
            let kind = match type_url {
                LISTENER => "listener",
                CLUSTER => "cluster",
                ROUTE => "route_configuration",
                SECRET => "secret",
                _ => "cluster_load_assignment",
            };
            let error_state = json!({
                "last_update_attempt": timestamp(n.at),
                "details": n.error,
                "version_info": n.version,
            });
            let mut names = named(&n.error, kind);
            if names.is_empty() {
                names.push(String::new());
            }
            for name in names {
                entries.push(json!({"name": name, "error_state": error_state}));
            }
        }
        let section_type = format!("type.googleapis.com/envoy.admin.v3.{section}");
        let mut value = json!({"@type": section_type});
        value[key] = Value::Array(entries);
        if let Some(v) = versions.get(type_url) {
            value["version_info"] = Value::String(v.clone());
        }
        match configs.iter_mut().find(|c| c["@type"] == section_type) {
            Some(existing) => {
                for (k, v) in value.as_object().into_iter().flatten() {
                    existing[k.as_str()] = v.clone();
                }
            }
            None => configs.push(value),
        }
    }
    redact(dump);
    Ok(())
}

/// Envoy's placeholder for a sensitive field: `[redacted]`, as bytes.
const REDACTED: &str = "W3JlZGFjdGVkXQ==";

/// Replaces every private key in a dump with Envoy's `[redacted]`
/// placeholder: `/config_dump` never shows key material.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "private_key" && child.is_object() {
                    *child = json!({"inline_bytes": REDACTED});
                } else {
                    redact(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_keys_are_redacted() {
        let mut v = json!({"configs": [{"secret": {"tls_certificate": {
            "certificate_chain": {"inline_string": "CERT"},
            "private_key": {"inline_string": "KEY"}}}}]});
        redact(&mut v);
        let tc = &v["configs"][0]["secret"]["tls_certificate"];
        assert_eq!(tc["private_key"], json!({"inline_bytes": REDACTED}));
        assert_eq!(tc["certificate_chain"]["inline_string"], "CERT");
    }

    #[test]
    fn nack_names_and_timestamps() {
        let e = r#"listener "a": filter_chains[0]: bad; listener "b": x; cluster "c": y"#;
        assert_eq!(named(e, "listener"), vec!["a", "b"]);
        assert_eq!(named(e, "cluster"), vec!["c"]);
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 365)),
            "1971-01-01T00:00:00Z"
        );
    }
}
