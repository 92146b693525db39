//! Locality-aware load balancing as istiod writes it into each proxy's
//! endpoints: endpoints grouped by locality (`region/zone/subzone`), then
//! DestinationRule `localityLbSetting` applied relative to the proxy's own
//! locality. `distribute` sets each locality's weight (a `to` share split
//! among the localities it covers by their endpoint counts; localities no
//! `to` names get nothing). Failover, which Istio turns on only with
//! outlier detection, sets priorities: same subzone 0, same zone, same
//! region, then the `failover` targets in order, then everything else,
//! numbered without gaps; with `failoverPriority` instead, by how many of
//! its labels (in order) an endpoint shares with the proxy.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints;
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::istio::types::networking::{LocalityLbSetting, TrafficPolicy};

/// `region/zone/subzone` as Envoy's locality (`None` when unknown).
pub fn parse(locality: &str) -> Option<Locality> {
    if locality.is_empty() {
        return None;
    }
    let mut parts = locality.split('/');
    Some(Locality {
        region: parts.next().unwrap_or_default().to_string(),
        zone: parts.next().unwrap_or_default().to_string(),
        sub_zone: parts.next().unwrap_or_default().to_string(),
    })
}

/// Whether `pattern` (`region/zone/subzone`, each part `*` or left out
/// for any) covers `locality`.
pub fn matches(pattern: &str, locality: &str) -> bool {
    let mut have = locality.split('/');
    for want in pattern.split('/') {
        if want == "*" {
            return true;
        }
        if have.next().unwrap_or("") != want {
            return false;
        }
    }
    true
}

/// The locality setting that applies: the rule's, unless it is disabled.
pub fn setting(policy: &TrafficPolicy) -> Option<&LocalityLbSetting> {
    policy
        .load_balancer
        .as_ref()?
        .locality_lb_setting
        .as_ref()
        .filter(|s| s.enabled != Some(false))
}

/// Whether `distribute` applies to a proxy in `proxy_locality` (the
/// cluster then needs locality-weighted balancing).
pub fn distributes(policy: &TrafficPolicy, proxy_locality: &str) -> bool {
    !proxy_locality.is_empty()
        && setting(policy).is_some_and(|s| {
            s.distribute
                .iter()
                .any(|d| matches(&d.from, proxy_locality))
        })
}

/// Applies `policy`'s locality setting to `groups` for a proxy in
/// `proxy_locality`.
pub fn apply(policy: &TrafficPolicy, proxy_locality: &str, groups: &mut Vec<LocalityLbEndpoints>) {
    let Some(s) = setting(policy) else { return };
    if !s.failover_priority.is_empty() {
        // Priorities were set from the labels the endpoints share with the
        // proxy (only with outlier detection, as Istio); number them
        // without gaps.
        let mut distinct: Vec<u32> = groups.iter().map(|g| g.priority).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for g in groups.iter_mut() {
            g.priority = distinct.iter().position(|d| *d == g.priority).unwrap_or(0) as u32;
        }
        groups.sort_by_key(|g| g.priority);
        return;
    }
    if proxy_locality.is_empty() {
        return;
    }
    let name = |g: &LocalityLbEndpoints| {
        g.locality
            .as_ref()
            .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
            .unwrap_or_default()
    };
    if let Some(d) = s
        .distribute
        .iter()
        .find(|d| matches(&d.from, proxy_locality))
    {
        // Endpoints each `to` pattern covers, to split its share.
        let covered: BTreeMap<&str, usize> =
            d.to.keys()
                .map(|pattern| {
                    let n = groups
                        .iter()
                        .filter(|g| matches(pattern, &name(g)))
                        .map(|g| g.lb_endpoints.len())
                        .sum();
                    (pattern.as_str(), n)
                })
                .collect();
        for g in groups.iter_mut() {
            let here = name(g);
            let weight: u32 =
                d.to.iter()
                    .filter(|(pattern, _)| matches(pattern, &here))
                    .map(|(pattern, w)| {
                        let total = covered.get(pattern.as_str()).copied().unwrap_or(0).max(1);
                        (*w as usize * g.lb_endpoints.len()).div_ceil(total) as u32
                    })
                    .sum();
            g.load_balancing_weight = Some(UInt32Value { value: weight });
        }
        groups.retain(|g| g.load_balancing_weight.is_some_and(|w| w.value > 0));
        return;
    }
    if policy.outlier_detection.is_none() {
        // Istio fails over only where it can tell a locality is unhealthy.
        return;
    }
    let me = parse(proxy_locality).unwrap_or_default();
    let failover: Vec<&str> = s
        .failover
        .iter()
        .filter(|f| f.from == me.region)
        .map(|f| f.to.as_str())
        .collect();
    let rank = |l: &Locality| -> u32 {
        if l.region == me.region {
            if l.zone == me.zone {
                if l.sub_zone == me.sub_zone { 0 } else { 1 }
            } else {
                2
            }
        } else if let Some(i) = failover.iter().position(|r| *r == l.region) {
            3 + i as u32
        } else {
            3 + failover.len() as u32
        }
    };
    let ranks: Vec<u32> = groups
        .iter()
        .map(|g| rank(&g.locality.clone().unwrap_or_default()))
        .collect();
    let mut distinct = ranks.clone();
    distinct.sort_unstable();
    distinct.dedup();
    for (g, r) in groups.iter_mut().zip(ranks) {
        g.priority = distinct.iter().position(|d| *d == r).unwrap_or(0) as u32;
    }
    groups.sort_by_key(|g| g.priority);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_patterns() {
        assert!(matches("us-west/*", "us-west/zone1/a"));
        assert!(matches("us-west/zone1/*", "us-west/zone1/a"));
        assert!(matches("us-west", "us-west/zone2"));
        assert!(!matches("us-west/zone1/*", "us-west/zone2/a"));
        assert!(!matches("us-east/*", "us-west/zone1"));
        assert!(matches("*", "anything/at/all"));
    }
}
