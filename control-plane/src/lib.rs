//! `ferry-pilot`: Ferry's control plane. Today it owns the Envoy v3 ADS
//! server (state-of-the-world and delta, per-stream ACK/NACK bookkeeping and
//! an `istioctl proxy-status`-like view of it) and the sources that fill it:
//! the replay of an Envoy `/config_dump` and the static resources of an Envoy
//! bootstrap. Translation of Istio resources will feed the same cache.

pub mod istio;
pub mod pilot;
pub mod replay;
pub mod xds;
