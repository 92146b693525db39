//! Outlier detection (Envoy's `outlier_detection`): every upstream result is
//! reported here, per endpoint; consecutive 5xx, consecutive gateway errors
//! and consecutive local-origin failures eject an endpoint at once, and a
//! timer every `interval` brings ejected endpoints back once their ejection
//! time (base × number of ejections, capped) is over, and ejects endpoints
//! whose success rate lies too far below the cluster's. Balancers read only
//! one atomic flag per endpoint ([`HostOutlier::ejected`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ferry_model::cluster::OutlierDetection;
use tokio::time::Instant;

use crate::stats::{Counter, Stats};

/// What one request to an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// No answer: connect failure, reset or timeout (local origin).
    LocalFailure,
    /// The connection was made (local origin success).
    LocalSuccess,
    /// The connection was made and no response will follow (TCP proxy):
    /// without the split it counts as a success of the endpoint.
    LocalSuccessFinal,
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
pub struct HostOutlier {
    ejected: AtomicBool,
    state: Mutex<HostState>,
}

#[derive(Debug, Default)]
struct HostState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Grows with each ejection, shrinks after a base ejection time without one.
    backoff: u32,
    ejected_at: Option<Instant>,
    last_unejected: Option<Instant>,
    /// Success-rate counters of the current interval: results the
    /// endpoint answered (and, without the split, local failures)...
    success: u64,
    total: u64,
    /// ...and, with the split, local-origin results.
    local_success: u64,
    local_total: u64,
    /// The random extra of the current ejection (`max_ejection_time_jitter`).
    jitter: Duration,
}

impl HostOutlier {
    pub fn ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }
}

/// A cluster's detector: its configuration, the hosts it watches and how
/// many of them are ejected.
pub struct Detector {
    cfg: OutlierDetection,
    hosts: Mutex<Vec<Weak<HostOutlier>>>,
    ejected: AtomicUsize,
    stats: OutlierStats,
}

#[derive(Clone, Debug)]
struct OutlierStats {
    enforced_total: Counter,
    enforced_5xx: Counter,
    enforced_gateway: Counter,
    enforced_local: Counter,
    enforced_success_rate: Counter,
    enforced_local_success_rate: Counter,
    enforced_failure_percentage: Counter,
    enforced_local_failure_percentage: Counter,
    overflow: Counter,
}

impl Detector {
    pub fn new(cfg: OutlierDetection, stats: &Stats, cluster: &str) -> Arc<Self> {
        let c = |n: &str| stats.counter(&format!("cluster.{cluster}.outlier_detection.{n}"));
        Arc::new(Self {
            cfg,
            hosts: Mutex::new(Vec::new()),
            ejected: AtomicUsize::new(0),
            stats: OutlierStats {
                enforced_total: c("ejections_enforced_total"),
                enforced_5xx: c("ejections_enforced_consecutive_5xx"),
                enforced_gateway: c("ejections_enforced_consecutive_gateway_failure"),
                enforced_local: c("ejections_enforced_consecutive_local_origin_failure"),
                enforced_success_rate: c("ejections_enforced_success_rate"),
                enforced_local_success_rate: c("ejections_enforced_local_origin_success_rate"),
                enforced_failure_percentage: c("ejections_enforced_failure_percentage"),
                enforced_local_failure_percentage: c(
                    "ejections_enforced_local_origin_failure_percentage",
                ),
                overflow: c("ejections_overflow"),
            },
        })
    }

