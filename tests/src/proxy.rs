//! A loopback harness for data-path tests: the test backends of `tests/apps/` as child
//! processes ([`App`]), the `ferry` binary run on a generated Envoy bootstrap ([`Ferry`]),
//! builders for the bootstrap pieces the tests need ([`Bootstrap`]), and small helpers
//! (free ports, commands with a deadline, raw HTTP to the admin port). Every process is
//! killed when its handle drops, so a panicking test leaves nothing running; handles print
//! their process's log when they drop, which the test harness shows for failed tests only.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// How long a backend or Ferry may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------ ports

/// A free TCP port on 127.0.0.1, reserved across the workspace's test processes
/// (`ferry_netns::ports`).
pub fn free_port() -> u16 {
    ferry_netns::ports::free_port()
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&local(port), Duration::from_millis(200)).is_ok()
}

// ------------------------------------------------------------------------------ files

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The test applications (`tests/apps/`).
pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps")
}

/// The `ferry` binary next to the test executable (`target/<profile>/ferry`; tests run from
/// `target/<profile>/deps`). `FERRY_BIN` overrides it.
pub fn ferry_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let bin = profile_dir.join("ferry");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first with `cargo build -p ferry-proxy`",
            bin.display()
        );
    }
    Ok(bin)
}

fn tail(path: &Path, max: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

// ------------------------------------------------------------------------------ serialization

/// Serializes tests that must not share the machine with others (the 1 GiB transfer would
/// starve timing assertions of its neighbours on two cores). Works across the threads of
/// `cargo test` and the processes of `cargo nextest`: it is an `flock` on a file.
pub struct RunLock(#[allow(dead_code)] File);

impl RunLock {
    fn take(exclusive: bool) -> Self {
        let path = std::env::temp_dir().join("ferry-data-path-tests.lock");
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .expect("opening the test lock file");
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        while unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "flock: {e}");
        }
        Self(file)
    }

    /// Taken by ordinary tests: they run side by side.
    pub fn shared() -> Self {
        Self::take(false)
    }

    /// Taken by a heavy test: it runs alone.
    pub fn exclusive() -> Self {
        Self::take(true)
    }
}

// ------------------------------------------------------------------------------ commands

/// Runs a command to completion with a deadline; stdin is closed unless `input` is set.
/// A command still running at the deadline is killed and reported as an error.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {shown}"))?;
    wait_output(&mut child, timeout).with_context(|| format!("running {shown}"))
}

/// Waits for a spawned child whose stdout and stderr are piped, collecting both.
pub fn wait_output(child: &mut Child, timeout: Duration) -> Result<Output> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {timeout:?}; killed");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `curl -sS --max-time 30 ARGS...`, returning its output; fails unless curl exits 0.
pub fn curl(args: &[&str]) -> Result<Output> {
    let out = run(
        Command::new("curl")
            .args(["-sS", "--max-time", "30"])
            .args(args),
        Duration::from_secs(40),
    )?;
    if !out.status.success() {
        bail!(
            "curl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A minimal HTTP/1.1 exchange (`Connection: close`): status and body.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no response head from {addr}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line from {addr}: {head:?}"))?;
    Ok((status, body.to_string()))
}

// ------------------------------------------------------------------------------ apps

