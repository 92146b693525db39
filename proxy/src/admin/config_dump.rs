//! `/config_dump` in Envoy's shape (`envoy.admin.v3.ConfigDump`), which
//! `istioctl proxy-config` reads: sections in Envoy's order (bootstrap,
//! clusters, endpoints with `include_eds`, listeners, scoped routes, routes,
//! secrets); the route configurations inlined in listeners as
//! `static_route_configs`; `resource=` (one repeated field, each element
//! typed as Envoy types it), `mask=` (a field mask, applied to each section
//! or, with `resource`, to each element) and `name_regex=` (resources whose
//! name matches the whole expression).

use bytes::Bytes;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use http::{Response, StatusCode};
use http_body_util::Full;
use prost::{Message, Name};
use serde_json::{Value, json};

use super::{Query, text};
use crate::run::Runtime;

const ADMIN: &str = "type.googleapis.com/envoy.admin.v3.";

/// Envoy's order of the sections.
const ORDER: &[&str] = &[
    "BootstrapConfigDump",
    "ClustersConfigDump",
    "EndpointsConfigDump",
    "ListenersConfigDump",
    "ScopedRoutesConfigDump",
    "RoutesConfigDump",
    "SecretsConfigDump",
];

/// The repeated fields `resource=` accepts: (field, section, element type).
const RESOURCES: &[(&str, &str, &str)] = &[
    ("static_clusters", "ClustersConfigDump", "StaticCluster"),
    (
        "dynamic_active_clusters",
        "ClustersConfigDump",
        "DynamicCluster",
    ),
    (
        "dynamic_warming_clusters",
        "ClustersConfigDump",
        "DynamicCluster",
    ),
    (
        "static_endpoint_configs",
        "EndpointsConfigDump",
        "StaticEndpointConfig",
    ),
    (
        "dynamic_endpoint_configs",
        "EndpointsConfigDump",
        "DynamicEndpointConfig",
    ),
    ("static_listeners", "ListenersConfigDump", "StaticListener"),
    (
        "dynamic_listeners",
        "ListenersConfigDump",
        "DynamicListener",
    ),
    (
        "static_route_configs",
        "RoutesConfigDump",
        "StaticRouteConfig",
    ),
    (
        "dynamic_route_configs",
        "RoutesConfigDump",
        "DynamicRouteConfig",
    ),
    ("static_secrets", "SecretsConfigDump", "StaticSecret"),
    (
        "dynamic_active_secrets",
        "SecretsConfigDump",
        "DynamicSecret",
    ),
    (
        "dynamic_warming_secrets",
        "SecretsConfigDump",
        "DynamicSecret",
    ),
];

fn section_name(v: &Value) -> &str {
    v["@type"].as_str().unwrap_or("").trim_start_matches(ADMIN)
}

/// The route configurations listeners carry inline (Envoy lists them as
/// static route configurations).
fn inline_routes(
    d: &ferry_xds::json::Descriptors,
    listeners: &[Listener],
    last_updated: &str,
) -> Vec<Value> {
    let mut out = Vec::new();
    for l in listeners {
        for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            for f in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if any.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else {
                    continue;
                };
                if let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier
                    && let Ok(mut v) = d.to_json("envoy.config.route.v3.RouteConfiguration", rc)
                {
                    v["@type"] =
                        json!("type.googleapis.com/envoy.config.route.v3.RouteConfiguration");
                    out.push(json!({"route_config": v, "last_updated": last_updated}));
                }
            }
        }
    }
    out
}

