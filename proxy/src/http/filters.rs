//! Runs the CORS, local rate limit and RBAC filters of a connection manager on one
//! request: the decisions come from `ferry_filters::http`; here they become
//! responses, request changes and Envoy's counters.

use ferry_filters::http::{
    cors as cors_filter, jwt_authn as jwt, local_ratelimit as rl, rbac as rbac_engine,
};
use ferry_model::cors::CorsPolicy;
use ferry_model::format::FormatContext;
use ferry_model::jwt::{JwtAuthn, JwtPerRoute};
use ferry_model::ratelimit::LocalRateLimit;
use ferry_model::rbac::{DynamicMetadata, HttpRbac};
use ferry_model::{HttpConnectionManager, Route, WeightedCluster};
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;

use super::ConnCtx;
use super::body::{self, ResponseBody};

/// The per-connection buckets of one downstream connection, by the address
/// of the configuration they follow (checked against its shape, since a
/// replaced route table may reuse an address).
#[derive(Default)]
pub struct ConnBuckets(std::sync::Mutex<Vec<(usize, std::sync::Arc<rl::BucketSet>)>>);

impl ConnBuckets {
    fn get(&self, cfg: &LocalRateLimit) -> std::sync::Arc<rl::BucketSet> {
        let key = cfg as *const LocalRateLimit as usize;
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, set)) = all.iter().find(|(k, s)| *k == key && s.fits(cfg)) {
            return set.clone();
        }
        all.retain(|(k, _)| *k != key);
        let set = std::sync::Arc::new(rl::BucketSet::like(cfg));
        all.push((key, set.clone()));
        set
    }
}

/// Headers the filters already passed add to whatever response comes back
/// (the encode side of a filter).
#[derive(Default)]
pub struct ResponseHooks {
    /// Set over whatever the response carries.
    set: HeaderMap,
    /// The external authorizer's changes, applied after.
    edits: Vec<super::ext_authz::Edit>,
    /// The compressor filters passed (their encode side runs in `handle`).
    pub compressors: super::compressor::Plan,
}

impl ResponseHooks {
    /// The encode side of the filters passed, on a response: its headers,
    /// and the compressors to run once the response is final.
    pub fn attach<B>(&self, resp: &mut Response<B>) {
        self.apply(resp.headers_mut());
        if !self.compressors.is_empty() {
            resp.extensions_mut().insert(self.compressors.clone());
        }
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        super::ext_authz::apply_edits(headers, &self.edits);
    }

    pub(super) fn edit(&mut self, edits: Vec<super::ext_authz::Edit>) {
        self.edits.extend(edits);
    }

    fn set_all(&mut self, h: HeaderMap) {
        for (k, v) in h {
            if let Some(k) = k {
                self.set.insert(k, v);
            }
        }
    }
}

/// `envoy.filters.http.cors`: a preflight is answered here (`Some`); an
/// allowed cross-origin request leaves its headers in `hooks`.
pub fn cors(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    policies: &[&CorsPolicy],
    req: &Request<Incoming>,
    hooks: &mut ResponseHooks,
) -> Option<Response<ResponseBody>> {
    let (decision, stats) = cors_filter::decide(
        policies,
        req.method(),
        req.headers(),
        (rand::random(), rand::random()),
    );
    let counter = |n: &str| {
        ctx.rt
            .stats
            .counter(&format!("http.{}.cors.{n}", hcm.stat_prefix))
            .inc()
    };
    if stats.origin_valid {
        counter("origin_valid");
    }
    if stats.origin_invalid {
        counter("origin_invalid");
    }
    match decision {
        cors_filter::Decision::Pass => None,
        cors_filter::Decision::Simple(h) => {
            hooks.set_all(h);
            None
        }
        cors_filter::Decision::Preflight(h) | cors_filter::Decision::Refused(h) => {
            let mut resp = Response::new(body::empty());
            *resp.headers_mut() = h;
            resp.extensions_mut()
                .insert(super::observe::Details("cors_response".into()));
            Some(resp)
        }
    }
}

/// The route a request took and the weighted cluster it picked: where the
/// filters find their `typed_per_filter_config` overrides, the picked
/// cluster's first, then the route's (which already falls back to its
/// virtual host's and its table's).
#[derive(Debug, Clone, Copy, Default)]
pub struct PerRoute<'a> {
    pub route: Option<&'a Route>,
    pub entry: Option<&'a WeightedCluster>,
}

