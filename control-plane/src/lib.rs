//! `ferry-pilot`: Ferry's control plane. Today it owns the Envoy v3 ADS
//! server (state-of-the-world and delta, per-stream ACK/NACK bookkeeping and
//! an `istioctl proxy-status`-like view of it) and the sources that fill it:
//! the replay of an Envoy `/config_dump` and the static resources of an Envoy
//! bootstrap, and Istio configuration ([`istio`]: a directory of YAML or,
//! with the `kube` feature, the Kubernetes API) translated per proxy by
//! [`pilot`] for sidecars and gateways.

pub mod ca;
pub mod explain;
pub mod heap;
pub mod inject;
pub mod istio;
pub mod local;
pub mod pilot;
pub mod replay;
#[cfg(feature = "kube")]
pub mod webhook;
pub mod xds;
