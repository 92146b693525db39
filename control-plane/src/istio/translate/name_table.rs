//! The DNS name table a sidecar's agent answers from (istiod's NDS,
//! `BuildNameTable`): every service the proxy's Sidecar scope imports, by
//! host, with its virtual IP; a headless Kubernetes service with the
//! addresses of its endpoints instead. Kubernetes services carry their
//! short name and namespace so the agent also answers `name`,
//! `name.namespace` and `name.namespace.svc`. A ServiceEntry host without
//! an address is left out (istiod does the same unless it allocates
//! addresses itself), as is anything whose addresses are not IPs.

use envoy_types::pb::google::protobuf::Any;
use ferry_envoy_json::istio_nds::{NAME_TABLE_TYPE, NameInfo, NameTable};
use prost::Message;

use super::Scope;
use super::registry::ServiceKind;

const KUBERNETES: &str = "Kubernetes";
const EXTERNAL: &str = "External";

pub(crate) fn build(scope: &Scope<'_>) -> NameTable {
    let mut out = NameTable::default();
    for svc in &scope.services {
        let ips: Vec<String> = match (&svc.kind, &svc.vip) {
            (ServiceKind::Kube { headless: true }, _) => {
                let mut ips: Vec<String> = svc
                    .endpoints
                    .iter()
                    .map(|e| e.address.clone())
                    .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                    .collect();
                ips.dedup();
                ips
            }
            (_, Some(vip)) if vip.parse::<std::net::IpAddr>().is_ok() => vec![vip.clone()],
            _ => Vec::new(),
        };
        if ips.is_empty() {
            continue;
        }
        let kube = matches!(svc.kind, ServiceKind::Kube { .. });
        match out.table.get_mut(&svc.host) {
            None => {
                out.table.insert(
                    svc.host.clone(),
                    NameInfo {
                        ips,
                        registry: if kube { KUBERNETES } else { EXTERNAL }.into(),
                        shortname: if kube {
                            svc.name.clone()
                        } else {
                            String::new()
                        },
                        namespace: if kube {
                            svc.namespace.clone()
                        } else {
                            String::new()
                        },
                        alt_hosts: Vec::new(),
                    },
                );
            }
            // A Kubernetes service wins over ServiceEntries of its host;
            // ServiceEntries of one host add up.
            Some(ni) if ni.registry != KUBERNETES => {
                if kube {
                    ni.ips = ips;
                    ni.registry = KUBERNETES.into();
                    ni.shortname = svc.name.clone();
                    ni.namespace = svc.namespace.clone();
                } else {
                    ni.ips.extend(ips);
                }
            }
            Some(_) => {}
        }
    }
    out
}

/// The table as the one NDS resource.
pub fn to_any(table: &NameTable) -> Any {
    Any {
        type_url: NAME_TABLE_TYPE.to_string(),
        value: table.encode_to_vec(),
    }
}
