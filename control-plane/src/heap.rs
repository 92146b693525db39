//! Giving memory back to the system after pushes.
//!
//! ferry-pilot runs on glibc's allocator. A push builds and encodes every
//! resource the proxy is sent and frees it once written, and glibc keeps
//! what is freed in its per-thread arenas rather than returning it: 100
//! proxies synced from a 2,000-service mesh left an RSS of about 400 MiB, of
//! which `malloc_trim` gave back 190. [`released`] arranges one trim shortly
//! after a stream pushed; a burst of pushes costs one trim.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long after the first push of a burst the heap is trimmed: the
/// responses are written (and freed) by then.
const TRIM_AFTER: Duration = Duration::from_secs(1);

/// A trim is already arranged.
static ARRANGED: AtomicBool = AtomicBool::new(false);
/// Trims done, for the tests.
static TRIMS: AtomicU64 = AtomicU64::new(0);

/// Memory was (or is about to be) freed in bulk: trim the heap soon.
/// Outside a Tokio runtime it does nothing.
pub fn released() {
    released_after(TRIM_AFTER);
}

fn released_after(delay: Duration) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if ARRANGED.swap(true, Ordering::AcqRel) {
        return;
    }
    rt.spawn(async move {
        tokio::time::sleep(delay).await;
        ARRANGED.store(false, Ordering::Release);
        // It takes each arena's lock in turn: not on a worker.
        let _ = tokio::task::spawn_blocking(trim).await;
    });
}

fn trim() {
    let started = std::time::Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it returns the free memory at
    // the top of each arena and the free pages inside it to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    TRIMS.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        heap.trim_us = started.elapsed().as_micros() as u64,
        "heap trimmed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Until the trim count leaves `from` (the trim runs on the blocking
    /// pool), or 10 s.
    async fn trims_after(from: u64) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TRIMS.load(Ordering::Relaxed) == from && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        TRIMS.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_burst_of_releases_trims_once() {
        const SOON: Duration = Duration::from_millis(50);
        let before = TRIMS.load(Ordering::Relaxed);
        for _ in 0..5 {
            released_after(SOON);
        }
        assert_eq!(trims_after(before).await, before + 1);
        // No second trim from that burst.
        tokio::time::sleep(SOON * 4).await;
        assert_eq!(TRIMS.load(Ordering::Relaxed), before + 1);
        // A later push arranges another.
        released_after(SOON);
        assert_eq!(trims_after(before + 1).await, before + 2);
    }
}
