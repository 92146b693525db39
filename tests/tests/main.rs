//! Ferry's end-to-end suite, one module per area (each file beside this one).
//!
//! The areas are built as one test binary rather than one per file: every binary links the
//! whole proxy and control plane, so one binary saves gigabytes of disk and most of the link
//! time. nextest still runs each test in its own process; pick an area with
//! `cargo nextest run -p ferry-tests -E 'test(/^hbone::/)'`.

mod access_log;
mod admin;
mod agent;
mod agent_file_secrets;
mod ambient;
mod authn;
mod authz;
mod bookinfo;
mod cli;
mod compressor;
mod data_path;
mod demo;
mod dns;
mod endpoint_loss;
mod explain;
mod ext_authz;
mod filter_chain_matcher;
mod filter_chain_update;
mod forwarded;
mod gateway;
mod hbone;
mod hbone_server;
mod health_check;
mod hostile;
mod images;
mod inject;
mod iptables;
mod jwt;
mod l7_cluster;
mod l7_router;
mod live_updates;
mod mesh;
mod mesh_identity;
mod mesh_metrics;
mod mesh_trace;
mod mixed_mesh;
mod nds;
mod netns_bed;
mod network_set_filter_state;
mod path_normalization;
mod pilot_explain;
mod pipe_endpoints;
mod rbac;
mod replay;
mod route_decisions;
mod runtime;
mod sds_agent;
mod sidecar_resource;
mod tcp_metadata_exchange;
mod tcp_proxy_options;
mod tcp_shifting;
mod tls;
mod tls_verification;
mod tracing;
mod walkthrough;
mod xds;
mod xds_updates;
