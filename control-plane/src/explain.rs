//! `ferry-pilot explain`: what a request from or to a given pod would get,
//! and why, from the control plane's view. The configuration ferry-pilot
//! would send that pod's proxy (a sidecar, or with `gateway` an ingress
//! gateway) is converted exactly as a Ferry proxy converts what it
//! receives, and the data plane's own `/explain` answers on it: listener,
//! filter chain, virtual host, route and why earlier routes did not match,
//! weighted choice, cluster and endpoints, retry and timeout policy, the
//! RBAC and JWT verdicts. Only the live state differs: endpoints are those
//! of the assignments (no outlier ejection, no active health checks), and
//! the workload certificates are taken as present.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Any, Struct, Value as PbValue, value::Kind};
use ferry_model::cluster::EndpointHealth;
use ferry_xds::store::{self, Parsed, Store};
use prost::Message;
use serde_json::{Value, json};

use crate::istio::translate::{Mesh, Proxy, ProxyConfig};

/// Whose configuration to explain.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// The pod's name; `None` to pick the workload by `labels` alone.
    pub pod: Option<String>,
    pub namespace: String,
    /// The workload's labels (the pod's own when empty).
    pub labels: BTreeMap<String, String>,
    /// The pod runs an ingress gateway (a `router` node), not a sidecar.
    pub gateway: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0}")]
    Proxy(#[from] crate::istio::translate::ProxyError),
    #[error("the configuration for {who} does not convert: {error}")]
    Convert { who: String, error: String },
    #[error(transparent)]
    Explain(#[from] ferry_proxy::admin::ExplainError),
}

impl Subject {
    /// The labels as `k=v,k=v`.
    pub fn label_text(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The proxy ferry-pilot would see connect for `subject`: a Ferry node with
/// the pod's identity, completed from its Pod as at connection time.
pub fn proxy_for(mesh: &Mesh, subject: &Subject) -> Result<Proxy, ExplainError> {
    let ns = &subject.namespace;
    let kind = if subject.gateway { "router" } else { "sidecar" };
    let pod = subject.pod.as_deref().unwrap_or("explain");
    let text = |s: &str| PbValue {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let mut meta = Struct::default();
    meta.fields.insert("NAMESPACE".into(), text(ns));
    if !subject.labels.is_empty() {
        let mut labels = Struct::default();
        for (k, v) in &subject.labels {
            labels.fields.insert(k.clone(), text(v));
        }
        meta.fields.insert(
            "LABELS".into(),
            PbValue {
                kind: Some(Kind::StructValue(labels)),
            },
        );
    }
    let app = subject
        .labels
        .get("app")
        .map_or(pod, String::as_str)
        .to_string();
    let node = Node {
        id: format!("{kind}~~{pod}.{ns}~{ns}.svc.cluster.local"),
        cluster: format!("{app}.{ns}"),
        user_agent_name: "ferry".into(),
        metadata: Some(meta),
        ..Default::default()
    };
    let mut proxy = Proxy::from_node(&node)?;
    if subject.pod.is_none() {
        proxy.pod_name = None;
    }
    mesh.complete_proxy(&mut proxy);
    Ok(proxy)
}

/// `/explain`'s answer on `config` for the request in `query` (its
/// parameters: `method`, `authority`, `path`, `header`, `source`,
/// `destination`, …).
pub fn explain(
    config: &ProxyConfig,
    who: &str,
    query: &[(String, String)],
) -> Result<Value, ExplainError> {
    let mut store = Store::default();
    store.secrets_elsewhere = true;
    let mut warnings = ferry_xds::convert::Warnings::default();
    let mut endpoints: HashMap<String, Vec<Value>> = HashMap::new();
    let resources = config
        .listeners
        .iter()
        .map(|r| (store::LISTENER, r.encode_to_vec()))
        .chain(
            config
                .routes
                .iter()
                .map(|r| (store::ROUTE, r.encode_to_vec())),
        )
        .chain(
            config
                .clusters
                .iter()
                .map(|r| (store::CLUSTER, r.encode_to_vec())),
        )
        .chain(
            config
                .endpoints
                .iter()
                .map(|r| (store::ENDPOINT, r.encode_to_vec())),
        );
    for (type_url, value) in resources {
        let any = Any {
            type_url: type_url.to_string(),
            value,
        };
        let (name, parsed) = store::parse(type_url, &any, &mut warnings).map_err(|(name, e)| {
            ExplainError::Convert {
                who: who.to_string(),
                error: format!("{} {e}", name.unwrap_or_default()),
            }
        })?;
        if let Parsed::Endpoints(eps) = &parsed {
            endpoints.insert(name.clone(), eps.iter().map(endpoint_json).collect());
        }
        store.upsert(type_url, name, "ferry-pilot".into(), any.value, parsed);
    }
    let snapshot = store
        .assemble(
            &ferry_model::Snapshot::default(),
            None,
            Duration::ZERO,
            format!("ferry-pilot explain {who}"),
        )
        .snapshot;
    // An EDS cluster's endpoints are its assignment's (by service name).
    let by_cluster = |name: &str| -> Vec<Value> {
        let service = config
            .clusters
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.eds_cluster_config.as_ref())
            .map(|e| e.service_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| name.to_string());
        endpoints.get(&service).cloned().unwrap_or_default()
    };
    Ok(ferry_proxy::admin::explain_config(
        &snapshot,
        &by_cluster,
        query,
    )?)
}

fn endpoint_json(e: &ferry_model::Endpoint) -> Value {
    json!({
        "address": e.address.to_string(),
        "health_flags": match e.health {
            EndpointHealth::Healthy => "healthy",
            EndpointHealth::Degraded => "/degraded_eds_health",
            EndpointHealth::Unhealthy => "/failed_eds_health",
        },
        "weight": e.weight,
        "priority": e.priority,
    })
}
