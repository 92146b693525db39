//! `/clusters`: every cluster with its circuit breakers and, per endpoint,
//! the counters, health flags, weight, locality and priority Envoy reports
//! (`cluster::host::stat::value` lines, or `{"cluster_statuses": [...]}`
//! with `format=json`, which `istioctl proxy-config endpoints` reads).
//!
//! Ferry keeps no locality names (only their grouping): `region`, `zone`
//! and `sub_zone` read empty, and outlier detection's success rates `-1`
//! (not computed), as Envoy shows them before it computed any.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use ferry_model::ClusterKind;
use ferry_model::cluster::Thresholds;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::listeners::host_address;
use super::{Query, json, text};
use crate::cluster::{ClusterRt, EndpointPool};
use crate::lb::HostMeta;
use crate::run::Runtime;

/// The names of the clusters that came by CDS (`added_via_api`).
fn dynamic_names(rt: &Runtime) -> HashSet<String> {
    let Some(x) = &rt.xds else {
        return HashSet::new();
    };
    let store = x.store.lock().unwrap_or_else(|p| p.into_inner());
    store
        .of(ferry_xds::store::CLUSTER)
        .map(|(n, _)| n.clone())
        .collect()
}

/// A host's counters (in Envoy's order: counters, then gauges).
fn host_stats(p: &EndpointPool) -> [(&'static str, u64, bool); 9] {
    let s = p.host_stats();
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        ("cx_connect_fail", r(&s.cx_connect_fail), false),
        ("cx_total", r(&s.cx_total), false),
        ("rq_error", r(&s.rq_error), false),
        ("rq_success", r(&s.rq_success), false),
        ("rq_timeout", r(&s.rq_timeout), false),
        ("rq_total", r(&s.rq_total), false),
        ("cx_active", r(&s.cx_active), true),
        ("rq_active", p.active_requests(), true),
        ("rq_pending_active", 0, true),
    ]
}

/// Envoy's `health_flags`: `healthy`, or the reasons it is not.
/// In Envoy's order of its health flags.
pub(super) fn health_flags(p: &EndpointPool, m: &HostMeta) -> String {
    let mut flags = Vec::new();
    if p.health.failed() {
        flags.push("/failed_active_hc");
    }
    if p.ejected() {
        flags.push("/failed_outlier_check");
    }
    if m.unhealthy {
        flags.push("/failed_eds_health");
    }
    if p.health.degraded() {
        flags.push("/degraded_active_hc");
    }
    if m.degraded {
        flags.push("/degraded_eds_health");
    }
    if p.health.pending_removal() {
        flags.push("/pending_dynamic_removal");
    }
    if p.health.excluded() {
        flags.push("/excluded_via_immediate_hc_fail");
    }
    if p.health.timed_out() {
        flags.push("/active_hc_timeout");
    }
    if flags.is_empty() {
        "healthy".into()
    } else {
        flags.concat()
    }
}

fn sorted(rt: &Runtime) -> Vec<Arc<ClusterRt>> {
    let clusters = rt.clusters.load();
    let mut all: Vec<Arc<ClusterRt>> = clusters.iter().cloned().collect();
    all.sort_by(|a, b| a.name().cmp(b.name()));
    all
}

