//! Merged metrics on the status port (istio-agent's `/stats/prometheus` on
//! 15020): one scrape returns the agent's own counters, the proxy's
//! metrics and the application's, so Prometheus needs one target per pod
//! even when the app's port sits behind mTLS. The injector moved the pod's
//! `prometheus.io/scrape|port|path` annotations into
//! `ISTIO_PROMETHEUS_ANNOTATIONS` and pointed them here. The app is
//! scraped over loopback with the scraper's `Accept` narrowed to the text
//! and OpenMetrics formats and its `X-Prometheus-Scrape-Timeout-Seconds`;
//! an app that fails, answers non-200 or sends more than 10 MiB is left
//! out of that scrape (counted in `istio_agent_scrape_failures_total`),
//! never failing it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The agent's limit on one application answer.
const MAX_APP_BODY: usize = 10 * 1024 * 1024;
/// When the scraper gives no timeout: a hung app must not hang the scrape.
const DEFAULT_APP_TIMEOUT: Duration = Duration::from_secs(10);

pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Ports the agent refuses to scrape as the app's (a loop, or Istio's own).
const RESERVED_PORTS: [(u16, &str); 9] = [
    (15000, "Envoy admin"),
    (15001, "outbound traffic capture"),
    (15004, "pilot debug"),
    (15006, "inbound traffic capture"),
    (15008, "HBONE tunnel"),
    (15020, "pilot-agent status / merged Prometheus"),
    (15021, "Envoy health"),
    (15053, "DNS proxy"),
    (15090, "Envoy Prometheus (already merged)"),
];

