//! The connection manager's timers of one request while it arrives:
//! `request_timeout` (the whole request must be received within it) and
//! `stream_idle_timeout` (no request body byte for that long), each
//! answered 408 as Envoy answers them. Once the request is complete the
//! router's timers take over (the route timeout, and the stream idle
//! timeout as the route's default), until the response's last byte.
//!
//! The downstream body is read deep inside the router (streamed, or kept
//! for retries), so its progress is reported through [`RequestProgress`],
//! which the body types pick up from the task-local [`PROGRESS`] that
//! `handle` sets around routing: no signature between the connection
//! manager and the body types has to carry it.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

tokio::task_local! {
    /// The progress of the request whose routing runs in this task.
    pub(crate) static PROGRESS: Arc<RequestProgress>;
}

/// How far a request's body has arrived.
#[derive(Debug)]
pub struct RequestProgress {
    ended: AtomicBool,
    last_activity: Mutex<Instant>,
    changed: Notify,
}

impl RequestProgress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ended: AtomicBool::new(false),
            last_activity: Mutex::new(Instant::now()),
            changed: Notify::new(),
        })
    }

    /// The progress of the request being routed in this task, if any.
    pub fn current() -> Option<Arc<Self>> {
        PROGRESS.try_with(Arc::clone).ok()
    }

    /// A body frame arrived.
    pub fn active(&self) {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.changed.notify_waiters();
    }

    /// The request was received whole.
    pub fn ended(&self) {
        self.ended.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn last_activity(&self) -> Instant {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which of the request's arrival timers ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// `request_timeout`: Envoy's 408 "request timeout".
    Request,
    /// `stream_idle_timeout` before the request was whole: 408 "stream timeout".
    Idle,
}

/// Resolves when a timer runs out before the request has arrived whole;
/// never once it has.
pub async fn arrival(
    p: &RequestProgress,
    started: Instant,
    request_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
) -> Expired {
    if request_timeout.is_none() && idle_timeout.is_none() {
        return std::future::pending().await;
    }
    let request_at = request_timeout.map(|t| started + t);
    loop {
        let changed = p.changed.notified();
        if p.is_ended() {
            return std::future::pending().await;
        }
        let idle_at = idle_timeout.map(|t| p.last_activity() + t);
        let first = [(request_at, Expired::Request), (idle_at, Expired::Idle)]
            .into_iter()
            .filter_map(|(at, kind)| Some((at?, kind)))
            .min_by_key(|(at, _)| *at);
        let Some((at, kind)) = first else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                if !p.is_ended() {
                    return kind;
                }
            }
            _ = changed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn request_timeout_counts_from_the_start() {
        let p = RequestProgress::new();
        let start = Instant::now();
        let feeder = {
            let p = p.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    p.active();
                }
            })
        };
        let kind = arrival(
            &p,
            start,
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(2)),
        )
        .await;
        assert_eq!(kind, Expired::Request);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_restarts_with_each_frame() {
        let p = RequestProgress::new();
        let start = Instant::now();
        {
            let p = p.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    p.active();
                }
            });
        }
        let kind = arrival(&p, start, None, Some(Duration::from_secs(2))).await;
        assert_eq!(kind, Expired::Idle);
        // The last frame came at 3 s.
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_request_never_expires() {
        let p = RequestProgress::new();
        let start = Instant::now();
        {
            let p = p.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                p.ended();
            });
        }
        let r = tokio::time::timeout(
            Duration::from_secs(3600),
            arrival(
                &p,
                start,
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(2)),
            ),
        )
        .await;
        assert!(r.is_err());
    }
}
