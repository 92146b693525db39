//! `envoy.access_loggers.file` (and the stdout/stderr loggers, which write
//! to the process's own descriptors): one writer thread per sink, draining
//! a bounded queue in batches and flushing when the queue runs dry.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use ferry_model::access_log::Sink;

use super::{LogStats, QUEUE_LIMIT};

enum Msg {
    Line(String),
    Reopen,
    /// Answered once everything queued before it was written.
    Flush(SyncSender<()>),
}

/// The queue of one sink; its thread ends when the writer is dropped.
pub struct Writer {
    tx: SyncSender<Msg>,
    stats: LogStats,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

/// Where the thread writes.
enum Out {
    File { path: String, w: BufWriter<File> },
    Stdout(BufWriter<std::io::Stdout>),
    Stderr(BufWriter<std::io::Stderr>),
}

impl Out {
    fn open(sink: &Sink) -> std::io::Result<Out> {
        Ok(match sink {
            Sink::File(path) => Out::File {
                path: path.clone(),
                w: BufWriter::with_capacity(64 * 1024, open_append(path)?),
            },
            Sink::Stdout => Out::Stdout(BufWriter::with_capacity(64 * 1024, std::io::stdout())),
            Sink::Stderr => Out::Stderr(BufWriter::with_capacity(64 * 1024, std::io::stderr())),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Out::File { w, .. } => w,
            Out::Stdout(w) => w,
            Out::Stderr(w) => w,
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
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LIMIT);
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("ferry-access-log".into())
            .spawn(move || run(out, rx, thread_stats))?;
        Ok(Writer { tx, stats })
    }

    /// Queues a line; a full queue drops it (counted).
    pub fn write(&self, line: String) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => self.stats.write_buffered.inc(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.inc()
            }
        }
    }

    pub fn reopen(&self) {
        // Blocking is fine: this runs off the data path (signal or admin).
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Waits (a second at most) until everything queued so far is written.
    pub fn flush(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// The writer thread: blocks for the first message, takes whatever else is
/// queued, writes the batch and flushes it.
fn run(mut out: Out, rx: Receiver<Msg>, stats: LogStats) {
    let mut pending_flush: Vec<SyncSender<()>> = Vec::new();
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut failed = false;
        let mut handle = |m: Msg, out: &mut Out| match m {
            Msg::Line(l) => {
                if out.writer().write_all(l.as_bytes()).is_err() {
                    failed = true;
                }
            }
            // In order: what came before goes to the old file, what comes
            // after to the new one.
            Msg::Reopen => reopen(out, &stats),
            Msg::Flush(done) => pending_flush.push(done),
        };
        handle(first, &mut out);
        // A batch: what is already queued, bounded so a flush happens
        // regularly under constant load.
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(m) => handle(m, &mut out),
                Err(_) => break,
            }
        }
        if out.writer().flush().is_err() {
            failed = true;
        }
        if failed {
            stats.write_failed.inc();
        } else {
            stats.write_completed.inc();
        }
        for done in pending_flush.drain(..) {
            let _ = done.send(());
        }
    }
    let _ = out.writer().flush();
}

/// Reopens a file sink at its path (after log rotation).
fn reopen(out: &mut Out, stats: &LogStats) {
    let Out::File { path, w } = out else {
        return;
    };
    let _ = w.flush();
    match open_append(path) {
        Ok(f) => *w = BufWriter::with_capacity(64 * 1024, f),
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
            w.write(format!("line {i}\n"));
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
        w.write("after\n".into());
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
