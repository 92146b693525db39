//! The Kubernetes objects used for service discovery, reduced to the fields
//! the control plane reads: a `Service`'s ports and selector, a `Pod`'s
//! labels, IP and service account, `Endpoints` / `EndpointSlice` addresses, a
//! `Deployment`'s pod template. Unknown fields are accepted: these objects
//! carry far more than a mesh needs and Kubernetes validates them itself.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::IntOrString;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    /// No selector: endpoints come from `Endpoints` / `EndpointSlice` objects.
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` (headless) or an address; absent in most manifests, where the
    /// API server would allocate one.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub external_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u32,
    pub target_port: Option<IntOrString>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Pod {
    pub spec: PodSpec,
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    pub service_account_name: Option<String>,
    /// The deprecated spelling, still honoured by Kubernetes.
    pub service_account: Option<String>,
    pub containers: Vec<Container>,
}

impl PodSpec {
    /// The service account the pod runs as (`default` when none is named).
    pub fn service_account(&self) -> &str {
        self.service_account_name
            .as_deref()
            .or(self.service_account.as_deref())
            .unwrap_or("default")
    }

    /// Resolves a named container port (a `targetPort: http` of a Service).
    pub fn named_port(&self, name: &str) -> Option<u32> {
        self.containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Container {
    pub name: String,
    /// What the container runs: the local platform of `ferry-pilot demo`
    /// picks the app from the image and its arguments.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: u32,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Deployment {
    pub spec: DeploymentSpec,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DeploymentSpec {
    /// Kubernetes defaults an absent count to 1.
    pub replicas: Option<u32>,
    pub template: PodTemplate,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodTemplate {
    pub metadata: super::ObjectMeta,
    pub spec: PodSpec,
}

/// The legacy `Endpoints` object (one per Service, same name).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Endpoints {
    pub subsets: Vec<EndpointSubset>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSubset {
    pub addresses: Vec<EndpointAddress>,
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointAddress {
    pub ip: String,
    pub target_ref: Option<ObjectReference>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectReference {
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u32,
}

/// A `discovery.k8s.io/v1` EndpointSlice; its Service is named by the
/// `kubernetes.io/service-name` label.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSlice {
    pub address_type: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub target_ref: Option<ObjectReference>,
    pub conditions: SliceConditions,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct SliceConditions {
    /// Absent means ready, per the EndpointSlice API.
    pub ready: Option<bool>,
}

/// The label an EndpointSlice carries to name its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A `Secret`: the TLS credentials a gateway names by `credentialName`.
/// `data` values are base64, as the API serves them; `stringData` (written
/// by hand in manifests, merged by the API server) is plain text and wins.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Secret {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub data: BTreeMap<String, String>,
    pub string_data: BTreeMap<String, String>,
}

/// Key material never reaches a log: only the keys are shown.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("type", &self.type_)
            .field("keys", &self.keys())
            .finish()
    }
}

impl Secret {
    /// The value under `key` (decoded), `Ok(None)` when absent or empty.
    pub fn value(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        use base64::Engine;
        if let Some(v) = self.string_data.get(key) {
            return Ok((!v.is_empty()).then(|| v.clone().into_bytes()));
        }
        let Some(v) = self.data.get(key) else {
            return Ok(None);
        };
        // The API serves standard base64; manifests may wrap it.
        let compact: String = v.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| format!("data.{key} is not base64: {e}"))?;
        Ok((!bytes.is_empty()).then_some(bytes))
    }

    /// Every key it holds, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .data
            .keys()
            .chain(self.string_data.keys())
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}
