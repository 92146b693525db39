//! Istio configuration in, Envoy xDS out: reading Istio and Kubernetes
//! resources from a [`source`], checking them with precise messages in
//! [`validate`] (galley's job) and turning them, per proxy, into the
//! listeners, routes, clusters and endpoints istiod would send in
//! [`translate`] (pilot's job). The ADS server serves what this produces;
//! [`apply`] changes a configuration directory as `kubectl apply` would.

pub mod apply;
#[cfg(feature = "kube")]
pub mod kube_source;
pub mod names;
pub mod source;
pub mod translate;
pub mod types;
pub mod validate;
