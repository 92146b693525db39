//! The certificate jobs istio-agent does beside Envoy, in-process: a fresh
//! key and CSR for the workload's SPIFFE identity, signed by the mesh CA
//! (istiod or ferry-pilot, `IstioCertificateService`), served to the rest
//! of the proxy as the SDS secrets Istio's configuration names: `default`
//! (the workload certificate and key) and `ROOTCA` (the mesh root). The
//! certificate is renewed when half its remaining lifetime at receipt has
//! passed (istio-agent's `SECRET_GRACE_PERIOD_RATIO` 0.5), with a new key each time; a failed
//! request is retried with backoff while the current certificate serves on.
//! A rotation reaches new handshakes; established connections keep theirs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_model::tls::{Secret, TlsCertificate, ValidationContext};
use ferry_xds::ads::LocalSecrets;
use ferry_xds::ca::CaTarget;
use tokio::sync::watch;

/// SDS name of the workload certificate in Istio's configuration.
pub const WORKLOAD_SECRET: &str = "default";
/// SDS name of the mesh root.
pub const ROOT_SECRET: &str = "ROOTCA";

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub ca: CaTarget,
    /// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
    pub identity: String,
    /// Lifetime asked for.
    pub ttl: Duration,
}

/// The SPIFFE identity from the node's namespace and service account.
pub fn identity(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let sa = if service_account.is_empty() {
        "default"
    } else {
        service_account
    };
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")
}

/// One issued certificate as the two secrets, and when to renew it.
fn secrets_of(chain: Vec<String>, key_pem: String) -> (LocalSecrets, Option<SystemTime>) {
    // The last element is the root; the leaf and intermediates make the
    // chain presented to peers (a lone certificate is both).
    let root = chain.last().cloned().unwrap_or_default();
    let presented = if chain.len() > 1 {
        chain[..chain.len() - 1].concat()
    } else {
        chain.concat()
    };
    // Half of the lifetime left at receipt, as istio-agent counts it (not
    // from `notBefore`, which a CA backdates for clock skew).
    let received = SystemTime::now();
    let renew_at = ferry_tls::workload::validity(presented.as_bytes())
        .map(|(_, to)| received + to.duration_since(received).unwrap_or_default() / 2);
    let mut out: LocalSecrets = HashMap::new();
    out.insert(
        WORKLOAD_SECRET.into(),
        Arc::new(Secret::Certificate(TlsCertificate {
            cert_chain_pem: presented.into_bytes(),
            private_key_pem: key_pem.into_bytes(),
        })),
    );
    out.insert(
        ROOT_SECRET.into(),
        Arc::new(Secret::Validation(ValidationContext {
            trusted_ca_pem: root.into_bytes(),
            ..ValidationContext::default()
        })),
    );
    (out, renew_at)
}

async fn issue(opts: &AgentOptions) -> Result<(LocalSecrets, Option<SystemTime>), String> {
    let (key_pem, csr_pem) =
        ferry_tls::workload::key_and_csr(&opts.identity).map_err(|e| e.to_string())?;
    let chain = ferry_xds::ca::create_certificate(&opts.ca, &csr_pem, opts.ttl)
        .await
        .map_err(|e| e.to_string())?;
    // Refuse a chain whose leaf is not for us or does not parse: the
    // previous certificate keeps serving.
    let leaf = ferry_tls::parse_certificates(chain[0].as_bytes())?;
    let got = leaf.first().and_then(|c| ferry_tls::spiffe_id(c.as_ref()));
    if got.as_deref() != Some(opts.identity.as_str()) {
        return Err(format!(
            "the CA issued a certificate for {got:?}, not {:?}",
            opts.identity
        ));
    }
    Ok(secrets_of(chain, key_pem))
}

/// Starts the agent: it publishes the workload certificate and root on
/// `tx` (beside whatever else is published there) once issued, and again
/// at every renewal.
pub fn start(opts: AgentOptions, tx: std::sync::Arc<watch::Sender<LocalSecrets>>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match issue(&opts).await {
                Ok((secrets, renew_at)) => {
                    tracing::info!(agent.identity = %opts.identity, "workload certificate issued");
                    tx.send_modify(|m| m.extend(secrets));
                    backoff = Duration::from_millis(500);
                    // An already expired certificate: renew soon, but
                    // not in a loop.
                    renew_at
                        .map_or(Duration::from_secs(60), |t| {
                            t.duration_since(SystemTime::now()).unwrap_or_default()
                        })
                        .max(Duration::from_secs(1))
                }
                Err(e) => {
                    tracing::warn!(agent.identity = %opts.identity, error = %e, retry.in = ?backoff, "workload certificate request failed");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_defaults_the_service_account() {
        assert_eq!(
            identity("cluster.local", "foo", ""),
            "spiffe://cluster.local/ns/foo/sa/default"
        );
        assert_eq!(
            identity("td", "foo", "sleep"),
            "spiffe://td/ns/foo/sa/sleep"
        );
    }

    #[test]
    fn chain_splits_into_presented_certificates_and_root() {
        let (s, _) = secrets_of(
            vec!["LEAF\n".into(), "MID\n".into(), "ROOT\n".into()],
            "KEY".into(),
        );
        match s[WORKLOAD_SECRET].as_ref() {
            Secret::Certificate(c) => assert_eq!(c.cert_chain_pem, b"LEAF\nMID\n"),
            other => panic!("{other:?}"),
        }
        match s[ROOT_SECRET].as_ref() {
            Secret::Validation(v) => assert_eq!(v.trusted_ca_pem, b"ROOT\n"),
            other => panic!("{other:?}"),
        }
    }
}
