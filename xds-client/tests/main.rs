//! The xDS conversion suite, one module per area (each file beside this one), built as one
//! test binary so that the workspace links a few binaries instead of one per file.
//! `convert_fuzz` stays a binary of its own, run on its own with more iterations.

mod access_log;
mod agent_bootstrap;
mod cluster_lb;
mod dump_type_urls;
mod filter_chain_matcher;
mod hbone_shapes;
mod istio_dump;
mod listener_fingerprints;
mod path_normalization;
mod rbac;
mod route_features;
mod route_policies;
mod tls_settings;
mod tracing;
mod wasm;
