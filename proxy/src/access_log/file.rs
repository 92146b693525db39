//! `envoy.access_loggers.file` (and the stdout/stderr loggers, which write
//! to the process's own descriptors): each sink has a buffer the data path
//! appends its rendered lines to, and a writer thread that takes the whole
//! buffer at once and writes it, as Envoy's file flusher does. The thread
//! is woken only when a batch starts (then it lets the batch grow for
//! [`FLUSH_INTERVAL`]) or when the batch reached [`FLUSH_SIZE`], so a busy
//! worker pays a memory copy per entry and a wake-up per batch — no system
//! call, thread switch or allocation per entry.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ferry_model::access_log::Sink;

use super::{BUFFER_LIMIT, LogStats};

/// How long a batch may gather entries before it is written: short enough
/// for `tail -f` and tests to see entries at once, long enough that a busy
/// proxy writes a few large batches a second rather than one per entry.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// A batch this large is written without waiting for the interval (Envoy's
/// flush threshold, 64 KiB).
pub const FLUSH_SIZE: usize = 64 * 1024;

/// What the data path and the writer thread share.
#[derive(Default)]
struct State {
    /// Entries not yet written.
    buf: Vec<u8>,
    /// A reopen was asked for when `buf` held this many bytes: what came
    /// before goes to the old file, what came after to the new one.
    reopen_at: Option<usize>,
    /// Answered once everything buffered before them was written.
    flush_waiters: Vec<SyncSender<()>>,
    /// The writer was dropped: write what is left and end.
    closed: bool,
}

impl State {
    /// Whether the writer thread has to write now rather than let the batch
    /// grow.
    fn urgent(&self) -> bool {
        self.buf.len() >= FLUSH_SIZE
            || !self.flush_waiters.is_empty()
            || self.reopen_at.is_some()
            || self.closed
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (plain data).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The buffer of one sink; its thread writes what is left and ends when
/// the writer is dropped.
pub struct Writer {
    shared: Arc<Shared>,
    stats: LogStats,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

/// Where the thread writes (unbuffered: it writes whole batches).
enum Out {
    File { path: String, f: File },
    Stdout(std::io::Stdout),
    Stderr(std::io::Stderr),
}

impl Out {
    fn open(sink: &Sink) -> std::io::Result<Out> {
        Ok(match sink {
            Sink::File(path) => Out::File {
                path: path.clone(),
                f: open_append(path)?,
            },
            Sink::Stdout => Out::Stdout(std::io::stdout()),
            Sink::Stderr => Out::Stderr(std::io::stderr()),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        match self {
            Out::File { f, .. } => f.write_all(b),
            Out::Stdout(w) => {
                let mut w = w.lock();
                w.write_all(b)?;
                w.flush()
            }
            Out::Stderr(w) => w.lock().write_all(b),
        }
    }
}

fn open_append(path: &str) -> std::io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

impl Writer {
    /// Opens the sink (a file that cannot be opened is an error now) and
    /// starts its thread.
    pub fn open(sink: Sink, stats: LogStats) -> std::io::Result<Writer> {
        let out = Out::open(&sink)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("ferry-access-log".into())
            .spawn(move || run(out, &thread_shared, &thread_stats))?;
        Ok(Writer { shared, stats })
    }

    /// Buffers an entry; a full buffer (the disk is not keeping up) drops
    /// it (counted). Never blocks beyond the copy under the lock.
    pub fn write(&self, line: &[u8]) {
        let mut s = self.shared.lock();
        if s.buf.len() + line.len() > BUFFER_LIMIT {
            drop(s);
            self.stats.dropped.inc();
            return;
        }
        let started = s.buf.is_empty();
        s.buf.extend_from_slice(line);
        // The thread sleeps until a batch starts, then until the interval
        // ends or the batch is large: wake it only at those two moments.
        let wake = started || (s.buf.len() >= FLUSH_SIZE && s.buf.len() - line.len() < FLUSH_SIZE);
        drop(s);
        self.stats.write_buffered.inc();
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Reopens the file at its path (log rotation), after what is buffered
    /// now was written to the old one.
    pub fn reopen(&self) {
        let mut s = self.shared.lock();
        let at = s.buf.len();
        s.reopen_at = Some(at);
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Waits (a second at most) until everything buffered so far is written.
    pub fn flush(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        self.shared.lock().flush_waiters.push(done_tx);
        self.shared.wake.notify_one();
        let _ = done_rx.recv_timeout(Duration::from_secs(1));
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// The writer thread: waits for a batch to start, lets it grow for the
/// flush interval (or until it is large, or someone waits for it), takes
/// it whole and writes it.
fn run(mut out: Out, shared: &Shared, stats: &LogStats) {
    // The buffer handed back to the data path: batches alternate between
    // two allocations instead of allocating one per batch.
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let mut s = shared.lock();
        while s.buf.is_empty() && !s.urgent() {
            s = shared.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if !s.urgent() {
            s = shared
                .wake
                .wait_timeout_while(s, FLUSH_INTERVAL, |s| !s.urgent())
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut batch = std::mem::replace(&mut s.buf, std::mem::take(&mut spare));
        let reopen_at = s.reopen_at.take();
        let waiters = std::mem::take(&mut s.flush_waiters);
        let closed = s.closed;
        drop(s);

        let mut result = Ok(());
        match reopen_at {
            Some(at) => {
                let (before, after) = batch.split_at(at.min(batch.len()));
                result = out.write_all(before);
                reopen(&mut out, stats);
                result = result.and(out.write_all(after));
            }
            None => {
                if !batch.is_empty() {
                    result = out.write_all(&batch);
                }
            }
        }
        if !batch.is_empty() {
            if result.is_err() {
                stats.write_failed.inc();
            } else {
                stats.write_completed.inc();
            }
        }
        for done in waiters {
            let _ = done.send(());
        }
        if closed {
            break;
        }
        batch.clear();
        // A burst's large buffer is not kept for good.
        if batch.capacity() > 4 * FLUSH_SIZE {
            batch = Vec::new();
        }
        spare = batch;
    }
}

/// Reopens a file sink at its path (after log rotation).
fn reopen(out: &mut Out, stats: &LogStats) {
    let Out::File { path, f } = out else {
        return;
    };
    match open_append(path) {
        Ok(new) => *f = new,
        Err(e) => {
            stats.reopen_failed.inc();
            tracing::warn!(access_log.path = %path, error = %e, "access log could not be reopened");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Stats;

    #[test]
    fn writes_in_order_reopens_and_counts_drops() {
        let dir = std::env::temp_dir().join(format!("ferry-alog-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("a.log");
        let _ = std::fs::remove_file(&path);
        let stats = Stats::default();
        let ls = LogStats::new(&stats);
        let p = path.to_string_lossy().into_owned();
        let w = Writer::open(Sink::File(p), ls.clone()).expect("open");
        for i in 0..100 {
            w.write(format!("line {i}\n").as_bytes());
        }
        w.flush();
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[99], "line 99");
        // Rotation: the file is moved away, reopen creates a new one.
        let rotated = dir.join("a.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        w.reopen();
        w.write(b"after\n");
        w.flush();
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "after\n");
        assert_eq!(ls.write_buffered.get(), 101);
        assert_eq!(ls.dropped.get(), 0);
        assert!(ls.write_completed.get() >= 2);
        let _ = std::fs::remove_dir_all(&dir);
        // A path that cannot be opened is an error at once.
        assert!(Writer::open(Sink::File("/nonexistent-dir/x.log".into()), ls).is_err());
    }
}
