//! `/certs`: the certificates of every TLS context in use (listener chains
//! and clusters), each as Envoy shows them — `ca_cert` from the validation
//! context, `cert_chain` from the certificates — with serial number, SANs,
//! validity and days until expiration. Contexts made of the same secrets
//! are shown once.

use std::time::SystemTime;

use bytes::Bytes;
use ferry_model::tls::SanType;
use ferry_model::tls::{CommonTls, Secret, SecretSource};
use ferry_model::{ClusterKind, Snapshot};
use http::Response;
use http_body_util::Full;
use serde_json::{Value, json};

use crate::run::Runtime;

fn resolve<'a>(snap: &'a Snapshot, s: &'a SecretSource) -> (Option<&'a Secret>, String) {
    match s {
        SecretSource::Sds(name) | SecretSource::AgentSds(name) => (
            snap.secrets.get(name).map(|s| s.as_ref()),
            format!("<sds:{name}>"),
        ),
        SecretSource::Inline(sec) => (Some(sec.as_ref()), "<inline>".to_string()),
    }
}

fn rfc3339(t: SystemTime) -> String {
    ferry_xds::dump::timestamp(t)
}

/// Each certificate of a PEM bundle as Envoy's `CertificateDetails`.
fn details(pem: &[u8], path: &str) -> Vec<Value> {
    let Ok(certs) = ferry_tls::parse_certificates(pem) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    certs
        .iter()
        .filter_map(|der| ferry_tls::inspect::details(der))
        .map(|d| {
            // Envoy lists DNS names, then URIs, then IP addresses.
            let mut names = d.subject_alt_names.clone();
            names.sort_by_key(|(t, _)| match t {
                SanType::Dns => 0,
                SanType::Uri => 1,
                SanType::IpAddress => 2,
                _ => 3,
            });
            let sans: Vec<Value> = names
                .iter()
                .map(|(t, v)| match t {
                    SanType::Dns => json!({ "dns": v }),
                    SanType::Uri => json!({ "uri": v }),
                    SanType::IpAddress => json!({ "ip_address": v }),
                    _ => json!({ "email": v }),
                })
                .collect();
            let days = d
                .not_after
                .duration_since(now)
                .map(|left| left.as_secs() / 86_400)
                .unwrap_or(0);
            json!({
                "path": path,
                "serial_number": d.serial_number,
                "subject_alt_names": sans,
                "days_until_expiration": days.to_string(),
                "valid_from": rfc3339(d.not_before),
                "expiration_time": rfc3339(d.not_after),
            })
        })
        .collect()
}

fn context(snap: &Snapshot, c: &CommonTls) -> Value {
    let mut ca = Vec::new();
    if let Some(v) = &c.validation {
        let (sec, path) = resolve(snap, v);
        if let Some(Secret::Validation(vc)) = sec {
            ca.extend(details(&vc.trusted_ca_pem, &path));
        }
    } else if let Some(d) = &c.default_validation {
        ca.extend(details(&d.trusted_ca_pem, "<inline>"));
    }
    let mut chain = Vec::new();
    for s in &c.certificates {
        let (sec, path) = resolve(snap, s);
        if let Some(Secret::Certificate(tc)) = sec {
            chain.extend(details(&tc.cert_chain_pem, &path));
        }
    }
    json!({"ca_cert": ca, "cert_chain": chain})
}

pub(super) fn respond(rt: &Runtime) -> Response<Full<Bytes>> {
    let snap = rt.snapshot.load();
    let mut contexts: Vec<&CommonTls> = Vec::new();
    for l in &snap.listeners {
        for c in l.filter_chains.iter().chain(l.default_chain.iter()) {
            if let Some(t) = &c.tls {
                contexts.push(&t.common);
            }
        }
    }
    let mut clusters: Vec<_> = snap.clusters.values().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    for c in clusters {
        if matches!(c.kind, ClusterKind::BlackHole) {
            continue;
        }
        contexts.extend(c.tls.iter().map(|t| &t.common));
        contexts.extend(
            c.transport_socket_matches
                .iter()
                .filter_map(|m| m.tls.as_ref())
                .map(|t| &t.common),
        );
    }
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for c in contexts {
        let v = context(&snap, c);
        if !seen.contains(&v) {
            seen.push(v.clone());
            out.push(v);
        }
    }
    super::json(&json!({ "certificates": out }))
}
