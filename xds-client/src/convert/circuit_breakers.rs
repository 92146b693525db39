//! `envoy.config.cluster.v3.CircuitBreakers`: thresholds per routing
//! priority, retry budgets, and the per-host connection limit.

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::google::protobuf::UInt32Value;
use ferry_model as m;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx};

fields!(pub(super) static CIRCUIT_BREAKERS = "envoy.config.cluster.v3.CircuitBreakers" {
    "thresholds": applied,
    "per_host_thresholds": applied "max_connections per endpoint (its other fields are ignored, as Envoy ignores them)",
});

fields!(pub(super) static THRESHOLDS = "envoy.config.cluster.v3.CircuitBreakers.Thresholds" {
    "priority": applied "HIGH thresholds are kept, and used by no route (HIGH routes are refused)",
    "max_connections": applied,
    "max_pending_requests": applied,
    "max_requests": applied,
    "max_retries": applied,
    "retry_budget": applied,
    "track_remaining": applied "circuit_breakers.<priority>.remaining_cx, _pending, _rq and _retries gauges",
    "max_connection_pools": refused "a cap on connection pools is not supported",
});

fields!(pub(super) static RETRY_BUDGET = "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget" {
    "budget_percent": applied,
    "min_retry_concurrency": applied,
    "budget_interval": refused "interval-based retry budgets are not supported",
});

pub(super) fn circuit_breakers(
    ctx: &mut Ctx<'_>,
    field: &str,
    cb: Option<&cluster_pb::CircuitBreakers>,
) -> Result<m::cluster::CircuitBreakers, ConvertError> {
    let mut out = m::cluster::CircuitBreakers::default();
    let Some(cb) = cb else { return Ok(out) };
    let cluster_pb::CircuitBreakers {
        thresholds,
        per_host_thresholds,
    } = cb;
    for (i, t) in thresholds.iter().enumerate() {
        let th = threshold(ctx, &format!("{field}.thresholds[{i}]"), t)?;
        // RoutingPriority: DEFAULT = 0, HIGH = 1.
        if t.priority == 1 {
            out.high = th;
        } else {
            out.default = th;
        }
    }
    for t in per_host_thresholds {
        // Envoy applies only max_connections per host, of the DEFAULT priority.
        if t.priority == 0
            && let Some(v) = &t.max_connections
        {
            out.per_host_max_connections = Some(v.value);
        }
    }
    Ok(out)
}

fn threshold(
    ctx: &mut Ctx<'_>,
    field: &str,
    t: &cluster_pb::circuit_breakers::Thresholds,
) -> Result<m::cluster::Thresholds, ConvertError> {
    let cov = &THRESHOLDS;
    let cluster_pb::circuit_breakers::Thresholds {
        priority,
        max_connections,
        max_pending_requests,
        max_requests,
        max_retries,
        retry_budget,
        track_remaining,
        max_connection_pools,
    } = t;
    let _ = priority;
    ctx.refuse(
        cov,
        field,
        "max_connection_pools",
        max_connection_pools.is_some(),
    )?;
    let d = m::cluster::Thresholds::default();
    let u = |v: &Option<UInt32Value>, dflt: u32| v.as_ref().map_or(dflt, |v| v.value);
    let budget = match retry_budget {
        None => None,
        Some(b) => {
            let bf = path(field, "retry_budget");
            let cluster_pb::circuit_breakers::thresholds::RetryBudget {
                budget_percent,
                min_retry_concurrency,
                budget_interval,
            } = b;
            ctx.refuse(
                &RETRY_BUDGET,
                &bf,
                "budget_interval",
                budget_interval.is_some(),
            )?;
            let dflt = m::cluster::RetryBudget::default();
            let budget_ppm = match budget_percent {
                None => dflt.budget_ppm,
                Some(p) if (0.0..=100.0).contains(&p.value) => (p.value * 10_000.0).round() as u32,
                Some(p) => {
                    return Err(ctx.err(
                        path(&bf, "budget_percent"),
                        format!("{} is not a percentage (0 to 100)", p.value),
                    ));
                }
            };
            Some(m::cluster::RetryBudget {
                budget_ppm,
                min_retry_concurrency: u(min_retry_concurrency, dflt.min_retry_concurrency),
            })
        }
    };
    Ok(m::cluster::Thresholds {
        max_connections: u(max_connections, d.max_connections),
        max_pending_requests: u(max_pending_requests, d.max_pending_requests),
        max_requests: u(max_requests, d.max_requests),
        max_retries: u(max_retries, d.max_retries),
        retry_budget: budget,
        track_remaining: *track_remaining,
    })
}
