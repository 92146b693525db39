//! `typed_per_filter_config`: the per-route, per-virtual-host, per-table and
//! per-weighted-cluster overrides of the HTTP filters (`FilterConfig`
//! wrapper included).

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors_pb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;

use super::cors::{CORS_POLICY_TYPE, cors_policy, disabled_cors};
use super::coverage::{fields, path};
use super::fault::{FAULT_TYPE, fault_config};
use super::istio::{ISTIO_TOLERATED, WASM_TYPES};
use super::local_ratelimit::{RATELIMIT_TYPE, disabled_ratelimit, local_ratelimit};
use super::{ConvertError, Ctx, HTTP_TOLERATED, Typed, compressor, ext_authz, jwt_authn, rbac};

const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";

fields!(pub(super) static FILTER_CONFIG = "envoy.config.route.v3.FilterConfig" {
    "config": applied,
    "is_optional": applied "an unsupported filter type is skipped with a warning either way (a connection manager running it is refused)",
    "disabled": applied "true turns the filter off for the route; false without a config (enabling a filter the connection manager disables) is refused",
});

/// The overrides Ferry's filters read, by filter name. An entry of a filter
/// type Ferry does not implement changes nothing (a connection manager that
/// runs such a filter is refused), so it is skipped with a warning;
/// Istio's own filters' entries are skipped as those filters are.
pub(super) fn per_filter_configs(
    ctx: &mut Ctx<'_>,
    field: &str,
    map: &std::collections::HashMap<String, Any>,
) -> Result<m::FilterOverrides, ConvertError> {
    let mut out = m::FilterOverrides::default();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        let Some(any) = map.get(name) else { continue };
        let ef = format!("{field}[{name:?}]");
        let mut typed = Typed::from_any(any).map_err(|e| ctx.err(&ef, e))?;
        let mut disabled = false;
        if typed.type_name() == FILTER_CONFIG_TYPE {
            // The route-level wrapper: `disabled` turns the filter off for
            // the route.
            let fc: route_pb::FilterConfig = typed.decode().map_err(|e| ctx.err(&ef, e))?;
            let route_pb::FilterConfig {
                config,
                is_optional,
                disabled: off,
            } = fc;
            let _ = is_optional;
            disabled = off;
            match config.as_ref() {
                Some(inner) => typed = Typed::from_any(inner).map_err(|e| ctx.err(&ef, e))?,
                None if disabled => {
                    // Without a config the filter kind is unknown: a
                    // disabled entry of each kind, each filter reading its own.
                    out.fault
                        .push((name.clone(), Arc::new(m::fault::FaultConfig::default())));
                    out.cors.push((name.clone(), Arc::new(disabled_cors())));
                    out.ratelimit
                        .push((name.clone(), Arc::new(disabled_ratelimit())));
                    out.rbac
                        .push((name.clone(), Arc::new(m::rbac::HttpRbac::default())));
                    out.jwt.push((name.clone(), m::jwt::JwtPerRoute::Disabled));
                    out.ext_authz.push((
                        name.clone(),
                        m::ext_authz::ExtAuthzPerRoute {
                            disabled: true,
                            ..Default::default()
                        },
                    ));
                    out.compressor.push((name.clone(), true));
                    continue;
                }
                // Enabling a filter the connection manager disabled: Ferry's
                // connection managers drop their disabled filters, so the
                // filter would never run on this route.
                None => {
                    return Err(ctx.err(
                        path(&ef, "disabled"),
                        "enabling per route a filter the connection manager disables is not supported",
                    ));
                }
            }
        }
        match typed.type_name() {
            FAULT_TYPE => {
                let cfg = if disabled {
                    m::fault::FaultConfig::default()
                } else {
                    let hf: fault_pb::HttpFault = typed.decode().map_err(|e| ctx.err(&ef, e))?;
                    fault_config(ctx, &ef, &hf)?
                };
                out.fault.push((name.clone(), Arc::new(cfg)));
            }
            CORS_POLICY_TYPE => {
                let cfg = if disabled {
                    disabled_cors()
                } else {
                    let p: cors_pb::CorsPolicy = typed.decode().map_err(|e| ctx.err(&ef, e))?;
                    cors_policy(ctx, &ef, &p)?
                };
                out.cors.push((name.clone(), Arc::new(cfg)));
            }
            RATELIMIT_TYPE => {
                let cfg = if disabled {
                    disabled_ratelimit()
                } else {
                    let p: ratelimit_pb::LocalRateLimit =
                        typed.decode().map_err(|e| ctx.err(&ef, e))?;
                    local_ratelimit(ctx, &ef, &p)?
                };
                out.ratelimit.push((name.clone(), Arc::new(cfg)));
            }
            rbac::HTTP_RBAC_PER_ROUTE_TYPE => {
                // A disabled entry has no rules: the filter lets everything through.
                let cfg = if disabled {
                    m::rbac::HttpRbac::default()
                } else {
                    rbac::http_rbac_per_route(ctx, &ef, typed)?
                };
                out.rbac.push((name.clone(), Arc::new(cfg)));
            }
            jwt_authn::JWT_PER_ROUTE_TYPE => {
                let cfg = if disabled {
                    m::jwt::JwtPerRoute::Disabled
                } else {
                    jwt_authn::per_route(ctx, &ef, typed)?
                };
                out.jwt.push((name.clone(), cfg));
            }
            ext_authz::EXT_AUTHZ_PER_ROUTE_TYPE => {
                let cfg = if disabled {
                    m::ext_authz::ExtAuthzPerRoute {
                        disabled: true,
                        ..Default::default()
                    }
                } else {
                    ext_authz::per_route(ctx, &ef, typed)?
                };
                out.ext_authz.push((name.clone(), cfg));
            }
            compressor::COMPRESSOR_PER_ROUTE_TYPE => {
                let off = disabled || compressor::per_route(ctx, &ef, typed)?;
                out.compressor.push((name.clone(), off));
            }
            // A Wasm filter's per-route configuration: the filter itself is
            // refused unless Istio's built-in or failing open.
            t if ISTIO_TOLERATED.contains(&t)
                || HTTP_TOLERATED.contains(&t)
                || WASM_TYPES.contains(&t) => {}
            t => ctx.warn(
                &ef,
                format!("per-filter configuration of unsupported type {t} has no effect; skipped"),
            ),
        }
    }
    Ok(out)
}