impl<'a> PerRoute<'a> {
    pub fn fault(&self, filter: &str) -> Option<&'a ferry_model::fault::FaultConfig> {
        self.entry
            .and_then(|e| e.filters.fault(filter))
            .or_else(|| self.route.and_then(|r| r.fault_override(filter)))
    }

    pub fn ratelimit(&self, filter: &str) -> Option<&'a LocalRateLimit> {
        self.entry
            .and_then(|e| e.filters.ratelimit(filter))
            .or_else(|| self.route.and_then(|r| r.ratelimit_override(filter)))
    }

    pub fn rbac(&self, filter: &str) -> Option<&'a HttpRbac> {
        self.entry
            .and_then(|e| e.filters.rbac(filter))
            .or_else(|| self.route.and_then(|r| r.rbac_override(filter)))
    }

    /// Whether `CompressorPerRoute` turns the compressor `filter` off.
    pub fn compressor_disabled(&self, filter: &str) -> bool {
        let entry = self.entry.and_then(|e| {
            e.filters
                .compressor
                .iter()
                .find(|(n, _)| n == filter)
                .map(|(_, off)| *off)
        });
        entry.unwrap_or_else(|| self.route.is_some_and(|r| r.compressor_disabled(filter)))
    }

    pub fn jwt(&self, filter: &str) -> Option<&'a JwtPerRoute> {
        self.entry
            .and_then(|e| e.filters.jwt(filter))
            .or_else(|| self.route.and_then(|r| r.jwt_override(filter)))
    }

    pub fn ext_authz(&self, filter: &str) -> Option<&'a ferry_model::ext_authz::ExtAuthzPerRoute> {
        self.entry
            .and_then(|e| e.filters.ext_authz(filter))
            .or_else(|| self.route.and_then(|r| r.ext_authz_override(filter)))
    }

    /// The CORS policies, most specific first.
    pub fn cors(&self, filter: &str) -> Vec<&'a CorsPolicy> {
        let mut out: Vec<_> = self
            .entry
            .and_then(|e| e.filters.cors(filter))
            .into_iter()
            .collect();
        out.extend(
            self.route
                .map(|r| r.cors_policies(filter))
                .unwrap_or_default(),
        );
        out
    }
}

/// `envoy.filters.http.local_ratelimit`: `Some` is the answer to a request
/// over the limit; a request over a limit that is not enforced gets the
/// configured request headers.
pub fn local_ratelimit(
    ctx: &ConnCtx,
    cfg: &LocalRateLimit,
    route: Option<&Route>,
    cluster: &str,
    req: &mut Request<Incoming>,
    fctx: &FormatContext<'_>,
    hooks: &mut ResponseHooks,
) -> Option<Response<ResponseBody>> {
    let requested = match route {
        Some(r) if !cfg.descriptors.is_empty() => {
            let info = rl::RequestInfo {
                pseudo: super::pseudo_of(req),
                headers: req.headers(),
                remote: super::client::remote(ctx, req).ip(),
                cluster,
            };
            rl::descriptors(cfg, &r.rate_limits, &r.vhost_rate_limits, &info)
        }
        _ => Vec::new(),
    };
    let own = cfg.per_connection.then(|| ctx.ratelimit_buckets.get(cfg));
    let (decision, shown) = rl::decide(
        cfg,
        own.as_deref(),
        &requested,
        (rand::random(), rand::random()),
    );
    if cfg.x_ratelimit_headers
        && let Some(b) = shown
    {
        // Every answer to the request says where its bucket stands.
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit", HeaderValue::from(b.max_tokens));
        h.insert("x-ratelimit-remaining", HeaderValue::from(b.remaining()));
        h.insert(
            "x-ratelimit-reset",
            HeaderValue::from(b.seconds_until_token()),
        );
        hooks.set_all(h);
    }
    let counter = |n: &str| {
        ctx.rt
            .stats
            .counter(&format!("{}.http_local_rate_limit.{n}", cfg.stat_prefix))
            .inc()
    };
    if decision == rl::Decision::Disabled {
        return None;
    }
    counter("enabled");
    match decision {
        rl::Decision::Disabled => None,
        rl::Decision::Allowed => {
            counter("ok");
            None
        }
        rl::Decision::LimitedNotEnforced => {
            counter("rate_limited");
            cfg.request_headers_when_not_enforced
                .apply(req.headers_mut(), fctx, None);
            None
        }
        rl::Decision::Limited => {
            counter("rate_limited");
            counter("enforced");
            let mut resp = super::local_reply(super::LocalReply {
                status: cfg.status,
                body: Some("local_rate_limited".into()),
            });
            // Envoy 1.40 does not add `x-envoy-ratelimited` here (its docs
            // say it does): only the configured headers.
            cfg.response_headers
                .apply(resp.headers_mut(), fctx, Some(req.headers()));
            if cfg.grpc_resource_exhausted {
                // A gRPC request then gets RESOURCE_EXHAUSTED, not UNAVAILABLE.
                resp.extensions_mut().insert(super::LocalBody {
                    text: Some("local_rate_limited".into()),
                    grpc_status: Some(8),
                });
            }
            Some(resp)
        }
    }
}

