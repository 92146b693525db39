//! `ferry-pilot demo` itself, run as a user runs it: its output must show the bookinfo page
//! through the gateway ("Simple Bookstore App"), the reviews versions seen before any rule,
//! the split after `virtual-service-reviews-50-v3.yaml` (only v1 and v3, within a binomial
//! bound), Istio's metrics with the mTLS identities; `ferry-pilot apply -f` must change the
//! running mesh; SIGTERM must leave no namespace, process or file behind; after SIGKILL the
//! processes die with it and the next start clears the namespaces left. Without what it
//! needs (root, `ip`, `iptables`, `python3`) it stops at once and says how to get it.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, http, namespaces_of, workspace_bin};

/// A running `ferry-pilot demo`, its output collected in a file.
struct Demo {
    child: Child,
    out: PathBuf,
}

impl Demo {
    fn start(state: &Path) -> Result<Demo> {
        let out = state.with_extension("out");
        let file = std::fs::File::create(&out)?;
        let child = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"))
            .args(["demo", "--port", "0", "--state-dir"])
            .arg(state)
            .env("FERRY_BIN", netns::ferry_bin())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        Ok(Demo { child, out })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until the demo prints `marker` (it must not exit first).
    fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.output();
            if text.contains(marker) {
                return Ok(text);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the demo exited ({status}) before {marker:?}:\n{text}");
            }
            if Instant::now() > deadline {
                bail!("no {marker:?} after {timeout:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: sending a signal to our own unreaped child.
        ensure!(unsafe { libc::kill(pid, signal) } == 0, "kill {pid}");
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "still running {timeout:?} after the signal:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

/// The processes inside the namespaces of process `pid`'s meshes.
fn processes_of(pid: u32) -> Vec<u32> {
    namespaces_of(pid)
        .iter()
        .flat_map(|ns| {
            let out = Command::new("ip").args(["netns", "pids", ns]).output();
            out.map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .unwrap_or_default()
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purpose: its parent (the demo) has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// `name N, name N` counts from a line of the demo's output, after `prefix`.
fn counts_after(text: &str, prefix: &str) -> Result<BTreeMap<String, usize>> {
    let line = text
        .lines()
        .find(|l| l.contains(prefix))
        .with_context(|| format!("no line with {prefix:?} in:\n{text}"))?;
    let list = line
        .rsplit_once("): ")
        .map(|(_, l)| l)
        .context(line.to_string())?;
    list.split(", ")
        .map(|item| {
            let (name, n) = item.rsplit_once(' ').context(item.to_string())?;
            Ok((name.to_string(), n.trim().parse()?))
        })
        .collect()
}

/// The reviews version of a product page fetched through the demo's gateway URL.
fn reviews_version(gateway: SocketAddr) -> Result<String> {
    let stream = TcpStream::connect_timeout(&gateway, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let page = http::get(stream, &gateway.to_string(), "/productpage", &[])?;
    ensure!(page.status == 200, "{}: {}", page.status, page.body);
    let at = page
        .body
        .find("Reviews served by: ")
        .with_context(|| page.body.clone())?;
    Ok(page.body[at + 19..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn the_demo_runs_bookinfo_and_leaves_nothing_behind() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let state = std::env::temp_dir().join(format!("ferry-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut demo = Demo::start(&state)?;
    let text = demo.wait_for("==> serving", Duration::from_secs(180))?;

    // The page through the gateway.
    ensure!(
        text.contains("/productpage: 200 \"Simple Bookstore App\", reviews served by reviews-v"),
        "no bookinfo page through the gateway:\n{text}"
    );
    // Before any rule: round robin over the three versions.
    let before = counts_after(&text, "12 page loads without a rule")?;
    ensure!(
        before
            .keys()
            .all(|k| ["reviews-v1", "reviews-v2", "reviews-v3"].contains(&k.as_str()))
            && before.values().sum::<usize>() == 12
            && before.len() >= 2,
        "without a rule: {before:?}\n{text}"
    );
    // The 50/50 rule, applied on the running mesh: only v1 and v3, near half each
    // (3.29 standard deviations of Binomial(100, 0.5): 99.9 % of honest runs).
    ensure!(
        text.contains(
            "$ ferry-pilot apply -f samples/bookinfo/networking/virtual-service-reviews-50-v3.yaml"
        ) && text.contains("virtualservice default/reviews created"),
        "{text}"
    );
    let after = counts_after(&text, "100 page loads with the rule")?;
    let v1 = after.get("reviews-v1").copied().unwrap_or(0);
    let v3 = after.get("reviews-v3").copied().unwrap_or(0);
    ensure!(
        v1 + v3 == 100 && after.len() == 2 && v1.abs_diff(50) <= 17,
        "with the 50/50 rule: {after:?}\n{text}"
    );
    // Istio's metrics: productpage's calls to both reviews versions, over mTLS to the
    // reviews identity.
    for workload in ["reviews-v1", "reviews-v3", "details-v1"] {
        ensure!(
            text.lines().any(|l| l.contains(
                "istio_requests_total{reporter=\"source\",source_workload=\"productpage-v1\""
            ) && l.contains(&format!("destination_workload=\"{workload}\""))
                && l.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-"
                )
                && l.contains("response_code=\"200\"")),
            "no metrics for productpage -> {workload}:\n{text}"
        );
    }
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("Gateway URL: http://"))
        .and_then(|l| l.split_whitespace().next())
        .context("no gateway URL")?;
    let gateway: SocketAddr = url.parse()?;

    // `ferry-pilot apply -f` on the running mesh, as kubectl apply: all traffic to v3.
    let rule = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../samples/bookinfo/networking/virtual-service-reviews-v3.yaml");
    let out = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["apply", "--config"])
        .arg(state.join("config"))
        .arg("-f")
        .arg(&rule)
        .output()?;
    ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).trim()
                == "virtualservice default/reviews configured",
        "apply: {out:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<String> = (0..10)
            .map(|_| reviews_version(gateway))
            .collect::<Result<_>>()?;
        if seen.iter().all(|v| v == "reviews-v3") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "reviews-v3 rule never took effect: {seen:?}"
        );
    }

    // SIGTERM: everything goes.
    let pid = demo.child.id();
    let namespaces = namespaces_of(pid);
    let processes = processes_of(pid);
    ensure!(
        namespaces.len() >= 9 && processes.len() >= 14,
        "while running: namespaces {namespaces:?}, processes {processes:?}"
    );
    demo.signal(libc::SIGTERM)?;
    let status = demo.wait_exit(Duration::from_secs(30))?;
    let text = demo.output();
    ensure!(status.success(), "exit {status}:\n{text}");
    ensure!(
        text.contains("==> SIGTERM: stopping")
            && text.contains("every pod, namespace, capture rule and process of the demo is gone"),
        "{text}"
    );
    ensure!(
        namespaces_of(pid).is_empty(),
        "left: {:?}",
        namespaces_of(pid)
    );
    let left: Vec<u32> = processes.into_iter().filter(|p| alive(*p)).collect();
    ensure!(left.is_empty(), "processes left: {left:?}");
    ensure!(!state.exists(), "{} left", state.display());
    ensure!(
        TcpStream::connect_timeout(&gateway, Duration::from_millis(500)).is_err(),
        "the gateway port still accepts"
    );
    Ok(())
}

#[test]
fn after_sigkill_nothing_runs_and_the_next_start_clears_the_rest() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let state = std::env::temp_dir().join(format!("ferry-demo-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut demo = Demo::start(&state)?;
    demo.wait_for("==> serving", Duration::from_secs(180))?;
    let pid = demo.child.id();
    let namespaces = namespaces_of(pid);
    let processes = processes_of(pid);
    ensure!(!namespaces.is_empty() && !processes.is_empty());
    demo.signal(libc::SIGKILL)?;
    demo.wait_exit(Duration::from_secs(10))?;
    // Its processes die with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes.iter().any(|p| alive(*p)) {
        ensure!(
            Instant::now() < deadline,
            "processes outlived the demo: {:?}",
            processes.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The namespaces stay until the next start, which clears them first.
    let mut next = Demo::start(&state)?;
    let text = next.wait_for("==> serving", Duration::from_secs(180))?;
    ensure!(
        text.contains("==> cleared what an earlier run left:"),
        "no stale cleanup reported:\n{text}"
    );
    ensure!(
        namespaces_of(pid).is_empty(),
        "stale namespaces: {:?}",
        namespaces_of(pid)
    );
    next.signal(libc::SIGINT)?;
    let status = next.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "{}", next.output());
    ensure!(namespaces_of(next.child.id()).is_empty());
    ensure!(!state.exists());
    Ok(())
}

#[test]
fn without_root_or_tools_it_says_what_is_needed() -> Result<()> {
    let pilot = workspace_bin("ferry-pilot", "ferry-pilot");
    // No tools on PATH.
    let out = Command::new(&pilot)
        .args(["demo", "--state-dir", "/nonexistent/ferry-demo"])
        .env("PATH", "/nonexistent")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{err}");
    for needed in [
        "ip: not found",
        "apt-get install iproute2",
        "iptables, iptables-restore: not found",
        "apt-get install iptables",
        "python3: not found",
    ] {
        ensure!(err.contains(needed), "{needed:?} not in:\n{err}");
    }
    // Not root (as nobody), when this test may change its uid.
    if netns::is_root() {
        let mut child = Command::new(&pilot)
            .args(["demo", "--state-dir", "/nonexistent/ferry-demo"])
            .uid(65534)
            .gid(65534)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = String::new();
        child
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut err)?;
        let status = child.wait()?;
        ensure!(!status.success(), "{err}");
        ensure!(
            err.contains("root: network namespaces and iptables need it; run `sudo"),
            "{err}"
        );
    }
    Ok(())
}
