//! A cluster's load-balancing settings: `common_lb_config`, the policy's
//! own `*_lb_config` (least request, round robin, ring hash, maglev,
//! original destination) and Envoy's slow start.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use ferry_model as m;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, duration};

fields!(pub(super) static COMMON_LB_CONFIG = "envoy.config.cluster.v3.Cluster.CommonLbConfig" {
    "healthy_panic_threshold": applied "default 50 %; 0 disables panic mode",
    "zone_aware_lb_config": inert "zone-aware routing needs the bootstrap's local_cluster_name, which Ferry does not read",
    "locality_weighted_lb_config": applied,
    "update_merge_window": warned "endpoint updates apply at once",
    "ignore_new_hosts_until_first_hc": refused "excluding new hosts until their first health check is not supported",
    "close_connections_on_host_set_change": refused "closing connections on endpoint changes is not supported",
    "consistent_hashing_lb_config": applied "only the defaults (see ConsistentHashingLbConfig)",
    "override_host_status": refused "host overrides are not supported",
});

fields!(pub(super) static CONSISTENT_HASHING = "envoy.config.cluster.v3.Cluster.CommonLbConfig.ConsistentHashingLbConfig" {
    "use_hostname_for_hashing": refused "hashing on host names is not supported (addresses are hashed)",
    "hash_balance_factor": refused "bounded-load consistent hashing is not supported",
});

fields!(pub(super) static SLOW_START = "envoy.config.cluster.v3.Cluster.SlowStartConfig" {
    "slow_start_window": applied,
    "aggression": applied "its default_value (there is no runtime layer)",
    "min_weight_percent": applied "default 10 %",
});

fields!(pub(super) static LEAST_REQUEST = "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig" {
    "choice_count": applied,
    "active_request_bias": applied "its default_value (there is no runtime layer)",
    "slow_start_config": applied,
});

fields!(pub(super) static ROUND_ROBIN = "envoy.config.cluster.v3.Cluster.RoundRobinLbConfig" {
    "slow_start_config": applied,
});

fields!(pub(super) static RING_HASH = "envoy.config.cluster.v3.Cluster.RingHashLbConfig" {
    "minimum_ring_size": applied,
    "maximum_ring_size": applied,
    "hash_function": applied "XX_HASH (MURMUR_HASH_2 refused)",
});

fields!(pub(super) static MAGLEV = "envoy.config.cluster.v3.Cluster.MaglevLbConfig" {
    "table_size": applied,
});

fields!(pub(super) static ORIGINAL_DST = "envoy.config.cluster.v3.Cluster.OriginalDstLbConfig" {
    "use_http_header": refused "taking the destination from a request header is not supported",
    "http_header_name": inert "read only with use_http_header, which is refused",
    "upstream_port_override": applied,
    "metadata_key": applied "envoy.filters.listener.original_dst / waypoint only (Istio's waypoint override, read from the internal connection's metadata); other keys are refused",
});

/// The cluster's [`m::cluster::LbConfig`] (the overprovisioning factor and
/// the peak-EWMA opt-in are the caller's).
pub(super) fn lb_config(
    ctx: &mut Ctx<'_>,
    common: Option<&cluster_pb::cluster::CommonLbConfig>,
    specific: Option<&cluster_pb::cluster::LbConfig>,
    policy: m::LbPolicy,
) -> Result<m::cluster::LbConfig, ConvertError> {
    use cluster_pb::cluster::LbConfig as L;
    let mut lb = m::cluster::LbConfig::default();
    match specific {
        Some(L::LeastRequestLbConfig(lr)) => {
            let f = "least_request_lb_config";
            let cluster_pb::cluster::LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            } = lr;
            if let Some(n) = choice_count {
                if n.value < 2 {
                    return Err(ctx.err(path(f, "choice_count"), "must be at least 2"));
                }
                lb.choice_count = n.value;
            }
            if let Some(b) = active_request_bias {
                if b.default_value < 0.0 || b.default_value.is_nan() {
                    return Err(ctx.err(
                        path(f, "active_request_bias"),
                        "must be a number not below 0",
                    ));
                }
                lb.active_request_bias = b.default_value;
            }
            if policy == m::LbPolicy::LeastRequest {
                lb.slow_start = slow_start(ctx, &path(f, "slow_start_config"), slow_start_config)?;
            }
        }
        Some(L::RoundRobinLbConfig(rr)) => {
            let cluster_pb::cluster::RoundRobinLbConfig { slow_start_config } = rr;
            if policy == m::LbPolicy::RoundRobin {
                lb.slow_start = slow_start(
                    ctx,
                    "round_robin_lb_config.slow_start_config",
                    slow_start_config,
                )?;
            }
        }
        Some(L::RingHashLbConfig(rh)) => {
            let cluster_pb::cluster::RingHashLbConfig {
                minimum_ring_size,
                maximum_ring_size,
                hash_function,
            } = rh;
            // HashFunction: XX_HASH = 0, MURMUR_HASH_2 = 1.
            if *hash_function != 0 {
                return Err(ctx.err(
                    "ring_hash_lb_config.hash_function",
                    "only XX_HASH is supported",
                ));
            }
            if let Some(v) = minimum_ring_size {
                lb.min_ring_size = v.value;
            }
            if let Some(v) = maximum_ring_size {
                lb.max_ring_size = v.value;
            }
            if lb.min_ring_size > lb.max_ring_size {
                return Err(ctx.err(
                    "ring_hash_lb_config",
                    "minimum_ring_size exceeds maximum_ring_size",
                ));
            }
            if lb.max_ring_size > 8 * 1024 * 1024 {
                return Err(ctx.err("ring_hash_lb_config.maximum_ring_size", "at most 8M"));
            }
        }
        Some(L::MaglevLbConfig(mg)) => {
            let cluster_pb::cluster::MaglevLbConfig { table_size } = mg;
            if let Some(v) = table_size {
                if !is_prime(v.value) || v.value > 5_000_011 {
                    return Err(ctx.err(
                        "maglev_lb_config.table_size",
                        format!("{} is not a prime up to 5000011", v.value),
                    ));
                }
                lb.maglev_table_size = v.value;
            }
        }
        Some(L::OriginalDstLbConfig(od)) => {
            let f = "original_dst_lb_config";
            let cluster_pb::cluster::OriginalDstLbConfig {
                use_http_header,
                http_header_name,
                upstream_port_override,
                metadata_key,
            } = od;
            let _ = http_header_name;
            ctx.refuse(&ORIGINAL_DST, f, "use_http_header", *use_http_header)?;
            if let Some(p) = upstream_port_override {
                lb.original_dst.port_override = Some(u16::try_from(p.value).map_err(|_| {
                    ctx.err(
                        format!("{f}.upstream_port_override"),
                        format!("{} is not a port", p.value),
                    )
                })?);
            }
            if let Some(k) = metadata_key {
                use envoy_types::pb::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
                let keys: Vec<&str> = k
                    .path
                    .iter()
                    .filter_map(|s| match &s.segment {
                        Some(Segment::Key(k)) => Some(k.as_str()),
                        _ => None,
                    })
                    .collect();
                // The one key an internal connection's metadata carries:
                // Istio's waypoint override.
                if k.key != "envoy.filters.listener.original_dst"
                    || keys != ["waypoint"]
                    || k.path.len() != 1
                {
                    return Err(ctx.err(
                        format!("{f}.metadata_key"),
                        "only envoy.filters.listener.original_dst / waypoint is supported as the metadata key",
                    ));
                }
                lb.original_dst.waypoint_from_metadata = true;
            }
        }
        None => {}
    }
    if let Some(c) = common {
        common_lb(ctx, "common_lb_config", c, &mut lb)?;
    }
    Ok(lb)
}