/// What a request that passed `envoy.filters.http.jwt_authn` carries on.
pub struct JwtPassed {
    /// The request's dynamic metadata when a verified token put its payload
    /// there (`None`: nothing added).
    pub metadata: Option<DynamicMetadata>,
    /// `clear_route_cache`: the route is to be chosen again.
    pub reroute: bool,
}

/// `envoy.filters.http.jwt_authn`: `Err` is the 401 (or 403) of a request
/// whose token fails its requirement; `Ok` says what it carries on. Tokens
/// that are not forwarded are removed from the request.
pub fn jwt_authn(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    cfg: &JwtAuthn,
    per_route: PerRoute<'_>,
    filter_name: &str,
    req: &mut Request<Incoming>,
    request_metadata: Option<DynamicMetadata>,
) -> Result<JwtPassed, Box<Response<ResponseBody>>> {
    let counter = |n: &str| {
        ctx.rt
            .stats
            .counter(&format!("http.{}.jwt_authn.{n}", hcm.stat_prefix))
            .inc()
    };
    // A route's `PerRouteConfig`: off (Envoy still counts the request as
    // allowed), or a named requirement instead of the rules.
    let route_requirement = match per_route.jwt(filter_name) {
        Some(JwtPerRoute::Disabled) => {
            counter("allowed");
            return Ok(JwtPassed {
                metadata: request_metadata,
                reroute: false,
            });
        }
        Some(JwtPerRoute::RequirementName(n)) => match cfg.requirement_map.get(n) {
            Some(r) => Some(r),
            None => {
                counter("denied");
                return Err(Box::new(super::local_reply(super::LocalReply {
                    status: http::StatusCode::FORBIDDEN,
                    // Envoy 1.40's text (seen with one name in the map).
                    body: Some(format!(
                        "Failed JWT authentication: Wrong requirement_name: {n}. It should be one of [{}]",
                        cfg.requirement_map
                            .keys()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    )),
                })));
            }
        },
        None => None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let decision = {
        let pseudo = super::pseudo_of(req);
        match jwt::decide(cfg, route_requirement, &pseudo, req.headers(), now) {
            jwt::Decision::Deny(status) => Err((
                status,
                jwt::www_authenticate(status, &pseudo, req.headers()),
            )),
            jwt::Decision::Pass(v) => Ok(v),
            jwt::Decision::Preflight => {
                counter("cors_preflight_bypassed");
                Ok(Vec::new())
            }
        }
    };
    match decision {
        Ok(verified) => {
            counter("allowed");
            let reroute = jwt::clears_route_cache(cfg, &verified);
            let entries = jwt::apply(cfg, &verified, req.headers_mut());
            if entries.is_empty() {
                return Ok(JwtPassed {
                    metadata: request_metadata,
                    reroute,
                });
            }
            let mut md = request_metadata.unwrap_or_else(|| ctx.rbac_view().1.clone());
            md.0.entry(jwt::METADATA_NAMESPACE.to_string())
                .or_default()
                .extend(entries);
            Ok(JwtPassed {
                metadata: Some(md),
                reroute,
            })
        }
        Err((status, realm)) => {
            counter("denied");
            tracing::debug!(jwt.status = %status, src.addr = %ctx.peer, "JWT authentication failed");
            let mut resp = super::local_reply(super::LocalReply {
                status: http::StatusCode::from_u16(status.http_status())
                    .unwrap_or(http::StatusCode::UNAUTHORIZED),
                body: (!cfg.strip_failure_response).then(|| status.to_string()),
            });
            if !cfg.strip_failure_response
                && let Ok(v) = HeaderValue::from_str(&realm)
            {
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
            }
            resp.extensions_mut().insert(super::observe::Details(
                format!(
                    "jwt_authn_access_denied{{{}}}",
                    status.to_string().replace(' ', "_")
                )
                .into(),
            ));
            Err(Box::new(resp))
        }
    }
}

/// What the RBAC filters put in a request's dynamic metadata (namespace
/// `envoy.filters.http.rbac`): the shadow rules' verdict, by key.
#[derive(Debug, Clone, Default)]
pub struct RbacMetadata(pub Vec<(String, String)>);

/// `envoy.filters.http.rbac`: the shadow rules are evaluated and counted,
/// then the enforced ones; `Some` is the 403 of a denied request. A route's
/// `RBACPerRoute` replaces both rule sets (none: the filter lets the request
/// through); the counters stay the filter's.
pub fn rbac(
    ctx: &ConnCtx,
    hcm: &HttpConnectionManager,
    cfg: &HttpRbac,
    per_route: PerRoute<'_>,
    filter_name: &str,
    req: &mut Request<Incoming>,
    request_metadata: Option<&DynamicMetadata>,
) -> Option<Response<ResponseBody>> {
    let rules = per_route.rbac(filter_name).unwrap_or(cfg);
    if rules.rules.is_none() && rules.shadow_rules.is_none() {
        return None;
    }
    let pseudo = super::pseudo_of(req);
    let (downstream, metadata) = ctx.rbac_view();
    let metadata = request_metadata.unwrap_or(metadata);
    let subject = rbac_engine::Subject {
        headers: req.headers(),
        pseudo: Some(&pseudo),
        local: ctx.original_dst,
        direct_remote: ctx.peer,
        remote: super::client::remote(ctx, req).ip(),
        server_name: &downstream.server_name,
        tls: downstream.tls_peer(),
        metadata,
        // The request's own (set by set_filter_state), which holds the
        // connection's too, else the connection's.
        filter_state: req
            .extensions()
            .get::<ferry_model::filter_state::FilterState>()
            .or(downstream.filter_state.as_deref()),
    };
    let base = format!("http.{}.", hcm.stat_prefix);
    let counters = crate::rbac::RbacCounters {
        stats: &ctx.rt.stats,
        base: &base,
        rules_prefix: &cfg.rules_stat_prefix,
        shadow_prefix: &cfg.shadow_rules_stat_prefix,
        // Envoy keeps per-policy counters for the filter's own rules only,
        // never for a route's.
        per_rule: cfg.track_per_rule_stats && std::ptr::eq(rules, cfg),
    };
    let shadow = rules
        .shadow_rules
        .as_ref()
        .map(|shadow| rbac_engine::evaluate(shadow, &subject));
    if let Some(v) = &shadow {
        counters.shadow(v);
    }
    let enforced = rules
        .rules
        .as_deref()
        .map(|r| rbac_engine::evaluate(r, &subject));
    // As Envoy's filter: the shadow rules' verdict goes into the request's
    // dynamic metadata (what Istio's dry-run trace tags read).
    if let Some(v) = shadow {
        let prefix = &cfg.shadow_rules_stat_prefix;
        let mut md = Vec::with_capacity(2);
        if let Some(p) = v.matched_policy {
            md.push((format!("{prefix}shadow_effective_policy_id"), p));
        }
        md.push((
            format!("{prefix}shadow_engine_result"),
            if v.allowed { "allowed" } else { "denied" }.to_string(),
        ));
        match req.extensions_mut().get_mut::<RbacMetadata>() {
            Some(m) => m.0.extend(md),
            None => {
                req.extensions_mut().insert(RbacMetadata(md));
            }
        }
    }
    let enforced = enforced?;
    counters.enforced(&enforced);
    if enforced.allowed {
        return None;
    }
    tracing::debug!(
        rbac.policy = enforced.matched_policy.as_deref().unwrap_or("none"),
        src.addr = %ctx.peer,
        "RBAC denied the request"
    );
    let mut resp = super::local_reply(super::LocalReply {
        status: http::StatusCode::FORBIDDEN,
        body: Some("RBAC: access denied".into()),
    });
    resp.extensions_mut().insert(super::observe::Details(
        format!(
            "rbac_access_denied_matched_policy[{}]",
            enforced.matched_policy.as_deref().unwrap_or("none")
        )
        .into(),
    ));
    Some(resp)
}
