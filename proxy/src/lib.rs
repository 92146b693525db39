//! `ferry-proxy`: the data plane's runtime. Listeners and interception,
//! protocol detection, the TCP proxy, the HTTP server and upstream pools, the
//! cluster manager, the admin server, the agent's status server (application
//! probes, merged metrics, exit for Jobs), drain and in-place listener updates,
//! and the `iptables` init step.

pub mod access_log;
pub mod admin;
pub mod agent;
pub mod app_probe;
pub mod cluster;
pub mod demo;
pub mod detect;
pub mod dns;
pub mod drain;
pub mod filter_chain_update;
mod future_sizes;
pub mod health_check;
pub mod heap;
pub mod http;
pub mod internal_listener;
pub mod internal_pipe;
pub mod iptables;
pub mod lb;
pub mod listener;
pub mod metadata_exchange;
pub mod metrics;
pub mod metrics_merge;
pub mod network_ext_authz;
pub mod network_set_filter_state;
pub mod orig_dst;
pub mod outlier;
pub mod rbac;
pub mod resolv_conf;
pub mod run;
pub mod stats;
pub mod status;
pub mod tcp;
pub mod tls;
pub mod tls_server_stream;
pub mod trace;
pub mod upstream_h1;
