//! istio-agent's file-mounted secrets: the SDS names `file-cert:CERT~KEY`
//! (a certificate chain and its key) and `file-root:PATH` (trusted roots),
//! which istiod writes on the `sds-grpc` cluster for a DestinationRule or
//! Gateway naming certificate files, and which the agent serves by reading
//! those files. When Ferry does the agent's job itself (`--ca-addr`), it
//! reads them the same way: each name is loaded when the configuration
//! first names it, checked as an SDS secret would be, published with the
//! other local secrets, and read again when a file changes (the files are
//! polled, as mounted Secrets are replaced by Kubernetes without notice).
//! `file-root:system` is the operating system's CA bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use tokio::sync::watch;

use crate::ads::LocalSecrets;
use crate::convert::Warnings;

const CERT: &str = "file-cert:";
const ROOT: &str = "file-root:";

/// How often the files of a secret are checked for a change.
const POLL: Duration = Duration::from_secs(2);

/// Whether `name` is one of istio-agent's file-mounted secret names.
pub fn is_file_secret(name: &str) -> bool {
    name.starts_with(CERT) || name.starts_with(ROOT)
}

/// The operating system's CA bundle, where istio-agent looks for it
/// (`file-root:system`): the first that exists, else Debian's path.
pub fn system_ca_bundle() -> &'static str {
    const CANDIDATES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/pki/tls/cacert.pem",
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ];
    CANDIDATES
        .iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or(&CANDIDATES[0])
}

/// The files a file-mounted secret name reads.
fn files(name: &str) -> Result<Vec<PathBuf>, String> {
    if let Some(pair) = name.strip_prefix(CERT) {
        let (cert, key) = pair
            .split_once('~')
            .ok_or_else(|| format!("{name:?}: expected file-cert:CERT~KEY"))?;
        return Ok(vec![cert.into(), key.into()]);
    }
    match name.strip_prefix(ROOT) {
        Some("system") => Ok(vec![system_ca_bundle().into()]),
        Some(path) if !path.is_empty() => Ok(vec![path.into()]),
        _ => Err(format!("{name:?} is not a file-mounted secret")),
    }
}

/// Reads the secret `name` names and converts it as an SDS secret of the
/// same content would be.
pub fn load(name: &str) -> Result<ferry_model::tls::Secret, String> {
    let paths = files(name)?;
    let mut data = Vec::with_capacity(paths.len());
    for p in &paths {
        let bytes = std::fs::read(p).map_err(|e| format!("{name:?}: {}: {e}", p.display()))?;
        data.push(DataSource {
            specifier: Some(Specifier::InlineBytes(bytes)),
            ..Default::default()
        });
    }
    let mut data = data.into_iter();
    let kind = if name.starts_with(CERT) {
        tls_pb::secret::Type::TlsCertificate(tls_pb::TlsCertificate {
            certificate_chain: data.next(),
            private_key: data.next(),
            ..Default::default()
        })
    } else {
        tls_pb::secret::Type::ValidationContext(tls_pb::CertificateValidationContext {
            trusted_ca: data.next(),
            ..Default::default()
        })
    };
    let pb = tls_pb::Secret {
        name: name.to_string(),
        r#type: Some(kind),
    };
    crate::convert::secret(&pb, &mut Warnings::default()).map_err(|e| format!("{name:?}: {e}"))
}

