//! `/explain` (beyond Envoy): what the running configuration would do with
//! a request, and why, without sending one. Given the request
//! (`method`, `authority`, `path`, `header=name:value`…) and its
//! connection (`source`, `destination` or `listener`, `sni`, `alpn`,
//! `principal`), it answers from the live snapshot: the listener (and the
//! original-destination hand-off), the filter chain and what ruled out the
//! others, the network RBAC verdicts, then for HTTP the route table,
//! virtual host and matched domain, every earlier route with its first
//! failing condition, the chosen route's action (weighted choices with
//! their shares, timeouts, retry policy, rewrites, mirrors), each HTTP
//! filter's verdict in order (RBAC with shadow rules, JWT, fault, rate
//! limit), the outcome, and each cluster with its live endpoint set.
//!
//! The verdicts come from the data path's own matchers and filter engines
//! (`Listener::select_chain`, `RouteMatch`, the RBAC and JWT engines):
//! the explanation cannot drift from what a request gets. What it cannot
//! know is said so: random draws (weighted clusters, runtime fractions,
//! fault percentages) are reported as shares, not decided.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use ferry_filters::http::{jwt_authn as jwt, rbac as rbac_engine};
use ferry_model::explain::{chain_accepts, chain_criterion, connection_value};
use ferry_model::jwt::JwtPerRoute;
use ferry_model::listener::ChainStep;
use ferry_model::rbac::{DynamicMetadata, Rbac};
use ferry_model::{
    ChainKind, ClusterKind, ClusterSpecifier, ConnectionInfo, FilterChain, HttpConnectionManager,
    HttpFilterConfig, LbPolicy, Listener, Pseudo, Route, RouteAction, RouteSource, Snapshot,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Map, Value, json};

use super::{Query, json, text};
use crate::run::Runtime;

/// The request and connection to explain, from the query.
struct Ask {
    method: String,
    authority: String,
    path: String,
    scheme: String,
    headers: HeaderMap,
    source: SocketAddr,
    destination: Option<SocketAddr>,
    listener: Option<String>,
    sni: Option<String>,
    tls: bool,
    alpn: Vec<String>,
    /// `http/1.0`, `http/1.1` or `h2c`: what the HTTP inspector would see.
    protocol: String,
    /// The client certificate's URI SAN (a SPIFFE identity).
    principal: Option<String>,
}

pub(super) fn respond(rt: &Runtime, q: &Query) -> Response<Full<Bytes>> {
    let snap = rt.snapshot.load();
    let endpoints = |name: &str| live_endpoints(rt, name);
    match Ask::parse(q) {
        Ok(ask) => match explain(&snap, &endpoints, &ask) {
            Ok(v) => json(&v),
            Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
        },
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

impl Ask {
    fn parse(q: &Query) -> Result<Self, String> {
        let addr = |k: &str| -> Result<Option<SocketAddr>, String> {
            q.get(k)
                .map(|v| {
                    v.parse::<SocketAddr>()
                        .map_err(|_| format!("{k}: expected ip:port, got \"{v}\""))
                })
                .transpose()
        };
        let mut headers = HeaderMap::new();
        for h in q.all("header") {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("header: expected name:value, got \"{h}\""))?;
            let name = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("header: invalid name \"{name}\""))?;
            let value = HeaderValue::from_str(value.trim_start())
                .map_err(|_| format!("header: invalid value for \"{name}\""))?;
            headers.append(name, value);
        }
        let authority = q.get("authority").unwrap_or_default().to_string();
        let sni = q.get("sni").filter(|s| !s.is_empty()).map(str::to_string);
        let principal = q
            .get("principal")
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let alpn: Vec<String> = q
            .get("alpn")
            .map(|a| {
                a.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let tls = match q.get("tls") {
            Some("true" | "1") => true,
            Some("false" | "0") => false,
            Some(v) => return Err(format!("tls: expected true or false, got \"{v}\"")),
            None => sni.is_some() || principal.is_some(),
        };
        let protocol = q.get("protocol").unwrap_or("http/1.1").to_string();
        if !matches!(protocol.as_str(), "http/1.0" | "http/1.1" | "h2c") {
            return Err(format!(
                "protocol: expected http/1.0, http/1.1 or h2c, got \"{protocol}\""
            ));
        }
        let destination = match addr("destination")? {
            Some(d) => Some(d),
            None => authority.parse().ok(),
        };
        let listener = q.get("listener").map(str::to_string);
        if destination.is_none() && listener.is_none() {
            return Err(
                "give destination=ip:port (the address the client connects to) or listener=NAME"
                    .into(),
            );
        }
        Ok(Ask {
            method: q.get("method").unwrap_or("GET").to_ascii_uppercase(),
            path: q.get("path").unwrap_or("/").to_string(),
            scheme: q.get("scheme").unwrap_or("http").to_string(),
            authority,
            headers,
            source: addr("source")?.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
            destination,
            listener,
            sni,
            tls,
            alpn,
            protocol,
            principal,
        })
    }

    fn pseudo(&self) -> Pseudo<'_> {
        Pseudo {
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            scheme: &self.scheme,
        }
    }

    /// What the RBAC policies see of the connection and request.
    fn subject<'a>(
        &'a self,
        local: SocketAddr,
        tls: Option<rbac_engine::TlsPeer<'a>>,
        metadata: &'a DynamicMetadata,
        headers: &'a HeaderMap,
        pseudo: Option<&'a Pseudo<'a>>,
    ) -> rbac_engine::Subject<'a> {
        rbac_engine::Subject {
            headers,
            pseudo,
            local,
            direct_remote: self.source,
            remote: self.source.ip(),
            server_name: self.sni.as_deref().unwrap_or_default(),
            tls,
            metadata,
            filter_state: None,
        }
    }
}

