//! Active health checks (`Cluster.health_checks`) through Ferry and through
//! Envoy 1.40 fed the same bootstrap: an HTTP, a TCP and a gRPC cluster of
//! two real backends each (`tests/apps/health_backend.py`), one of which
//! fails its check, then recovers, then (HTTP) fails again. At each step
//! both proxies must show the same `/clusters` health flags and send
//! traffic to the same backends; the HTTP check of one backend goes to the
//! port and Host its `health_check_config` names. An upstream answering with
//! `x-envoy-immediate-health-check-fail` (routed traffic: a passive failure; or a
//! check's 503) fails its host at once, flagged `excluded_via_immediate_hc_fail` until
//! it passes again, with the same flags and `health_check.passive_failure` in both.
//!
//! Envoy comes from `ferry_tests::envoy`; without it only Ferry's half runs
//! (with a note), except under `CI=true`, where a missing Envoy fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    Bootstrap, Ferry, RunLock, TempDir, accepts, apps_dir, curl, free_port, http_listener,
    http_request, local, tcp_proxy,
};
use serde_json::{Value, json};

/// A `health_backend.py` process, killed on drop.
struct Backend {
    child: Child,
    name: &'static str,
    port: u16,
    ctl: PathBuf,
    log: PathBuf,
}

impl Backend {
    fn start(
        dir: &Path,
        mode: &str,
        name: &'static str,
        health: Option<(&str, u16)>,
    ) -> Result<Backend> {
        let port = free_port();
        let ctl = dir.join(format!("{name}.failing"));
        let log = dir.join(format!("{name}.log"));
        let mut args = vec![
            mode.to_string(),
            port.to_string(),
            name.to_string(),
            ctl.display().to_string(),
        ];
        if let Some((host, hc_port)) = health {
            args.push(host.to_string());
            if hc_port != 0 {
                args.push(hc_port.to_string());
            }
        }
        let out = File::create(&log)?;
        let child = Command::new("python3")
            .arg("-u")
            .arg(apps_dir().join("health_backend.py"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning python3")?;
        let mut b = Backend {
            child,
            name,
            port,
            ctl,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !accepts(port) {
            if let Some(st) = b.child.try_wait()? {
                bail!("{name} exited ({st}): {}", b.log());
            }
            if Instant::now() >= deadline {
                bail!("{name} did not listen: {}", b.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(b)
    }

    fn fail(&self, failing: bool) -> Result<()> {
        if failing {
            File::create(&self.ctl)?;
        } else if self.ctl.exists() {
            std::fs::remove_file(&self.ctl)?;
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fast checks: Envoy's no-traffic interval (60 s) would slow the first
/// rounds, so it is set as short as the others.
fn check(extra: Value) -> Value {
    let mut c = json!({
        "timeout": "1s",
        "interval": "0.2s",
        "no_traffic_interval": "0.2s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    c
}

fn endpoint(port: u16, health: Option<Value>) -> Value {
    let mut e = json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}});
    if let Some(h) = health {
        e["endpoint"]["health_check_config"] = h;
    }
    e
}

fn cluster(name: &str, endpoints: Vec<Value>, hc: Value, http2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "health_checks": [hc],
        // Envoy delays health changes of a cluster that changed within
        // the last second from reaching its balancers (1 s merge window):
        // none here, so traffic follows the flags at once as in Ferry.
        "common_lb_config": {"update_merge_window": "0s"},
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        });
    }
    c
}

struct Bed {
    http: [Backend; 2],
    tcp: [Backend; 2],
    grpc: [Backend; 2],
    /// The second HTTP backend's health port.
    http_health_port: u16,
    /// An empty gRPC request message, framed.
    frame: PathBuf,
}

impl Bed {
    fn start(dir: &Path) -> Result<Bed> {
        let hp = free_port();
        let frame = dir.join("empty.grpc");
        std::fs::write(&frame, [0u8; 5])?;
        Ok(Bed {
            frame,
            http: [
                Backend::start(dir, "http", "http-a", Some(("hc_http", 0)))?,
                Backend::start(dir, "http", "http-b", Some(("b.health", hp)))?,
            ],
            tcp: [
                Backend::start(dir, "tcp", "tcp-a", None)?,
                Backend::start(dir, "tcp", "tcp-b", None)?,
            ],
            grpc: [
                Backend::start(dir, "grpc", "grpc-a", None)?,
                Backend::start(dir, "grpc", "grpc-b", None)?,
            ],
            http_health_port: hp,
        })
    }

    fn all(&self) -> impl Iterator<Item = &Backend> {
        self.http.iter().chain(&self.tcp).chain(&self.grpc)
    }

    fn logs(&self) -> String {
        self.all()
            .map(|b| format!("--- {} ---\n{}", b.name, b.log()))
            .collect()
    }

    fn config(&self, http: u16, tcp: u16, grpc: u16) -> Value {
        let [ha, hb] = &self.http;
        let [ta, tb] = &self.tcp;
        let [ga, gb] = &self.grpc;
        let route = |c: &str| vec![json!({"match": {"prefix": "/"}, "route": {"cluster": c}})];
        let doc = Bootstrap::new()
            .listener(http_listener("h", http, route("hc_http")))
            .listener(json!({
                "name": "t",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": tcp}},
                "filter_chains": [{"filters": [tcp_proxy("t", "hc_tcp")]}],
            }))
            .listener(http_listener("g", grpc, route("hc_grpc")))
            .cluster(cluster(
                "hc_http",
                vec![
                    endpoint(ha.port, None),
                    endpoint(
                        hb.port,
                        Some(json!({"port_value": self.http_health_port, "hostname": "b.health"})),
                    ),
                ],
                check(json!({"http_health_check": {
                    "path": "/healthz",
                    "request_headers_to_add": [{"header": {"key": "x-hc", "value": "1"}}],
                }})),
                false,
            ))
            .cluster(cluster(
                "hc_tcp",
                vec![endpoint(ta.port, None), endpoint(tb.port, None)],
                check(json!({"tcp_health_check": {
                    "send": {"text": "50494e470a"},
                    "receive": [{"text": "504f4e47"}],
                }})),
                false,
            ))
            .cluster(cluster(
                "hc_grpc",
                vec![endpoint(ga.port, None), endpoint(gb.port, None)],
                check(json!({"grpc_health_check": {"service_name": "svc"}})),
                true,
            ))
            .render();
        serde_json::from_str(&doc).unwrap_or(Value::Null)
    }
}

/// `/clusters` health flags of each backend, by name.
fn flags(admin: u16, bed: &Bed) -> Result<BTreeMap<&'static str, String>> {
    let (_, body) = http_request(local(admin), "GET", "/clusters")?;
    let mut out = BTreeMap::new();
    for b in bed.all() {
        let prefix = format!("::127.0.0.1:{}::health_flags::", b.port);
        if let Some(v) = body
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, v)| v.to_string()))
        {
            out.insert(b.name, v);
        }
    }
    Ok(out)
}

/// Waits until the flags are `want` (at most 10 s); returns them.
fn settle(
    admin: u16,
    bed: &Bed,
    want: &BTreeMap<&'static str, String>,
) -> Result<BTreeMap<&'static str, String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = flags(admin, bed)?;
        if &got == want || Instant::now() >= deadline {
            return Ok(got);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Which backends answered 12 requests on each listener (`frame`: a file
/// holding an empty gRPC message).
fn served(http: u16, tcp: u16, grpc: u16, frame: &Path) -> Result<BTreeSet<String>> {
    let data = format!("@{}", frame.display());
    let mut names = BTreeSet::new();
    for _ in 0..12 {
        let (status, body) = http_request(local(http), "GET", "/who")?;
        if status != 200 {
            bail!("HTTP {status}: {body}");
        }
        names.insert(body);
        let mut s = TcpStream::connect(local(tcp))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"who\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        names.insert(line.trim().to_string());
        let url = format!("http://127.0.0.1:{grpc}/test.Who/Name");
        let out = curl(&[
            "-s",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            &data,
            &url,
        ]);
        let out = out?;
        let body = String::from_utf8_lossy(&out.stdout);
        // The answer is one gRPC frame: 5 bytes of header, then the name.
        names.insert(body.get(5..).unwrap_or("").to_string());
    }
    Ok(names)
}

/// A stat from `/stats` (0 when absent).
fn stat(admin: u16, name: &str) -> Result<u64> {
    let (_, body) = http_request(local(admin), "GET", "/stats")?;
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0))
}

type Step = (BTreeMap<&'static str, String>, BTreeSet<String>);

/// The three steps, through the proxy whose admin port is `admin`.
fn scenario(admin: u16, bed: &Bed, ports: (u16, u16, u16)) -> Result<Vec<Step>> {
    let (http, tcp, grpc) = ports;
    let want = |failing: &[&str]| -> BTreeMap<&'static str, String> {
        bed.all()
            .map(|b| {
                let f = if failing.contains(&b.name) {
                    "/failed_active_hc"
                } else {
                    "healthy"
                };
                (b.name, f.to_string())
            })
            .collect()
    };
    let mut steps = Vec::new();
    // 1. The b backends fail (they were set failing before the start).
    let f = settle(admin, bed, &want(&["http-b", "tcp-b", "grpc-b"]))?;
    steps.push((f, served(http, tcp, grpc, &bed.frame)?));
    // 2. They recover (healthy_threshold 2).
    for b in [&bed.http[1], &bed.tcp[1], &bed.grpc[1]] {
        b.fail(false)?;
    }
    let f = settle(admin, bed, &want(&[]))?;
    steps.push((f, served(http, tcp, grpc, &bed.frame)?));
    // 3. The HTTP one fails again: a 503 fails it at once.
    bed.http[1].fail(true)?;
    let f = settle(admin, bed, &want(&["http-b"]))?;
    steps.push((f, served(http, tcp, grpc, &bed.frame)?));
    Ok(steps)
}

fn reset(bed: &Bed) -> Result<()> {
    for b in bed.all() {
        b.fail(false)?;
    }
    for b in [&bed.http[1], &bed.tcp[1], &bed.grpc[1]] {
        b.fail(true)?;
    }
    Ok(())
}

#[test]
fn http_health_check_fails_and_recovers_hosts_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let dir = TempDir::new("health-check")?;
    let bed = Bed::start(dir.path())?;
    let ports = (free_port(), free_port(), free_port());
    let cfg = bed.config(ports.0, ports.1, ports.2);
    let names = |l: &[&str]| -> BTreeSet<String> { l.iter().map(|s| s.to_string()).collect() };
    let healthy = |failing: &[&str]| -> BTreeMap<&'static str, String> {
        bed.all()
            .map(|b| {
                let f = if failing.contains(&b.name) {
                    "/failed_active_hc"
                } else {
                    "healthy"
                };
                (b.name, f.to_string())
            })
            .collect()
    };
    let expected: Vec<Step> = vec![
        (
            healthy(&["http-b", "tcp-b", "grpc-b"]),
            names(&["http-a", "tcp-a", "grpc-a"]),
        ),
        (
            healthy(&[]),
            names(&["http-a", "http-b", "tcp-a", "tcp-b", "grpc-a", "grpc-b"]),
        ),
        (
            healthy(&["http-b"]),
            names(&["http-a", "tcp-a", "tcp-b", "grpc-a", "grpc-b"]),
        ),
    ];

    reset(&bed)?;
    let ferry = Ferry::start(&cfg.to_string())?;
    let got = scenario(ferry.admin_port(), &bed, ports)
        .with_context(|| format!("through ferry:\n{}\n{}", ferry.log(), bed.logs()))?;
    assert_eq!(got, expected, "through ferry:\n{}", bed.logs());
    let admin = ferry.admin_port();
    for s in ["attempt", "success", "failure"] {
        for c in ["hc_http", "hc_tcp", "hc_grpc"] {
            let name = format!("cluster.{c}.health_check.{s}");
            assert!(stat(admin, &name)? > 0, "{name}");
        }
    }
    assert_eq!(stat(admin, "cluster.hc_http.health_check.healthy")?, 1);
    assert_eq!(stat(admin, "cluster.hc_tcp.health_check.healthy")?, 2);
    assert!(stat(admin, "cluster.hc_tcp.health_check.network_failure")? > 0);
    let log = bed.http[1].log();
    assert!(
        log.contains("host=b.health ua=Envoy/HC x-hc=1 port=health"),
        "the check of http-b goes to its health port and host:\n{log}"
    );
    drop(ferry);

    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    reset(&bed)?;
    let e = Envoy::start(&bin, &cfg, ports.0)?;
    let seen = scenario(e.admin(), &bed, ports)
        .with_context(|| format!("through envoy:\n{}\n{}", e.log(), bed.logs()))?;
    assert_eq!(seen, got, "Envoy and Ferry see the same health and traffic");
    for (c, n) in [("hc_http", 1), ("hc_tcp", 2)] {
        let name = format!("cluster.{c}.health_check.healthy");
        assert_eq!(stat(e.admin(), &name)?, n, "envoy {name}");
    }
    Ok(())
}

