//! `/stats` as Envoy serves it: `name: value` lines sorted by name, or
//! `{"stats": [{"name", "value"}]}` with `format=json`; `filter` keeps the
//! names a regular expression finds (RE2 syntax, searched anywhere in the
//! name), `usedonly` the values ever written, `type` one kind; and
//! `/stats/prometheus`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::{Query, json, text};
use crate::run::Runtime;

/// Every statistic: (name, value, is a gauge).
fn entries(rt: &Runtime) -> Vec<(String, u64, bool)> {
    let mut all = rt.stats.entries();
    if let Some(x) = &rt.xds {
        use std::sync::atomic::Ordering::Relaxed;
        for (name, v) in [
            ("xds.update_success", x.updates.load(Relaxed)),
            ("xds.ack", x.acks.load(Relaxed)),
            ("xds.update_rejected", x.nacks.load(Relaxed)),
            ("xds.reconnect", x.reconnects.load(Relaxed)),
            ("xds.warning", x.warnings.load(Relaxed)),
        ] {
            all.push((name.to_string(), v, false));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

pub(super) fn respond(rt: &Runtime, q: &Query) -> Response<Full<Bytes>> {
    let filter = match q.get("filter").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match regex::Regex::new(f) {
            Ok(r) => Some(r),
            Err(e) => {
                return text(StatusCode::BAD_REQUEST, format!("Invalid re2 regex: {e}"));
            }
        },
    };
    let kind = q.get("type").unwrap_or("All");
    let (counters, gauges) = match kind {
        "All" => (true, true),
        "Counters" => (true, false),
        "Gauges" => (false, true),
        "Histograms" | "TextReadouts" => (false, false),
        other => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid stats type: {other}"),
            );
        }
    };
    let used_only = q.has("usedonly");
    let kept: Vec<(String, u64, bool)> = entries(rt)
        .into_iter()
        .filter(|(_, _, g)| if *g { gauges } else { counters })
        .filter(|(_, v, _)| !used_only || *v != 0)
        .filter(|(n, _, _)| filter.as_ref().is_none_or(|r| r.is_match(n)))
        .collect();
    match q.get("format") {
        Some("json") => {
            let stats: Vec<serde_json::Value> = kept
                .iter()
                .map(|(n, v, _)| json!({"name": n, "value": v}))
                .collect();
            let mut r = json(&json!({ "stats": stats }));
            // Envoy's JSON stats come compact, on one line.
            *r.body_mut() = Full::new(Bytes::from(
                serde_json::to_vec(&json!({ "stats": stats })).unwrap_or_default(),
            ));
            r
        }
        Some("prometheus") => prometheus(rt),
        None | Some("text") => {
            let mut body = String::new();
            for (n, v, _) in &kept {
                body.push_str(n);
                body.push_str(": ");
                body.push_str(&v.to_string());
                body.push('\n');
            }
            text(StatusCode::OK, body)
        }
        Some(other) => text(
            StatusCode::BAD_REQUEST,
            format!("usage: /stats?format=(text|json|prometheus); unknown format {other}"),
        ),
    }
}

/// `/stats/prometheus` (text format 0.0.4): Envoy's statistics under their
/// Prometheus names and Istio's standard metrics.
pub(super) fn prometheus(rt: &Runtime) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::OK,
        crate::metrics::render_prometheus(&rt.stats, Some(&rt.istio)),
    );
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
