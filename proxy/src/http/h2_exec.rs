//! The HTTP/2 server's executor, which owns resetting a terminated
//! CONNECT stream. hyper ends an upgraded HTTP/2 stream with END_STREAM
//! however its bytes end (its sending side is a task of its own that sends
//! END_STREAM once the upgraded stream is shut down or dropped), but Envoy
//! resets a CONNECT stream whose upstream connection closed under it
//! (RST_STREAM). Each stream's task runs here with a [`StreamTasks`] of its
//! own; the task hyper spawns from it (the upgraded stream's sending side,
//! the only task a stream spawns) is kept there, so the tunnel can stop it
//! before dropping the stream: with no END_STREAM sent and nothing left
//! holding the stream, the `h2` codec resets it. Only a stream that asks
//! for its [`StreamTasks`] (a CONNECT terminated here) allocates them.

use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

tokio::task_local! {
    static STREAM: RefCell<Option<Arc<StreamTasks>>>;
}

/// The tasks one HTTP/2 stream spawned.
#[derive(Default)]
pub struct StreamTasks {
    upgraded: Mutex<Option<JoinHandle<()>>>,
}

impl StreamTasks {
    /// Those of the stream whose task is running (`None` outside a stream
    /// of this executor, as for HTTP/1).
    pub fn current() -> Option<Arc<StreamTasks>> {
        STREAM
            .try_with(|s| s.borrow_mut().get_or_insert_with(Default::default).clone())
            .ok()
    }

    /// Stops the upgraded stream's sending side before it sends
    /// END_STREAM; the stream is then reset once dropped. Whether there
    /// was one to stop.
    pub async fn stop_upgraded(&self) -> bool {
        let task = self
            .upgraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(task) = task else {
            return false;
        };
        task.abort();
        // Until it is gone (dropped mid-way, or done already).
        let _ = task.await;
        true
    }
}

/// Spawns hyper's HTTP/2 server tasks on the runtime: a stream's task in a
/// [`StreamTasks`] scope of its own, a task spawned from within one kept
/// in that scope.
#[derive(Clone, Copy, Default)]
pub struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // Within a stream's task: the stream's own (kept only when the
        // stream asked for its tasks).
        match STREAM.try_with(|s| s.borrow().clone()) {
            Ok(stream) => {
                let task = tokio::spawn(fut);
                if let Some(stream) = stream {
                    *stream.upgraded.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
                }
            }
            Err(_) => {
                tokio::spawn(STREAM.scope(RefCell::new(None), fut));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;

    /// A task spawned from a stream's task is kept in that stream's scope,
    /// and stopping it drops it before it finishes.
    #[tokio::test]
    async fn a_streams_spawned_task_is_kept_and_stopped() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        StreamExec.execute(async move {
            let stream = StreamTasks::current();
            StreamExec.execute(async move {
                // Dropped (not finished) when stopped.
                let _tell = dropped_tx;
                std::future::pending::<()>().await;
            });
            let _ = tx.send(stream);
        });
        let stream = rx.await.unwrap().expect("a stream's task runs in a scope");
        assert!(stream.stop_upgraded().await);
        assert!(dropped_rx.await.is_err(), "the spawned task was dropped");
        assert!(!stream.stop_upgraded().await, "nothing left to stop");
        assert!(StreamTasks::current().is_none());
    }
}
