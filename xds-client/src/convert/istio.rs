//! Istio's own extensions: `istio.stats` (converted: Ferry reports Istio's
//! metrics), the TCP metadata exchange (`istio.metadata_exchange`, on
//! listeners and as an upstream cluster filter: converted, Ferry speaks it),
//! the filters Ferry recognises without implementing them (HTTP peer
//! metadata, alpn, authn), accepted with a warning, and Wasm filters:
//! Istio's built-in null-VM plugins (metadata exchange, stats) are what
//! Ferry does natively; any other plugin is refused unless it fails open,
//! since skipping a plugin that fails closed (an authenticating WasmPlugin,
//! say) would let through what Envoy stops.

use ferry_model as m;
use prost::Message;

use super::{ConvertError, Ctx, Typed};

/// Type URLs of Istio's own extensions: recognised, not (yet) implemented,
/// never a reason to reject a listener.
pub(super) const ISTIO_TOLERATED: &[&str] = &[
    "io.istio.http.peer_metadata.Config",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "io.istio.network.authn.Config",
    "istio.mixer.v1.config.client.ClientConfig",
];

/// The Wasm filters' types (HTTP and network: the same `PluginConfig`).
pub(super) const WASM_TYPES: &[&str] = &[
    "envoy.extensions.filters.network.wasm.v3.Wasm",
    "envoy.extensions.filters.http.wasm.v3.Wasm",
];

/// Istio's plugins compiled into its proxy (`envoy.wasm.runtime.null`),
/// which Ferry does natively: peer metadata exchange (`x-envoy-peer-metadata`)
/// and Istio's standard metrics.
const NATIVE_NULL_VM_PLUGINS: &[&str] = &["envoy.wasm.metadata_exchange", "envoy.wasm.stats"];

/// A Wasm filter (`kind` is "http" or "network"): accepted with a warning
/// when it is one of Istio's built-in plugins, or when its plugin fails open
/// (Envoy then lets traffic through when the plugin cannot run, which is
/// what skipping it amounts to); refused otherwise.
pub(super) fn wasm(
    ctx: &mut Ctx<'_>,
    field: &str,
    kind: &str,
    name: &str,
    typed: Typed,
) -> Result<(), ConvertError> {
    use envoy_types::pb::envoy::config::core::v3::{async_data_source, data_source};
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::envoy::extensions::wasm::v3::{FailurePolicy, plugin_config::Vm};
    let tf = format!("{field}.typed_config");
    // The HTTP and network filters' `Wasm` are the same message.
    let w: Wasm = typed.decode().map_err(|e| ctx.err(&tf, e))?;
    let Some(cfg) = &w.config else {
        return Err(ctx.err(
            format!("{tf}.config"),
            "a Wasm filter needs a plugin config",
        ));
    };
    let builtin = match &cfg.vm {
        Some(Vm::VmConfig(vm)) if vm.runtime == "envoy.wasm.runtime.null" => vm
            .code
            .as_ref()
            .and_then(|c| match &c.specifier {
                Some(async_data_source::Specifier::Local(d)) => match &d.specifier {
                    Some(data_source::Specifier::InlineString(s)) => Some(s.as_str()),
                    _ => None,
                },
                _ => None,
            })
            .filter(|code| NATIVE_NULL_VM_PLUGINS.contains(code)),
        _ => None,
    };
    if let Some(code) = builtin {
        ctx.warn(
            field,
            format!(
                "{kind} filter {name:?} runs Istio's built-in plugin {code:?}, which Ferry does natively (peer metadata exchange, Istio metrics); its configuration is not read"
            ),
        );
        return Ok(());
    }
    #[allow(deprecated)]
    let fails_open = cfg.fail_open || cfg.failure_policy == FailurePolicy::FailOpen as i32;
    if fails_open {
        ctx.warn(
            field,
            format!(
                "{kind} filter {name:?}: Wasm plugins are not run; this one fails open, so traffic passes as in Envoy when the plugin cannot run"
            ),
        );
        return Ok(());
    }
    Err(ctx.err(
        &tf,
        format!(
            "Wasm plugin {name:?} is not supported, and it fails closed: skipping it would let through what it stops (set failure_policy: FAIL_OPEN to run without it)"
        ),
    ))
}

/// Istio's TCP metadata exchange configuration type.
pub(super) const METADATA_EXCHANGE_TYPE: &str =
    "envoy.tcp.metadataexchange.config.MetadataExchange";

/// `envoy.tcp.metadataexchange.config.MetadataExchange`: the ALPN protocol
/// under which the exchange is spoken. `enable_discovery` and
/// `additional_labels` (ambient's workload discovery when a peer sends no
/// metadata) only change which labels an unknown peer gets; left out.
#[derive(Clone, PartialEq, Message)]
struct MetadataExchange {
    #[prost(string, tag = "1")]
    protocol: String,
}

/// The protocol of a metadata exchange filter; an empty one is Istio's
/// `istio-peer-exchange` (what istiod always sets).
pub(super) fn metadata_exchange(
    ctx: &Ctx<'_>,
    field: &str,
    typed: Typed,
) -> Result<String, super::ConvertError> {
    let protocol = match typed {
        Typed::Proto { bytes, .. } => {
            MetadataExchange::decode(bytes.as_slice())
                .map_err(|e| ctx.err(format!("{field}.typed_config"), e.to_string()))?
                .protocol
        }
        Typed::Json { json, .. } => json
            .get("protocol")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string(),
    };
    Ok(if protocol.is_empty() {
        "istio-peer-exchange".to_string()
    } else {
        protocol
    })
}

/// Istio's `istio.stats` configuration type.
pub(super) const ISTIO_STATS_TYPE: &str = "stats.PluginConfig";

/// The fields of Istio's `stats.PluginConfig` Ferry applies; custom metric
/// definitions and tag overrides are not (they are Istio's own extension and
/// istiod only sets them from a Telemetry resource).
#[derive(Clone, PartialEq, Message)]
struct PluginConfig {
    #[prost(bool, tag = "6")]
    disable_host_header_fallback: bool,
    /// 0: UNSPECIFIED (the listener's direction decides), 1: SERVER_GATEWAY.
    #[prost(int32, tag = "10")]
    reporter: i32,
}

/// `istio.stats`: lenient, since unknown or malformed fields of Istio's own
/// extension must not cost the listener.
pub(super) fn istio_stats(ctx: &Ctx<'_>, typed: Typed) -> m::IstioStats {
    let cfg = match typed {
        Typed::Proto { bytes, .. } => PluginConfig::decode(bytes.as_slice()).unwrap_or_else(|e| {
            tracing::debug!(xds.resource = %ctx.resource, error = %e, "istio.stats: undecodable config; defaults used");
            PluginConfig::default()
        }),
        Typed::Json { json, .. } => PluginConfig {
            disable_host_header_fallback: json
                .get("disable_host_header_fallback")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            reporter: i32::from(
                json.get("reporter").and_then(serde_json::Value::as_str) == Some("SERVER_GATEWAY"),
            ),
        },
    };
    let reporter = if cfg.reporter == 1 || ctx.inbound {
        m::Reporter::Destination
    } else {
        m::Reporter::Source
    };
    m::IstioStats {
        reporter,
        disable_host_header_fallback: cfg.disable_host_header_fallback,
    }
}
