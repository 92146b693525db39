//! `envoy.filters.network.tcp_proxy` (`TcpProxy`) → the model's TCP proxy:
//! the cluster or weighted clusters, timeouts, connect attempts, the source
//! IP hash and the access logs; every other field refused, warned or inert
//! by its classification list.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_pb;
use ferry_model as m;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, access_log, duration, timeout_or};

fields!(pub(super) static TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" {
    "stat_prefix": applied,
    "cluster": applied,
    "weighted_clusters": applied,
    "on_demand": refused "on-demand cluster discovery is not supported",
    "metadata_match": refused "subset metadata matches are not supported",
    "idle_timeout": applied "one hour when unset, none when zero",
    "downstream_idle_timeout": inert "not implemented by Envoy either",
    "upstream_idle_timeout": inert "not implemented by Envoy either",
    "access_log": applied,
    "max_connect_attempts": applied "each further attempt on another host while there is one",
    "backoff_options": warned "connect attempts follow one another at once",
    "hash_policy": applied "source_ip; filter_state refused",
    "tunneling_config": applied "HTTP/2 CONNECT over the cluster's HTTP/2 connection (see TunnelingConfig)",
    "max_downstream_connection_duration": applied,
    "max_downstream_connection_duration_jitter_percentage": warned "connections close at max_downstream_connection_duration exactly",
    "access_log_flush_interval": refused "periodic access log entries are not supported (one entry per connection, at its end)",
    "flush_access_log_on_connected": refused "early access log entries are not supported (one entry per connection, at its end)",
    "access_log_options": applied "its periodic and early flush settings are refused",
    "proxy_protocol_tlvs": refused "PROXY protocol TLVs are not supported",
    "proxy_protocol_tlv_merge_policy": inert "read only with proxy_protocol_tlvs, which are refused",
    "upstream_connect_mode": refused "the upstream connection is always made at once (IMMEDIATE)",
    "max_early_data_bytes": warned "downstream bytes wait in the socket until the upstream connects",
    "check_drain_close": warned "draining connections close at the drain deadline",
});

fields!(pub(super) static TUNNELING_CONFIG = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.TunnelingConfig" {
    "hostname": applied "a literal host:port, or %DOWNSTREAM_LOCAL_ADDRESS% (the connection's original destination); other substitutions are refused",
    "use_post": refused "tunneling over POST is not supported (CONNECT only)",
    "headers_to_add": applied "literal values; values with substitutions are refused",
    "propagate_response_headers": warned "the CONNECT response's headers are not kept in filter state (only Istio's baggage telemetry reads them)",
    "post_path": inert "read only with use_post, which is refused",
    "propagate_response_trailers": warned "the CONNECT response's trailers are not kept in filter state",
    "request_id_extension": refused "request IDs on the CONNECT request are not supported",
    "request_id_header": inert "read only with request_id_extension, which is refused",
    "request_id_metadata_key": inert "read only with request_id_extension, which is refused",
    "formatters": refused "formatter extensions are not supported",
});

fields!(pub(super) static TCP_HASH_POLICY = "envoy.type.v3.HashPolicy" ("tcp_proxy") {
    "source_ip": applied,
    "filter_state": refused "filter state hashing is not supported",
});

fn tunneling(
    ctx: &mut Ctx<'_>,
    field: &str,
    t: &tcp_pb::tcp_proxy::TunnelingConfig,
) -> Result<m::listener::Tunneling, ConvertError> {
    let cov = &TUNNELING_CONFIG;
    let tcp_pb::tcp_proxy::TunnelingConfig {
        hostname,
        use_post,
        headers_to_add,
        propagate_response_headers,
        post_path,
        propagate_response_trailers,
        request_id_extension,
        request_id_header,
        request_id_metadata_key,
        formatters,
    } = t;
    let _ = (post_path, request_id_header, request_id_metadata_key);
    ctx.refuse(cov, field, "use_post", *use_post)?;
    ctx.refuse(
        cov,
        field,
        "request_id_extension",
        request_id_extension.is_some(),
    )?;
    ctx.refuse(cov, field, "formatters", !formatters.is_empty())?;
    ctx.knob(
        cov,
        field,
        "propagate_response_headers",
        *propagate_response_headers,
    );
    ctx.knob(
        cov,
        field,
        "propagate_response_trailers",
        *propagate_response_trailers,
    );
    let host = match hostname.as_str() {
        "" => return Err(ctx.err(path(field, "hostname"), "a tunnel needs a hostname")),
        "%DOWNSTREAM_LOCAL_ADDRESS%" => m::listener::TunnelHost::DownstreamLocalAddress,
        h if h.contains('%') => {
            return Err(ctx.err(
                path(field, "hostname"),
                format!("{h:?}: only %DOWNSTREAM_LOCAL_ADDRESS% or a literal host is supported"),
            ));
        }
        h => m::listener::TunnelHost::Literal(h.to_string()),
    };
    let mut headers = Vec::with_capacity(headers_to_add.len());
    for (i, h) in headers_to_add.iter().enumerate() {
        let hf = format!("{field}.headers_to_add[{i}]");
        let Some(hv) = &h.header else {
            return Err(ctx.err(path(&hf, "header"), "a header is required"));
        };
        let value = if hv.raw_value.is_empty() {
            hv.value.clone()
        } else {
            String::from_utf8(hv.raw_value.clone())
                .map_err(|_| ctx.err(path(&hf, "header.raw_value"), "not UTF-8"))?
        };
        if value.contains('%') {
            return Err(ctx.err(
                path(&hf, "header"),
                "header values with substitutions are not supported",
            ));
        }
        let name = hv.key.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(&value).is_err()
        {
            return Err(ctx.err(path(&hf, "header"), "not a valid header"));
        }
        headers.push((name, value));
    }
    Ok(m::listener::Tunneling {
        hostname: host,
        headers,
    })
}