/// The endpoints of the static clusters, with the defaults Envoy shows.
fn static_endpoints(d: &ferry_xds::json::Descriptors, rt: &Runtime) -> Vec<Value> {
    let statics = rt
        .bootstrap()
        .proto
        .static_resources
        .clone()
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in &statics.clusters {
        let Some(la) = &c.load_assignment else {
            continue;
        };
        let Ok(mut v) = d.to_json("envoy.config.endpoint.v3.ClusterLoadAssignment", la) else {
            continue;
        };
        v["@type"] = json!("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment");
        if let Some(eps) = v["endpoints"].as_array_mut() {
            for e in eps {
                if e.get("locality").is_none() {
                    e["locality"] = json!({});
                }
                if e.get("load_balancing_weight").is_none() {
                    e["load_balancing_weight"] = json!(0);
                }
                if let Some(lbs) = e["lb_endpoints"].as_array_mut() {
                    for lb in lbs {
                        if lb.get("health_status").is_none() {
                            lb["health_status"] = json!("HEALTHY");
                        }
                        if lb.get("load_balancing_weight").is_none() {
                            lb["load_balancing_weight"] = json!(1);
                        }
                        if lb["endpoint"].get("health_check_config").is_none() {
                            lb["endpoint"]["health_check_config"] = json!({});
                        }
                    }
                }
            }
        }
        if v.get("policy").is_none() {
            v["policy"] = json!({"overprovisioning_factor": 140});
        }
        out.push(json!({ "endpoint_config": v }));
    }
    out
}

/// The whole dump, sections in Envoy's order.
fn full(rt: &Runtime, include_eds: bool) -> Result<Value, String> {
    let mut dump = rt.config_dump()?;
    let Some(configs) = dump["configs"].as_array_mut() else {
        return Err("config dump without configs".into());
    };
    let loaded = configs
        .first()
        .and_then(|b| b["last_updated"].as_str())
        .unwrap_or_default()
        .to_string();
    // Inline route configurations: the bootstrap's listeners and the ones
    // received over LDS.
    let mut listeners = rt
        .bootstrap()
        .proto
        .static_resources
        .clone()
        .unwrap_or_default()
        .listeners;
    if let Some(x) = &rt.xds {
        let store = x.store.lock().unwrap_or_else(|p| p.into_inner());
        for (_, e) in store.of(ferry_xds::store::LISTENER) {
            if let Ok(l) = Listener::decode(e.raw.as_slice()) {
                listeners.push(l);
            }
        }
    }
    let d = ferry_xds::json::Descriptors::load()?;
    let routes = inline_routes(&d, &listeners, &loaded);
    let section = |configs: &mut Vec<Value>, name: &str| -> usize {
        match configs.iter().position(|c| section_name(c) == name) {
            Some(i) => i,
            None => {
                configs.push(json!({ "@type": format!("{ADMIN}{name}") }));
                configs.len() - 1
            }
        }
    };
    if !routes.is_empty() {
        let i = section(configs, "RoutesConfigDump");
        configs[i]["static_route_configs"] = Value::Array(routes);
    }
    section(configs, "RoutesConfigDump");
    section(configs, "ScopedRoutesConfigDump");
    if include_eds {
        let eps = static_endpoints(&d, rt);
        let i = section(configs, "EndpointsConfigDump");
        if !eps.is_empty() {
            configs[i]["static_endpoint_configs"] = Value::Array(eps);
        }
    } else {
        configs.retain(|c| section_name(c) != "EndpointsConfigDump");
    }
    // Empty repeated fields are left out, as proto3 JSON does.
    for c in configs.iter_mut() {
        if let Some(o) = c.as_object_mut() {
            o.retain(|_, v| !matches!(v, Value::Array(a) if a.is_empty()));
        }
    }
    configs.sort_by_key(|c| {
        ORDER
            .iter()
            .position(|n| *n == section_name(c))
            .unwrap_or(ORDER.len())
    });
    Ok(dump)
}

/// The name of a dumped resource (listener, cluster, route configuration,
/// secret or endpoint assignment).
fn resource_name(e: &Value) -> Option<&str> {
    if let Some(n) = e["name"].as_str() {
        return Some(n);
    }
    for k in ["listener", "cluster", "route_config", "secret"] {
        if let Some(n) = e[k]["name"].as_str() {
            return Some(n);
        }
    }
    e["endpoint_config"]["cluster_name"].as_str()
}