/// Why an explanation could not be given.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The question is malformed (a bad address, header or flag).
    #[error("{0}")]
    Ask(String),
    /// The configuration has nothing to say (no listener takes it).
    #[error("{0}")]
    NotFound(String),
}

/// The same explanation as `/explain`, for a configuration that is not
/// running: `snap` is the configuration (converted as the data path would
/// take it), `endpoints` gives each cluster's endpoint set in
/// `/explain`'s shape, and `query` holds `/explain`'s parameters (repeated
/// keys, such as `header`, in order). `ferry-pilot explain` answers with it
/// from the configuration it would send a proxy.
pub fn explain_config(
    snap: &Snapshot,
    endpoints: &dyn Fn(&str) -> Vec<Value>,
    query: &[(String, String)],
) -> Result<Value, ExplainError> {
    let q = Query::from_pairs(query);
    let ask = Ask::parse(&q).map_err(ExplainError::Ask)?;
    explain(snap, endpoints, &ask).map_err(ExplainError::NotFound)
}

/// A live cluster's endpoints, with their health, as `/explain` shows them.
fn live_endpoints(rt: &Runtime, name: &str) -> Vec<Value> {
    rt.clusters
        .load()
        .get(name)
        .map(|live| {
            live.endpoints()
                .iter()
                .map(|(p, m)| {
                    json!({
                        "address": p.address.to_string(),
                        "health_flags": super::clusters::health_flags(p, m),
                        "weight": m.weight,
                        "priority": m.priority,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The explanation, or why there is none (no such listener).
fn explain(
    snap: &Snapshot,
    endpoints: &dyn Fn(&str) -> Vec<Value>,
    ask: &Ask,
) -> Result<Value, String> {
    let mut out = Map::new();
    out.insert("request".into(), request_json(ask));
    let (listener, via) = pick_listener(snap, ask)?;
    let dst = ask.destination.unwrap_or(listener.address);
    let mut l = json!({
        "name": listener.name,
        "address": listener.address.to_string(),
    });
    if let Some(via) = via {
        l["handed_over_by"] = json!(via);
    }
    out.insert("listener".into(), l);

    let info = ConnectionInfo {
        destination: Some(dst),
        source: Some(ask.source),
        server_name: ask.sni.clone(),
        transport_protocol: listener
            .listener_filters
            .tls_inspector
            .then_some(if ask.tls { "tls" } else { "raw_buffer" }),
        application_protocols: if !ask.alpn.is_empty() {
            ask.alpn.clone()
        } else if !ask.tls && listener.listener_filters.http_inspector {
            vec![ask.protocol.clone()]
        } else {
            Vec::new()
        },
    };
    let (chain, chain_json) = explain_chain(&listener, &info);
    out.insert("filter_chain".into(), chain_json);
    let Some(chain) = chain else {
        out.insert(
            "outcome".into(),
            json!(format!(
                "no filter chain matches: the connection is closed (listener.{}.no_filter_chain_match)",
                listener.name
            )),
        );
        return Ok(Value::Object(out));
    };

    // What the policies see of the peer: its certificate's URI SAN, on a
    // chain that terminates TLS.
    let uris: Vec<String> = ask.principal.iter().cloned().collect();
    let tls_peer = chain.tls.as_ref().map(|_| rbac_engine::TlsPeer {
        uri_sans: &uris,
        dns_sans: &[],
        subject: "",
    });
    let metadata = rbac_engine::istio_authn_metadata(
        chain
            .tls
            .as_ref()
            .and(ask.principal.as_deref())
            .filter(|p| p.starts_with("spiffe://")),
    );
    let empty = HeaderMap::new();
    let mut denied = None;
    let mut network = Vec::new();
    for r in &chain.rbac {
        let subject = ask.subject(dst, tls_peer, &metadata, &empty, None);
        let (v, allowed) = rbac_json(r.rules.as_deref(), r.shadow_rules.as_deref(), &subject);
        network.push(json!({"stat_prefix": r.stat_prefix, "result": v}));
        if !allowed && denied.is_none() {
            denied = Some(format!(
                "the connection is closed by envoy.filters.network.rbac ({})",
                r.stat_prefix
            ));
        }
    }
    if !chain.rbac.is_empty() {
        out.insert("network_rbac".into(), Value::Array(network));
    }
    if let Some(d) = denied {
        out.insert("outcome".into(), json!(d));
        return Ok(Value::Object(out));
    }

    let clusters: Vec<String> = match &chain.kind {
        ChainKind::Tcp(t) => {
            let total = t.total_weight();
            let tcp = if total == 0 {
                json!({"cluster": t.cluster})
            } else {
                json!({"weighted_clusters": t.weighted.iter().map(|(n, w)| json!({
                    "name": n,
                    "weight": w,
                    "share": share(u64::from(*w), total),
                })).collect::<Vec<_>>()})
            };
            out.insert("tcp_proxy".into(), tcp);
            out.insert(
                "outcome".into(),
                json!("proxied by envoy.filters.network.tcp_proxy"),
            );
            if total == 0 {
                vec![t.cluster.clone()]
            } else {
                t.weighted.iter().map(|(n, _)| n.clone()).collect()
            }
        }
        ChainKind::Http(hcm) => {
            let (http, outcome, clusters) = explain_http(snap, hcm, ask, dst, tls_peer, &metadata);
            out.insert("http".into(), http);
            out.insert("outcome".into(), json!(outcome));
            clusters
        }
    };
    let cl: Vec<Value> = clusters
        .iter()
        .map(|name| cluster_json(endpoints, snap, name))
        .collect();
    out.insert("clusters".into(), Value::Array(cl));
    Ok(Value::Object(out))
}

fn request_json(ask: &Ask) -> Value {
    let mut headers = Map::new();
    for (k, v) in &ask.headers {
        headers.insert(
            k.as_str().to_string(),
            json!(String::from_utf8_lossy(v.as_bytes())),
        );
    }
    json!({
        "method": ask.method,
        "authority": ask.authority,
        "path": ask.path,
        "headers": headers,
        "source": ask.source.to_string(),
        "destination": ask.destination.map(|d| d.to_string()),
        "tls": ask.tls,
        "sni": ask.sni,
        "principal": ask.principal,
    })
}

/// The listener that takes the connection, and the original-destination
/// listener that handed it over, if one did (as `listener::handle`).
fn pick_listener(snap: &Snapshot, ask: &Ask) -> Result<(Arc<Listener>, Option<String>), String> {
    let accepted = match (&ask.listener, ask.destination) {
        (Some(name), _) => snap
            .listener(name)
            .cloned()
            .ok_or_else(|| format!("no listener named \"{name}\""))?,
        (None, Some(dst)) => match snap.listener_for_original_dst(dst) {
            Some(l) if l.bind_to_port => l.clone(),
            // A listener that binds no port is reached through the one
            // traffic is redirected to (iptables), which hands it over.
            found => snap
                .listeners
                .iter()
                .find(|l| l.use_original_dst && l.bind_to_port)
                .or(found)
                .cloned()
                .ok_or_else(|| format!("no listener takes connections to {dst}"))?,
        },
        (None, None) => return Err("no destination".into()),
    };
    if let Some(dst) = ask.destination
        && accepted.use_original_dst
        && !accepted.addresses().any(|a| a == dst)
        && let Some(l) = snap
            .listener_for_original_dst(dst)
            .filter(|l| !Arc::ptr_eq(l, &accepted))
    {
        return Ok((l.clone(), Some(accepted.name.clone())));
    }
    Ok((accepted, None))
}

/// The chosen chain and the reasons the others lost, step by step.
fn explain_chain<'l>(
    listener: &'l Listener,
    info: &ConnectionInfo,
) -> (Option<&'l Arc<FilterChain>>, Value) {
    let mut left: Vec<&Arc<FilterChain>> = listener.filter_chains.iter().collect();
    let mut rejected = Vec::new();
    let chosen = listener.select_chain_observed(info, |step: ChainStep, cands| {
        left.retain(|c| {
            let keep = cands.iter().any(|k| Arc::ptr_eq(k, c));
            if !keep {
                rejected.push(rejection(c, info, step));
            }
            keep
        });
    });
    // A `filter_chain_matcher` decides alone: the chains' own matches are not read,
    // so no chain is rejected step by step.
    let by_matcher = listener.filter_chain_matcher.is_some();
    let Some(chain) = chosen else {
        return (
            None,
            json!({"name": null, "rejected": rejected, "default_chain": false,
                   "filter_chain_matcher": by_matcher}),
        );
    };
    let is_default = listener
        .default_chain
        .as_ref()
        .is_some_and(|d| Arc::ptr_eq(d, chain));
    let kind = match &chain.kind {
        ChainKind::Tcp(_) => "envoy.filters.network.tcp_proxy",
        ChainKind::Http(_) => "envoy.filters.network.http_connection_manager",
    };
    let v = json!({
        "name": chain.name,
        "default_chain": is_default,
        "terminates_tls": chain.tls.is_some(),
        "requires_client_certificate": chain.tls.as_ref().map(|t| t.require_client_certificate),
        "terminal_filter": kind,
        "rejected": rejected,
        "filter_chain_matcher": by_matcher,
    });
    (Some(chain), v)
}

fn rejection(c: &FilterChain, info: &ConnectionInfo, step: ChainStep) -> Value {
    let m = &c.filter_chain_match;
    let wants = chain_criterion(m, step);
    let reason = if !chain_accepts(m, info, step) {
        "does not match"
    } else if wants.is_none() {
        "leaves it open while another chain matches it"
    } else {
        "another chain matches it more specifically"
    };
    json!({
        "name": c.name,
        "step": step.field(),
        "wants": wants,
        "connection": connection_value(info, step),
        "reason": reason,
    })
}

/// One RBAC filter's enforced and shadow verdicts; `bool`: let through.
fn rbac_json(
    rules: Option<&Rbac>,
    shadow: Option<&Rbac>,
    subject: &rbac_engine::Subject<'_>,
) -> (Value, bool) {
    let verdict = |v: rbac_engine::Verdict| {
        json!({
            "allowed": v.allowed,
            "matched_policy": v.matched_policy,
        })
    };
    let enforced = rules.map(|r| rbac_engine::evaluate(r, subject));
    let allowed = enforced.as_ref().is_none_or(|v| v.allowed);
    let v = json!({
        "enforced": enforced.map(verdict),
        "shadow": shadow.map(|r| verdict(rbac_engine::evaluate(r, subject))),
    });
    (v, allowed)
}

/// The connection manager's part: route table, virtual host, routes,
/// filters; returns the JSON, the outcome and the clusters to show.
fn explain_http(
    snap: &Snapshot,
    hcm: &HttpConnectionManager,
    ask: &Ask,
    dst: SocketAddr,
    tls_peer: Option<rbac_engine::TlsPeer<'_>>,
    metadata: &DynamicMetadata,
) -> (Value, String, Vec<String>) {
    let mut out = Map::new();
    let pseudo = ask.pseudo();
    let (rc_name, rc) = match &hcm.routes {
        RouteSource::Inline(rc) => (rc.name.clone(), Some(rc.clone())),
        RouteSource::Rds(name) => (name.clone(), snap.routes.get(name).cloned()),
    };
    out.insert(
        "route_config".into(),
        json!({
            "name": rc_name,
            "source": if matches!(hcm.routes, RouteSource::Rds(_)) { "rds" } else { "inline" },
            "loaded": rc.is_some(),
        }),
    );
    let vh = rc.as_deref().and_then(|rc| rc.virtual_host(&ask.authority));
    let mut route: Option<(usize, &Route)> = None;
    if let Some(vh) = vh {
        out.insert(
            "virtual_host".into(),
            json!({
                "name": vh.name,
                "matched_domain": vh.matched_domain(if rc.as_ref().is_some_and(|r| r.ignore_port_in_host_matching) {
                    ferry_model::route::strip_port(&ask.authority)
                } else {
                    &ask.authority
                }),
            }),
        );
        let mut skipped = Vec::new();
        for (i, r) in vh.routes.iter().enumerate() {
            let reason = match r.route_match.mismatch(&pseudo, &ask.headers) {
                Some(why) => why,
                None => match r.route_match.runtime_fraction {
                    Some(f) if f.numerator < f.denominator => format!(
                        "matches, but only {} of requests (runtime_fraction); the others go on",
                        share(u64::from(f.numerator), u64::from(f.denominator))
                    ),
                    _ => {
                        route = Some((i, r));
                        break;
                    }
                },
            };
            skipped.push(json!({
                "index": i,
                "name": r.name,
                "match": r.route_match.describe(),
                "reason": reason,
            }));
        }
        out.insert("skipped_routes".into(), Value::Array(skipped));
    } else {
        out.insert("virtual_host".into(), Value::Null);
    }

    let mut clusters = Vec::new();
    let mut outcome = None;
    if let Some((i, r)) = route {
        let (v, cl) = route_json(i, r, &ask.headers);
        out.insert("route".into(), v);
        clusters = cl;
    } else {
        out.insert("route".into(), Value::Null);
    }
    // The cluster for the fault filter's `upstream_cluster`: the one a
    // single-cluster route names.
    let cluster = match route.map(|(_, r)| &r.action) {
        Some(RouteAction::Route {
            cluster: ClusterSpecifier::Name(n),
            ..
        }) => n.as_str(),
        _ => "",
    };
    let mut filters = Vec::new();
    let mut request_metadata = metadata.clone();
    for f in &hcm.http_filters {
        let r = route.map(|(_, r)| r);
        let mut v = json!({"name": f.name});
        if outcome.is_some() {
            v["reached"] = json!(false);
            filters.push(v);
            continue;
        }
        match &f.config {
            HttpFilterConfig::Rbac(cfg) => {
                let rules = r.and_then(|r| r.rbac_override(&f.name)).unwrap_or(cfg);
                v["type"] = json!("envoy.filters.http.rbac");
                v["route_override"] = json!(!std::ptr::eq(rules, cfg.as_ref()));
                let subject = ask.subject(
                    dst,
                    tls_peer,
                    &request_metadata,
                    &ask.headers,
                    Some(&pseudo),
                );
                let (res, allowed) = rbac_json(
                    rules.rules.as_deref(),
                    rules.shadow_rules.as_deref(),
                    &subject,
                );
                v["result"] = res;
                if !allowed {
                    outcome = Some(format!(
                        "403 \"RBAC: access denied\" from {} (rbac_access_denied_matched_policy)",
                        f.name
                    ));
                }
            }
            HttpFilterConfig::SetFilterState(_) => {
                v["type"] = json!("envoy.filters.http.set_filter_state");
                v["result"] = json!("sets filter state (not evaluated here)");
            }
            HttpFilterConfig::ExtAuthz(_) => {
                v["type"] = json!("envoy.filters.http.ext_authz");
                v["result"] = json!(match r.and_then(|r| r.ext_authz_override(&f.name)) {
                    Some(o) if o.disabled => "disabled on the route",
                    _ => "asks the external authorizer (not asked here)",
                });
            }
            HttpFilterConfig::JwtAuthn(cfg) => {
                v["type"] = json!("envoy.filters.http.jwt_authn");
                let requirement = match r.and_then(|r| r.jwt_override(&f.name)) {
                    Some(JwtPerRoute::Disabled) => {
                        v["result"] = json!("disabled on the route");
                        filters.push(v);
                        continue;
                    }
                    Some(JwtPerRoute::RequirementName(n)) => match cfg.requirement_map.get(n) {
                        Some(req) => Some(req),
                        None => {
                            v["result"] = json!(format!("unknown requirement_name {n}"));
                            outcome = Some(format!("403 from {} (wrong requirement_name)", f.name));
                            filters.push(v);
                            continue;
                        }
                    },
                    None => None,
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default();
                match jwt::decide(cfg, requirement, &pseudo, &ask.headers, now) {
                    jwt::Decision::Pass(verified) => {
                        v["result"] = json!("passes");
                        v["verified_providers"] =
                            json!(verified.iter().map(|x| &x.provider).collect::<Vec<_>>());
                        let entries = jwt::apply(cfg, &verified, &mut ask.headers.clone());
                        if !entries.is_empty() {
                            request_metadata
                                .0
                                .entry(jwt::METADATA_NAMESPACE.to_string())
                                .or_default()
                                .extend(entries);
                        }
                    }
                    jwt::Decision::Preflight => v["result"] = json!("CORS preflight, not checked"),
                    jwt::Decision::Deny(status) => {
                        v["result"] = json!(format!("denied: {status}"));
                        outcome = Some(format!(
                            "{} \"{status}\" from {}",
                            status.http_status(),
                            f.name
                        ));
                    }
                }
            }
            HttpFilterConfig::Fault(cfg) => {
                let cfg = r.and_then(|r| r.fault_override(&f.name)).unwrap_or(cfg);
                v["type"] = json!("envoy.filters.http.fault");
                let applies = cfg
                    .headers
                    .iter()
                    .all(|h| h.matches_request(&ask.headers, Some(&pseudo)))
                    && cfg.upstream_cluster.as_deref().is_none_or(|c| c == cluster);
                v["applies"] = json!(applies);
                if let Some(d) = &cfg.delay {
                    v["delay_share"] = json!(share(
                        d.percentage.numerator.into(),
                        d.percentage.denominator.into()
                    ));
                }
                if let Some(a) = &cfg.abort {
                    v["abort_share"] = json!(share(
                        a.percentage.numerator.into(),
                        a.percentage.denominator.into()
                    ));
                    v["abort_status"] = match a.source {
                        ferry_model::fault::AbortSource::Http(s) => json!(s),
                        ferry_model::fault::AbortSource::Grpc(s) => json!(format!("grpc {s}")),
                        ferry_model::fault::AbortSource::Header => json!("from request header"),
                    };
                }
            }
            HttpFilterConfig::LocalRateLimit(cfg) => {
                let cfg = r.and_then(|r| r.ratelimit_override(&f.name)).unwrap_or(cfg);
                v["type"] = json!("envoy.filters.http.local_ratelimit");
                v["enabled_share"] = json!(share(
                    cfg.filter_enabled.numerator.into(),
                    cfg.filter_enabled.denominator.into()
                ));
                v["enforced_share"] = json!(share(
                    cfg.filter_enforced.numerator.into(),
                    cfg.filter_enforced.denominator.into()
                ));
                v["token_bucket"] = cfg.bucket.as_ref().map_or(Value::Null, |b| {
                    json!({
                        "max_tokens": b.max_tokens,
                        "tokens_per_fill": b.tokens_per_fill,
                        "fill_interval": secs(b.fill_interval),
                    })
                });
            }
            HttpFilterConfig::Cors => {
                v["type"] = json!("envoy.filters.http.cors");
                v["policies"] = json!(r.map_or(0, |r| r.cors_policies(&f.name).len()));
            }
            HttpFilterConfig::IstioStats(s) => {
                v["type"] = json!("istio.stats");
                v["reporter"] = json!(s.reporter.as_str());
            }
            HttpFilterConfig::Compressor(c) => {
                v["type"] = json!("envoy.filters.http.compressor");
                v["encoding"] = json!(c.library.encoding());
                v["disabled_on_route"] = json!(r.is_some_and(|r| r.compressor_disabled(&f.name)));
            }
        }
        filters.push(v);
    }
    out.insert("http_filters".into(), Value::Array(filters));

    let outcome = outcome.unwrap_or_else(|| match route {
        None if rc.is_none() => {
            format!("404 (NR): route configuration {rc_name} not received yet")
        }
        None if vh.is_none() => {
            format!("404 (NR): no virtual host of {rc_name} matches the authority")
        }
        None => "404 (NR): no route of the virtual host matches".to_string(),
        Some((_, r)) => match &r.action {
            RouteAction::Route { .. } if clusters.is_empty() => {
                "503 (NC): the cluster header names no cluster".to_string()
            }
            RouteAction::Route { .. } => {
                match clusters.iter().find(|c| snap.cluster(c).is_none()) {
                    Some(c) => format!("503 (NC): cluster {c} is not configured"),
                    None => format!("routed to {}", clusters.join(" | ")),
                }
            }
            RouteAction::DirectResponse { status, .. } => {
                format!("{} direct response", status.as_u16())
            }
            RouteAction::Redirect { status, .. } => format!("{} redirect", status.as_u16()),
        },
    });
    (Value::Object(out), outcome, clusters)
}

/// The chosen route and its action; the clusters it may send to (mirrors
/// last).
fn route_json(index: usize, r: &Route, headers: &HeaderMap) -> (Value, Vec<String>) {
    let mut v = json!({
        "index": index,
        "name": r.name,
        "match": r.route_match.describe(),
    });
    if let Some(d) = &r.decorator {
        v["decorator"] = json!(d.operation);
    }
    let mut clusters = Vec::new();
    match &r.action {
        RouteAction::Route {
            cluster,
            prefix_rewrite,
            regex_rewrite,
            host_rewrite,
            timeout,
            retry_policy,
            idle_timeout,
            mirrors,
            max_stream_duration,
            ..
        } => {
            v["action"] = json!("route");
            match cluster {
                ClusterSpecifier::Name(n) => {
                    v["cluster"] = json!(n);
                    clusters.push(n.clone());
                }
                ClusterSpecifier::Weighted(ws) => {
                    let total: u64 = ws.clusters.iter().map(|w| u64::from(w.weight)).sum();
                    v["weighted_clusters"] = ws
                        .clusters
                        .iter()
                        .map(|w| {
                            json!({
                                "name": w.name,
                                "weight": w.weight,
                                "share": share(u64::from(w.weight), total),
                            })
                        })
                        .collect();
                    clusters.extend(ws.clusters.iter().map(|w| w.name.clone()));
                }
                ClusterSpecifier::Header(h) => {
                    let named = headers.get(h).and_then(|x| x.to_str().ok());
                    v["cluster_header"] = json!({"header": h.as_str(), "names": named});
                    clusters.extend(named.map(str::to_string));
                }
            }
            v["timeout"] = timeout.map_or(json!("disabled"), |t| json!(secs(t)));
            if let Some(t) = idle_timeout {
                v["idle_timeout"] = json!(secs(*t));
            }
            if let Some(t) = max_stream_duration {
                v["max_stream_duration"] = json!(secs(*t));
            }
            v["retry_policy"] = retry_policy.as_ref().map_or(Value::Null, |p| {
                json!({
                    "retry_on": p.retry_on.names().join(","),
                    "num_retries": p.num_retries,
                    "per_try_timeout": p.per_try_timeout.map(secs),
                    "retriable_status_codes": p.retriable_status_codes,
                    "previous_hosts": p.previous_hosts,
                })
            });
            if let Some(p) = prefix_rewrite {
                v["prefix_rewrite"] = json!(p);
            }
            if let Some(rr) = regex_rewrite {
                v["regex_rewrite"] = json!({
                    "pattern": rr.pattern.as_str(),
                    "substitution": rr.substitution,
                });
            }
            if let Some(h) = host_rewrite {
                v["host_rewrite"] = json!(format!("{h:?}"));
            }
            if !mirrors.is_empty() {
                v["mirrors"] = mirrors
                    .iter()
                    .map(|m| {
                        json!({
                            "cluster": m.cluster,
                            "share": share(m.fraction.numerator.into(), m.fraction.denominator.into()),
                        })
                    })
                    .collect();
                clusters.extend(mirrors.iter().map(|m| m.cluster.clone()));
            }
        }
        RouteAction::DirectResponse { status, body } => {
            v["action"] = json!("direct_response");
            v["status"] = json!(status.as_u16());
            v["body"] = json!(body);
        }
        RouteAction::Redirect {
            status,
            scheme,
            host,
            port,
            path,
            prefix_rewrite,
            strip_query,
        } => {
            v["action"] = json!("redirect");
            v["status"] = json!(status.as_u16());
            v["redirect"] = json!({
                "scheme": scheme,
                "host": host,
                "port": port,
                "path": path,
                "prefix_rewrite": prefix_rewrite,
                "strip_query": strip_query,
            });
        }
    }
    clusters.dedup();
    (v, clusters)
}

/// A cluster's kind, balancing and live endpoints (health as `/clusters`
/// reports it).
fn cluster_json(endpoints: &dyn Fn(&str) -> Vec<Value>, snap: &Snapshot, name: &str) -> Value {
    let Some(c) = snap.cluster(name) else {
        return json!({"name": name, "configured": false});
    };
    let kind = match &c.kind {
        ClusterKind::Static(_) => "STATIC",
        ClusterKind::StrictDns(_) => "STRICT_DNS",
        ClusterKind::OriginalDst => "ORIGINAL_DST",
        ClusterKind::BlackHole => "STATIC (no endpoints)",
        ClusterKind::Eds { .. } => "EDS (no assignment yet)",
    };
    let lb = match c.lb_policy {
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::LeastRequest => "LEAST_REQUEST",
        LbPolicy::Random => "RANDOM",
        LbPolicy::RingHash => "RING_HASH",
        LbPolicy::Maglev => "MAGLEV",
        LbPolicy::ClusterProvided => "CLUSTER_PROVIDED",
    };
    let endpoints = endpoints(name);
    json!({
        "name": name,
        "configured": true,
        "type": kind,
        "lb_policy": lb,
        "connect_timeout": secs(c.connect_timeout),
        "tls": c.tls.is_some() || !c.transport_socket_matches.is_empty(),
        "outlier_detection": c.outlier_detection.is_some(),
        "endpoints": endpoints,
    })
}

/// A share as a percentage (`"12.5%"`).
fn share(part: u64, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    let pct = part as f64 * 100.0 / total as f64;
    let s = format!("{pct:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// A duration as protobuf JSON prints it (`"15s"`, `"0.250s"`).
fn secs(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_durations_read_as_envoy_prints_them() {
        assert_eq!(share(1, 8), "12.5%");
        assert_eq!(share(80, 100), "80%");
        assert_eq!(share(1, 3), "33.333%");
        assert_eq!(share(0, 0), "0%");
        assert_eq!(secs(std::time::Duration::from_secs(15)), "15s");
        assert_eq!(secs(std::time::Duration::from_millis(250)), "0.250s");
    }
}