pub(super) fn respond(rt: &Runtime, q: &Query) -> Response<Full<Bytes>> {
    let filter = match q.get("filter").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match regex::Regex::new(f) {
            Ok(r) => Some(r),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("Invalid re2 regex: {e}")),
        },
    };
    let dynamic = dynamic_names(rt);
    let clusters: Vec<Arc<ClusterRt>> = sorted(rt)
        .into_iter()
        .filter(|c| filter.as_ref().is_none_or(|r| r.is_match(c.name())))
        .collect();
    if q.get("format") == Some("json") {
        let statuses: Vec<Value> = clusters
            .iter()
            .map(|c| cluster_json(c, dynamic.contains(c.name())))
            .collect();
        return json(&json!({ "cluster_statuses": statuses }));
    }
    let mut out = String::new();
    for c in &clusters {
        let n = c.name();
        out.push_str(&format!("{n}::observability_name::{n}\n"));
        if c.cfg.outlier_detection.is_some() {
            for k in [
                "success_rate_average",
                "success_rate_ejection_threshold",
                "local_origin_success_rate_average",
                "local_origin_success_rate_ejection_threshold",
            ] {
                out.push_str(&format!("{n}::outlier::{k}::-1\n"));
            }
        }
        for (prio, t) in [
            ("default_priority", &c.cfg.circuit_breakers.default),
            ("high_priority", &c.cfg.circuit_breakers.high),
        ] {
            for (k, v) in [
                ("max_connections", t.max_connections),
                ("max_pending_requests", t.max_pending_requests),
                ("max_requests", t.max_requests),
                ("max_retries", t.max_retries),
            ] {
                out.push_str(&format!("{n}::{prio}::{k}::{v}\n"));
            }
        }
        out.push_str(&format!("{n}::added_via_api::{}\n", dynamic.contains(n)));
        if let ClusterKind::Eds { service_name } = &c.cfg.kind
            && !service_name.is_empty()
        {
            out.push_str(&format!("{n}::eds_service_name::{service_name}\n"));
        }
        for (p, m) in c.endpoints() {
            let h = format!("{n}::{}", p.address);
            let mut stats = host_stats(&p);
            stats.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v, _) in stats {
                out.push_str(&format!("{h}::{k}::{v}\n"));
            }
            out.push_str(&format!(
                "{h}::hostname::{}\n",
                p.hostname().map_or("", |h| &**h)
            ));
            out.push_str(&format!("{h}::health_flags::{}\n", health_flags(&p, &m)));
            out.push_str(&format!("{h}::weight::{}\n", m.weight));
            out.push_str(&format!("{h}::region::\n{h}::zone::\n{h}::sub_zone::\n"));
            out.push_str(&format!("{h}::canary::false\n"));
            out.push_str(&format!("{h}::priority::{}\n", m.priority));
            out.push_str(&format!("{h}::success_rate::-1\n"));
            out.push_str(&format!("{h}::local_origin_success_rate::-1\n"));
        }
    }
    text(StatusCode::OK, out)
}

fn thresholds(t: &Thresholds, high: bool) -> Value {
    let mut v = json!({
        "max_connections": t.max_connections,
        "max_pending_requests": t.max_pending_requests,
        "max_requests": t.max_requests,
        "max_retries": t.max_retries,
    });
    if high {
        v["priority"] = json!("HIGH");
    }
    v
}

fn cluster_json(c: &ClusterRt, added_via_api: bool) -> Value {
    let hosts: Vec<Value> = c
        .endpoints()
        .iter()
        .map(|(p, m)| {
            // proto3 JSON: zero counters and the COUNTER type are omitted.
            let stats: Vec<Value> = host_stats(p)
                .iter()
                .map(|(name, v, gauge)| {
                    let mut s = json!({ "name": name });
                    if *v != 0 {
                        s["value"] = json!(v.to_string());
                    }
                    if *gauge {
                        s["type"] = json!("GAUGE");
                    }
                    s
                })
                .collect();
            let mut health = json!({
                "eds_health_status": if m.unhealthy {
                    "UNHEALTHY"
                } else if m.degraded {
                    "DEGRADED"
                } else {
                    "HEALTHY"
                }
            });
            if p.health.failed() {
                health["failed_active_health_check"] = json!(true);
            }
            if p.ejected() {
                health["failed_outlier_check"] = json!(true);
            }
            if p.health.degraded() {
                health["failed_active_degraded_check"] = json!(true);
            }
            if p.health.pending_removal() {
                health["pending_dynamic_removal"] = json!(true);
            }
            if p.health.excluded() {
                health["excluded_via_immediate_hc_fail"] = json!(true);
            }
            if p.health.timed_out() {
                health["active_hc_timeout"] = json!(true);
            }
            let mut h = json!({
                "address": host_address(&p.address),
                "stats": stats,
                "health_status": health,
                "weight": m.weight,
                "locality": {},
            });
            if let Some(name) = p.hostname() {
                h["hostname"] = json!(name.as_ref());
            }
            if m.priority != 0 {
                h["priority"] = json!(m.priority);
            }
            h
        })
        .collect();
    let mut v = json!({
        "name": c.name(),
        "host_statuses": hosts,
        "circuit_breakers": {"thresholds": [
            thresholds(&c.cfg.circuit_breakers.default, false),
            thresholds(&c.cfg.circuit_breakers.high, true),
        ]},
        "observability_name": c.name(),
    });
    if added_via_api {
        v["added_via_api"] = json!(true);
    }
    if let ClusterKind::Eds { service_name } = &c.cfg.kind
        && !service_name.is_empty()
    {
        v["eds_service_name"] = json!(service_name);
    }
    v
}
