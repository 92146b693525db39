//! `ferry-pilot demo`: bookinfo on a local mesh, one command, no Kubernetes. It checks the
//! machine (root, `ip`, `iptables`, `python3`), clears what a killed earlier run left, checks
//! the configuration as `ferry-pilot analyze` does, brings the mesh up
//! ([`ferry_pilot::local::run::LocalMesh`]: ferry-pilot, a pod per workload with
//! `ferry iptables` and a `ferry sidecar`, STRICT mTLS with identities from ferry-pilot's CA,
//! the ingress gateway running `ferry gateway`), forwards a host port to the gateway, and on
//! the built-in configuration walks Istio's first steps: `/productpage` through the gateway,
//! `virtual-service-reviews-50-v3.yaml` applied, the split observed, Istio's metrics. Then it
//! serves until SIGINT or SIGTERM and removes every namespace, rule and process it created;
//! its processes die with it on SIGKILL and the next run sweeps the namespaces left behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_netns::http;
use ferry_pilot::istio::apply::apply;
use ferry_pilot::istio::source::{Snapshot, parse_documents};
use ferry_pilot::istio::validate::{Severity, validate};
use ferry_pilot::local::forward::Forward;
use ferry_pilot::local::run::{LocalMesh, Options, Proxy};
use ferry_pilot::local::samples;

/// Where the demo keeps its state unless told otherwise; `ferry-pilot apply` looks here too.
pub const DEFAULT_STATE_DIR: &str = "/run/ferry-demo";
const RULE: &str = "virtual-service-reviews-50-v3.yaml";

/// What `ferry-pilot demo` was asked to do.
pub struct DemoArgs {
    pub config: Option<PathBuf>,
    pub port: u16,
    pub state_dir: PathBuf,
}

/// Lines for the reader, flushed at once (progress shows while the mesh builds).
struct Out(std::io::Stdout);

impl Out {
    fn line(&mut self, text: impl std::fmt::Display) {
        let mut lock = self.0.lock();
        let _ = writeln!(lock, "{text}");
        let _ = lock.flush();
    }
}

