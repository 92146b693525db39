//! The outbound clusters and ClusterLoadAssignments of a proxy, translated
//! once per proxy class and shared. With thousands of services they are
//! most of what a proxy is sent, and most proxies get the same ones: what
//! makes two proxies' outbound clusters differ is a short list of inputs,
//! which [`OutboundClass`] holds exactly (the namespace, the Sidecar that
//! applies, the DestinationRules whose `workloadSelector` selects the
//! proxy, its locality and `failoverPriority` labels when some rule
//! balances by locality, and the node flags cluster translation reads).
//! The memo lives in its [`super::Mesh`], so any change of the
//! configuration (a new mesh) starts it afresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

use super::registry::selects;
use super::{NodeType, Scope};
use crate::istio::source::{Resource, Spec};
use crate::istio::types::networking::{DestinationRule, LoadBalancerSettings, TrafficPolicy};

/// The outbound clusters (`outbound|PORT|SUBSET|HOST`) of the services a
/// proxy imports, and the assignments of those discovered by EDS, each
/// sorted by name.
#[derive(Debug, Default, PartialEq)]
pub struct Outbound {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
}

/// Everything of a proxy that outbound cluster and endpoint translation
/// reads: proxies of one class get the same [`Outbound`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OutboundClass {
    node_type: NodeType,
    /// `exportTo` of services and rules, Sidecar `.` imports, the rule
    /// precedence (the proxy's namespace first).
    namespace: String,
    /// The Sidecar that scopes the proxy (its position in the mesh).
    sidecar: Option<usize>,
    /// The DestinationRules with a `workloadSelector` that select the
    /// proxy (their positions in the mesh).
    selected_rules: Vec<usize>,
    /// The proxy's locality, when some rule balances by locality (else
    /// empty: nothing reads it).
    locality: String,
    /// The proxy's value of every label some rule's `failoverPriority`
    /// names (its locality standing for the topology labels).
    failover_labels: Vec<Option<String>>,
    /// ALPN and the metadata exchange filter of Istio mTLS clusters.
    istio_network_stats: bool,
    /// Whether HBONE endpoints are tunnelled.
    disable_hbone_send: bool,
}

/// What of the mesh cuts proxies into classes, found once per mesh.
#[derive(Debug, Default)]
struct Inputs {
    /// Some rule sets `localityLbSetting` (the proxy's locality matters).
    locality_lb: bool,
    /// Every label a `failoverPriority` names, sorted.
    failover_labels: Vec<String>,
}

/// The outbound translations of one mesh, by proxy class. Held weakly:
/// a translation lives as long as somebody uses it (ferry-pilot keeps the
/// encoding, not the messages), and is made again when asked for after.
#[derive(Debug, Default)]
pub(super) struct Memo {
    inputs: Inputs,
    table: Mutex<HashMap<OutboundClass, Weak<Outbound>>>,
}

impl Memo {
    pub(super) fn new(destination_rules: &[Resource]) -> Self {
        let mut inputs = Inputs::default();
        for r in destination_rules {
            let Spec::DestinationRule(dr) = &r.spec else {
                continue;
            };
            for lb in load_balancers(dr) {
                if let Some(s) = &lb.locality_lb_setting {
                    inputs.locality_lb = true;
                    inputs
                        .failover_labels
                        .extend(s.failover_priority.iter().cloned());
                }
            }
        }
        inputs.failover_labels.sort();
        inputs.failover_labels.dedup();
        Self {
            inputs,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The class of the proxy `scope` is made for.
    pub(super) fn class(&self, scope: &Scope<'_>) -> OutboundClass {
        let proxy = scope.proxy;
        let mesh = scope.mesh;
        let sidecar = scope
            .sidecar
            .and_then(|(found, _)| mesh.sidecars.iter().position(|r| std::ptr::eq(r, found)));
        let selected_rules = mesh
            .destination_rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match &r.spec {
                Spec::DestinationRule(dr)
                    if r.meta.namespace == proxy.namespace
                        && dr
                            .workload_selector
                            .as_ref()
                            .is_some_and(|sel| selects(&sel.match_labels, &proxy.labels)) =>
                {
                    Some(i)
                }
                _ => None,
            })
            .collect();
        let failover_labels = if self.inputs.failover_labels.is_empty() {
            Vec::new()
        } else {
            let labels = with_topology(&proxy.labels, &proxy.locality);
            self.inputs
                .failover_labels
                .iter()
                .map(|k| labels.get(k).cloned())
                .collect()
        };
        OutboundClass {
            node_type: proxy.node_type,
            namespace: proxy.namespace.clone(),
            sidecar,
            selected_rules,
            locality: if self.inputs.locality_lb {
                proxy.locality.clone()
            } else {
                String::new()
            },
            failover_labels,
            istio_network_stats: proxy.istio_network_stats,
            disable_hbone_send: proxy.disable_hbone_send,
        }
    }

    /// The outbound part of `scope`'s proxy: its class's, translated by the
    /// first proxy of the class to ask.
    pub(super) fn get(&self, scope: &Scope<'_>) -> Arc<Outbound> {
        let class = self.class(scope);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = table.get(&class).and_then(Weak::upgrade) {
            return held;
        }
        let made = Arc::new(super::cluster::outbound_all(scope));
        table.insert(class, Arc::downgrade(&made));
        made
    }

    /// How many classes have been translated (for tests and diagnostics;
    /// a class made again counts once).
    pub(super) fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Every load balancer setting of a rule: its policy's, its port-level
/// ones, and its subsets'.
fn load_balancers(dr: &DestinationRule) -> impl Iterator<Item = &LoadBalancerSettings> {
    fn of(tp: &TrafficPolicy) -> impl Iterator<Item = &LoadBalancerSettings> {
        tp.load_balancer.iter().chain(
            tp.port_level_settings
                .iter()
                .filter_map(|p| p.load_balancer.as_ref()),
        )
    }
    dr.traffic_policy.iter().flat_map(of).chain(
        dr.subsets
            .iter()
            .filter_map(|s| s.traffic_policy.as_ref())
            .flat_map(of),
    )
}

/// A proxy's or an endpoint's labels with its locality as the topology
/// labels it does not set, as istiod counts them for `failoverPriority`.
pub(super) fn with_topology(
    labels: &BTreeMap<String, String>,
    locality: &str,
) -> BTreeMap<String, String> {
    let mut out = labels.clone();
    let parts = locality.split('/');
    for (key, value) in [
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "topology.istio.io/subzone",
    ]
    .into_iter()
    .zip(parts)
    {
        if !value.is_empty() {
            out.entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
    }
    out
}