fn common_lb(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: &cluster_pb::cluster::CommonLbConfig,
    lb: &mut m::cluster::LbConfig,
) -> Result<(), ConvertError> {
    use cluster_pb::cluster::common_lb_config::LocalityConfigSpecifier;
    let cov = &COMMON_LB_CONFIG;
    let cluster_pb::cluster::CommonLbConfig {
        healthy_panic_threshold,
        update_merge_window,
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        override_host_status,
        locality_config_specifier,
    } = c;
    ctx.refuse(
        cov,
        field,
        "ignore_new_hosts_until_first_hc",
        *ignore_new_hosts_until_first_hc,
    )?;
    ctx.knob(
        cov,
        field,
        "update_merge_window",
        update_merge_window.is_some(),
    );
    ctx.refuse(
        cov,
        field,
        "close_connections_on_host_set_change",
        *close_connections_on_host_set_change,
    )?;
    ctx.refuse(
        cov,
        field,
        "override_host_status",
        override_host_status.is_some(),
    )?;
    if let Some(ch) = consistent_hashing_lb_config {
        let chf = path(field, "consistent_hashing_lb_config");
        let cluster_pb::cluster::common_lb_config::ConsistentHashingLbConfig {
            use_hostname_for_hashing,
            hash_balance_factor,
        } = ch;
        ctx.refuse(
            &CONSISTENT_HASHING,
            &chf,
            "use_hostname_for_hashing",
            *use_hostname_for_hashing,
        )?;
        ctx.refuse(
            &CONSISTENT_HASHING,
            &chf,
            "hash_balance_factor",
            hash_balance_factor.is_some(),
        )?;
    }
    if let Some(p) = healthy_panic_threshold {
        if !(0.0..=100.0).contains(&p.value) {
            return Err(ctx.err(
                path(field, "healthy_panic_threshold"),
                format!("{} is not a percentage (0 to 100)", p.value),
            ));
        }
        lb.healthy_panic_threshold = p.value;
    }
    lb.locality_weighted = match locality_config_specifier {
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_)) => true,
        // Without the bootstrap's local cluster, zone-aware routing does
        // nothing in Envoy either.
        Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_)) | None => false,
    };
    Ok(())
}

fn slow_start(
    ctx: &Ctx<'_>,
    field: &str,
    s: &Option<cluster_pb::cluster::SlowStartConfig>,
) -> Result<Option<m::cluster::SlowStart>, ConvertError> {
    let Some(s) = s else { return Ok(None) };
    let cluster_pb::cluster::SlowStartConfig {
        slow_start_window,
        aggression,
        min_weight_percent,
    } = s;
    let window = duration(slow_start_window).unwrap_or(Duration::ZERO);
    if window.is_zero() {
        return Ok(None);
    }
    let aggression = aggression.as_ref().map_or(1.0, |a| a.default_value);
    // As Envoy: an aggression that is not positive counts as 1.
    let aggression = if aggression > 0.0 && aggression.is_finite() {
        aggression
    } else {
        1.0
    };
    let min_weight = match min_weight_percent {
        None => 0.1,
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value / 100.0,
        Some(p) => {
            return Err(ctx.err(
                path(field, "min_weight_percent"),
                format!("{} is not a percentage (0 to 100)", p.value),
            ));
        }
    };
    Ok(Some(m::cluster::SlowStart {
        window,
        aggression,
        min_weight,
    }))
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}
