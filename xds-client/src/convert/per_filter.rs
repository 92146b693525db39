//! `typed_per_filter_config`: the per-route, per-virtual-host overrides
//! of the HTTP filters (`FilterConfig` wrapper included).

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as cors_pb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault_pb;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as ratelimit_pb;
use envoy_types::pb::google::protobuf::Any;
use ferry_model as m;

use super::cors::{CORS_POLICY_TYPE, cors_policy, disabled_cors};
use super::fault::{FAULT_TYPE, fault_config};
use super::local_ratelimit::{RATELIMIT_TYPE, disabled_ratelimit, local_ratelimit};
use super::{ConvertError, Ctx, Typed, jwt_authn, rbac};

const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";

/// The entries of a `typed_per_filter_config` map Ferry's filters read, by
/// filter name; entries of other filters are left alone.
#[derive(Default)]
pub(super) struct PerFilter {
    pub(super) fault: Vec<(String, Arc<m::fault::FaultConfig>)>,
    pub(super) cors: Vec<(String, Arc<m::cors::CorsPolicy>)>,
    pub(super) ratelimit: Vec<(String, Arc<m::ratelimit::LocalRateLimit>)>,
    pub(super) rbac: Vec<(String, Arc<m::rbac::HttpRbac>)>,
    pub(super) jwt: Vec<(String, m::jwt::JwtPerRoute)>,
}

pub(super) fn per_filter_configs(
    ctx: &mut Ctx<'_>,
    field: &str,
    map: &std::collections::HashMap<String, Any>,
) -> Result<PerFilter, ConvertError> {
    let mut out = PerFilter::default();
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
            disabled = fc.disabled;
            match fc.config.as_ref() {
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
                    continue;
                }
                None => continue,
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
            _ => {}
        }
    }
    Ok(out)
}