/// Runs the demo; returns once it was stopped (or failed), with everything removed.
pub fn run(args: DemoArgs) -> Result<()> {
    let mut out = Out(std::io::stdout());
    out.line("ferry demo: bookinfo on a local mesh (ferry-pilot, ferry sidecars, ferry gateway)");
    let missing = missing_requirements();
    if !missing.is_empty() {
        bail!(
            "this machine lacks what the local mesh needs:\n{}",
            missing
                .iter()
                .map(|m| format!("  - {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    out.line("==> machine: root, ip, iptables and python3 found");
    let ferry = ferry_bin()?;
    let pilot = std::env::current_exe().context("locating ferry-pilot")?;

    let state = &args.state_dir;
    take_state_dir(state, &mut out)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let signals = watch_signals(cancel.clone())?;

    let result = run_mesh(&args, &ferry, &pilot, cancel, &signals, &mut out);
    // Whatever happened, nothing stays behind: the mesh was dropped inside run_mesh.
    let _ = std::fs::remove_dir_all(state);
    let left = ferry_netns::namespaces_of(std::process::id());
    if left.is_empty() {
        out.line("==> stopped: every pod, namespace, capture rule and process of the demo is gone");
    } else {
        out.line(format!(
            "==> stopped, but these namespaces remain: {left:?}"
        ));
    }
    result
}

fn run_mesh(
    args: &DemoArgs,
    ferry: &Path,
    pilot: &Path,
    cancel: Arc<AtomicBool>,
    signals: &mpsc::Receiver<&'static str>,
    out: &mut Out,
) -> Result<()> {
    let (files, built_in) = match &args.config {
        Some(dir) => (read_config(dir)?, false),
        None => (
            samples::BOOKINFO
                .iter()
                .map(|(p, t)| (format!("samples/bookinfo/{p}"), t.to_string()))
                .collect(),
            true,
        ),
    };
    let what = match &args.config {
        Some(dir) => dir.display().to_string(),
        None => "the built-in bookinfo (samples/bookinfo)".to_string(),
    };
    analyze(&files, &what, out)?;

    let opts = Options {
        pilot_bin: pilot.to_path_buf(),
        ferry_bin: ferry.to_path_buf(),
        proxy: Proxy::Ferry,
        state_dir: args.state_dir.clone(),
        die_with_parent: true,
        cert_ttl: None,
        pilot_args: Vec::new(),
        cancel: cancel.clone(),
    };
    out.line("==> building the mesh (each pod: a network namespace on one bridge)");
    let started = Instant::now();
    let mesh = match LocalMesh::start(&files, &opts, &mut |line| out.line(format!("    {line}"))) {
        Ok(m) => m,
        Err(ferry_pilot::local::LocalError::Interrupted) => {
            out.line("==> interrupted while building the mesh");
            return Ok(());
        }
        Err(e) => return Err(e).context("building the local mesh"),
    };
    out.line(format!(
        "==> mesh ready in {:.1} s: {} pods, STRICT mTLS, identities from ferry-pilot's CA",
        started.elapsed().as_secs_f64(),
        mesh.pods.len() + 2
    ));
    give_to_invoking_user(mesh.config_dir());

    let Some(target) = mesh.gateway_addr() else {
        out.line("==> no Gateway selects the ingress gateway (istio: ingressgateway): nothing to forward");
        return serve(&mesh, None, args, signals, out);
    };
    let forward = forward(args.port, &mesh, target, out)?;
    let url = format!("http://{}", forward.addr());
    out.line(format!(
        "Gateway URL: {url}   (export GATEWAY_URL={})",
        forward.addr()
    ));
    if built_in && let Err(e) = tour(&mesh, forward.addr(), &cancel, out) {
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        return Err(e.context(format!("the walk-through failed\n{}", mesh.diagnostics())));
    }
    serve(&mesh, Some(&url), args, signals, out)
}

/// Waits for SIGINT or SIGTERM, telling the reader what to try meanwhile.
fn serve(
    mesh: &LocalMesh,
    url: Option<&str>,
    args: &DemoArgs,
    signals: &mpsc::Receiver<&'static str>,
    out: &mut Out,
) -> Result<()> {
    if let Some(url) = url {
        out.line(format!(
            "==> serving: open {url}/productpage (Ctrl-C stops and removes everything)"
        ));
    } else {
        out.line("==> serving (Ctrl-C stops and removes everything)");
    }
    let config = mesh.config_dir().display().to_string();
    let apply_hint = if args.state_dir == Path::new(DEFAULT_STATE_DIR) {
        "ferry-pilot apply -f FILE".to_string()
    } else {
        format!("ferry-pilot apply --config {config} -f FILE")
    };
    out.line(format!(
        "    change the configuration: {apply_hint}, or edit the files in {config}"
    ));
    out.line(
        "    try: ferry-pilot apply -f samples/bookinfo/networking/virtual-service-reviews-v3.yaml",
    );
    let signal = signals.recv().unwrap_or("end of the signal watcher");
    out.line(format!("==> {signal}: stopping"));
    Ok(())
}

/// The walk-through: the page through the gateway, the 50/50 rule applied on the running
/// mesh, the split observed, Istio's metrics.
fn tour(mesh: &LocalMesh, gateway: SocketAddr, cancel: &AtomicBool, out: &mut Out) -> Result<()> {
    let page = until(cancel, Duration::from_secs(30), || {
        let page = product_page(gateway)?;
        Ok((page.status == 200 && page.title.is_some()).then_some(page))
    })
    .context("GET /productpage through the gateway")?;
    out.line(format!(
        "==> GET http://{gateway}/productpage: {} \"{}\", reviews served by {}",
        page.status,
        page.title.as_deref().unwrap_or_default(),
        page.reviews
    ));
    let before = loads(gateway, 12, cancel)?;
    out.line(format!(
        "    12 page loads without a rule for reviews (round robin): {}",
        counts(&before)
    ));

    let (path, text) = samples::networking(RULE).context("the built-in rule")?;
    out.line(format!(
        "==> $ ferry-pilot apply -f samples/bookinfo/{path}"
    ));
    let applied = apply(mesh.config_dir(), text, Path::new(path))?;
    give_to_invoking_user(mesh.config_dir());
    for a in &applied {
        out.line(format!("    {a}"));
    }
    // The rule reaches productpage's sidecar in a moment: wait for ten loads in a row that
    // keep to it before counting.
    until(cancel, Duration::from_secs(30), || {
        let seen = loads(gateway, 10, cancel)?;
        Ok(seen
            .iter()
            .all(|v| v == "reviews-v1" || v == "reviews-v3")
            .then_some(()))
    })
    .context("the 50/50 rule never took effect")?;
    let n = 100;
    let after = loads(gateway, n, cancel)?;
    out.line(format!(
        "    {n} page loads with the rule (50% v1, 50% v3): {}",
        counts(&after)
    ));
    if after.iter().any(|v| v != "reviews-v1" && v != "reviews-v3") {
        bail!("with the 50/50 rule, pages came from {}", counts(&after));
    }

    let productpage = mesh
        .pods
        .iter()
        .find(|r| r.plan.labels.get("app").is_some_and(|a| a == "productpage"))
        .context("no productpage pod")?;
    let metrics = productpage
        .pod
        .http_get(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15090),
            "127.0.0.1",
            "/stats/prometheus",
            &[],
        )
        .context("productpage's sidecar metrics")?;
    out.line(format!(
        "==> Istio metrics from productpage's sidecar (curl localhost:15090/stats/prometheus in pod {}):",
        productpage.plan.name
    ));
    let lines = istio_requests(&metrics.body);
    if lines.is_empty() {
        bail!(
            "no istio_requests_total in productpage's metrics:\n{}",
            metrics.body
        );
    }
    for l in lines {
        out.line(format!("    {l}"));
    }
    Ok(())
}

/// What a page load showed.
struct Page {
    status: u16,
    title: Option<String>,
    /// `reviews-v2`, or `unavailable`.
    reviews: String,
}

fn product_page(gateway: SocketAddr) -> Result<Page> {
    let stream = TcpStream::connect_timeout(&gateway, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(http::READ_TIMEOUT))?;
    let r = http::get(stream, &gateway.to_string(), "/productpage", &[])?;
    let title = between(&r.body, "<title>", "</title>").map(str::to_string);
    let reviews = between(&r.body, "Reviews served by: ", " ")
        .map(str::to_string)
        .unwrap_or_else(|| "unavailable".to_string());
    Ok(Page {
        status: r.status,
        title,
        reviews,
    })
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

/// The reviews version of `n` page loads.
fn loads(gateway: SocketAddr, n: usize, cancel: &AtomicBool) -> Result<Vec<String>> {
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        if cancel.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let page = product_page(gateway)?;
        seen.push(if page.status == 200 {
            page.reviews
        } else {
            format!("status {}", page.status)
        });
    }
    Ok(seen)
}

fn counts(seen: &[String]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for s in seen {
        *by.entry(s.as_str()).or_default() += 1;
    }
    by.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `istio_requests_total` series productpage's sidecar reported as the source of a call,
/// shortened to the labels that tell them apart.
fn istio_requests(metrics: &str) -> Vec<String> {
    const KEEP: [&str; 6] = [
        "reporter",
        "source_workload",
        "destination_workload",
        "destination_service_name",
        "response_code",
        "destination_principal",
    ];
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            let labels = labels
                .strip_prefix("istio_requests_total{")?
                .strip_suffix('}')?;
            let kept: Vec<&str> = labels
                .split("\",")
                .map(|kv| kv.trim_end_matches('"'))
                .filter(|kv| KEEP.iter().any(|k| kv.starts_with(&format!("{k}=\""))))
                .collect();
            Some(format!(
                "istio_requests_total{{{}\"}} {value}",
                kept.join("\",")
            ))
        })
        .collect()
}

/// Polls `probe` until it gives a value, for at most `timeout`.
fn until<T>(
    cancel: &AtomicBool,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancel.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let last = probe();
        if let Ok(Some(v)) = last {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return match last {
                Err(e) => Err(e.context(format!("still failing after {timeout:?}"))),
                _ => bail!("not as expected after {timeout:?}"),
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Forwards a host port on 127.0.0.1 to the gateway: `port`, or any free one when it is taken.
fn forward(port: u16, mesh: &LocalMesh, target: SocketAddr, out: &mut Out) -> Result<Forward> {
    let dialer = mesh.gateway.pod.dialer();
    let host = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p);
    match Forward::start(host(port), dialer.clone(), target) {
        Ok(f) => Ok(f),
        Err(e) if port != 0 => {
            out.line(format!(
                "    port {port} on 127.0.0.1 is taken ({e}); using a free one"
            ));
            Ok(Forward::start(host(0), dialer, target)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks the configuration as `ferry-pilot analyze` does; errors stop the demo.
fn analyze(files: &[(String, String)], what: &str, out: &mut Out) -> Result<()> {
    let mut snapshot = Snapshot::default();
    for (name, text) in files {
        let s = parse_documents(text, Path::new(name));
        snapshot.resources.extend(s.resources);
        snapshot.errors.extend(s.errors);
    }
    let mut errors: Vec<String> = snapshot
        .errors
        .iter()
        .map(|e| format!("Error {e}"))
        .collect();
    let mut warnings = Vec::new();
    for f in validate(&snapshot) {
        if f.severity == Severity::Error {
            errors.push(f.to_string());
        } else {
            warnings.push(f.to_string());
        }
    }
    for w in &warnings {
        out.line(format!("    {w}"));
    }
    if !errors.is_empty() {
        bail!(
            "the configuration ({what}) has errors; `ferry-pilot analyze` shows the same:\n{}",
            errors.join("\n")
        );
    }
    out.line(format!(
        "==> configuration: {what}, {} resources; analyze: no errors{}",
        snapshot.resources.len(),
        if warnings.is_empty() {
            String::new()
        } else {
            format!(", {} warnings above", warnings.len())
        }
    ));
    Ok(())
}

/// The YAML files under `dir` (recursively, in path order), as (path, text).
fn read_config(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    if dir.is_file() {
        dirs.clear();
        files.push(dir.to_path_buf());
    }
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("--config {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("--config {}: no .yaml files", dir.display());
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
            Ok((p.display().to_string(), text))
        })
        .collect()
}

/// What the machine lacks, each with how to get it.
fn missing_requirements() -> Vec<String> {
    let mut missing = Vec::new();
    if !ferry_netns::is_root() {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "ferry-pilot".to_string());
        missing.push(format!(
            "root: network namespaces and iptables need it; run `sudo {exe} demo` \
             (scripts/demo builds and asks sudo for you)"
        ));
    }
    for (tools, package, why) in [
        (
            &["ip"][..],
            "iproute2",
            "`ip` makes the pods' namespaces and links",
        ),
        (
            &["iptables", "iptables-restore"][..],
            "iptables",
            "`ferry iptables` programs each pod's capture rules with them",
        ),
        (&["python3"][..], "python3", "the bookinfo apps are Python"),
    ] {
        let absent: Vec<&str> = tools
            .iter()
            .copied()
            .filter(|t| which(t).is_none())
            .collect();
        if !absent.is_empty() {
            missing.push(format!(
                "{}: not found; {why}. On Debian or Ubuntu: `sudo apt-get install {package}`",
                absent.join(", ")
            ));
        }
    }
    missing
}

fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `ferry` beside this binary (the build's `target/<profile>/`), or `$FERRY_BIN`.
fn ferry_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating ferry-pilot")?;
    let ferry = exe.with_file_name("ferry");
    if !ferry.is_file() {
        bail!(
            "{} not found: build it (`cargo build -p ferry-proxy`, or scripts/demo), or set FERRY_BIN",
            ferry.display()
        );
    }
    Ok(ferry)
}

/// Makes the state directory this run's: refuses while another demo uses it, clears what a
/// run killed with SIGKILL left (its namespaces, its files).
fn take_state_dir(state: &Path, out: &mut Out) -> Result<()> {
    let pid_file = state.join("pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file)
        && let Ok(pid) = text.trim().parse::<u32>()
        && pid != std::process::id()
        && Path::new(&format!("/proc/{pid}")).exists()
    {
        bail!(
            "a demo already runs with {} (pid {pid}); stop it (Ctrl-C, or kill {pid}) or give --state-dir",
            state.display()
        );
    }
    let swept = ferry_netns::sweep_stale();
    let stale_files = state.exists();
    if stale_files {
        std::fs::remove_dir_all(state).with_context(|| format!("clearing {}", state.display()))?;
    }
    if !swept.is_empty() || stale_files {
        out.line(format!(
            "==> cleared what an earlier run left: {} namespaces{}",
            swept.len(),
            if stale_files {
                format!(", {}", state.display())
            } else {
                String::new()
            }
        ));
    }
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    std::fs::write(&pid_file, std::process::id().to_string())
        .with_context(|| format!("writing {}", pid_file.display()))?;
    Ok(())
}

/// A thread that turns SIGINT and SIGTERM into `cancel` and a message on the channel.
fn watch_signals(cancel: Arc<AtomicBool>) -> Result<mpsc::Receiver<&'static str>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (mut int, mut term) = match (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    (Ok(i), Ok(t)) => (i, t),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                cancel.store(true, Ordering::Relaxed);
                let _ = tx.send(name);
            });
        })
        .context("starting the signal watcher")?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(rx),
        Ok(Err(e)) => bail!("watching signals: {e}"),
        Err(_) => bail!("watching signals: the watcher ended"),
    }
}

/// Under sudo, hands the configuration directory to the user who ran it, so that
/// `ferry-pilot apply` and an editor work without root.
fn give_to_invoking_user(dir: &Path) {
    let id = |var| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let (Some(uid), Some(gid)) = (id("SUDO_UID"), id("SUDO_GID")) else {
        return;
    };
    let _ = std::os::unix::fs::chown(dir, Some(uid), Some(gid));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::os::unix::fs::chown(e.path(), Some(uid), Some(gid));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_requests_keep_the_labels_that_tell_series_apart() {
        let text = "# TYPE istio_requests_total counter\n\
            istio_requests_total{reporter=\"source\",source_workload=\"productpage-v1\",source_principal=\"spiffe://x\",destination_workload=\"reviews-v1\",destination_service_name=\"reviews\",response_code=\"200\",connection_security_policy=\"unknown\"} 7\n\
            istio_request_bytes_sum{reporter=\"source\"} 1\n";
        assert_eq!(
            istio_requests(text),
            [
                "istio_requests_total{reporter=\"source\",source_workload=\"productpage-v1\",destination_workload=\"reviews-v1\",destination_service_name=\"reviews\",response_code=\"200\"} 7"
            ]
        );
        assert_eq!(counts(&["b".into(), "a".into(), "b".into()]), "a 1, b 2");
        assert_eq!(
            between("x<title>T</title>", "<title>", "</title>"),
            Some("T")
        );
    }
}
