//! The bootstrap's own fields (`envoy.config.bootstrap.v3.Bootstrap`) beside
//! its resources: each is read here, applied elsewhere, refused by name or
//! accepted with a warning, as istio-agent's bootstrap needs them.

use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap_pb;
use envoy_types::pb::envoy::config::metrics::v3 as metrics_pb;
use envoy_types::pb::envoy::config::overload::v3 as overload_pb;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, Warnings};

fields!(pub(super) static BOOTSTRAP = "envoy.config.bootstrap.v3.Bootstrap" {
    "node": applied "sent to the xDS server",
    "node_context_params": inert "names xdstp:// context parameters; Ferry requests no xdstp names",
    "static_resources": applied,
    "dynamic_resources": applied "ADS (gRPC or delta) to a static cluster",
    "cluster_manager": applied "see ClusterManager",
    "hds_config": refused "health discovery (HDS) is not supported",
    "flags_path": warned "flag files are not read",
    "stats_sinks": refused "stats sinks are not supported (statistics are served by the admin and Prometheus endpoints)",
    "deferred_stat_options": warned "statistics are created when first used either way",
    "stats_config": applied "see StatsConfig",
    "stats_flush_interval": warned "there are no sinks to flush to",
    "watchdog": warned "there is no watchdog",
    "watchdogs": warned "there is no watchdog",
    "tracing": applied "the tracer of connection managers that name none",
    "layered_runtime": applied "static layers are read and every key judged by name (see the runtime module: applied, inert with a warning, refused, or unknown with a warning); an admin layer is accepted; disk and RTDS layers are refused",
    "admin": applied "address and access_log; profile_path is warned about",
    "overload_manager": applied "see OverloadManager",
    "enable_dispatcher_stats": warned "event loop statistics are not kept",
    "header_prefix": refused "renaming the x-envoy- headers is not supported",
    "stats_server_version_override": warned "server.version is not reported",
    "use_tcp_for_dns_lookups": warned "the system resolver is used",
    "dns_resolution_config": refused "custom DNS resolvers are not supported (the system resolver is used)",
    "typed_dns_resolver_config": refused "custom DNS resolvers are not supported (the system resolver is used)",
    "bootstrap_extensions": applied "envoy.bootstrap.internal_listener enables internal listeners (always on here; buffer_size_kb is fixed at 64); istio.workload.BootstrapExtension is accepted with a warning (workload metadata discovery only feeds telemetry); others are refused",
    "fatal_actions": warned "there are no fatal actions",
    "config_sources": refused "xdstp:// config sources are not supported",
    "default_config_source": refused "xdstp:// config sources are not supported",
    "default_socket_interface": refused "custom socket interfaces are not supported",
    "certificate_provider_instances": refused "certificate providers are not supported",
    "inline_headers": warned "header maps are not tuned",
    "perf_tracing_file_path": warned "there is no performance trace",
    "default_regex_engine": warned "regexes use Rust's regex engine (RE2 syntax)",
    "xds_delegate_extension": refused "xDS delegates are not supported",
    "xds_config_tracker_extension": refused "xDS config trackers are not supported",
    "listener_manager": refused "custom listener managers are not supported",
    "application_log_config": warned "Ferry's own log format is used",
    "grpc_async_client_manager_config": warned "gRPC clients are not cached by these settings",
    "memory_allocator_manager": warned "the allocator is not tuned",
    "enable_worker_cpu_affinity": warned "workers are not pinned to CPUs",
    "stats_flush_on_admin": warned "there are no sinks to flush to",
    "stats_eviction_interval": warned "statistics are never evicted",
});

fields!(pub(super) static STATS_CONFIG = "envoy.config.metrics.v3.StatsConfig" {
    "stats_tags": warned "only renames the tags of Prometheus names; Ferry's own tag extraction applies",
    "use_all_default_tags": warned "only changes the tags of Prometheus names; Ferry's own tag extraction applies",
    "stats_matcher": warned "only limits which statistics exist; Ferry keeps and serves them all (more than Envoy, never fewer)",
    "histogram_bucket_settings": warned "histogram buckets are Ferry's",
    "allow_default_tag_overrides": warned "only changes the tags of Prometheus names",
});