#[derive(Debug, thiserror::Error)]
pub enum ScrapeConfigError {
    #[error("ISTIO_PROMETHEUS_ANNOTATIONS: {0}")]
    Json(#[from] serde_json::Error),
    #[error("ISTIO_PROMETHEUS_ANNOTATIONS: invalid prometheus scrape configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Default, Deserialize)]
struct Annotations {
    #[serde(default)]
    scrape: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    targets: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTarget {
    #[serde(default)]
    port: String,
    #[serde(default)]
    path: String,
}

/// One application endpoint to merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    pub path: String,
}

/// The merge: the app's targets and the agent's scrape counters.
#[derive(Debug, Default)]
pub struct MetricsMerge {
    targets: Vec<Target>,
    scrapes: AtomicU64,
    app_failures: AtomicU64,
}

impl MetricsMerge {
    /// Reads `ISTIO_PROMETHEUS_ANNOTATIONS` as the agent does: `scrape:
    /// "false"` merges nothing; a missing port is 80 and a missing path
    /// `/metrics`; the status port and Istio's ports are refused.
    pub fn parse(json: Option<&str>, status_port: u16) -> Result<Self, ScrapeConfigError> {
        let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
            return Ok(Self::default());
        };
        let a: Annotations = serde_json::from_str(json)?;
        if a.scrape == "false" {
            return Ok(Self::default());
        }
        let raw = if a.targets.is_empty() {
            vec![RawTarget {
                port: if a.port.is_empty() {
                    "80".into()
                } else {
                    a.port
                },
                path: a.path,
            }]
        } else {
            a.targets
        };
        let mut targets = Vec::with_capacity(raw.len());
        for t in raw {
            let port: u16 = t
                .port
                .trim()
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ScrapeConfigError::Invalid(format!("invalid target port {:?}", t.port))
                })?;
            if port == status_port {
                return Err(ScrapeConfigError::Invalid(format!(
                    "target port {port} is the same as agent port, which may lead to a recursive loop"
                )));
            }
            if let Some((_, why)) = RESERVED_PORTS.iter().find(|(p, _)| *p == port) {
                return Err(ScrapeConfigError::Invalid(format!(
                    "target port {port} is reserved for Istio ({why}) and cannot be scraped"
                )));
            }
            let path = if t.path.is_empty() {
                "/metrics".to_string()
            } else if t.path.starts_with('/') {
                t.path
            } else {
                format!("/{}", t.path)
            };
            targets.push(Target { port, path });
        }
        Ok(Self {
            targets,
            ..Self::default()
        })
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The merged scrape: the agent's counters, then `proxy` (the proxy's
    /// own text exposition), then each app target's body. Returns the
    /// content type (the apps' format when they agree, as the agent
    /// negotiates it) and the body.
    pub async fn scrape(&self, headers: &HeaderMap, proxy: String) -> (String, String) {
        self.scrapes.fetch_add(1, Relaxed);
        let accept = allowed_content_types(
            headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        );
        let timeout = headers
            .get("x-prometheus-scrape-timeout-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(DEFAULT_APP_TIMEOUT);
        let scrapes = self.targets.iter().map(|t| {
            let accept = accept.clone();
            async move {
                let r = tokio::time::timeout(timeout, scrape_app(t, headers, &accept))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                if let Err(e) = &r {
                    self.app_failures.fetch_add(1, Relaxed);
                    tracing::warn!(scrape.port = t.port, scrape.path = %t.path, error = %e, "failed scraping application metrics");
                }
                r.ok()
            }
        });
        let apps: Vec<Option<(String, Bytes)>> = futures_util::future::join_all(scrapes).await;
        // One format for the whole answer: the apps' when they agree,
        // else the text format.
        let mut format: Option<String> = None;
        for (ct, _) in apps.iter().flatten() {
            let f = negotiate_format(ct);
            format = match format {
                None => Some(f),
                Some(prev) if prev == f => Some(prev),
                Some(_) => Some(TEXT_FORMAT.to_string()),
            };
        }
        let format = format.unwrap_or_else(|| TEXT_FORMAT.to_string());
        let mut out = String::with_capacity(proxy.len() + 512);
        self.render_agent(&mut out);
        out.push_str(&proxy);
        if !out.ends_with('\n') && !out.is_empty() {
            out.push('\n');
        }
        for (_, body) in apps.iter().flatten() {
            let text = String::from_utf8_lossy(body);
            let text = strip_eof(&text);
            out.push_str(text);
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
        }
        if format.starts_with("application/openmetrics-text") {
            out.push_str("# EOF\n");
        }
        (format, out)
    }

    fn render_agent(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP istio_agent_scrapes_total The total number of scrapes.\n# TYPE istio_agent_scrapes_total counter\nistio_agent_scrapes_total {}",
            self.scrapes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP istio_agent_scrape_failures_total The total number of failed scrapes.\n# TYPE istio_agent_scrape_failures_total counter\nistio_agent_scrape_failures_total{{type=\"application\"}} {}",
            self.app_failures.load(Relaxed)
        );
    }
}

/// The body without OpenMetrics' closing `# EOF` (one is written at the
/// end of the merged answer).
fn strip_eof(body: &str) -> &str {
    let trimmed = body.trim_end_matches([' ', '\t', '\r', '\n']);
    match trimmed.strip_suffix("# EOF") {
        Some(rest) => rest,
        None => body,
    }
}

/// The merged answer's content type for an app's content type.
fn negotiate_format(content_type: &str) -> String {
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or("").to_ascii_lowercase();
    if media == "application/openmetrics-text" {
        let version = parts.find_map(|p| p.strip_prefix("version=")).unwrap_or("");
        return match version {
            "1.0.0" => "application/openmetrics-text; version=1.0.0; charset=utf-8".into(),
            "0.0.1" | "" => "application/openmetrics-text; version=0.0.1; charset=utf-8".into(),
            _ => TEXT_FORMAT.into(),
        };
    }
    TEXT_FORMAT.into()
}

