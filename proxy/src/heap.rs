//! Giving memory back to the system once connections freed their buffers
//! in bulk (idle keep-alive connections parked: `http::serve_h1`).
//!
//! mimalloc returns a freed page to the system only after its purge delay
//! (10 ms), and only when something on the owning thread allocates or
//! collects later. A proxy whose connections just went idle does neither, so
//! the freed codec buffers would stay resident. [`released`] arranges one
//! collection on this worker shortly after; a burst of releases costs one.
//! Purging on every free instead (`MIMALLOC_PURGE_DELAY=0`) was measured to
//! cost 30 % of the throughput of a new connection per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long after the first release of a burst the heap is collected.
const COLLECT_AFTER: Duration = Duration::from_millis(250);

thread_local! {
    /// A collection is already arranged from this thread.
    static ARRANGED: Arc<AtomicBool> = Arc::new(AtomicBool::new(false));
}

/// Memory was freed in bulk on this thread: collect the heap soon.
pub fn released() {
    let arranged = ARRANGED.with(Arc::clone);
    if arranged.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(COLLECT_AFTER).await;
        arranged.store(false, Ordering::Release);
        collect();
    });
}

/// Frees what the heap no longer uses and gives its pages back now. It
/// runs where the task runs: the arranging thread on a current-thread
/// runtime, usually the same worker otherwise; the process-wide arenas
/// are purged from any thread.
fn collect() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: mi_collect takes no pointer; it frees and purges what this
    // thread's heap no longer uses.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
