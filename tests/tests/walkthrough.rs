//! Istio's bookinfo walk-through on the project's own fixtures (`samples/bookinfo`: the
//! configuration and apps `ferry-pilot demo` runs), brought up by the same local platform as
//! the demo, once with Envoy and once with Ferry as every sidecar and the ingress gateway.
//! A client pod loads `/productpage` through the gateway, as a reader of the docs does in a
//! browser, and each step must show what the docs say, the same through both data planes:
//! request routing (all to v1; jason to v2), traffic shifting (50/50 v1/v3, then all to v3),
//! fault injection (ratings aborted for jason; ratings delayed 7 s for jason, which
//! productpage's 3 s timeout, tried twice, turns into "reviews unavailable" after about 6 s),
//! and STRICT mTLS (a pod without a sidecar cannot reach a workload).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_pilot::istio::apply::apply;
use ferry_pilot::local::run::{LocalMesh, Options, Proxy};
use ferry_pilot::local::samples;
use ferry_tests::netns::{self, Pod, ferry_bin, workspace_bin};

/// A page load: the reviews version shown (`reviews-v2`, or `unavailable`), whether the
/// ratings were shown as unavailable, and the seconds it took.
#[derive(Debug)]
struct Load {
    reviews: String,
    ratings_error: bool,
    stars: bool,
    secs: f64,
}

struct Walk {
    mesh: LocalMesh,
    client: Pod,
    gateway: SocketAddr,
    state: std::path::PathBuf,
}

impl Drop for Walk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

