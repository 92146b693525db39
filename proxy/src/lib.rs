//! `ferry-proxy`: the data plane's runtime. Listeners and interception,
//! protocol detection, the TCP proxy, the HTTP server and upstream pools, the
//! cluster manager, the admin server, drain, and the `iptables` init step.

pub mod access_log;
pub mod admin;
pub mod agent;
pub mod cluster;
pub mod demo;
pub mod detect;
pub mod drain;
pub mod http;
pub mod iptables;
pub mod lb;
pub mod listener;
pub mod metrics;
pub mod orig_dst;
pub mod outlier;
pub mod rbac;
pub mod run;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod trace;
