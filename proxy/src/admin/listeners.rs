//! `/listeners`: each listener's name and address (`name::address` lines,
//! or `{"listener_statuses": [...]}` with `format=json`).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::{Query, json, text};
use crate::run::Runtime;

/// An address as Envoy's JSON shows it.
pub(super) fn socket_address(a: std::net::SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

/// An endpoint's address as Envoy's JSON shows it (`pipe` for a Unix socket).
pub(super) fn host_address(a: &ferry_model::cluster::HostAddr) -> Value {
    match a {
        ferry_model::cluster::HostAddr::Ip(a) => socket_address(*a),
        ferry_model::cluster::HostAddr::Pipe(p) => json!({"pipe": {"path": p.0.as_ref()}}),
        ferry_model::cluster::HostAddr::Internal(i) => json!({"envoy_internal_address": {
            "server_listener_name": i.listener.as_ref(),
            "endpoint_id": i.endpoint_id.as_ref(),
        }}),
    }
}

pub(super) fn respond(rt: &Runtime, q: &Query) -> Response<Full<Bytes>> {
    let snap = rt.snapshot.load();
    if q.get("format") == Some("json") {
        let statuses: Vec<Value> = snap
            .listeners
            .iter()
            .map(|l| {
                let mut s = json!({"name": l.name, "local_address": socket_address(l.address)});
                if !l.additional_addresses.is_empty() {
                    s["additional_local_addresses"] = Value::Array(
                        l.additional_addresses
                            .iter()
                            .map(|a| socket_address(*a))
                            .collect(),
                    );
                }
                s
            })
            .collect();
        return json(&json!({ "listener_statuses": statuses }));
    }
    let mut body = String::new();
    for l in &snap.listeners {
        body.push_str(&format!("{}::{}\n", l.name, l.address));
    }
    text(StatusCode::OK, body)
}
