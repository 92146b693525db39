//! Drain: signals every listener generation and connection watches, and a
//! count of live connections so shutdown can wait for in-flight work.
//!
//! There are two levels: the process (SIGTERM, `/quitquitquit`) and a
//! listener generation (a listener replaced or removed by a configuration
//! update). A connection drains when either of its two signals fires.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Clone)]
pub struct Drain {
    tx: Arc<watch::Sender<bool>>,
    parent: Option<Arc<watch::Sender<bool>>>,
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
        let (tx, _) = watch::channel(false);
        Self {
            tx: Arc::new(tx),
            parent: None,
            live: Arc::new((AtomicUsize::new(0), Notify::new())),
        }
    }

    /// A listener generation's drain: fires on its own or with the process.
    pub fn child(&self) -> Drain {
        let (tx, _) = watch::channel(false);
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
        *self.tx.borrow() || self.parent.as_ref().is_some_and(|p| *p.borrow())
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.tx.subscribe();
        match &self.parent {
            None => {
                // An error means the sender is gone, which only happens at exit.
                let _ = rx.wait_for(|d| *d).await;
            }
            Some(p) => {
                let mut prx = p.subscribe();
                tokio::select! {
                    _ = rx.wait_for(|d| *d) => {}
                    _ = prx.wait_for(|d| *d) => {}
                }
            }
        }
    }

    pub fn start(&self) {
        self.tx.send_replace(true);
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
}
