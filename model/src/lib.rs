//! `ferry-model`: the immutable configuration snapshot the data plane runs on.
//!
//! A [`Snapshot`] holds listeners (with their filter chains), route tables with
//! compiled matchers, and clusters. It is built once per configuration change by
//! `ferry-xds` (from a static bootstrap or xDS) and then only read, concurrently,
//! by every connection. No I/O and no async runtime live here.

pub mod access_log;
pub mod chain_matcher;
pub mod cidr;
pub mod cluster;
pub mod compressor;
pub mod cors;
pub mod explain;
pub mod ext_authz;
pub mod fault;
pub mod filter_state;
pub mod format;
pub mod forwarded;
pub mod health_check;
pub mod http_protocol;
pub mod jwt;
pub mod listener;
pub mod ratelimit;
pub mod rbac;
pub mod route;
pub mod sharded;
pub mod stream_info;
pub mod tls;
pub mod tracing;

use std::collections::HashMap;
use std::sync::Arc;

pub use cidr::CidrRange;
pub use cluster::{Cluster, ClusterKind, Endpoint, LbPolicy, UpstreamProtocol};
pub use listener::{
    ChainKind, ChainStep, ConnectionInfo, FilterChain, FilterChainMatch, HttpCodec,
    HttpConnectionManager, HttpFilter, HttpFilterConfig, IstioStats, Listener, ListenerFilters,
    PortPredicate, Reporter, RouteSource, SourceType, TcpProxy,
};
pub use listener::{EscapedSlashesAction, PathNormalization};
pub use route::{
    AppendAction, ClusterSpecifier, DomainMatcher, FilterOverrides, HeaderKey, HeaderMatcher,
    HeaderMutations, HeaderOp, HeaderToAdd, HostRewrite, PathMatch, Pseudo, QueryMatch,
    QueryParameterMatcher, RegexRewrite, Route, RouteAction, RouteConfig, RouteCors, RouteMatch,
    StringMatcher, TlsRequirement, VirtualHost, WeightedCluster, WeightedClusters,
};
pub use route::{
    AttemptCount, Fraction, GrpcTimeout, GrpcTimeouts, MirrorPolicy, RetryOn, RetryPolicy,
};
pub use sharded::ShardedMap;

/// One consistent, validated configuration.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// A label for this configuration (the bootstrap file name or the xDS versions).
    pub version: String,
    pub listeners: Vec<Arc<Listener>>,
    /// Clusters by name, in shards successive snapshots share.
    pub clusters: ShardedMap<Arc<Cluster>>,
    /// Route configurations delivered by RDS, by name.
    pub routes: HashMap<String, Arc<RouteConfig>>,
    /// TLS secrets by name: the bootstrap's static ones and those delivered
    /// by SDS. A new version of a secret is a new `Arc`, which is how the
    /// data path notices a rotation.
    pub secrets: HashMap<String, Arc<tls::Secret>>,
    /// This snapshot's number among those the process assembled (0: not
    /// numbered, e.g. a bootstrap's).
    pub serial: u64,
    /// The clusters in which this snapshot differs from the one numbered
    /// `after`, when it was assembled from that one: the runtime then
    /// rebuilds only those. `None`: compare every cluster.
    pub cluster_changes: Option<ClusterChanges>,
}

/// Which clusters of a snapshot differ from its predecessor's (added,
/// changed or removed); every other cluster is the same `Arc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterChanges {
    /// The [`Snapshot::serial`] of the predecessor.
    pub after: u64,
    pub names: Vec<String>,
}

impl Snapshot {
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// The route table of a connection manager: inline, or by RDS name.
    pub fn route_config<'a>(&'a self, source: &'a RouteSource) -> Option<&'a Arc<RouteConfig>> {
        match source {
            RouteSource::Inline(rc) => Some(rc),
            RouteSource::Rds(name) => self.routes.get(name),
        }
    }

    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The listener an original-destination listener hands a connection to, as
    /// Envoy does for `use_original_dst`: the listener whose address equals the
    /// original destination, or failing that a wildcard listener on its port.
    pub fn listener_for_original_dst(&self, dst: std::net::SocketAddr) -> Option<&Arc<Listener>> {
        let exact = self
            .listeners
            .iter()
            .filter(|l| !l.internal)
            .find(|l| l.addresses().any(|a| a == dst));
        exact.or_else(|| {
            self.listeners.iter().filter(|l| !l.internal).find(|l| {
                l.addresses().any(|a| {
                    a.port() == dst.port()
                        && a.ip().is_unspecified()
                        && a.is_ipv4() == dst.is_ipv4()
                })
            })
        })
    }

    /// Checks the references between resources: every cluster a listener's
    /// route or TCP proxy names must exist.
    pub fn validate(&self) -> Result<(), ModelError> {
        for l in &self.listeners {
            for chain in l.filter_chains.iter().chain(l.default_chain.iter()) {
                let mut clusters = chain.kind.referenced_clusters();
                if let ChainKind::Http(h) = &chain.kind
                    && let RouteSource::Rds(name) = &h.routes
                    && let Some(rc) = self.routes.get(name)
                {
                    clusters.extend(rc.referenced_clusters());
                }
                for cluster in clusters {
                    if !self.clusters.contains_key(cluster) {
                        return Err(ModelError::new(
                            format!("listener {:?} filter chain {:?}", l.name, chain.name),
                            format!("references unknown cluster {cluster:?}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A configuration error naming the resource and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct ModelError {
    pub resource: String,
    pub message: String,
}

impl ModelError {
    pub fn new(resource: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            resource: resource.into(),
            message: message.into(),
        }
    }
}
