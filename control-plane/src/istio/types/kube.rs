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
