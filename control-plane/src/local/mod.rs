//! A mesh on one machine, without Kubernetes: what `ferry-pilot demo` runs and what the
//! integration tests build their meshes with. [`platform`] plays the Kubernetes parts
//! (Deployments become pods with addresses, Services get cluster IPs, the injector's decision
//! per pod), [`run`] brings the mesh up as network-namespace pods ([`ferry_netns`]):
//! `ferry-pilot serve` in an `istiod` pod, each workload's app with `ferry iptables` and a
//! sidecar, an ingress gateway; [`bootstrap`] writes the proxies' Envoy bootstraps as
//! istio-agent would, [`forward`] reaches the gateway from the host like
//! `kubectl port-forward`, and [`samples`] holds the project's own bookinfo configuration
//! and apps (`samples/` in the repository, built into the binary).

pub mod bootstrap;
pub mod forward;
pub mod platform;
pub mod run;
pub mod samples;

use std::path::PathBuf;

/// Why the local mesh could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Netns(#[from] ferry_netns::Error),
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot be run (a missing field, an unusable image).
    #[error("{0}")]
    Config(String),
    /// A process did not come up; the message carries its log.
    #[error("{0}")]
    Failed(String),
    #[error("interrupted")]
    Interrupted,
}

impl LocalError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| LocalError::Io { what, path, source }
    }
}
