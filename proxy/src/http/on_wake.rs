//! A future polled only once its own waker fired.
//!
//! A connection's task waits in one `select!` on its codec and on watchers
//! beside it (the drain signal, `max_connection_duration`, the idle timer).
//! `select!` polls every branch on every wake-up of the task, and the codec
//! wakes it several times per request, while the watchers almost never have
//! anything to say: polling them each time cost about 5 % of the instructions
//! of a proxied request. [`OnWake`] gives the watchers a waker of their own
//! and passes on a poll only after it fired (or on the first poll).

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// Whether the inner future's waker fired, and the task to wake then.
#[derive(Default)]
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pin_project_lite::pin_project! {
    /// `fut`, polled only when something it waits on woke it.
    pub struct OnWake<F> {
        #[pin]
        fut: F,
        signal: Arc<Signal>,
        waker: Waker,
    }
}

impl<F: Future> OnWake<F> {
    pub fn new(fut: F) -> Self {
        let signal = Arc::new(Signal::default());
        // Polled the first time whatever happened before.
        signal.woken.store(true, Ordering::Relaxed);
        let waker = Waker::from(signal.clone());
        Self { fut, signal, waker }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake-up in between sets
        // the flag, which is then seen; one after it wakes this task again.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    pin_project_lite::pin_project! {
        /// Counts the polls of the future it wraps.
        struct Counted<F> {
            #[pin]
            fut: F,
            polls: Arc<AtomicUsize>,
        }
    }

    impl<F: Future> Future for Counted<F> {
        type Output = F::Output;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            let this = self.project();
            this.polls.fetch_add(1, Ordering::Relaxed);
            this.fut.poll(cx)
        }
    }

    /// Polls of a watcher waiting beside a task woken 50 times by something
    /// else, until the watcher's own notification comes.
    async fn polls_beside_a_busy_task(gated: bool) -> usize {
        let polls = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let n = notify.clone();
        let watcher = Counted {
            fut: async move { n.notified().await },
            polls: polls.clone(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let busy = async move {
            for _ in 0..50 {
                let _ = tx.send(());
                tokio::task::yield_now().await;
            }
            notify.notify_one();
            std::future::pending::<()>().await;
        };
        let watch = async {
            if gated {
                OnWake::new(watcher).await;
            } else {
                watcher.await;
            }
        };
        tokio::pin!(busy, watch);
        loop {
            tokio::select! {
                biased;
                () = &mut watch => break,
                Some(()) = rx.recv() => {}
                () = &mut busy => {}
            }
        }
        polls.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn the_watcher_is_polled_only_when_its_own_waker_fired() {
        // Without the gate, every wake-up of the task polls it.
        assert!(polls_beside_a_busy_task(false).await > 50);
        // With it: the first poll, and the one after its notification.
        assert_eq!(polls_beside_a_busy_task(true).await, 2);
    }
}
