//! Drain: signals the process and each connection watch, and a count of
//! live connections so shutdown can wait for in-flight work.
//!
//! There are three levels: the process (SIGTERM, `/quitquitquit`), the
//! inbound listeners (a sidecar's termination drains only those, as
//! istio-agent's `drain_listeners?inboundonly`: the app may still call out
//! while it shuts down), and a connection (its filter chain changed or
//! removed by a configuration update, or its listener replaced). A
//! connection drains when any signal above it or its own fires: HTTP
//! finishes what is in flight and closes, TCP gets the drain deadline. A connection can also be told to close now
//! (a network RBAC re-check denied it): HTTP still finishes the request
//! in flight, TCP closes at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// The states of a drain signal, in order: each only moves forward.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CLOSING: u8 = 2;

#[derive(Clone)]
pub struct Drain {
    tx: Arc<watch::Sender<u8>>,
    /// The signals above this one (the process's first).
    parents: Vec<Arc<watch::Sender<u8>>>,
    live: Arc<(AtomicUsize, Notify)>,
}

/// Held by each connection; dropping it lets shutdown proceed.
pub struct ConnGuard {
    live: Arc<(AtomicUsize, Notify)>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.live.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.live.1.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(RUNNING);
        Self {
            tx: Arc::new(tx),
            parents: Vec::new(),
            live: Arc::new((AtomicUsize::new(0), Notify::new())),
        }
    }

    /// A drain below this one: fires on its own or with any above it.
    pub fn child(&self) -> Drain {
        let (tx, _) = watch::channel(RUNNING);
        let mut parents = self.parents.clone();
        parents.push(self.tx.clone());
        Drain {
            tx: Arc::new(tx),
            parents,
            live: self.live.clone(),
        }
    }

    pub fn track(&self) -> ConnGuard {
        self.live.0.fetch_add(1, Ordering::AcqRel);
        ConnGuard {
            live: self.live.clone(),
        }
    }

    pub fn live_connections(&self) -> usize {
        self.live.0.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow() >= DRAINING || self.parents.iter().any(|p| *p.borrow() >= DRAINING)
    }

    /// Whether this connection was told to close now.
    pub fn is_closing(&self) -> bool {
        *self.tx.borrow() == CLOSING
    }

    /// Resolves once draining has started (here or above).
    pub async fn signaled(&self) {
        let wait = |tx: &Arc<watch::Sender<u8>>| {
            let mut rx = tx.subscribe();
            Box::pin(async move {
                // An error means the sender is gone, which only happens at exit.
                let _ = rx.wait_for(|d| *d >= DRAINING).await;
            })
        };
        let all: Vec<_> = std::iter::once(&self.tx)
            .chain(&self.parents)
            .map(wait)
            .collect();
        futures_util::future::select_all(all).await;
    }

    /// Resolves once the connection was told to close now; never otherwise.
    pub async fn closing(&self) {
        let mut rx = self.tx.subscribe();
        if rx.wait_for(|d| *d == CLOSING).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn start(&self) {
        self.tx.send_if_modified(|s| {
            let was = *s;
            *s = was.max(DRAINING);
            *s != was
        });
    }

    /// Tells the connection to close now (it counts as draining too).
    pub fn close(&self) {
        self.tx.send_replace(CLOSING);
    }

    /// Starts draining and waits until every tracked connection is done, or
    /// the deadline passes. Returns the connections still open.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.start();
        self.wait_idle(deadline).await
    }

    /// Waits until every tracked connection is done, or the deadline
    /// passes. Returns the connections still open.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let notified = self.live.1.notified();
                if self.live_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.live_connections()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_connections_up_to_deadline() {
        let d = Drain::new();
        let g = d.track();
        let d2 = d.clone();
        let h = tokio::spawn(async move { d2.drain(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(d.is_draining());
        drop(g);
        assert_eq!(h.await.unwrap(), 0);

        let _g = d.track();
        assert_eq!(d.drain(Duration::from_secs(5)).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn generation_drains_alone_or_with_the_process() {
        let process = Drain::new();
        let old = process.child();
        let new = process.child();
        old.start();
        tokio::time::timeout(Duration::from_secs(1), old.signaled())
            .await
            .unwrap();
        assert!(!new.is_draining());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), new.signaled())
                .await
                .is_err()
        );
        process.start();
        tokio::time::timeout(Duration::from_secs(1), new.signaled())
            .await
            .unwrap();
        assert!(new.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn inbound_level_drains_its_connections_alone_or_with_the_process() {
        let process = Drain::new();
        let inbound = process.child();
        let inbound_conn = inbound.child();
        let outbound_conn = process.child();
        inbound.start();
        tokio::time::timeout(Duration::from_secs(1), inbound_conn.signaled())
            .await
            .unwrap();
        assert!(inbound_conn.is_draining() && !outbound_conn.is_draining());
        assert!(!process.is_draining());
        let other = Drain::new();
        let level = other.child();
        let conn = level.child();
        other.start();
        tokio::time::timeout(Duration::from_secs(1), conn.signaled())
            .await
            .unwrap();
        assert!(conn.is_draining() && level.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_told_to_close_is_draining_too() {
        let process = Drain::new();
        let conn = process.child();
        assert!(!conn.is_closing());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), conn.closing())
                .await
                .is_err()
        );
        conn.close();
        tokio::time::timeout(Duration::from_secs(1), conn.closing())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), conn.signaled())
            .await
            .unwrap();
        assert!(conn.is_draining() && conn.is_closing());
        // Draining later does not take the close back.
        conn.start();
        assert!(conn.is_closing());
        assert!(!process.is_draining());
    }
}