/// The `Accept` sent to the app: the scraper's media types narrowed to the
/// text and OpenMetrics formats, with descending quality, as the agent
/// rewrites it; the text format when nothing usable is left.
fn allowed_content_types(accept: &str) -> String {
    const TEXT: &str = "text/plain;version=0.0.4";
    const OPENMETRICS: &str = "application/openmetrics-text;version=0.0.1";
    let mut kept: Vec<String> = Vec::new();
    for entry in accept.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let mut parts = entry.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: Vec<&str> = parts.filter(|p| !p.starts_with("q=")).collect();
        let e = match media.as_str() {
            "*/*" | "*" => TEXT.to_string(),
            "application/*" => OPENMETRICS.to_string(),
            "text/*" | "text/plain" | "application/openmetrics-text" => {
                let mut s = media.clone();
                for p in params {
                    s.push(';');
                    s.push_str(p);
                }
                s
            }
            _ => continue,
        };
        if !kept.contains(&e) {
            kept.push(e);
        }
    }
    if kept.is_empty() {
        return TEXT.to_string();
    }
    let total = kept.len();
    kept.iter()
        .enumerate()
        .map(|(i, e)| format!("{e};q=0.{}", total - i))
        .collect::<Vec<_>>()
        .join(",")
}

async fn scrape_app(
    t: &Target,
    headers: &HeaderMap,
    accept: &str,
) -> Result<(String, Bytes), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, t.port));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("error scraping http://localhost:{}{}: {e}", t.port, t.path))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(t.path.as_str())
        .header(http::header::HOST, format!("localhost:{}", t.port))
        .header(http::header::ACCEPT, accept)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    for h in ["user-agent", "x-prometheus-scrape-timeout-seconds"] {
        if let Some(v) = headers.get(h) {
            req.headers_mut().insert(h, v.clone());
        }
    }
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!(
            "error scraping http://localhost:{}{}, status code: {}",
            t.port,
            t.path,
            resp.status().as_u16()
        ));
    }
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = Limited::new(resp.into_body(), MAX_APP_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((ct, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_as_the_agent_reads_them() {
        let m = MetricsMerge::parse(
            Some(r#"{"scrape":"true","path":"/m","port":"9102"}"#),
            15020,
        )
        .unwrap();
        assert_eq!(
            m.targets(),
            [Target {
                port: 9102,
                path: "/m".into()
            }]
        );
        let m = MetricsMerge::parse(Some(r#"{"scrape":"true"}"#), 15020).unwrap();
        assert_eq!(
            m.targets(),
            [Target {
                port: 80,
                path: "/metrics".into()
            }]
        );
        assert!(
            MetricsMerge::parse(Some(r#"{"scrape":"false","port":"1"}"#), 15020)
                .unwrap()
                .targets()
                .is_empty()
        );
        for bad in [
            r#"{"port":"15020"}"#,
            r#"{"port":"15090"}"#,
            r#"{"port":"x"}"#,
            "[",
        ] {
            assert!(MetricsMerge::parse(Some(bad), 15020).is_err(), "{bad}");
        }
    }

    #[test]
    fn accept_is_narrowed_to_prometheus_formats() {
        assert_eq!(allowed_content_types(""), "text/plain;version=0.0.4");
        assert_eq!(
            allowed_content_types(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            ),
            "application/openmetrics-text;version=1.0.0;q=0.3,application/openmetrics-text;version=0.0.1;q=0.2,text/plain;version=0.0.4;q=0.1"
        );
        assert_eq!(
            allowed_content_types("application/json"),
            "text/plain;version=0.0.4"
        );
    }

    #[test]
    fn formats_and_eof() {
        assert_eq!(negotiate_format("text/plain; version=0.0.4"), TEXT_FORMAT);
        assert!(
            negotiate_format("application/openmetrics-text; version=1.0.0; charset=utf-8")
                .contains("1.0.0")
        );
        assert_eq!(strip_eof("a 1\n# EOF\n"), "a 1\n");
        assert_eq!(strip_eof("a 1\n"), "a 1\n");
    }
}
