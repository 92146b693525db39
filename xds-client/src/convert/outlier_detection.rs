//! `envoy.config.cluster.v3.OutlierDetection`, with Envoy's defaults.

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::google::protobuf::UInt32Value;
use ferry_model as m;

use super::coverage::fields;
use super::{ConvertError, Ctx, duration};

fields!(pub(super) static OUTLIER_DETECTION = "envoy.config.cluster.v3.OutlierDetection" {
    "consecutive_5xx": applied,
    "interval": applied,
    "base_ejection_time": applied,
    "max_ejection_percent": applied,
    "enforcing_consecutive_5xx": applied,
    "enforcing_success_rate": applied,
    "success_rate_minimum_hosts": applied,
    "success_rate_request_volume": applied,
    "success_rate_stdev_factor": applied,
    "consecutive_gateway_failure": applied,
    "enforcing_consecutive_gateway_failure": applied,
    "split_external_local_origin_errors": applied,
    "consecutive_local_origin_failure": applied,
    "enforcing_consecutive_local_origin_failure": applied,
    "enforcing_local_origin_success_rate": applied,
    "failure_percentage_threshold": applied,
    "enforcing_failure_percentage": applied,
    "enforcing_failure_percentage_local_origin": applied,
    "failure_percentage_minimum_hosts": applied,
    "failure_percentage_request_volume": applied,
    "max_ejection_time": applied,
    "max_ejection_time_jitter": applied,
    "successful_active_health_check_uneject_host": applied,
    "monitors": refused "outlier detection monitors are not supported",
    "always_eject_one_host": applied,
    "detect_degraded_hosts": refused "degraded-host detection is not supported",
});

pub(super) fn outlier_detection(
    ctx: &Ctx<'_>,
    field: &str,
    o: &cluster_pb::OutlierDetection,
) -> Result<m::cluster::OutlierDetection, ConvertError> {
    let cov = &OUTLIER_DETECTION;
    let cluster_pb::OutlierDetection {
        consecutive_5xx,
        interval,
        base_ejection_time,
        max_ejection_percent,
        enforcing_consecutive_5xx,
        enforcing_success_rate,
        success_rate_minimum_hosts,
        success_rate_request_volume,
        success_rate_stdev_factor,
        consecutive_gateway_failure,
        enforcing_consecutive_gateway_failure,
        split_external_local_origin_errors,
        consecutive_local_origin_failure,
        enforcing_consecutive_local_origin_failure,
        enforcing_local_origin_success_rate,
        failure_percentage_threshold,
        enforcing_failure_percentage,
        enforcing_failure_percentage_local_origin,
        failure_percentage_minimum_hosts,
        failure_percentage_request_volume,
        max_ejection_time,
        max_ejection_time_jitter,
        successful_active_health_check_uneject_host,
        monitors,
        always_eject_one_host,
        detect_degraded_hosts,
    } = o;
    ctx.refuse(cov, field, "monitors", !monitors.is_empty())?;
    ctx.refuse(
        cov,
        field,
        "detect_degraded_hosts",
        detect_degraded_hosts.as_ref().is_some_and(|v| v.value),
    )?;
    let d = m::cluster::OutlierDetection::default();
    let u = |v: &Option<UInt32Value>, dflt: u32| v.as_ref().map_or(dflt, |v| v.value);
    // The `enforcing_*` and percentage settings are percentages.
    let pct = |v: &Option<UInt32Value>, dflt: u32| u(v, dflt).min(100);
    let base = duration(base_ejection_time).unwrap_or(d.base_ejection_time);
    Ok(m::cluster::OutlierDetection {
        consecutive_5xx: u(consecutive_5xx, d.consecutive_5xx),
        consecutive_gateway_failure: u(consecutive_gateway_failure, d.consecutive_gateway_failure),
        consecutive_local_origin_failure: u(
            consecutive_local_origin_failure,
            d.consecutive_local_origin_failure,
        ),
        enforcing_consecutive_5xx: pct(enforcing_consecutive_5xx, d.enforcing_consecutive_5xx),
        enforcing_consecutive_gateway_failure: pct(
            enforcing_consecutive_gateway_failure,
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: pct(
            enforcing_consecutive_local_origin_failure,
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_success_rate: pct(enforcing_success_rate, d.enforcing_success_rate),
        split_external_local_origin_errors: *split_external_local_origin_errors,
        interval: duration(interval).unwrap_or(d.interval),
        // Envoy: the cap is never below the base time.
        max_ejection_time: duration(max_ejection_time)
            .unwrap_or(d.max_ejection_time)
            .max(base),
        base_ejection_time: base,
        max_ejection_percent: pct(max_ejection_percent, d.max_ejection_percent),
        success_rate_minimum_hosts: u(success_rate_minimum_hosts, d.success_rate_minimum_hosts),
        success_rate_request_volume: u(success_rate_request_volume, d.success_rate_request_volume),
        success_rate_stdev_factor: u(success_rate_stdev_factor, d.success_rate_stdev_factor),
        enforcing_local_origin_success_rate: pct(
            enforcing_local_origin_success_rate,
            d.enforcing_local_origin_success_rate,
        ),
        failure_percentage_threshold: pct(
            failure_percentage_threshold,
            d.failure_percentage_threshold,
        ),
        enforcing_failure_percentage: pct(
            enforcing_failure_percentage,
            d.enforcing_failure_percentage,
        ),
        enforcing_failure_percentage_local_origin: pct(
            enforcing_failure_percentage_local_origin,
            d.enforcing_failure_percentage_local_origin,
        ),
        failure_percentage_minimum_hosts: u(
            failure_percentage_minimum_hosts,
            d.failure_percentage_minimum_hosts,
        ),
        failure_percentage_request_volume: u(
            failure_percentage_request_volume,
            d.failure_percentage_request_volume,
        ),
        max_ejection_time_jitter: duration(max_ejection_time_jitter).unwrap_or_default(),
        always_eject_one_host: always_eject_one_host.as_ref().is_some_and(|v| v.value),
        uneject_on_health_check_success: successful_active_health_check_uneject_host
            .as_ref()
            .is_none_or(|v| v.value),
    })
}
