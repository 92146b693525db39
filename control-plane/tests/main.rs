//! ferry-pilot's integration suite, one module per area (each file beside this one), built
//! as one test binary so that the workspace links a few binaries instead of one per file.
//! `common` is the shared harness; `kube_api` the test API server of the `kube` feature.

mod common;
#[cfg(feature = "kube")]
mod kube_api;

mod ads;
mod cli;
mod envoy;
mod istio_ambient;
mod istio_authz;
mod istio_envoy;
mod istio_gateway;
mod istio_locality;
mod istio_mtls;
mod istio_path_normalization;
mod istio_source;
mod istio_telemetry;
mod istio_translate;
mod istio_validate;
mod kube_source;
mod manifests;
mod outbound_sharing;
mod proxy_applies;
mod replay;
mod sidecar_listeners;
mod webhook;
