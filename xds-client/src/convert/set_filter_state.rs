//! `envoy.filters.http.set_filter_state`
//! (`envoy.extensions.filters.http.set_filter_state.v3.Config`) and
//! `envoy.filters.network.set_filter_state`
//! (`envoy.extensions.filters.network.set_filter_state.v3.Config`): filter
//! state objects set from the request headers or when a connection is
//! accepted, optionally carried with the upstream connection (Istio's
//! `connect_authority` on `connect_terminate` and on the waypoint's
//! `main_internal` chains). Both read the same `FilterStateValue`s.
//! Only objects Ferry reads are accepted: strings and the `original_dst`
//! addresses; any other factory (one that would steer the request, such as
//! `envoy.tcp_proxy.cluster`) is refused by name.

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3 as sfs_pb;
use envoy_types::pb::envoy::extensions::filters::http::set_filter_state::v3 as http_pb;
use envoy_types::pb::envoy::extensions::filters::network::set_filter_state::v3 as net_pb;
use ferry_model::filter_state as fs;
use ferry_model::format::ValueFormat;

use super::core_types::data_source;
use super::coverage::{fields, path};
use super::{ConvertError, Ctx};

pub(super) const SET_FILTER_STATE_TYPE: &str =
    "envoy.extensions.filters.http.set_filter_state.v3.Config";

fields!(pub(super) static SET_FILTER_STATE = "envoy.extensions.filters.http.set_filter_state.v3.Config" {
    "on_request_headers": applied,
    "clear_route_cache": refused "choosing the route again after setting filter state is not supported (no route matcher of Ferry's reads filter state)",
});

pub(super) const NETWORK_SET_FILTER_STATE_TYPE: &str =
    "envoy.extensions.filters.network.set_filter_state.v3.Config";

fields!(pub(super) static NETWORK_SET_FILTER_STATE = "envoy.extensions.filters.network.set_filter_state.v3.Config" {
    "on_new_connection": applied "set when the connection is accepted, before the chain's other filters read it (a TLS connection's before its handshake, as Envoy: the peer's certificate is not known yet)",
    "on_downstream_tls_handshake": refused "setting filter state when the TLS handshake completes is not supported",
    "on_downstream_data": refused "setting filter state on the first downstream data is not supported",
});

fields!(pub(super) static FILTER_STATE_VALUE = "envoy.extensions.filters.common.set_filter_state.v3.FilterStateValue" {
    "object_key": applied,
    "factory_key": applied "envoy.string, envoy.hashable_string, istio.hashable_string (strings) and envoy.filters.listener.original_dst.local_ip / remote_ip (addresses); other factories refused",
    "format_string": applied "text_format and text_format_source; %REQ(…)% (pseudo-headers included), the downstream addresses, %DOWNSTREAM_PEER_URI_SAN%, %DOWNSTREAM_LOCAL_URI_SAN% and %FILTER_STATE(KEY:PLAIN|TYPED)% among the commands (a network filter has no request: %REQ% is '-')",
    "read_only": applied,
    "shared_with_upstream": applied "ONCE and TRANSITIVE: carried with an internal connection the request opens",
    "skip_if_empty": applied,
});

fields!(pub(super) static VALUE_FORMAT = "envoy.config.core.v3.SubstitutionFormatString" ("set_filter_state value") {
    "text_format": applied,
    "json_format": refused "a JSON value for filter state is not supported",
    "text_format_source": applied "inline",
    "omit_empty_values": refused "empty values render as '-', as Envoy's default; omitting them is not supported",
    "content_type": inert "Envoy reads it for local replies only",
    "formatters": refused "formatter extensions are not supported",
    "json_format_options": inert "read with json_format only",
});

/// The object kind the factory named `factory` makes.
fn kind_of(factory: &str) -> Option<fs::ObjectKind> {
    match factory {
        "envoy.string" => Some(fs::ObjectKind::String),
        "envoy.hashable_string" | "istio.hashable_string" => Some(fs::ObjectKind::HashableString),
        fs::ORIGINAL_DST_LOCAL | fs::ORIGINAL_DST_REMOTE => Some(fs::ObjectKind::Address),
        _ => None,
    }
}

pub(super) fn set_filter_state(
    ctx: &Ctx<'_>,
    field: &str,
    cfg: &http_pb::Config,
) -> Result<fs::SetFilterState, ConvertError> {
    let http_pb::Config {
        on_request_headers,
        clear_route_cache,
    } = cfg;
    ctx.refuse(
        &SET_FILTER_STATE,
        field,
        "clear_route_cache",
        *clear_route_cache,
    )?;
    let mut out = Vec::with_capacity(on_request_headers.len());
    for (i, v) in on_request_headers.iter().enumerate() {
        out.push(value(ctx, &format!("{field}.on_request_headers[{i}]"), v)?);
    }
    Ok(fs::SetFilterState {
        on_request_headers: out,
    })
}

