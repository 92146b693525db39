//! The Envoy v3 aggregated discovery service: the resource [`Cache`] (what is
//! served), the ADS [`Server`] (how it is served: state-of-the-world and delta
//! streams with Envoy's nonce and ACK/NACK rules), the per-stream
//! [`ProxyStatus`] bookkeeping and its JSON endpoint.

mod cache;
mod delta;
mod grpc_stream;
pub mod http;
mod intern;
mod server;
mod sotw;
mod status;

pub use cache::{Cache, CachedResource, TypeSnapshot, resource_version, to_any};
pub use intern::Interner;
pub use server::{AdsService, CacheResolver, Server, ServerTls};
pub use status::{Nack, Protocol, ProxyStatus, SyncState, TypeStatus};

use std::time::Duration;

/// Type URL of `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.config.route.v3.RouteConfiguration` (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Whether an empty subscription to `type_url` means "everything" (Envoy's
/// legacy wildcard, which Listener and Cluster have, and Istio's NDS, which
/// the agent asks for without names).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == LISTENER
        || type_url == CLUSTER
        || type_url == ferry_envoy_json::istio_nds::NAME_TABLE_TYPE
}

/// The order in which a change to several types at once is pushed on one
/// stream: make before break (clusters, their endpoints, listeners, their
/// routes), then anything else.
pub(crate) fn push_rank(type_url: &str) -> u8 {
    match type_url {
        CLUSTER => 0,
        ENDPOINT => 1,
        LISTENER => 2,
        ROUTE => 3,
        SECRET => 4,
        _ => 5,
    }
}

/// Errors of the ADS server and its test hooks.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("timed out after {timeout:?} waiting for {what}; streams: {streams}")]
    Timeout {
        what: String,
        timeout: Duration,
        /// The status of the streams of the node waited for, as JSON.
        streams: String,
    },
    #[error("cannot read the address of the listening socket: {0}")]
    LocalAddr(std::io::Error),
    #[error("ADS server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("status endpoint: {0}")]
    Status(std::io::Error),
}
