//! Drain: signals the process and each connection watch, and a count of
//! live connections so shutdown can wait for in-flight work.
//!
//! There are two levels: the process (SIGTERM, `/quitquitquit`) and a
//! connection (its filter chain changed or removed by a configuration
//! update, or its listener replaced). A connection drains when either of
//! its two signals fires: HTTP finishes what is in flight and closes, TCP
//! gets the drain deadline. A connection can also be told to close now
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
    parent: Option<Arc<watch::Sender<u8>>>,
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
            parent: None,
            live: Arc::new((AtomicUsize::new(0), Notify::new())),
        }
    }

    /// A connection's drain: fires on its own or with the process.
    pub fn child(&self) -> Drain {
        let (tx, _) = watch::channel(RUNNING);
        Drain {
            tx: Arc::new(tx),
            parent: Some(self.parent.clone().unwrap_or_else(|| self.tx.clone())),
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
        *self.tx.borrow() >= DRAINING
            || self
                .parent
                .as_ref()
                .is_some_and(|p| *p.borrow() >= DRAINING)
    }

    /// Whether this connection was told to close now.
    pub fn is_closing(&self) -> bool {
        *self.tx.borrow() == CLOSING
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.tx.subscribe();
        match &self.parent {
            None => {
                // An error means the sender is gone, which only happens at exit.
                let _ = rx.wait_for(|d| *d >= DRAINING).await;
            }
            Some(p) => {
                let mut prx = p.subscribe();
                tokio::select! {
                    _ = rx.wait_for(|d| *d >= DRAINING) => {}
                    _ = prx.wait_for(|d| *d >= DRAINING) => {}
                }
            }
        }
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
