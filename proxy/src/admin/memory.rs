//! `/memory`: the allocator's view of the process in Envoy's keys (values as
//! decimal strings). Ferry's allocator is mimalloc, not tcmalloc: `allocated`
//! and `heap_size` are the memory it has committed now and at its peak,
//! `total_physical_bytes` the resident set; the page heap and thread cache
//! figures have no mimalloc counterpart and read 0.

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use serde_json::json;

pub(super) fn respond() -> Response<Full<Bytes>> {
    let (mut elapsed, mut user, mut sys) = (0usize, 0usize, 0usize);
    let (mut rss, mut peak_rss, mut commit, mut peak_commit, mut faults) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    // SAFETY: mi_process_info only writes the out-parameters given.
    unsafe {
        libmimalloc_sys::mi_process_info(
            &mut elapsed,
            &mut user,
            &mut sys,
            &mut rss,
            &mut peak_rss,
            &mut commit,
            &mut peak_commit,
            &mut faults,
        );
    }
    super::json(&json!({
        "allocated": commit.to_string(),
        "heap_size": peak_commit.max(commit).to_string(),
        "pageheap_unmapped": "0",
        "pageheap_free": "0",
        "total_thread_cache": "0",
        "total_physical_bytes": rss.to_string(),
    }))
}
