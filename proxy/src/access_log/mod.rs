//! Access log output: every configured sink (`envoy.access_loggers.file`,
//! `envoy.access_loggers.stdout` and `stderr`) is written by a writer thread
//! of its own, from a bounded buffer, so the data path only renders its line
//! and appends it — a slow disk never slows a request, and a full buffer
//! drops the entry and counts it (`access_log.dropped`) rather than growing
//! without bound or blocking.
//!
//! Files are opened in append mode (created if needed) as Envoy opens them,
//! and reopened on SIGUSR1 or `POST /reopen_logs` (log rotation). Envoy's
//! `filesystem.*` counters are kept: `write_buffered` per entry queued,
//! `write_completed` per batch written, `write_failed`, `reopen_failed`.

pub mod connection;
mod file;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ferry_model::access_log::{AccessLogs, Sink};
use ferry_model::stream_info::StreamInfo;

use crate::stats::{Counter, Stats};

pub use file::{FLUSH_INTERVAL, Writer};

/// Bytes buffered per sink before new entries are dropped (some 16 000
/// entries of Envoy's default format: seconds of a busy proxy's log).
pub const BUFFER_LIMIT: usize = 4 * 1024 * 1024;

/// The counters the writers share.
#[derive(Clone, Debug)]
pub struct LogStats {
    pub write_buffered: Counter,
    pub write_completed: Counter,
    pub write_failed: Counter,
    pub reopen_failed: Counter,
    pub dropped: Counter,
}

impl LogStats {
    pub fn new(stats: &Stats) -> Self {
        Self {
            write_buffered: stats.counter("filesystem.write_buffered"),
            write_completed: stats.counter("filesystem.write_completed"),
            write_failed: stats.counter("filesystem.write_failed"),
            reopen_failed: stats.counter("filesystem.reopen_failed"),
            dropped: stats.counter("access_log.dropped"),
        }
    }
}

/// The writers of every sink in use, shared by all connections.
pub struct AccessLogManager {
    writers: ArcSwap<HashMap<Sink, Arc<Writer>>>,
    /// Serialises the creation of writers (the map itself is read lock-free).
    create: Mutex<()>,
    stats: LogStats,
}

impl AccessLogManager {
    pub fn new(stats: &Stats) -> Self {
        Self {
            writers: ArcSwap::from_pointee(HashMap::new()),
            create: Mutex::new(()),
            stats: LogStats::new(stats),
        }
    }

    /// The writer of `sink`, opened on first use.
    pub fn writer(&self, sink: &Sink) -> std::io::Result<Arc<Writer>> {
        if let Some(w) = self.writers.load().get(sink) {
            return Ok(w.clone());
        }
        let _guard = self.create.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.writers.load();
        if let Some(w) = current.get(sink) {
            return Ok(w.clone());
        }
        let w = Arc::new(Writer::open(sink.clone(), self.stats.clone())?);
        let mut next = HashMap::clone(&current);
        next.insert(sink.clone(), w.clone());
        self.writers.store(Arc::new(next));
        Ok(w)
    }

    /// Opens the sinks a configuration uses (so a file that cannot be
    /// opened is reported when the configuration is applied) and closes
    /// those it no longer uses; returns the sinks that failed.
    pub fn prepare<'a>(
        &self,
        sinks: impl IntoIterator<Item = &'a Sink>,
    ) -> Vec<(Sink, std::io::Error)> {
        let mut used = Vec::new();
        let mut failed = Vec::new();
        for s in sinks {
            match self.writer(s) {
                Ok(_) => used.push(s.clone()),
                Err(e) => failed.push((s.clone(), e)),
            }
        }
        let _guard = self.create.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.writers.load();
        if current.keys().any(|k| !used.contains(k)) {
            let next: HashMap<_, _> = current
                .iter()
                .filter(|(k, _)| used.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            self.writers.store(Arc::new(next));
        }
        failed
    }

    /// Writes one stream's entries to the logs whose filters accept it.
    pub fn log(&self, logs: &AccessLogs, info: &StreamInfo) {
        thread_local! {
            /// The line being rendered: one allocation per thread, not per entry.
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        for l in &logs.logs {
            if !l.accepts(info, rand::random()) {
                continue;
            }
            let written = |w: &Writer| {
                LINE.with(|line| match line.try_borrow_mut() {
                    Ok(mut line) => {
                        line.clear();
                        l.format.render_into(info, &mut line);
                        w.write(line.as_bytes());
                        // A huge entry's buffer is not kept for good.
                        if line.capacity() > 64 * 1024 {
                            *line = String::new();
                        }
                    }
                    // Not reentrant, but never lose an entry to that.
                    Err(_) => w.write(l.format.render(info).as_bytes()),
                })
            };
            // The common case reads the writers without touching a count.
            if let Some(w) = self.writers.load().get(&l.sink) {
                written(w);
                continue;
            }
            match self.writer(&l.sink) {
                Ok(w) => written(&w),
                Err(e) => {
                    self.stats.write_failed.inc();
                    tracing::debug!(access_log.name = %l.name, error = %e, "access log unavailable");
                }
            }
        }
    }

    /// Reopens every file (after log rotation).
    pub fn reopen(&self) {
        for w in self.writers.load().values() {
            w.reopen();
        }
    }

    /// Waits until every entry queued so far was written (tests, shutdown).
    pub fn flush(&self) {
        for w in self.writers.load().values() {
            w.flush();
        }
    }
}

/// Every sink a snapshot's listeners, connection managers and TCP proxies
/// write to.
pub fn sinks_of(snapshot: &ferry_model::Snapshot) -> Vec<Sink> {
    let mut out: Vec<Sink> = Vec::new();
    let mut add = |logs: &AccessLogs| {
        for l in &logs.logs {
            if !out.contains(&l.sink) {
                out.push(l.sink.clone());
            }
        }
    };
    for l in &snapshot.listeners {
        add(&l.access_logs);
        for c in l.filter_chains.iter().chain(l.default_chain.iter()) {
            match &c.kind {
                ferry_model::ChainKind::Http(h) => add(&h.access_logs),
                ferry_model::ChainKind::Tcp(t) => add(&t.access_logs),
            }
        }
    }
    out
}