impl Walk {
    fn start(proxy: Proxy, tag: &str) -> Result<Walk> {
        let state = std::env::temp_dir().join(format!("ferry-walk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let files: Vec<(String, String)> = samples::BOOKINFO
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        let opts = Options {
            pilot_bin: workspace_bin("ferry-pilot", "ferry-pilot"),
            ferry_bin: ferry_bin(),
            proxy,
            state_dir: state.clone(),
            die_with_parent: false,
            cert_ttl: None,
            pilot_args: Vec::new(),
            cancel: Arc::new(AtomicBool::new(false)),
        };
        let mesh = LocalMesh::start(&files, &opts, &mut |_| {})?;
        let client = mesh.mesh().pod("client")?;
        let gateway = mesh.gateway_addr().context("no gateway port")?;
        Ok(Walk {
            mesh,
            client,
            gateway,
            state,
        })
    }

    fn apply(&self, name: &str) -> Result<()> {
        let (path, text) = samples::networking(name).with_context(|| name.to_string())?;
        apply(self.mesh.config_dir(), text, Path::new(path))?;
        Ok(())
    }

    fn load(&self, user: Option<&str>) -> Result<Load> {
        let cookie = user.map(|u| format!("session={u}"));
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
        let t = Instant::now();
        let page =
            self.client
                .http_get(self.gateway, "bookinfo.example", "/productpage", &headers)?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            page.status == 200 && page.body.contains("<title>Simple Bookstore App</title>"),
            "{}: {}",
            page.status,
            page.body
        );
        let reviews = page
            .body
            .split("Reviews served by: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("unavailable")
            .to_string();
        Ok(Load {
            reviews,
            ratings_error: page
                .body
                .contains("Ratings service is currently unavailable"),
            stars: page.body.contains("class=\"stars"),
            secs,
        })
    }

    fn loads(&self, user: Option<&str>, n: usize) -> Result<Vec<Load>> {
        (0..n).map(|_| self.load(user)).collect()
    }

    /// Polls until `k` loads in a row satisfy `want` (a rule needs a moment to reach the
    /// proxies).
    fn until(&self, user: Option<&str>, k: usize, want: impl Fn(&Load) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.loads(user, k)?;
            if got.iter().all(&want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "never as expected: last {got:?}\n{}",
                    self.mesh.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn only(loads: &[Load], version: &str) -> bool {
    loads.iter().all(|l| l.reviews == version)
}

/// The walk-through's steps; what was observed, to compare the data planes.
fn walk(w: &Walk) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    // STRICT mTLS: a pod without a sidecar gets nothing from a workload.
    let reviews = w.mesh.pod("reviews-v1-0").context("reviews-v1-0")?;
    let plain = w.client.http_get(
        SocketAddr::new(IpAddr::V4(reviews.pod.ip()), 9080),
        "reviews:9080",
        "/reviews/0",
        &[],
    );
    ensure!(
        plain.is_err(),
        "plaintext reached reviews under STRICT mTLS: {plain:?}"
    );
    seen.push("strict mTLS: plaintext refused".to_string());

    // Before any rule: the page, reviews from every version.
    w.until(None, 1, |l| l.reviews.starts_with("reviews-v"))?;
    let mixed = w.loads(None, 30)?;
    ensure!(
        ["reviews-v1", "reviews-v2", "reviews-v3"]
            .iter()
            .filter(|v| mixed.iter().any(|l| &l.reviews == *v))
            .count()
            >= 2,
        "without rules: {mixed:?}"
    );
    seen.push("no rule: reviews from several versions".to_string());

    // Request routing: everything to v1 (no stars), then jason to v2 (black stars).
    w.apply("virtual-service-all-v1.yaml")?;
    w.until(None, 10, |l| l.reviews == "reviews-v1" && !l.stars)?;
    ensure!(only(&w.loads(None, 20)?, "reviews-v1"), "all-v1");
    seen.push("all-v1: 20/20 reviews-v1".to_string());
    w.apply("virtual-service-reviews-test-v2.yaml")?;
    w.until(Some("jason"), 5, |l| l.reviews == "reviews-v2" && l.stars)?;
    ensure!(only(&w.loads(Some("jason"), 10)?, "reviews-v2"), "jason");
    ensure!(only(&w.loads(None, 10)?, "reviews-v1"), "others");
    seen.push("reviews-test-v2: jason 10/10 v2, others 10/10 v1".to_string());

    // Fault injection: ratings aborted for jason, then delayed 7 s for jason.
    w.apply("virtual-service-ratings-test-abort.yaml")?;
    w.until(Some("jason"), 5, |l| {
        l.reviews == "reviews-v2" && l.ratings_error
    })?;
    let others = w.loads(None, 5)?;
    ensure!(
        only(&others, "reviews-v1") && others.iter().all(|l| !l.ratings_error),
        "abort, others: {others:?}"
    );
    seen.push("ratings-test-abort: jason sees ratings unavailable".to_string());
    w.apply("virtual-service-ratings-test-delay.yaml")?;
    w.until(None, 3, |l| l.reviews == "reviews-v1" && l.secs < 2.0)?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let slow = loop {
        let l = w.load(Some("jason"))?;
        if l.reviews == "unavailable" || Instant::now() > deadline {
            break l;
        }
    };
    ensure!(
        slow.reviews == "unavailable" && (5.5..9.0).contains(&slow.secs),
        "delay: {slow:?}"
    );
    seen.push("ratings-test-delay: jason's reviews unavailable after ~6 s".to_string());

    // Traffic shifting: 50/50 between v1 and v3 within a 99.9 % binomial bound, then v3.
    w.apply("virtual-service-reviews-50-v3.yaml")?;
    w.until(None, 10, |l| {
        l.reviews == "reviews-v1" || l.reviews == "reviews-v3"
    })?;
    let n = 200;
    let split = w.loads(None, n)?;
    let v1 = split.iter().filter(|l| l.reviews == "reviews-v1").count();
    let v3 = split.iter().filter(|l| l.reviews == "reviews-v3").count();
    // 3.29 standard deviations of Binomial(200, 0.5).
    let bound = (3.29 * (n as f64 * 0.25).sqrt()).ceil() as usize;
    ensure!(
        v1 + v3 == n && v1.abs_diff(n / 2) <= bound,
        "50-v3: v1 {v1}, v3 {v3} of {n} (bound ±{bound})"
    );
    seen.push("reviews-50-v3: v1 and v3 only, within the 99.9% bound".to_string());
    w.apply("virtual-service-reviews-v3.yaml")?;
    w.until(None, 10, |l| l.reviews == "reviews-v3")?;
    ensure!(only(&w.loads(None, 20)?, "reviews-v3"), "v3");
    seen.push("reviews-v3: 20/20 reviews-v3".to_string());
    Ok(seen)
}

#[test]
fn bookinfo_walkthrough_through_envoy_and_ferry_alike() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let envoy = ferry_tests::envoy::require_bin()?;
    let with_envoy = {
        let w = Walk::start(Proxy::Envoy(envoy), "envoy")?;
        walk(&w).context("through Envoy")?
    };
    let with_ferry = {
        let w = Walk::start(Proxy::Ferry, "ferry")?;
        walk(&w).context("through Ferry")?
    };
    assert_eq!(with_ferry, with_envoy);
    Ok(())
}