/// A test backend from `tests/apps/echo.py`, killed on drop.
pub struct App {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl App {
    /// Starts `echo.py ARGS...` (`ARGS[1]` is the port) and waits until the port accepts.
    pub fn start(args: &[&str]) -> Result<App> {
        let port: u16 = args
            .get(1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("App::start({args:?}): the second argument is the port"))?;
        let dir = TempDir::new("app")?;
        let log = dir.path().join("app.log");
        let file = File::create(&log)?;
        let child = Command::new("python3")
            .arg("-u")
            .arg(apps_dir().join("echo.py"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawning python3 (is Python 3 installed?)")?;
        let mut app = App {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !accepts(port) {
            if let Some(st) = app.child.try_wait()? {
                bail!("echo.py {args:?} exited ({st}): {}", tail(&app.log, 4000));
            }
            if Instant::now() >= deadline {
                bail!("echo.py {args:?} did not listen: {}", tail(&app.log, 4000));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(app)
    }

    /// `echo.py http PORT NAME EXTRA...` on a fresh port.
    pub fn http(name: &str, extra: &[&str]) -> Result<App> {
        let port = free_port().to_string();
        let mut args = vec!["http", &port, name];
        args.extend_from_slice(extra);
        App::start(&args)
    }

    /// `echo.py MODE PORT` on a fresh port (`ws`, `grpc`, `tcp`, `banner`).
    pub fn mode(mode: &str) -> Result<App> {
        App::start(&[mode, &free_port().to_string()])
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The test harness shows what a test printed only when it fails.
        eprintln!(
            "--- backend on port {} ---\n{}",
            self.port,
            tail(&self.log, 4000)
        );
    }
}

// ------------------------------------------------------------------------------ ferry

/// A running `ferry sidecar`, killed on drop. Its stderr goes to a file ([`Ferry::log`]).
pub struct Ferry {
    child: Child,
    pub admin: u16,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
    _dir: TempDir,
}

impl Ferry {
    /// Starts Ferry on `config` (YAML or JSON) and waits until its admin `/ready` says LIVE.
    pub fn start(config: &str) -> Result<Ferry> {
        Ferry::start_with(config, &[])
    }

    /// Like [`Ferry::start`], with extra command-line arguments.
    pub fn start_with(config: &str, args: &[&str]) -> Result<Ferry> {
        let mut f = Ferry::spawn(config, args)?;
        f.wait_ready()?;
        Ok(f)
    }

    /// Starts Ferry without waiting for anything (for configurations that must fail).
    pub fn spawn(config: &str, args: &[&str]) -> Result<Ferry> {
        let dir = TempDir::new("proxy")?;
        let cfg = dir.path().join("bootstrap.yaml");
        fs::write(&cfg, config)?;
        let log_path = dir.path().join("ferry.log");
        let log = File::create(&log_path)?;
        let admin = free_port();
        let child = Command::new(ferry_bin()?)
            .arg("sidecar")
            .arg("--config")
            .arg(&cfg)
            .args(["--ready-addr", "off", "--prometheus-addr", "off"])
            .args(["--status-addr", "off"])
            .arg("--admin-addr")
            .arg(local(admin).to_string())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning ferry")?;
        Ok(Ferry {
            child,
            admin,
            log_path,
            exited: None,
            _dir: dir,
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.exited = Some(st);
                bail!("ferry exited during start-up ({st}):\n{}", self.log());
            }
            if let Ok((200, _)) = http_request(local(self.admin), "GET", "/ready") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("ferry not ready after {START_TIMEOUT:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin port Ferry was started with.
    pub fn admin_port(&self) -> u16 {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What Ferry logged so far.
    pub fn log(&self) -> String {
        tail(&self.log_path, 64 * 1024)
    }

    /// Every counter and gauge of the admin `/stats` page.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let (status, body) = http_request(local(self.admin), "GET", "/stats")?;
        if status != 200 {
            bail!("/stats answered {status}: {body}");
        }
        Ok(body
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect())
    }

    /// One statistic; 0 when Ferry has not created it (yet). Panics when admin is unreachable.
    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.stats().expect("reading ferry's /stats");
        stats.get(name).copied().unwrap_or(0)
    }

    /// Ferry's peak resident set size (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{}/status", self.pid()))?;
        Ok(kib * 1024)
    }

    pub fn sigterm(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: kill(2) on the pid of a child this handle owns and has not reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Waits for Ferry to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.exited {
            return Ok(st);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.exited = Some(st);
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("ferry still running after {timeout:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The test harness shows what a test printed only when it fails.
        eprintln!("--- ferry (admin {}) ---\n{}", self.admin, self.log());
    }
}

// ------------------------------------------------------------------------------ pilot

/// `ferry-pilot serve-static` on an empty bootstrap at a free local port: an xDS server
/// with no resources, for proxies whose bootstrap needs an ADS peer that serves nothing
/// (istio-agent's bootstrap, tests of what a bootstrap does alone). Killed when dropped.
pub struct StaticPilot {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl StaticPilot {
    /// Starts it, its files in `dir`, and waits until it listens.
    pub fn start(dir: &Path) -> Result<Self> {
        let empty = dir.join("empty-pilot-bootstrap.json");
        fs::write(&empty, "{}")?;
        let port = free_port();
        let log = dir.join("pilot.log");
        let child = Command::new(crate::netns::workspace_bin("ferry-pilot", "ferry-pilot"))
            .args(["serve-static", "--bootstrap"])
            .arg(&empty)
            .args(["--listen", &local(port).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting ferry-pilot serve-static")?;
        let mut pilot = Self { child, port, log };
        let deadline = Instant::now() + START_TIMEOUT;
        while !accepts(port) {
            if let Some(st) = pilot.child.try_wait()? {
                bail!(
                    "ferry-pilot exited ({st}) before listening:\n{}",
                    pilot.log()
                );
            }
            if Instant::now() > deadline {
                bail!("ferry-pilot did not listen on {port}:\n{}", pilot.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(pilot)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StaticPilot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------ bootstrap

/// How a cluster talks HTTP to its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Http1,
    Http2,
    /// `use_downstream_protocol_config`: the client's protocol.
    Downstream,
}

/// An Envoy v3 bootstrap with static listeners and clusters, rendered as JSON (which Ferry
/// reads like YAML).
#[derive(Debug, Default, Clone)]
pub struct Bootstrap {
    listeners: Vec<Value>,
    clusters: Vec<Value>,
}

impl Bootstrap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn listener(mut self, listener: Value) -> Self {
        self.listeners.push(listener);
        self
    }

    pub fn cluster(mut self, cluster: Value) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// An HTTP listener on `port` sending everything to `cluster` (route timeout disabled),
    /// with `stat_prefix` equal to `name`.
    pub fn http(self, name: &str, port: u16, cluster: &str) -> Self {
        let routes =
            vec![json!({"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}})];
        self.listener(http_listener(name, port, routes))
    }

    /// A TCP proxy listener on `port` to `cluster`, with `stat_prefix` equal to `name`.
    pub fn tcp(self, name: &str, port: u16, cluster: &str) -> Self {
        self.listener(listener(
            name,
            port,
            vec![json!({"filters": [tcp_proxy(name, cluster)]})],
        ))
    }

    /// A STATIC cluster of 127.0.0.1 endpoints.
    pub fn static_cluster(self, name: &str, ports: &[u16], upstream: Upstream) -> Self {
        self.cluster(static_cluster(name, ports, upstream))
    }

    pub fn render(&self) -> String {
        let doc = json!({
            "node": {"id": "sidecar~127.0.0.1~test.default~default.svc.cluster.local", "cluster": "test"},
            "static_resources": {"listeners": self.listeners, "clusters": self.clusters},
        });
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }
}

/// A listener on `127.0.0.1:port` with these filter chains.
pub fn listener(name: &str, port: u16, filter_chains: Vec<Value>) -> Value {
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": filter_chains,
    })
}

/// An HTTP listener whose one virtual host (`*`) has these routes.
pub fn http_listener(name: &str, port: u16, routes: Vec<Value>) -> Value {
    listener(
        name,
        port,
        vec![json!({"filters": [http_connection_manager(name, routes)]})],
    )
}

/// `envoy.filters.network.http_connection_manager` with codec AUTO, an inline route table
/// (one virtual host for every domain) and the router.
pub fn http_connection_manager(stat_prefix: &str, routes: Vec<Value>) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            // As istiod writes it: WebSocket upgrades pass, others are refused (403).
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            "route_config": {
                "name": format!("{stat_prefix}_routes"),
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    })
}

/// `envoy.filters.network.tcp_proxy` to `cluster`.
pub fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    })
}

/// A STATIC cluster with one endpoint per port on 127.0.0.1 (none: a cluster with no
/// endpoints at all).
pub fn static_cluster(name: &str, ports: &[u16], upstream: Upstream) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    });
    let options = match upstream {
        Upstream::Http1 => None,
        Upstream::Http2 => Some(json!({"explicit_http_config": {"http2_protocol_options": {}}})),
        Upstream::Downstream => Some(json!({"use_downstream_protocol_config": {}})),
    };
    if let (Some(mut o), Some(obj)) = (options, c.as_object_mut()) {
        o["@type"] =
            json!("type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions");
        obj.insert(
            "typed_extension_protocol_options".into(),
            json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": o}),
        );
    }
    c
}

// ------------------------------------------------------------------------------ responses

/// The parts of a raw HTTP/1 response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status_line: String,
    pub status: u16,
    /// Header names as they came on the wire.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON: {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one HTTP/1 response with a Content-Length (or none, for bodiless statuses) from a
/// keep-alive connection, leaving the connection ready for the next request.
pub fn read_response(r: &mut BufReader<TcpStream>) -> Result<RawResponse> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        bail!("connection closed before a response");
    }
    let status_line = line.trim_end().to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line {l:?}"))?;
        headers.push((k.to_string(), v.trim().to_string()));
    }
    let mut resp = RawResponse {
        status_line,
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = resp
        .header("content-length")
        .map(str::parse)
        .transpose()?
        .unwrap_or(0);
    resp.body = vec![0; len];
    r.read_exact(&mut resp.body)?;
    Ok(resp)
}

/// Listens on the Unix socket `path` (open to every user) and passes each
/// connection to a TCP connection from `connect`, bytes copied both ways
/// with half-close: istio-agent's `XDS` socket in front of the control
/// plane, as the agent's bootstrap expects it. Runs on threads of its own
/// until the process ends.
pub fn unix_relay(
    path: &Path,
    connect: impl Fn() -> Result<TcpStream> + Send + 'static,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))?;
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(t) = connect() else { continue };
            let (Ok(c2), Ok(t2)) = (c.try_clone(), t.try_clone()) else {
                continue;
            };
            // The control plane's stream stays open for as long as the
            // proxy runs: no read timeout.
            let _ = t.set_read_timeout(None);
            thread::spawn(move || {
                let (mut a, mut b) = (c, t2);
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            thread::spawn(move || {
                let (mut a, mut b) = (t, c2);
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(())
}