fields!(pub(super) static OVERLOAD_MANAGER = "envoy.config.overload.v3.OverloadManager" {
    "refresh_interval": warned "there are no resource monitors to refresh",
    "resource_monitors": applied "envoy.resource_monitors.global_downstream_max_connections at 2147483647 (no limit, as istio-agent sets it); other monitors or a lower limit are refused",
    "actions": refused "overload actions are not supported",
    "loadshed_points": refused "load shed points are not supported",
    "buffer_factory_config": warned "buffers are not tuned",
});

fields!(pub(super) static CLUSTER_MANAGER = "envoy.config.bootstrap.v3.ClusterManager" {
    "local_cluster_name": refused "zone-aware routing is not supported",
    "outlier_detection": warned "outlier ejection events are not written to an event log (the counters are kept)",
    "upstream_bind_config": refused "a bootstrap-wide upstream source address is not supported (set it per cluster)",
    "load_stats_config": refused "load reporting (LRS) is not supported",
    "enable_deferred_cluster_creation": warned "clusters are created at once",
});

fields!(pub(super) static ADMIN = "envoy.config.bootstrap.v3.Admin" {
    "access_log": applied,
    "access_log_path": refused "use access_log",
    "profile_path": warned "there is no CPU profiler",
    "address": applied "a TCP socket address (--admin-addr overrides it)",
    "socket_options": refused "socket options are not supported",
    "ignore_global_conn_limit": inert "there is no global connection limit to ignore",
    "allow_paths": refused "restricting the admin paths is not supported",
});

/// The one resource monitor accepted, and the only limit: none.
const GLOBAL_CONNECTIONS: &str = "envoy.resource_monitors.global_downstream_max_connections";
const DOWNSTREAM_CONNECTIONS_TYPE: &str =
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";
const INTERNAL_LISTENER: &str = "envoy.bootstrap.internal_listener";
/// Istio's metadata discovery extension (`metadata_discovery` with
/// ENABLE_HBONE): peer metadata for telemetry only.
const ISTIO_WORKLOAD_DISCOVERY: &str = "istio.workload.BootstrapExtension";

