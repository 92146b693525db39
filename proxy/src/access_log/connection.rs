//! The access log entries of connections: a TCP proxy's connection when it
//! closes (`TcpConnectionEnd`), and a connection no filter chain took,
//! logged by the listener's own access logs with Envoy's `NR` flag.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use ferry_model::access_log::AccessLogs;
use ferry_model::stream_info::{LogType, StreamInfo};

use crate::run::Runtime;

/// A connection being proxied; logged when dropped (whatever ended it).
pub struct ConnectionLog {
    rec: Option<Record>,
}

/// The entry under construction, where it goes, and when it started.
type Record = (Box<StreamInfo>, Arc<AccessLogs>, Arc<Runtime>, Instant);

impl ConnectionLog {
    pub fn start(
        rt: &Arc<Runtime>,
        logs: &Arc<AccessLogs>,
        peer: SocketAddr,
        local: SocketAddr,
        server_name: &str,
    ) -> Self {
        if logs.is_empty() {
            return Self { rec: None };
        }
        let mut info = StreamInfo::new(LogType::TcpConnectionEnd, SystemTime::now());
        info.downstream_remote = Some(peer);
        info.downstream_direct_remote = Some(peer);
        info.downstream_local = Some(local);
        info.requested_server_name = Some(server_name.to_string()).filter(|s| !s.is_empty());
        info.hostname = crate::http::hostname();
        Self {
            rec: Some((Box::new(info), logs.clone(), rt.clone(), Instant::now())),
        }
    }

    fn info(&mut self) -> Option<&mut StreamInfo> {
        self.rec.as_mut().map(|r| &mut *r.0)
    }

    /// An internal listener's own address, when it is the connection's
    /// local address.
    pub fn local_internal(&mut self, addr: Option<ferry_model::cluster::InternalAddr>) {
        if let Some(i) = self.info() {
            i.downstream_local_internal = addr;
        }
    }

    /// The connection's filter state, for `%FILTER_STATE%`.
    pub fn filter_state(&mut self, state: Option<Arc<ferry_model::filter_state::FilterState>>) {
        if let Some(i) = self.info() {
            i.filter_state = state;
        }
    }

    pub fn cluster(&mut self, name: &str) {
        if let Some(i) = self.info() {
            i.upstream_cluster = Some(name.to_string());
        }
    }

    pub fn upstream(&mut self, host: ferry_model::cluster::HostAddr, local: Option<SocketAddr>) {
        if let Some(i) = self.info() {
            i.upstream_host = Some(host);
            i.upstream_local = local;
        }
    }

    pub fn flag(&mut self, flag: &str) {
        if let Some(i) = self.info() {
            i.add_flag(flag);
        }
    }

    pub fn failure_reason(&mut self, reason: Option<String>) {
        if let Some(i) = self.info() {
            i.upstream_transport_failure_reason = reason;
        }
    }

    pub fn bytes(&mut self, received: u64, sent: u64) {
        if let Some(i) = self.info() {
            i.bytes_received = received;
            i.bytes_sent = sent;
        }
    }

    pub fn termination(&mut self, details: &str) {
        if let Some(i) = self.info() {
            i.connection_termination_details = Some(details.to_string());
        }
    }
}

impl Drop for ConnectionLog {
    fn drop(&mut self) {
        if let Some((mut info, logs, rt, start)) = self.rec.take() {
            info.duration = Some(start.elapsed());
            rt.access_logs.log(&logs, &info);
        }
    }
}

/// A connection no filter chain of `listener` matched.
pub fn no_filter_chain(
    rt: &Runtime,
    listener: &ferry_model::Listener,
    peer: SocketAddr,
    (local, local_internal): (SocketAddr, Option<&ferry_model::cluster::InternalAddr>),
    server_name: Option<&str>,
) {
    if listener.access_logs.is_empty() {
        return;
    }
    let mut info = StreamInfo::new(LogType::NotSet, SystemTime::now());
    info.downstream_remote = Some(peer);
    info.downstream_direct_remote = Some(peer);
    info.downstream_local = Some(local);
    info.downstream_local_internal = local_internal.cloned();
    info.requested_server_name = server_name.map(str::to_string).filter(|s| !s.is_empty());
    info.hostname = crate::http::hostname();
    info.add_flag("NR");
    info.duration = Some(std::time::Duration::ZERO);
    rt.access_logs.log(&listener.access_logs, &info);
}