/// The immediate-failure steps through one proxy: the flags after a routed `/drain`
/// answer carrying the header (and the passive failure counted), after recovery, after
/// a check answered 503 with the header, and after recovery again.
fn immediate_scenario(admin: u16, port: u16, b: &Backend) -> Result<(Vec<String>, u64)> {
    let immediate = PathBuf::from(format!("{}.immediate", b.ctl.display()));
    let flags = |want: &str| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = http_request(local(admin), "GET", "/clusters")?;
            let prefix = format!("::127.0.0.1:{}::health_flags::", b.port);
            let got = body
                .lines()
                .find_map(|l| l.split_once(&prefix).map(|(_, v)| v.to_string()))
                .unwrap_or_default();
            if got == want || Instant::now() >= deadline {
                return Ok(got);
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    let failed = "/failed_active_hc/excluded_via_immediate_hc_fail";
    let mut steps = vec![flags("healthy")?];
    let (status, body) = http_request(local(port), "GET", "/drain")?;
    anyhow::ensure!(status == 200 && body == b.name, "/drain: {status} {body}");
    steps.push(flags(failed)?);
    let passive = stat(admin, "cluster.hc_drain.health_check.passive_failure")?;
    steps.push(flags("healthy")?);
    std::fs::write(&immediate, "")?;
    steps.push(flags(failed)?);
    std::fs::remove_file(&immediate)?;
    steps.push(flags("healthy")?);
    Ok((steps, passive))
}

#[test]
fn immediate_health_check_fail_excludes_the_host_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let dir = TempDir::new("health-check-immediate")?;
    let b = Backend::start(dir.path(), "http", "drain", None)?;
    let port = free_port();
    let cfg: Value = serde_json::from_str(
        &Bootstrap::new()
            .listener(http_listener(
                "h",
                port,
                vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "hc_drain"}})],
            ))
            .cluster(cluster(
                "hc_drain",
                vec![endpoint(b.port, None)],
                check(json!({"http_health_check": {"path": "/healthz"}})),
                false,
            ))
            .render(),
    )?;
    let ferry = Ferry::start(&cfg.to_string())?;
    let got = immediate_scenario(ferry.admin_port(), port, &b)
        .with_context(|| format!("through ferry:\n{}\n{}", ferry.log(), b.log()))?;
    drop(ferry);
    let failed = "/failed_active_hc/excluded_via_immediate_hc_fail".to_string();
    let healthy = "healthy".to_string();
    assert_eq!(
        got,
        (
            vec![
                healthy.clone(),
                failed.clone(),
                healthy.clone(),
                failed,
                healthy
            ],
            1
        ),
        "through ferry"
    );
    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; the comparison is skipped");
        return Ok(());
    };
    let e = Envoy::start(&bin, &cfg, port)?;
    let seen = immediate_scenario(e.admin(), port, &b)
        .with_context(|| format!("through envoy:\n{}\n{}", e.log(), b.log()))?;
    assert_eq!(seen, got, "Envoy and Ferry flag and count alike");
    Ok(())
}
