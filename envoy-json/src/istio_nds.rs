//! Istio's name table (`istio.networking.nds.v1.NameTable`), which istiod
//! sends to the agent's DNS proxy as the NDS resource type over ADS: each
//! host of the services a proxy sees, with its addresses, the registry it
//! comes from and, for Kubernetes services, the short name and namespace
//! the proxy expands into the other names a pod may ask for.

use std::collections::HashMap;

/// The type URL of the NDS resource.
pub const NAME_TABLE_TYPE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

#[derive(Clone, PartialEq, prost::Message)]
pub struct NameTable {
    /// Host name → what resolves it.
    #[prost(map = "string, message", tag = "1")]
    pub table: HashMap<String, NameInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NameInfo {
    #[prost(string, repeated, tag = "1")]
    pub ips: Vec<String>,
    /// `Kubernetes` for Services (their short names are answered too).
    #[prost(string, tag = "2")]
    pub registry: String,
    #[prost(string, tag = "3")]
    pub shortname: String,
    #[prost(string, tag = "4")]
    pub namespace: String,
    /// Deprecated in Istio; still read.
    #[prost(string, repeated, tag = "5")]
    pub alt_hosts: Vec<String>,
}
