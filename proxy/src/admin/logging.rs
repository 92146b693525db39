//! Log levels changed at run time, as Envoy's `POST /logging` does: the
//! process's log filter is reloadable, Envoy's logger names (`http`,
//! `router`, `upstream`, `config`, `rbac`, …) map to Ferry's modules, and
//! `?level=L`, `?paths=a:L,b:L` or `?NAME=L` set them; any of them (or
//! none) answers the list of loggers and their levels.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use tracing_subscriber::reload;
use tracing_subscriber::{EnvFilter, Registry};

use super::{Query, text};

/// Envoy's logger names and the targets (crates and modules) of Ferry's
/// logs each one covers.
const LOGGERS: &[(&str, &[&str])] = &[
    ("admin", &["ferry_proxy::admin"]),
    ("client", &["ferry_proxy::cluster"]),
    ("config", &["ferry_xds", "ferry_proxy::run"]),
    (
        "conn_handler",
        &["ferry_proxy::listener", "ferry_proxy::detect"],
    ),
    ("connection", &["ferry_proxy::listener", "ferry_proxy::tls"]),
    ("dns", &["ferry_proxy::cluster"]),
    ("filter", &["ferry_filters"]),
    ("http", &["ferry_proxy::http"]),
    ("http2", &["ferry_proxy::http"]),
    ("jwt", &["ferry_filters::http::jwt_authn"]),
    ("main", &["ferry_proxy::run", "ferry"]),
    ("misc", &["ferry_proxy"]),
    ("pool", &["ferry_proxy::cluster"]),
    ("rbac", &["ferry_proxy::rbac", "ferry_filters::http::rbac"]),
    (
        "router",
        &["ferry_proxy::http", "ferry_filters::http::router"],
    ),
    ("secret", &["ferry_tls", "ferry_proxy::agent"]),
    ("tracing", &["ferry_proxy::trace"]),
    (
        "upstream",
        &[
            "ferry_proxy::cluster",
            "ferry_proxy::lb",
            "ferry_proxy::outlier",
        ],
    ),
];

/// Envoy's levels, most verbose first.
const LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "error", "critical", "off",
];

/// The live filter: the base directive the process started with, and the
/// level of each Envoy logger once set.
struct State {
    handle: reload::Handle<EnvFilter, Registry>,
    base: String,
    levels: BTreeMap<&'static str, &'static str>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// The reloadable filter layer for the process's subscriber, starting from
/// `directive` (e.g. `info` or `RUST_LOG`'s value).
pub fn layer(directive: &str) -> reload::Layer<EnvFilter, Registry> {
    let filter = EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let default = envoy_level(directive.split(',').next().unwrap_or("info"));
    let levels = LOGGERS.iter().map(|(n, _)| (*n, default)).collect();
    let _ = STATE.set(Mutex::new(State {
        handle,
        base: directive.to_string(),
        levels,
    }));
    layer
}

/// Envoy's name for a `tracing` level directive.
fn envoy_level(l: &str) -> &'static str {
    match l.trim() {
        "trace" => "trace",
        "debug" => "debug",
        "warn" | "warning" => "warning",
        "error" => "error",
        "off" => "off",
        _ => "info",
    }
}

/// `tracing`'s name for an Envoy level (`critical` is `error`).
fn tracing_level(l: &str) -> &'static str {
    match l {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" => "warn",
        "off" => "off",
        _ => "error",
    }
}

/// The level most loggers are at (`/server_info`'s `log_level`).
pub fn current_default() -> String {
    let Some(s) = STATE.get() else {
        return "info".into();
    };
    let s = s.lock().unwrap_or_else(|p| p.into_inner());
    s.levels.get("main").copied().unwrap_or("info").to_string()
}

fn list(levels: &BTreeMap<&'static str, &'static str>) -> String {
    let mut out = String::from("active loggers:\n");
    for (n, l) in levels {
        out.push_str(&format!("  {n}: {l}\n"));
    }
    out
}

const USAGE: &str = "usage: /logging?<name>=<level> (change single level)
usage: /logging?paths=name1:level1,name2:level2,... (change multiple levels)
usage: /logging?level=<level> (change all levels)
levels: trace debug info warning error critical off 
";

pub(super) fn respond(q: &Query) -> Response<Full<Bytes>> {
    let Some(state) = STATE.get() else {
        return text(StatusCode::OK, "active loggers:\n");
    };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let level_of = |l: &str| LEVELS.iter().copied().find(|x| *x == l);
    let known = |n: &str| LOGGERS.iter().map(|(k, _)| *k).find(|k| *k == n);
    let mut changes: Vec<(&'static str, &'static str)> = Vec::new();
    let bad = |msg: &str| text(StatusCode::BAD_REQUEST, format!("error: {msg}\n\n{USAGE}"));
    if let Some(l) = q.get("level") {
        let Some(l) = level_of(l) else {
            return bad("unknown logger level");
        };
        changes.extend(LOGGERS.iter().map(|(n, _)| (*n, l)));
    } else if let Some(paths) = q.get("paths") {
        for p in paths.split(',').filter(|p| !p.is_empty()) {
            let Some((n, l)) = p.split_once(':') else {
                return bad("invalid paths");
            };
            let Some(n) = known(n) else {
                return bad("unknown logger name");
            };
            let Some(l) = level_of(l) else {
                return bad("unknown logger level");
            };
            changes.push((n, l));
        }
    } else if let Some((n, l)) = q.0.iter().find_map(|(n, v)| v.last().map(|l| (n, l))) {
        let Some(n) = known(n) else {
            return bad("unknown logger name");
        };
        let Some(l) = level_of(l) else {
            return bad("unknown logger level");
        };
        changes.push((n, l));
    }
    if !changes.is_empty() {
        for (n, l) in changes {
            s.levels.insert(n, l);
        }
        if let Err(e) = apply(&s) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("error: {e}\n"));
        }
        tracing::info!(log.levels = ?s.levels, "log levels changed");
    }
    text(StatusCode::OK, list(&s.levels))
}

/// Rebuilds the filter: the base directive, then each logger's targets at
/// its level (a target shared by two loggers takes the more verbose).
fn apply(s: &State) -> Result<(), String> {
    let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
    let rank = |l: &str| LEVELS.iter().position(|x| *x == l).unwrap_or(2);
    for (n, ts) in LOGGERS {
        let l = s.levels.get(n).copied().unwrap_or("info");
        for t in *ts {
            let r = rank(l);
            targets
                .entry(t)
                .and_modify(|e| *e = (*e).min(r))
                .or_insert(r);
        }
    }
    let mut directive = s.base.clone();
    for (t, r) in targets {
        directive.push_str(&format!(",{t}={}", tracing_level(LEVELS[r])));
    }
    let filter = EnvFilter::try_new(&directive).map_err(|e| e.to_string())?;
    s.handle.reload(filter).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_both_ways() {
        for l in LEVELS {
            let back = envoy_level(tracing_level(l));
            let expected = if *l == "critical" { "error" } else { l };
            assert_eq!(back, expected);
        }
        assert!(list(&BTreeMap::from([("http", "debug")])).contains("  http: debug\n"));
    }
}