/// Checks every field of the bootstrap that no other converter reads, and
/// returns its runtime (empty without `layered_runtime`).
pub fn bootstrap_fields(
    b: &bootstrap_pb::Bootstrap,
    warnings: &mut Warnings,
) -> Result<crate::runtime::Runtime, ConvertError> {
    let mut ctx = Ctx {
        resource: "bootstrap".into(),
        warnings,
        inbound: false,
        outbound: false,
    };
    let ctx = &mut ctx;
    let cov = &BOOTSTRAP;
    #[allow(deprecated)]
    let bootstrap_pb::Bootstrap {
        node: _,
        node_context_params,
        static_resources: _,
        dynamic_resources: _,
        cluster_manager,
        hds_config,
        flags_path,
        stats_sinks,
        deferred_stat_options,
        stats_config,
        stats_flush_interval,
        watchdog,
        watchdogs,
        tracing: _,
        layered_runtime,
        admin,
        overload_manager,
        enable_dispatcher_stats,
        header_prefix,
        stats_server_version_override,
        use_tcp_for_dns_lookups,
        dns_resolution_config,
        typed_dns_resolver_config,
        bootstrap_extensions,
        fatal_actions,
        config_sources,
        default_config_source,
        default_socket_interface,
        certificate_provider_instances,
        inline_headers,
        perf_tracing_file_path,
        default_regex_engine,
        xds_delegate_extension,
        xds_config_tracker_extension,
        listener_manager,
        application_log_config,
        grpc_async_client_manager_config,
        memory_allocator_manager,
        enable_worker_cpu_affinity,
        stats_flush,
        stats_eviction,
    } = b;
    let _ = node_context_params;
    let f = "";
    ctx.refuse(cov, f, "hds_config", hds_config.is_some())?;
    ctx.refuse(cov, f, "stats_sinks", !stats_sinks.is_empty())?;
    ctx.refuse(cov, f, "header_prefix", !header_prefix.is_empty())?;
    ctx.refuse(
        cov,
        f,
        "dns_resolution_config",
        dns_resolution_config.is_some(),
    )?;
    ctx.refuse(
        cov,
        f,
        "typed_dns_resolver_config",
        typed_dns_resolver_config.is_some(),
    )?;
    ctx.refuse(cov, f, "config_sources", !config_sources.is_empty())?;
    ctx.refuse(
        cov,
        f,
        "default_config_source",
        default_config_source.is_some(),
    )?;
    ctx.refuse(
        cov,
        f,
        "default_socket_interface",
        !default_socket_interface.is_empty(),
    )?;
    ctx.refuse(
        cov,
        f,
        "certificate_provider_instances",
        !certificate_provider_instances.is_empty(),
    )?;
    ctx.refuse(
        cov,
        f,
        "xds_delegate_extension",
        xds_delegate_extension.is_some(),
    )?;
    ctx.refuse(
        cov,
        f,
        "xds_config_tracker_extension",
        xds_config_tracker_extension.is_some(),
    )?;
    ctx.refuse(cov, f, "listener_manager", listener_manager.is_some())?;
    for (name, set) in [
        ("flags_path", !flags_path.is_empty()),
        ("deferred_stat_options", deferred_stat_options.is_some()),
        ("stats_flush_interval", stats_flush_interval.is_some()),
        ("watchdog", watchdog.is_some()),
        ("watchdogs", watchdogs.is_some()),
        ("enable_dispatcher_stats", *enable_dispatcher_stats),
        (
            "stats_server_version_override",
            stats_server_version_override.is_some(),
        ),
        ("use_tcp_for_dns_lookups", *use_tcp_for_dns_lookups),
        ("fatal_actions", !fatal_actions.is_empty()),
        ("inline_headers", !inline_headers.is_empty()),
        ("perf_tracing_file_path", !perf_tracing_file_path.is_empty()),
        ("default_regex_engine", default_regex_engine.is_some()),
        ("application_log_config", application_log_config.is_some()),
        (
            "grpc_async_client_manager_config",
            grpc_async_client_manager_config.is_some(),
        ),
        (
            "memory_allocator_manager",
            memory_allocator_manager.is_some(),
        ),
        ("enable_worker_cpu_affinity", *enable_worker_cpu_affinity),
        ("stats_flush_on_admin", stats_flush.is_some()),
        ("stats_eviction_interval", stats_eviction.is_some()),
    ] {
        ctx.knob(cov, f, name, set);
    }
    let runtime = match layered_runtime {
        Some(lr) => {
            let mut warned = Vec::new();
            let rt = crate::runtime::Runtime::from_proto(lr, &mut |f, m| warned.push((f, m)))
                .map_err(|e| ctx.err(format!("layered_runtime.{}", e.field), e.message))?;
            for (f, m) in warned {
                ctx.warn(&format!("layered_runtime.{f}"), m);
            }
            rt
        }
        None => crate::runtime::Runtime::default(),
    };
    for (i, e) in bootstrap_extensions.iter().enumerate() {
        if e.name == ISTIO_WORKLOAD_DISCOVERY {
            ctx.warn(
                &format!("bootstrap_extensions[{i}]"),
                "istio.workload.BootstrapExtension: workload metadata discovery (peer metadata for telemetry) is not subscribed to".into(),
            );
            continue;
        }
        if e.name != INTERNAL_LISTENER {
            return Err(ctx.err(
                format!("bootstrap_extensions[{i}]"),
                format!("unsupported bootstrap extension {:?}", e.name),
            ));
        }
    }
    if let Some(s) = stats_config {
        let metrics_pb::StatsConfig {
            stats_tags,
            use_all_default_tags,
            stats_matcher,
            histogram_bucket_settings,
            allow_default_tag_overrides,
        } = s;
        let sf = "stats_config";
        ctx.knob(&STATS_CONFIG, sf, "stats_tags", !stats_tags.is_empty());
        ctx.knob(
            &STATS_CONFIG,
            sf,
            "use_all_default_tags",
            use_all_default_tags.is_some(),
        );
        ctx.knob(&STATS_CONFIG, sf, "stats_matcher", stats_matcher.is_some());
        ctx.knob(
            &STATS_CONFIG,
            sf,
            "histogram_bucket_settings",
            !histogram_bucket_settings.is_empty(),
        );
        ctx.knob(
            &STATS_CONFIG,
            sf,
            "allow_default_tag_overrides",
            allow_default_tag_overrides.is_some(),
        );
    }
    if let Some(o) = overload_manager {
        overload(ctx, o)?;
    }
    if let Some(cm) = cluster_manager {
        let bootstrap_pb::ClusterManager {
            local_cluster_name,
            outlier_detection,
            upstream_bind_config,
            load_stats_config,
            enable_deferred_cluster_creation,
        } = cm;
        let cf = "cluster_manager";
        let cov = &CLUSTER_MANAGER;
        ctx.refuse(
            cov,
            cf,
            "local_cluster_name",
            !local_cluster_name.is_empty(),
        )?;
        ctx.refuse(
            cov,
            cf,
            "upstream_bind_config",
            upstream_bind_config.is_some(),
        )?;
        ctx.refuse(cov, cf, "load_stats_config", load_stats_config.is_some())?;
        ctx.knob(cov, cf, "outlier_detection", outlier_detection.is_some());
        ctx.knob(
            cov,
            cf,
            "enable_deferred_cluster_creation",
            *enable_deferred_cluster_creation,
        );
    }
    if let Some(a) = admin {
        #[allow(deprecated)]
        let bootstrap_pb::Admin {
            access_log: _,
            access_log_path,
            profile_path,
            address: _,
            socket_options,
            ignore_global_conn_limit,
            allow_paths,
        } = a;
        let _ = ignore_global_conn_limit;
        let af = "admin";
        ctx.refuse(&ADMIN, af, "access_log_path", !access_log_path.is_empty())?;
        ctx.refuse(&ADMIN, af, "socket_options", !socket_options.is_empty())?;
        ctx.refuse(&ADMIN, af, "allow_paths", !allow_paths.is_empty())?;
        ctx.knob(&ADMIN, af, "profile_path", !profile_path.is_empty());
    }
    Ok(runtime)
}

