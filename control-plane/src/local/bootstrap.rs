//! The Envoy v3 bootstrap of a proxy in the local mesh, as istio-agent writes it for a pod:
//! the node (`sidecar~IP~POD.NS~NS.svc.cluster.local`, or `router~…` for a gateway) with the
//! metadata istiod reads (namespace, labels, service account, addresses), the admin port on
//! loopback, and ADS plus SDS from the control plane's 15010. The same text drives Ferry
//! and Envoy.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Who a proxy is.
#[derive(Clone, Debug)]
pub struct Node<'a> {
    /// `sidecar` or `router` (a gateway).
    pub kind: &'a str,
    pub pod: &'a str,
    /// The workload the pod belongs to (its Deployment), as Istio's metrics name it.
    pub workload: &'a str,
    pub namespace: &'a str,
    pub ip: Ipv4Addr,
    pub labels: &'a BTreeMap<String, String>,
    pub service_account: &'a str,
}

impl Node<'_> {
    /// Envoy's `service-cluster`: `app.namespace` (or the pod's name without an `app` label).
    pub fn cluster(&self) -> String {
        let app = self.labels.get("app").map_or(self.pod, String::as_str);
        format!("{app}.{}", self.namespace)
    }
}

/// The bootstrap of `node`, fed by the control plane at `pilot`.
pub fn bootstrap(node: &Node<'_>, pilot: Ipv4Addr) -> String {
    let labels: Vec<String> = node
        .labels
        .iter()
        .map(|(k, v)| format!("{}: {}", yaml_str(k), yaml_str(v)))
        .collect();
    bootstrap_for(
        &format!(
            "{}~{}~{}.{ns}~{ns}.svc.cluster.local",
            node.kind,
            node.ip,
            node.pod,
            ns = node.namespace
        ),
        &node.cluster(),
        &format!(
            "NAMESPACE: {}, WORKLOAD_NAME: {}, LABELS: {{{}}}, SERVICE_ACCOUNT: {}, INSTANCE_IPS: \"{}\"",
            yaml_str(node.namespace),
            yaml_str(node.workload),
            labels.join(", "),
            yaml_str(node.service_account),
            node.ip
        ),
        pilot,
    )
}

/// A bootstrap with this node (`metadata` is the inside of a YAML flow map), ADS and SDS from
/// the control plane at `pilot`.
pub fn bootstrap_for(node_id: &str, cluster: &str, metadata: &str, pilot: Ipv4Addr) -> String {
    let grpc_cluster = |cluster: &str| {
        format!(
            "  - name: {cluster}\n    type: STATIC\n    connect_timeout: 1s\n\
             \x20   typed_extension_protocol_options:\n\
             \x20     envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n\
             \x20       \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n\
             \x20       explicit_http_config: {{http2_protocol_options: {{}}}}\n\
             \x20   load_assignment:\n      cluster_name: {cluster}\n\
             \x20     endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {pilot}, port_value: 15010}}}}}}}}]}}]\n"
        )
    };
    format!(
        "node:\n  id: {node_id}\n  cluster: {cluster}\n  metadata: {{{metadata}}}\n\
         admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}\n\
         dynamic_resources:\n\
         \x20 ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}\n\
         \x20 lds_config: {{ads: {{}}, resource_api_version: V3}}\n\
         \x20 cds_config: {{ads: {{}}, resource_api_version: V3}}\n\
         {INTERNAL_LISTENER}\
         static_resources:\n  clusters:\n{}{}",
        grpc_cluster("xds-grpc"),
        grpc_cluster("sds-grpc"),
    )
}

/// istio-agent's bootstrap always loads Envoy's internal listener
/// extension (tools/packaging/common/envoy_bootstrap.json): an ambient mesh
/// sends internal listeners (`connect_originate`, `main_internal`), which
/// Envoy refuses without it.
const INTERNAL_LISTENER: &str = "bootstrap_extensions:\n\
     - name: envoy.bootstrap.internal_listener\n\
     \x20 typed_config:\n\
     \x20   \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n\
     \x20   type_url: type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener\n\
     \x20   value: {buffer_size_kb: 64}\n";

/// A YAML scalar that stays a string (label values such as `v1` or `true`).
fn yaml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_node_as_the_agent_names_it() {
        let labels = BTreeMap::from([
            ("app".to_string(), "reviews".to_string()),
            ("version".to_string(), "v2".to_string()),
        ]);
        let node = Node {
            kind: "sidecar",
            pod: "reviews-v2-0",
            workload: "reviews-v2",
            namespace: "default",
            ip: Ipv4Addr::new(10, 77, 1, 5),
            labels: &labels,
            service_account: "bookinfo-reviews",
        };
        let text = bootstrap(&node, Ipv4Addr::new(10, 77, 1, 2));
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
        assert_eq!(
            doc["node"]["id"].as_str(),
            Some("sidecar~10.77.1.5~reviews-v2-0.default~default.svc.cluster.local")
        );
        assert_eq!(doc["node"]["cluster"].as_str(), Some("reviews.default"));
        assert_eq!(
            doc["node"]["metadata"]["LABELS"]["version"].as_str(),
            Some("v2")
        );
        assert_eq!(
            doc["node"]["metadata"]["WORKLOAD_NAME"].as_str(),
            Some("reviews-v2")
        );
        assert_eq!(
            doc["node"]["metadata"]["SERVICE_ACCOUNT"].as_str(),
            Some("bookinfo-reviews")
        );
        assert!(text.contains("address: 10.77.1.2, port_value: 15010"));
        let ext = &doc["bootstrap_extensions"][0];
        assert_eq!(
            ext["name"].as_str(),
            Some("envoy.bootstrap.internal_listener")
        );
        assert_eq!(
            ext["typed_config"]["type_url"].as_str(),
            Some(
                "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
            )
        );
        assert_eq!(
            ext["typed_config"]["value"]["buffer_size_kb"].as_u64(),
            Some(64)
        );
    }
}