    /// Runs [`Detector::tick`] every `interval` while the detector lives.
    pub fn start(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        let interval = self.cfg.interval.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut t = tokio::time::interval_at(Instant::now() + interval, interval);
            loop {
                t.tick().await;
                let Some(d) = weak.upgrade() else { return };
                d.tick(Instant::now());
            }
        });
    }

    /// A passing active health check: an ejected host returns at once when
    /// `successful_active_health_check_uneject_host` says so (Envoy's default).
    pub fn health_check_passed(&self, host: &HostOutlier) {
        if !self.cfg.uneject_on_health_check_success || !host.ejected() {
            return;
        }
        let mut s = host.state.lock().unwrap_or_else(|p| p.into_inner());
        if host.ejected.swap(false, Ordering::Relaxed) {
            self.ejected.fetch_sub(1, Ordering::Relaxed);
            s.ejected_at = None;
            s.last_unejected = Some(Instant::now());
            tracing::info!("endpoint returned from ejection by a passing health check");
        }
    }

    /// The endpoint set changed: these are the hosts watched from now on.
    pub fn set_hosts(&self, hosts: &[Arc<HostOutlier>]) {
        let mut hs = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        *hs = hosts.iter().map(Arc::downgrade).collect();
        let ejected = hosts.iter().filter(|h| h.ejected()).count();
        self.ejected.store(ejected, Ordering::Relaxed);
    }

    fn host_count(&self) -> usize {
        let hs = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hs.iter().filter(|h| h.strong_count() > 0).count()
    }

    /// Records one result of `host`; may eject it.
    pub fn report(&self, host: &HostOutlier, outcome: Outcome) {
        let split = self.cfg.split_external_local_origin_errors;
        // Without the split, a local failure counts as the 503 Envoy answers.
        let outcome = match outcome {
            Outcome::LocalFailure if !split => Outcome::Status(503),
            Outcome::LocalSuccess if !split => return,
            Outcome::LocalSuccessFinal if !split => Outcome::Status(200),
            Outcome::LocalSuccessFinal => Outcome::LocalSuccess,
            o => o,
        };
        let mut reason = None;
        {
            let mut s = host.state.lock().unwrap_or_else(|p| p.into_inner());
            match outcome {
                Outcome::Status(code) => {
                    s.total += 1;
                    if (500..600).contains(&code) {
                        if matches!(code, 502..=504) {
                            s.consecutive_gateway += 1;
                            if s.consecutive_gateway == self.cfg.consecutive_gateway_failure {
                                reason = Some(Reason::Gateway);
                            }
                        } else {
                            s.consecutive_gateway = 0;
                        }
                        s.consecutive_5xx += 1;
                        if s.consecutive_5xx == self.cfg.consecutive_5xx {
                            reason = reason.or(Some(Reason::Consecutive5xx));
                        }
                    } else {
                        s.success += 1;
                        s.consecutive_5xx = 0;
                        s.consecutive_gateway = 0;
                    }
                }
                Outcome::LocalFailure => {
                    s.local_total += 1;
                    s.consecutive_local += 1;
                    if s.consecutive_local == self.cfg.consecutive_local_origin_failure {
                        reason = Some(Reason::LocalOrigin);
                    }
                }
                Outcome::LocalSuccess | Outcome::LocalSuccessFinal => {
                    s.local_total += 1;
                    s.local_success += 1;
                    s.consecutive_local = 0;
                }
            }
        }
        if let Some(r) = reason {
            let enforcing = match r {
                Reason::Consecutive5xx => self.cfg.enforcing_consecutive_5xx,
                Reason::Gateway => self.cfg.enforcing_consecutive_gateway_failure,
                Reason::LocalOrigin => self.cfg.enforcing_consecutive_local_origin_failure,
                Reason::SuccessRate => self.cfg.enforcing_success_rate,
                Reason::LocalSuccessRate => self.cfg.enforcing_local_origin_success_rate,
                Reason::FailurePercentage => self.cfg.enforcing_failure_percentage,
                Reason::LocalFailurePercentage => {
                    self.cfg.enforcing_failure_percentage_local_origin
                }
            };
            if enforcing > 0 && (enforcing >= 100 || rand::random_range(0..100) < enforcing) {
                self.eject(host, r, Instant::now());
            }
        }
    }

    fn eject(&self, host: &HostOutlier, reason: Reason, now: Instant) {
        if host.ejected() {
            return;
        }
        // Envoy: ejecting this host must keep the ejected share within
        // max_ejection_percent.
        let total = self.host_count().max(1);
        let ejected = self.ejected.load(Ordering::Relaxed);
        let after = ejected + 1;
        // `always_eject_one_host`: the first ejection is always allowed.
        let first = self.cfg.always_eject_one_host && ejected == 0;
        if !first && after * 100 > total * self.cfg.max_ejection_percent as usize {
            self.stats.overflow.inc();
            return;
        }
        let mut s = host.state.lock().unwrap_or_else(|p| p.into_inner());
        let base = self.cfg.base_ejection_time;
        if base * s.backoff < self.cfg.max_ejection_time {
            s.backoff += 1;
        }
        s.ejected_at = Some(now);
        s.jitter = if self.cfg.max_ejection_time_jitter.is_zero() {
            Duration::ZERO
        } else {
            self.cfg
                .max_ejection_time_jitter
                .mul_f64(rand::random::<f64>())
        };
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        s.consecutive_local = 0;
        host.ejected.store(true, Ordering::Relaxed);
        self.ejected.fetch_add(1, Ordering::Relaxed);
        self.stats.enforced_total.inc();
        match reason {
            Reason::Consecutive5xx => self.stats.enforced_5xx.inc(),
            Reason::Gateway => self.stats.enforced_gateway.inc(),
            Reason::LocalOrigin => self.stats.enforced_local.inc(),
            Reason::SuccessRate => self.stats.enforced_success_rate.inc(),
            Reason::LocalSuccessRate => self.stats.enforced_local_success_rate.inc(),
            Reason::FailurePercentage => self.stats.enforced_failure_percentage.inc(),
            Reason::LocalFailurePercentage => self.stats.enforced_local_failure_percentage.inc(),
        }
        tracing::info!(outlier.reason = ?reason, outlier.ejections = s.backoff, "endpoint ejected");
    }

    /// The periodic pass: un-eject endpoints whose time is over, let the
    /// backoff of well-behaved endpoints decay, and apply the success rate.
    pub fn tick(&self, now: Instant) {
        let hosts: Vec<Arc<HostOutlier>> = {
            let hs = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hs.iter().filter_map(Weak::upgrade).collect()
        };
        let base = self.cfg.base_ejection_time;
        let mut external = Vec::new();
        let mut local = Vec::new();
        for h in &hosts {
            let mut s = h.state.lock().unwrap_or_else(|p| p.into_inner());
            if h.ejected() {
                let time = (base * s.backoff).min(self.cfg.max_ejection_time) + s.jitter;
                if s.ejected_at
                    .is_some_and(|at| now.duration_since(at) >= time)
                {
                    h.ejected.store(false, Ordering::Relaxed);
                    self.ejected.fetch_sub(1, Ordering::Relaxed);
                    s.ejected_at = None;
                    s.last_unejected = Some(now);
                    tracing::info!("endpoint returned from ejection");
                }
            } else if s.backoff > 0
                && s.last_unejected
                    .is_none_or(|at| now.duration_since(at) >= base)
            {
                s.backoff -= 1;
                s.last_unejected = Some(now);
            }
            if !h.ejected() {
                external.push((h.clone(), s.success, s.total));
                local.push((h.clone(), s.local_success, s.local_total));
            }
            s.success = 0;
            s.total = 0;
            s.local_success = 0;
            s.local_total = 0;
        }
        self.judge(
            &external,
            Reason::SuccessRate,
            Reason::FailurePercentage,
            now,
        );
        // Local-origin results are judged apart only with the split.
        if self.cfg.split_external_local_origin_errors {
            self.judge(
                &local,
                Reason::LocalSuccessRate,
                Reason::LocalFailurePercentage,
                now,
            );
        }
    }

    /// Envoy's success-rate (mean - stdev × factor) and failure-percentage
    /// ejections over one kind of results (`success`, `total` per host).
    fn judge(
        &self,
        results: &[(Arc<HostOutlier>, u64, u64)],
        success_rate: Reason,
        failure_percentage: Reason,
        now: Instant,
    ) {
        let cfg = &self.cfg;
        let rate = |success: u64, total: u64| success as f64 * 100.0 / total as f64;
        let rates: Vec<(&Arc<HostOutlier>, f64)> = results
            .iter()
            .filter(|(_, _, total)| *total >= u64::from(cfg.success_rate_request_volume))
            .map(|(h, s, t)| (h, rate(*s, *t)))
            .collect();
        if !rates.is_empty() && rates.len() >= cfg.success_rate_minimum_hosts as usize {
            let n = rates.len() as f64;
            let mean = rates.iter().map(|r| r.1).sum::<f64>() / n;
            let var = rates.iter().map(|r| (r.1 - mean).powi(2)).sum::<f64>() / n;
            let threshold = mean - var.sqrt() * f64::from(cfg.success_rate_stdev_factor) / 1000.0;
            for (h, r) in &rates {
                if *r < threshold {
                    self.enforce(h, success_rate, now);
                }
            }
        }
        let volumes: Vec<(&Arc<HostOutlier>, f64)> = results
            .iter()
            .filter(|(_, _, total)| *total >= u64::from(cfg.failure_percentage_request_volume))
            .map(|(h, s, t)| (h, rate(*s, *t)))
            .collect();
        if !volumes.is_empty() && volumes.len() >= cfg.failure_percentage_minimum_hosts as usize {
            for (h, r) in &volumes {
                if 100.0 - r >= f64::from(cfg.failure_percentage_threshold) {
                    self.enforce(h, failure_percentage, now);
                }
            }
        }
    }

    /// Ejects `host` for `reason` with the reason's enforcing percentage.
    fn enforce(&self, host: &HostOutlier, reason: Reason, now: Instant) {
        let e = match reason {
            Reason::SuccessRate => self.cfg.enforcing_success_rate,
            Reason::LocalSuccessRate => self.cfg.enforcing_local_origin_success_rate,
            Reason::FailurePercentage => self.cfg.enforcing_failure_percentage,
            Reason::LocalFailurePercentage => self.cfg.enforcing_failure_percentage_local_origin,
            _ => 100,
        };
        if e > 0 && (e >= 100 || rand::random_range(0..100) < e) {
            self.eject(host, reason, now);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Reason {
    Consecutive5xx,
    Gateway,
    LocalOrigin,
    SuccessRate,
    LocalSuccessRate,
    FailurePercentage,
    LocalFailurePercentage,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(cfg: OutlierDetection, n: usize) -> (Arc<Detector>, Vec<Arc<HostOutlier>>) {
        let d = Detector::new(cfg, &Stats::default(), "c");
        let hosts: Vec<Arc<HostOutlier>> = (0..n).map(|_| Arc::default()).collect();
        d.set_hosts(&hosts);
        (d, hosts)
    }

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_ejects_and_time_grows_with_ejections() {
        let (d, hs) = detector(cfg(), 3);
        let h = &hs[0];
        d.report(h, Outcome::Status(500));
        d.report(h, Outcome::Status(200));
        d.report(h, Outcome::Status(500));
        d.report(h, Outcome::Status(500));
        assert!(!h.ejected(), "a success in between resets the count");
        d.report(h, Outcome::Status(503));
        assert!(h.ejected());
        // First ejection: base time (10 s).
        tokio::time::advance(Duration::from_secs(9)).await;
        d.tick(Instant::now());
        assert!(h.ejected());
        tokio::time::advance(Duration::from_secs(1)).await;
        d.tick(Instant::now());
        assert!(!h.ejected());
        // Second ejection right away: 2 × base.
        for _ in 0..3 {
            d.report(h, Outcome::Status(500));
        }
        assert!(h.ejected());
        tokio::time::advance(Duration::from_secs(19)).await;
        d.tick(Instant::now());
        assert!(h.ejected());
        tokio::time::advance(Duration::from_secs(1)).await;
        d.tick(Instant::now());
        assert!(!h.ejected());
        // Third: 3 × base = 30 s, capped by max_ejection_time at 25 s.
        for _ in 0..3 {
            d.report(h, Outcome::Status(500));
        }
        tokio::time::advance(Duration::from_secs(25)).await;
        d.tick(Instant::now());
        assert!(!h.ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_caps_ejections() {
        let (d, hs) = detector(cfg(), 3);
        for h in &hs {
            for _ in 0..3 {
                d.report(h, Outcome::Status(500));
            }
        }
        // 50 % of 3: one host may be ejected, a second would make 66 %.
        assert_eq!(hs.iter().filter(|h| h.ejected()).count(), 1);
        // Envoy's default (10 %) ejects nobody out of three.
        let (d, hs) = detector(
            OutlierDetection {
                consecutive_5xx: 3,
                ..OutlierDetection::default()
            },
            3,
        );
        for _ in 0..3 {
            d.report(&hs[0], Outcome::Status(500));
        }
        assert!(!hs[0].ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_and_local_origin_split() {
        let gw = OutlierDetection {
            consecutive_5xx: 100,
            consecutive_gateway_failure: 2,
            enforcing_consecutive_gateway_failure: 100,
            ..cfg()
        };
        let (d, hs) = detector(gw.clone(), 2);
        d.report(&hs[0], Outcome::Status(502));
        d.report(&hs[0], Outcome::Status(500));
        d.report(&hs[0], Outcome::Status(504));
        assert!(
            !hs[0].ejected(),
            "a non-gateway 5xx resets the gateway count"
        );
        d.report(&hs[0], Outcome::Status(503));
        assert!(hs[0].ejected());
        // Unsplit: connect failures count as 503s, hence as gateway errors.
        d.report(&hs[1], Outcome::LocalFailure);
        d.report(&hs[1], Outcome::LocalFailure);
        assert!(hs[1].ejected() || d.ejected.load(Ordering::Relaxed) == 1);

        let split = OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failure: 2,
            ..gw
        };
        let (d, hs) = detector(split, 2);
        d.report(&hs[0], Outcome::LocalFailure);
        d.report(&hs[0], Outcome::LocalSuccess);
        d.report(&hs[0], Outcome::LocalFailure);
        assert!(!hs[0].ejected());
        d.report(&hs[0], Outcome::LocalFailure);
        assert!(hs[0].ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn success_rate_ejects_the_outlier() {
        let sr = OutlierDetection {
            consecutive_5xx: 1000,
            success_rate_minimum_hosts: 3,
            success_rate_request_volume: 10,
            max_ejection_percent: 100,
            ..cfg()
        };
        let (d, hs) = detector(sr, 5);
        for (i, h) in hs.iter().enumerate() {
            for k in 0..100 {
                let fail = i == 4 && k % 2 == 0;
                d.report(h, Outcome::Status(if fail { 500 } else { 200 }));
            }
        }
        d.tick(Instant::now());
        assert!(hs[4].ejected());
        assert!(hs.iter().take(4).all(|h| !h.ejected()));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_percentage_ejects_past_the_threshold() {
        let fp = OutlierDetection {
            consecutive_5xx: 1000,
            enforcing_success_rate: 0,
            enforcing_failure_percentage: 100,
            failure_percentage_threshold: 60,
            failure_percentage_minimum_hosts: 2,
            failure_percentage_request_volume: 20,
            max_ejection_percent: 100,
            ..cfg()
        };
        let (d, hs) = detector(fp.clone(), 3);
        // 70 % failures, 50 %, and too few requests to count (with 90 %).
        for (i, (fails, total)) in [(14, 20), (10, 20), (9, 10)].into_iter().enumerate() {
            for k in 0..total {
                d.report(&hs[i], Outcome::Status(if k < fails { 503 } else { 200 }));
            }
        }
        d.tick(Instant::now());
        assert!(hs[0].ejected(), "70 % failures is past 60 %");
        assert!(!hs[1].ejected() && !hs[2].ejected());
        // Off by default (enforcing_failure_percentage 0).
        let (d, hs) = detector(
            OutlierDetection {
                enforcing_failure_percentage: 0,
                ..fp
            },
            3,
        );
        for _ in 0..20 {
            d.report(&hs[0], Outcome::Status(503));
            d.report(&hs[1], Outcome::Status(200));
        }
        d.tick(Instant::now());
        assert!(!hs[0].ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn local_origin_success_rate_needs_the_split() {
        let sr = OutlierDetection {
            consecutive_5xx: 1000,
            consecutive_local_origin_failure: 1000,
            success_rate_minimum_hosts: 3,
            success_rate_request_volume: 10,
            split_external_local_origin_errors: true,
            max_ejection_percent: 100,
            ..cfg()
        };
        let (d, hs) = detector(sr.clone(), 5);
        for (i, h) in hs.iter().enumerate() {
            for k in 0..100 {
                let fail = i == 4 && k % 2 == 0;
                d.report(
                    h,
                    if fail {
                        Outcome::LocalFailure
                    } else {
                        Outcome::LocalSuccess
                    },
                );
            }
        }
        d.tick(Instant::now());
        assert!(hs[4].ejected(), "local-origin success rate");
        assert!(hs.iter().take(4).all(|h| !h.ejected()));
        let (d, hs) = detector(
            OutlierDetection {
                enforcing_local_origin_success_rate: 0,
                ..sr
            },
            5,
        );
        for h in &hs {
            for k in 0..100 {
                let fail = std::ptr::eq(h.as_ref(), hs[4].as_ref()) && k % 2 == 0;
                d.report(
                    h,
                    if fail {
                        Outcome::LocalFailure
                    } else {
                        Outcome::LocalSuccess
                    },
                );
            }
        }
        d.tick(Instant::now());
        assert!(!hs[4].ejected(), "not enforced");
    }

    #[tokio::test(start_paused = true)]
    async fn always_eject_one_host_and_jitter() {
        let one = OutlierDetection {
            consecutive_5xx: 1,
            max_ejection_percent: 10,
            always_eject_one_host: true,
            max_ejection_time_jitter: Duration::from_secs(5),
            ..cfg()
        };
        let (d, hs) = detector(one, 3);
        d.report(&hs[0], Outcome::Status(503));
        assert!(hs[0].ejected(), "one host despite max_ejection_percent 10");
        d.report(&hs[1], Outcome::Status(503));
        assert!(!hs[1].ejected(), "only one");
        // Base 10 s plus up to 5 s of jitter: out within 15 s, not before 10.
        d.tick(Instant::now() + Duration::from_secs(9));
        assert!(hs[0].ejected());
        d.tick(Instant::now() + Duration::from_secs(16));
        assert!(!hs[0].ejected());
    }
}