fn overload(ctx: &mut Ctx<'_>, o: &overload_pb::OverloadManager) -> Result<(), ConvertError> {
    use envoy_types::pb::envoy::extensions::resource_monitors::downstream_connections::v3 as dc_pb;
    let overload_pb::OverloadManager {
        refresh_interval,
        resource_monitors,
        actions,
        loadshed_points,
        buffer_factory_config,
    } = o;
    let of = "overload_manager";
    let cov = &OVERLOAD_MANAGER;
    ctx.refuse(cov, of, "actions", !actions.is_empty())?;
    ctx.refuse(cov, of, "loadshed_points", !loadshed_points.is_empty())?;
    ctx.knob(cov, of, "refresh_interval", refresh_interval.is_some());
    ctx.knob(
        cov,
        of,
        "buffer_factory_config",
        buffer_factory_config.is_some(),
    );
    for (i, m) in resource_monitors.iter().enumerate() {
        let mf = format!("{of}.resource_monitors[{i}]");
        let overload_pb::ResourceMonitor { name, config_type } = m;
        use overload_pb::resource_monitor::ConfigType;
        let limit = match config_type {
            Some(ConfigType::TypedConfig(any)) if name == GLOBAL_CONNECTIONS => {
                let typed = super::Typed::from_any(any).map_err(|e| ctx.err(&mf, e))?;
                if typed.type_name() != DOWNSTREAM_CONNECTIONS_TYPE {
                    return Err(ctx.err(
                        path(&mf, "typed_config"),
                        format!("unexpected type {}", typed.type_name()),
                    ));
                }
                let c: dc_pb::DownstreamConnectionsConfig =
                    typed.decode().map_err(|e| ctx.err(&mf, e))?;
                c.max_active_downstream_connections
            }
            _ => {
                return Err(ctx.err(&mf, format!("unsupported resource monitor {name:?}")));
            }
        };
        // Only a limit that cannot be reached is accepted: Ferry has no
        // global connection limit to enforce a lower one.
        if limit < i64::from(i32::MAX) {
            return Err(ctx.err(
                path(&mf, "typed_config.max_active_downstream_connections"),
                format!("a global limit of {limit} connections is not supported"),
            ));
        }
    }
    Ok(())
}
