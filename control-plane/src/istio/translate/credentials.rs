//! `credentialName`: the TLS secrets a gateway's listeners (and clusters)
//! name over SDS as `kubernetes://NAME` — a certificate and its key — and
//! `kubernetes://NAME-cacert` — the CA of client certificates, with its CRL —
//! served by the control plane as istiod serves them, from Kubernetes
//! Secrets in the proxy's own namespace (a gateway never gets another
//! namespace's secrets).
//!
//! Keys read, as istiod reads them: `cert`/`key`/`cacert`/`crl` (generic
//! secrets) or `tls.crt`/`tls.key`/`ca.crt`/`ca.crl` (TLS secrets), and
//! `tls.ocsp-staple`. The CA comes from the Secret `NAME-cacert` when it
//! exists, else from `NAME` itself. A secret that is missing or lacks its
//! keys is not served (the proxy keeps waiting for it, as with istiod) and
//! is logged.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, Secret, TlsCertificate,
    UpstreamTlsContext, common_tls_context::ValidationContextType, secret,
};
use prost::Message;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;

use super::{ProxyConfig, Scope};
use crate::istio::source::Spec;
use crate::istio::types::kube;

/// The prefix of the SDS names the control plane serves from Secrets.
pub const PREFIX: &str = "kubernetes://";

/// The suffix naming a credential's CA (`NAME-cacert`).
const CA_SUFFIX: &str = "-cacert";

const DOWNSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// Adds to `out.secrets` every `kubernetes://` secret its listeners and
/// clusters name that the proxy's namespace holds.
pub(crate) fn build(scope: &Scope<'_>, out: &mut ProxyConfig, outbound: &[Cluster]) {
    let mut names = BTreeSet::new();
    for l in &out.listeners {
        for fc in l.filter_chains.iter().chain(&l.default_filter_chain) {
            collect(fc.transport_socket.as_ref(), &mut names);
        }
    }
    for c in out.clusters.iter().chain(outbound) {
        collect(c.transport_socket.as_ref(), &mut names);
        for m in &c.transport_socket_matches {
            collect(m.transport_socket.as_ref(), &mut names);
        }
    }
    let namespace = &scope.proxy.namespace;
    let lookup = |name: &str| {
        scope.mesh.secrets.iter().find_map(|r| match &r.spec {
            Spec::Secret(s) if r.meta.namespace == *namespace && r.meta.name == name => Some(s),
            _ => None,
        })
    };
    for sds_name in names {
        let Some(name) = sds_name.strip_prefix(PREFIX) else {
            continue;
        };
        let made = match name.strip_suffix(CA_SUFFIX) {
            Some(base) => match lookup(name).or_else(|| lookup(base)) {
                Some(s) => validation_secret(&sds_name, s),
                None => Err(format!(
                    "no Secret {namespace}/{name} (nor {namespace}/{base})"
                )),
            },
            None => match lookup(name) {
                Some(s) => certificate_secret(&sds_name, s),
                None => Err(format!("no Secret {namespace}/{name}")),
            },
        };
        match made {
            Ok(s) => out.secrets.push(s),
            Err(e) => tracing::warn!(
                xds.node = %scope.proxy.id,
                sds.name = %sds_name,
                error = %e,
                "credential not served"
            ),
        }
    }
}

/// The SDS names a TLS transport socket asks for.
fn collect(ts: Option<&TransportSocket>, names: &mut BTreeSet<String>) {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = ts.and_then(|t| t.config_type.as_ref()) else {
        return;
    };
    let common = match any.type_url.as_str() {
        DOWNSTREAM => DownstreamTlsContext::decode(any.value.as_slice())
            .ok()
            .and_then(|d| d.common_tls_context),
        UPSTREAM => UpstreamTlsContext::decode(any.value.as_slice())
            .ok()
            .and_then(|u| u.common_tls_context),
        _ => None,
    };
    let Some(CommonTlsContext {
        tls_certificate_sds_secret_configs,
        validation_context_type,
        ..
    }) = common
    else {
        return;
    };
    names.extend(
        tls_certificate_sds_secret_configs
            .into_iter()
            .map(|s| s.name),
    );
    match validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            names.insert(s.name);
        }
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            names.extend(c.validation_context_sds_secret_config.map(|s| s.name));
        }
        _ => {}
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

/// The first of `keys` holding a value.
fn first(s: &kube::Secret, keys: &[&str]) -> Result<Option<Vec<u8>>, String> {
    for k in keys {
        if let Some(v) = s.value(k)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn certificate_secret(sds_name: &str, s: &kube::Secret) -> Result<Secret, String> {
    let pair = match (s.value("cert")?, s.value("key")?) {
        (Some(c), Some(k)) => (c, k),
        _ => match (s.value("tls.crt")?, s.value("tls.key")?) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(format!(
                    "the Secret has neither cert and key nor tls.crt and tls.key (it has: {})",
                    s.keys().join(", ")
                ));
            }
        },
    };
    let (cert, key) = pair;
    Ok(Secret {
        name: sds_name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(cert),
            private_key: inline(key),
            ocsp_staple: s.value("tls.ocsp-staple")?.and_then(inline),
            ..Default::default()
        })),
    })
}

fn validation_secret(sds_name: &str, s: &kube::Secret) -> Result<Secret, String> {
    let Some(ca) = first(s, &["cacert", "ca.crt"])? else {
        return Err(format!(
            "the Secret has neither cacert nor ca.crt (it has: {})",
            s.keys().join(", ")
        ));
    };
    Ok(Secret {
        name: sds_name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(ca),
                crl: first(s, &["crl", "ca.crl"])?.and_then(inline),
                ..Default::default()
            },
        )),
    })
}