/// Keeps only the fields a field mask names (`@type` always stays); a path
/// through a list applies to each element.
fn trim(v: &mut Value, paths: &[Vec<&str>]) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| trim(i, paths)),
        Value::Object(o) => {
            o.retain(|k, child| {
                if k == "@type" {
                    return true;
                }
                let sub: Vec<Vec<&str>> = paths
                    .iter()
                    .filter(|p| p.first() == Some(&k.as_str()))
                    .map(|p| p[1..].to_vec())
                    .collect();
                if sub.is_empty() {
                    return false;
                }
                if !sub.iter().any(Vec::is_empty) {
                    trim(child, &sub);
                }
                true
            });
        }
        _ => {}
    }
}

pub(super) fn respond(rt: &Runtime, q: &Query) -> Response<Full<Bytes>> {
    let mut dump = match full(rt, q.has("include_eds")) {
        Ok(d) => d,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let name_regex = match q.get("name_regex").filter(|r| !r.is_empty()) {
        None => None,
        Some(r) => match regex::Regex::new(&format!("^(?:{r})$")) {
            Ok(r) => Some(r),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Error while parsing name_regex from {r}: {e}"),
                );
            }
        },
    };
    let mask: Option<Vec<Vec<&str>>> = q
        .get("mask")
        .filter(|m| !m.is_empty())
        .map(|m| m.split(',').map(|p| p.split('.').collect()).collect());
    let configs = dump["configs"]
        .as_array_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut out = Vec::new();
    match q.get("resource").filter(|r| !r.is_empty()) {
        Some(resource) => {
            let Some((_, section, element)) = RESOURCES.iter().find(|(f, _, _)| *f == resource)
            else {
                return reply(
                    StatusCode::NOT_FOUND,
                    format!("{resource} not found in config dump"),
                );
            };
            for c in configs.iter().filter(|c| section_name(c) == *section) {
                for e in c[resource].as_array().into_iter().flatten() {
                    if let Some(r) = &name_regex
                        && !resource_name(e).is_some_and(|n| r.is_match(n))
                    {
                        continue;
                    }
                    let mut e = e.clone();
                    if let Some(m) = &mask {
                        trim(&mut e, m);
                    }
                    let mut typed = json!({ "@type": format!("{ADMIN}{section}.{element}") });
                    for (k, v) in e.as_object().into_iter().flatten() {
                        typed[k.as_str()] = v.clone();
                    }
                    out.push(typed);
                }
            }
        }
        None => {
            for mut c in configs {
                if let Some(r) = &name_regex {
                    for (_, field, _) in RESOURCES {
                        if let Some(items) = c[*field].as_array_mut() {
                            items.retain(|e| resource_name(e).is_some_and(|n| r.is_match(n)));
                        }
                    }
                    if let Some(o) = c.as_object_mut() {
                        o.retain(|_, v| !matches!(v, Value::Array(a) if a.is_empty()));
                    }
                }
                if let Some(m) = &mask {
                    trim(&mut c, m);
                    // A section the mask left nothing of is left out.
                    if c.as_object().is_some_and(|o| o.len() == 1) {
                        continue;
                    }
                }
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return super::json(&json!({}));
    }
    super::json(&json!({ "configs": out }))
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = text(status, body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_masks() {
        let mut v = json!({"@type": "t", "static_clusters": [
            {"cluster": {"@type": "c", "name": "a", "type": "STATIC"}, "last_updated": "x"},
            {"cluster": {"@type": "c", "name": "b"}}],
            "dynamic_active_clusters": []});
        trim(&mut v, &[vec!["static_clusters", "cluster", "name"]]);
        assert_eq!(
            v,
            json!({"@type": "t", "static_clusters": [
                {"cluster": {"@type": "c", "name": "a"}}, {"cluster": {"@type": "c", "name": "b"}}]})
        );
        let mut v = json!({"@type": "t", "a": {"b": 1, "c": 2}, "d": 3});
        trim(&mut v, &[vec!["a"], vec!["d"]]);
        assert_eq!(v, json!({"@type": "t", "a": {"b": 1, "c": 2}, "d": 3}));
    }
}
