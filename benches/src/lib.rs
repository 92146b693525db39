//! Benchmark support for Ferry.
//!
//! The crate's binaries are the fixed points of the side-by-side load harness
//! (`benches/load.py`): `bench-backend` is the upstream every target forwards to,
//! `bench-tcp-client` drives the TCP proxy benchmark. This library holds what they
//! share, so the numbers they print are computed the same way.

use std::time::Duration;

/// Latency percentile over samples already sorted ascending, in the samples' unit.
///
/// Nearest-rank, like wrk and most load tools, so the TCP numbers compare
/// with the HTTP ones without an interpolation difference.
pub fn percentile(sorted: &[u32], pct: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (pct / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Parses `5`, `5s`, `500ms` or `2m` (the forms wrk and h2load accept) into a duration: a bare
/// number is seconds, the rest is humantime's.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("not a duration: {text:?}: {e} (use e.g. 5s or 500ms)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn durations_in_load_tool_forms() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
