//! The node identity sent to the management server, as istio-agent builds
//! it: `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` and
//! metadata from `ISTIO_META_*` variables, so istiod recognises the proxy.
//! The bootstrap's `node` is the base; flags and the environment fill in or
//! override it.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

/// Settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct NodeOverrides {
    pub id: Option<String>,
    pub cluster: Option<String>,
    /// `KEY=VALUE` pairs added to the metadata.
    pub metadata: Vec<(String, String)>,
    /// `sidecar` or `router` (gateways), the first field of an Istio node id.
    pub proxy_type: String,
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// Builds the node: bootstrap values, then the environment (`POD_NAME`,
/// `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`, `ISTIO_META_*`), then
/// the flags.
pub fn build(base: Option<&Node>, overrides: &NodeOverrides, env: &[(String, String)]) -> Node {
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let mut node = base.cloned().unwrap_or_default();
    let mut meta = node.metadata.take().unwrap_or_default();
    let namespace = get("POD_NAMESPACE");
    if let Some(ns) = &namespace {
        meta.fields
            .entry("NAMESPACE".into())
            .or_insert_with(|| string(ns));
    }
    for (var, key) in [
        ("POD_NAME", "NAME"),
        ("INSTANCE_IP", "INSTANCE_IPS"),
        ("SERVICE_ACCOUNT", "SERVICE_ACCOUNT"),
    ] {
        if let Some(v) = get(var) {
            meta.fields.entry(key.into()).or_insert_with(|| string(&v));
        }
    }
    for (k, v) in env {
        if let Some(key) = k.strip_prefix("ISTIO_META_")
            && !key.is_empty()
        {
            meta.fields.insert(key.to_string(), string(v));
        }
    }
    for (k, v) in &overrides.metadata {
        meta.fields.insert(k.clone(), string(v));
    }
    if node.id.is_empty()
        && let (Some(pod), Some(ns)) = (get("POD_NAME"), namespace.clone())
    {
        let ip = get("INSTANCE_IP").unwrap_or_else(|| "127.0.0.1".into());
        let ty = if overrides.proxy_type.is_empty() {
            "sidecar"
        } else {
            &overrides.proxy_type
        };
        node.id = format!("{ty}~{ip}~{pod}.{ns}~{ns}.svc.cluster.local");
    }
    if let Some(id) = &overrides.id {
        node.id = id.clone();
    }
    if let Some(c) = &overrides.cluster {
        node.cluster = c.clone();
    }
    if node.cluster.is_empty()
        && let (Some(pod), Some(ns)) = (get("POD_NAME"), namespace)
    {
        node.cluster = format!("{pod}.{ns}");
    }
    if node.user_agent_name.is_empty() {
        node.user_agent_name = "ferry".into();
    }
    node.metadata = (!meta.fields.is_empty()).then_some(Struct {
        fields: meta.fields,
    });
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn meta(n: &Node, k: &str) -> Option<String> {
        match n.metadata.as_ref()?.fields.get(k)?.kind.as_ref()? {
            Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn istio_agent_style_identity() {
        let n = build(
            None,
            &NodeOverrides::default(),
            &env(&[
                ("POD_NAME", "reviews-v1-abc"),
                ("POD_NAMESPACE", "default"),
                ("INSTANCE_IP", "10.1.2.3"),
                ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
                ("ISTIO_META_LABELS", r#"{"app":"reviews","version":"v1"}"#),
                ("HOME", "/root"),
            ]),
        );
        assert_eq!(
            n.id,
            "sidecar~10.1.2.3~reviews-v1-abc.default~default.svc.cluster.local"
        );
        assert_eq!(n.cluster, "reviews-v1-abc.default");
        assert_eq!(meta(&n, "NAMESPACE").as_deref(), Some("default"));
        assert_eq!(meta(&n, "CLUSTER_ID").as_deref(), Some("Kubernetes"));
        assert!(meta(&n, "LABELS").is_some_and(|l| l.contains("reviews")));
        assert_eq!(meta(&n, "HOME"), None);
    }

    #[test]
    fn flags_win_over_bootstrap_and_environment() {
        let base = Node {
            id: "from-bootstrap".into(),
            cluster: "c".into(),
            ..Default::default()
        };
        let o = NodeOverrides {
            id: Some("router~1.1.1.1~gw.istio-system~istio-system.svc.cluster.local".into()),
            metadata: vec![("ISTIO_VERSION".into(), "1.18.2".into())],
            ..Default::default()
        };
        let n = build(
            Some(&base),
            &o,
            &env(&[("POD_NAME", "x"), ("POD_NAMESPACE", "y")]),
        );
        assert!(n.id.starts_with("router~"));
        assert_eq!(n.cluster, "c");
        assert_eq!(meta(&n, "ISTIO_VERSION").as_deref(), Some("1.18.2"));
        let n = build(Some(&base), &NodeOverrides::default(), &[]);
        assert_eq!(n.id, "from-bootstrap");
    }
}