/// The files' modification times, to notice a change.
fn stamp(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Loads `name` into `tx` and keeps it current while `tx` has receivers.
/// A file that cannot be read or does not parse keeps the last good secret
/// (none at first: what needs it waits, as for an SDS secret not yet sent).
pub fn spawn_watch(name: String, tx: Arc<watch::Sender<LocalSecrets>>) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let paths = match files(&name) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sds.secret = %name, error = %e, "file-mounted secret name not understood");
                return;
            }
        };
        let mut seen = None;
        while !tx.is_closed() {
            let now = stamp(&paths);
            if seen.as_ref() != Some(&now) {
                match load(&name) {
                    Ok(secret) => {
                        tracing::info!(sds.secret = %name, "file-mounted secret loaded");
                        tx.send_modify(|m| {
                            m.insert(name.clone(), Arc::new(secret));
                        });
                    }
                    Err(e) => {
                        tracing::warn!(sds.secret = %name, error = %e, "file-mounted secret not loaded");
                    }
                }
                seen = Some(now);
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::tls::Secret;

    fn cert_and_key() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
        let params = rcgen::CertificateParams::new(vec!["a.example".to_string()])
            .unwrap_or_else(|e| panic!("params: {e}"));
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("cert: {e}"));
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn names_map_to_their_files() {
        assert!(is_file_secret("file-cert:/a~/b"));
        assert!(is_file_secret("file-root:/c"));
        assert!(!is_file_secret("default"));
        assert!(!is_file_secret("kubernetes://x"));
        assert_eq!(
            files("file-cert:/a/cert.pem~/a/key.pem").ok(),
            Some(vec![
                PathBuf::from("/a/cert.pem"),
                PathBuf::from("/a/key.pem")
            ])
        );
        assert_eq!(
            files("file-root:system").ok(),
            Some(vec![PathBuf::from(system_ca_bundle())])
        );
        assert!(files("file-cert:/only-one").is_err());
        assert!(files("file-root:").is_err());
    }

    #[tokio::test]
    async fn secrets_are_read_checked_and_read_again_on_change() {
        let dir = std::env::temp_dir().join(format!("ferry-file-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("dir: {e}"));
        let (cert, key) = cert_and_key();
        let (c, k, r) = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("root.pem"),
        );
        std::fs::write(&c, &cert).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&k, &key).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&r, &cert).unwrap_or_else(|e| panic!("{e}"));
        let cert_name = format!("file-cert:{}~{}", c.display(), k.display());
        let root_name = format!("file-root:{}", r.display());

        match load(&cert_name) {
            Ok(Secret::Certificate(t)) => {
                assert_eq!(t.cert_chain_pem, cert.as_bytes());
                assert_eq!(t.private_key_pem, key.as_bytes());
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(load(&root_name), Ok(Secret::Validation(v)) if v.trusted_ca_pem == cert.as_bytes())
        );
        // Not PEM: refused as an SDS secret with that content would be.
        std::fs::write(&r, "not a certificate").unwrap_or_else(|e| panic!("{e}"));
        assert!(load(&root_name).is_err());
        assert!(load(&format!("file-root:{}", dir.join("missing.pem").display())).is_err());

        // Watched: published, then published again when the file changes.
        std::fs::write(&r, &cert).unwrap_or_else(|e| panic!("{e}"));
        let (tx, mut rx) = watch::channel(LocalSecrets::new());
        spawn_watch(root_name.clone(), Arc::new(tx));
        let first = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|m| m.contains_key(&root_name)),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(first, Ok(true), "loaded");
        let (other, _) = cert_and_key();
        // A later modification time than the first write's.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&r, &other).unwrap_or_else(|e| panic!("{e}"));
        let changed = tokio::time::timeout(
            POLL * 3,
            rx.wait_for(|m| {
                matches!(m.get(&root_name).map(|s| &**s), Some(Secret::Validation(v)) if v.trusted_ca_pem == other.as_bytes())
            }),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(changed, Ok(true), "read again after the change");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The in-process agent's names follow the configuration: a name no
    /// longer referenced stops being watched and its secret is forgotten.
    #[tokio::test]
    async fn names_no_longer_referenced_are_dropped() {
        let dir =
            std::env::temp_dir().join(format!("ferry-file-secrets-unused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("dir: {e}"));
        let (cert, _) = cert_and_key();
        for f in ["a.pem", "b.pem"] {
            std::fs::write(dir.join(f), &cert).unwrap_or_else(|e| panic!("{e}"));
        }
        let a = format!("file-root:{}", dir.join("a.pem").display());
        let b = format!("file-root:{}", dir.join("b.pem").display());
        let (sds, mut rx) = crate::sds::AgentSds::local();
        assert!(sds.serves(&a) && sds.serves("default") && !sds.serves("kubernetes://x"));
        sds.want([a.as_str(), b.as_str(), "default"]);
        let both = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|m| m.contains_key(&a) && m.contains_key(&b)),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(both, Ok(true));
        sds.want([a.as_str()]);
        let m = rx.borrow_and_update().clone();
        assert!(m.contains_key(&a) && !m.contains_key(&b), "{:?}", m.keys());
        // No longer watched: a change to its file brings nothing back.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(dir.join("b.pem"), &cert).unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(POLL * 2).await;
        assert!(!rx.borrow().contains_key(&b));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