pub(super) fn tcp_proxy(
    ctx: &mut Ctx<'_>,
    field: &str,
    tp: &tcp_pb::TcpProxy,
) -> Result<m::TcpProxy, ConvertError> {
    use tcp_pb::tcp_proxy::ClusterSpecifier;
    let cov = &TCP_PROXY;
    #[allow(deprecated)] // `access_log_flush_interval` and `flush_access_log_on_connected`
    let tcp_pb::TcpProxy {
        stat_prefix,
        on_demand,
        metadata_match,
        idle_timeout,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log: _,
        max_connect_attempts,
        backoff_options,
        hash_policy,
        tunneling_config,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        access_log_flush_interval,
        flush_access_log_on_connected,
        access_log_options: _,
        proxy_protocol_tlvs,
        proxy_protocol_tlv_merge_policy,
        upstream_connect_mode,
        max_early_data_bytes,
        check_drain_close,
        cluster_specifier,
    } = tp;
    // Not implemented by Envoy either; read by nothing.
    let _ = (
        downstream_idle_timeout,
        upstream_idle_timeout,
        proxy_protocol_tlv_merge_policy,
    );
    ctx.refuse(cov, field, "on_demand", on_demand.is_some())?;
    ctx.refuse(cov, field, "metadata_match", metadata_match.is_some())?;
    let tunneling = match tunneling_config {
        Some(t) => Some(tunneling(ctx, &path(field, "tunneling_config"), t)?),
        None => None,
    };
    ctx.refuse(
        cov,
        field,
        "access_log_flush_interval",
        access_log_flush_interval.is_some(),
    )?;
    ctx.refuse(
        cov,
        field,
        "flush_access_log_on_connected",
        *flush_access_log_on_connected,
    )?;
    ctx.refuse(
        cov,
        field,
        "proxy_protocol_tlvs",
        !proxy_protocol_tlvs.is_empty(),
    )?;
    // UpstreamConnectMode: IMMEDIATE = 0.
    ctx.refuse(
        cov,
        field,
        "upstream_connect_mode",
        *upstream_connect_mode != 0,
    )?;
    ctx.knob(cov, field, "backoff_options", backoff_options.is_some());
    ctx.knob(
        cov,
        field,
        "max_downstream_connection_duration_jitter_percentage",
        max_downstream_connection_duration_jitter_percentage.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "max_early_data_bytes",
        max_early_data_bytes.is_some(),
    );
    ctx.knob(
        cov,
        field,
        "check_drain_close",
        check_drain_close.as_ref().is_some_and(|v| v.value),
    );
    let (cluster, weighted) = match cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => (c.clone(), Vec::new()),
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            let mut out = Vec::with_capacity(wc.clusters.len());
            for (i, c) in wc.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    return Err(ctx.err(
                        format!("{field}.weighted_clusters.clusters[{i}].name"),
                        "a cluster name is required",
                    ));
                }
                if c.metadata_match.is_some() {
                    return Err(ctx.err(
                        format!("{field}.weighted_clusters.clusters[{i}].metadata_match"),
                        "subset metadata matches are not supported",
                    ));
                }
                // A zero weight never gets a connection (Envoy allows it).
                if c.weight > 0 {
                    out.push((c.name.clone(), c.weight));
                }
            }
            let Some((first, _)) = out.first() else {
                return Err(ctx.err(
                    format!("{field}.weighted_clusters.clusters"),
                    "at least one cluster with a positive weight is required",
                ));
            };
            (first.clone(), out)
        }
        _ => return Err(ctx.err(format!("{field}.cluster"), "tcp_proxy needs a cluster")),
    };
    let mut hash_source_ip = false;
    for (i, h) in hash_policy.iter().enumerate() {
        use envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier as P;
        let at = format!("{field}.hash_policy[{i}]");
        match &h.policy_specifier {
            Some(P::SourceIp(_)) => hash_source_ip = true,
            Some(P::FilterState(_)) => {
                return Err(ctx.refused(&TCP_HASH_POLICY, &at, "filter_state"));
            }
            None => return Err(ctx.err(at, "a hash policy needs a policy")),
        }
    }
    let attempts = max_connect_attempts.as_ref().map_or(1, |v| v.value);
    if attempts < 1 {
        return Err(ctx.err(path(field, "max_connect_attempts"), "must be at least 1"));
    }
    let access_logs = access_log::tcp_proxy(ctx, field, tp)?;
    Ok(m::TcpProxy {
        access_logs,
        stat_prefix: stat_prefix.clone(),
        cluster,
        weighted,
        idle_timeout: timeout_or(idle_timeout, Some(Duration::from_secs(3600))),
        max_connect_attempts: attempts,
        max_downstream_connection_duration: duration(max_downstream_connection_duration)
            .filter(|d| !d.is_zero()),
        hash_source_ip,
        tunneling,
    })
}