/// The `on_new_connection` values of a network `set_filter_state`.
pub(super) fn network_set_filter_state(
    ctx: &Ctx<'_>,
    field: &str,
    cfg: &net_pb::Config,
) -> Result<Vec<fs::FilterStateValue>, ConvertError> {
    let net_pb::Config {
        on_new_connection,
        on_downstream_tls_handshake,
        on_downstream_data,
    } = cfg;
    let cov = &NETWORK_SET_FILTER_STATE;
    ctx.refuse(
        cov,
        field,
        "on_downstream_tls_handshake",
        !on_downstream_tls_handshake.is_empty(),
    )?;
    ctx.refuse(
        cov,
        field,
        "on_downstream_data",
        !on_downstream_data.is_empty(),
    )?;
    on_new_connection
        .iter()
        .enumerate()
        .map(|(i, v)| value(ctx, &format!("{field}.on_new_connection[{i}]"), v))
        .collect()
}

#[allow(deprecated)]
fn value(
    ctx: &Ctx<'_>,
    field: &str,
    v: &sfs_pb::FilterStateValue,
) -> Result<fs::FilterStateValue, ConvertError> {
    use sfs_pb::filter_state_value::{Key, SharedWithUpstream as S, Value};
    let sfs_pb::FilterStateValue {
        factory_key,
        read_only,
        shared_with_upstream,
        skip_if_empty,
        key,
        value,
    } = v;
    let Some(Key::ObjectKey(key)) = key else {
        return Err(ctx.err(path(field, "object_key"), "a key is required"));
    };
    if key.is_empty() {
        return Err(ctx.err(path(field, "object_key"), "must not be empty"));
    }
    // Without a factory key the object key names the factory, as in Envoy.
    let factory = if factory_key.is_empty() {
        key.as_str()
    } else {
        factory_key.as_str()
    };
    let Some(kind) = kind_of(factory) else {
        let at = if factory_key.is_empty() {
            "object_key"
        } else {
            "factory_key"
        };
        return Err(ctx.err(
            path(field, at),
            format!(
                "filter state object factory {factory:?} is not supported (only strings and the original_dst addresses)"
            ),
        ));
    };
    let Some(Value::FormatString(f)) = value else {
        return Err(ctx.err(path(field, "format_string"), "a value is required"));
    };
    let format = format_string(ctx, &path(field, "format_string"), f)?;
    let shared = match S::try_from(*shared_with_upstream) {
        Ok(S::None) => fs::Shared::None,
        Ok(S::Once) => fs::Shared::Once,
        Ok(S::Transitive) => fs::Shared::Transitive,
        Err(_) => {
            return Err(ctx.err(
                path(field, "shared_with_upstream"),
                format!("unknown value {shared_with_upstream}"),
            ));
        }
    };
    Ok(fs::FilterStateValue {
        key: key.clone(),
        kind,
        format,
        read_only: *read_only,
        shared,
        skip_if_empty: *skip_if_empty,
    })
}

#[allow(deprecated)]
fn format_string(
    ctx: &Ctx<'_>,
    field: &str,
    s: &core_pb::SubstitutionFormatString,
) -> Result<ValueFormat, ConvertError> {
    use core_pb::substitution_format_string::Format as F;
    let cov = &VALUE_FORMAT;
    let core_pb::SubstitutionFormatString {
        omit_empty_values,
        content_type,
        formatters,
        json_format_options,
        format,
    } = s;
    let _ = (content_type, json_format_options);
    ctx.refuse(cov, field, "omit_empty_values", *omit_empty_values)?;
    ctx.refuse(cov, field, "formatters", !formatters.is_empty())?;
    let (f, text) = match format {
        Some(F::TextFormat(t)) => (path(field, "text_format"), t.clone()),
        Some(F::TextFormatSource(d)) => {
            let f = path(field, "text_format_source");
            let bytes = data_source(ctx, &f, Some(d))?;
            let t = String::from_utf8(bytes).map_err(|_| ctx.err(&f, "the format is not UTF-8"))?;
            (f, t)
        }
        Some(F::JsonFormat(_)) => {
            ctx.refuse(cov, field, "json_format", true)?;
            return Err(ctx.err(field, "a text format is required"));
        }
        None => return Err(ctx.err(field, "a text format is required")),
    };
    ValueFormat::parse(&text).map_err(|e| ctx.err(&f, e))
}
