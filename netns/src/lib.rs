//! Pods as Linux network namespaces, for Ferry's integration tests and for `ferry-pilot demo`'s
//! local mesh. A [`Mesh`] is a Linux bridge living in a namespace of its own; each [`Pod`] is a
//! namespace joined to that bridge by a veth pair, with `lo` up, an address in a private /24
//! (and a ULA /64) and a default route towards the bridge. Nothing is routed beyond the bridge
//! namespace, so pod traffic never leaves the mesh and the host's own network is never touched.
//! A pod may also join another "node" ([`Mesh::pod_on_node`]): a bridge and subnet of its own in
//! the same mesh namespace, which then routes between the nodes as between two machines.
//! Every interface lives inside a mesh namespace (`br0`, `eth0`, `v<N>`), which is why meshes of
//! parallel runs never collide; namespace names carry the creating process id so a later run can
//! sweep what a killed run left behind ([`sweep_stale`]). Processes run inside a pod (as root or
//! as another uid), log to files under a per-mesh directory, and are killed on drop; dropping a
//! pod kills whatever still runs in its namespace and deletes it, even while a test panics.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub mod http;
pub mod ports;

/// What went wrong while building a mesh or running something in it: the message names the
/// command or file, and carries what the command printed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Os(#[from] io::Error),
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `return Err(Error::Failed(format!(...)))`.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(Error::Failed(format!($($arg)*)))
    };
}

/// `fail!` unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

/// Names what was being done when an I/O call failed.
trait IoContext<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io {
            what: what(),
            source: e.into(),
        })
    }
}

/// The highest node number a pod may join ([`Mesh::pod_on_node`]).
pub const MAX_NODE: u8 = 8;
/// Every namespace this bed creates is named `ferry-<pid>-<n>-...`.
const NS_PREFIX: &str = "ferry-";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The bridge inside the mesh namespace.
const BRIDGE: &str = "br0";
/// A pod's interface, inside the pod namespace.
const POD_IF: &str = "eth0";
/// Default limit for [`PodCommand::output`], so a hung command fails the test instead of
/// hanging it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Proxy variables from the developer's shell would send a pod's curl towards a proxy it
/// cannot reach; pods never use one.
const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

static MESH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A tiny TCP server used by [`Pod::spawn_tag_server`]: answers every connection with an
/// HTTP/1.0 response whose body names the server (`tag`), the local address, the original
/// destination (`SO_ORIGINAL_DST`, set when iptables redirected the connection) and the peer.
const TAG_SERVER_PY: &str = r#"
import socket, struct, sys, threading
port, tag = int(sys.argv[1]), sys.argv[2]
bind = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((bind, port))
srv.listen(128)
print(f"listening {bind}:{port}", flush=True)

def orig_dst(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
        return f"{socket.inet_ntoa(raw[4:8])}:{struct.unpack('!H', raw[2:4])[0]}"
    except OSError:
        return "none"

def handle(conn, peer):
    with conn:
        try:
            conn.settimeout(2)
            conn.recv(65536)
            local = conn.getsockname()
            body = f"{tag} local={local[0]}:{local[1]} orig={orig_dst(conn)} peer={peer[0]}:{peer[1]}\n"
            head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            conn.sendall((head + body).encode())
            print(body.strip(), flush=True)
        except OSError:
            pass

while True:
    conn, peer = srv.accept()
    threading.Thread(target=handle, args=(conn, peer), daemon=True).start()
"#;

/// Runs `ip` with `args` in the root namespace (it targets test namespaces with `-n`).
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .io_context(|| "running `ip` (is iproute2 installed?)".to_string())?;
    ensure!(
        output.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Kills every process whose network namespace is `ns`, then deletes the namespace. Errors are
/// ignored: this runs from `Drop`, where the best effort is all there is.
fn destroy_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Deletes the namespaces (and kills what still runs in them) of processes that no longer exist:
/// a run killed by a timeout or by SIGKILL never reaches its `Drop`s. Returns the names of the
/// namespaces removed. [`Mesh::new`] calls it; a program may call it first to report them.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            destroy_namespace(&name);
            removed.push(name);
        }
    }
    removed
}

/// The namespaces that meshes of process `pid` created and that still exist.
pub fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("{NS_PREFIX}{pid}-");
    let mut out: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Enters the network namespace open at `fd`, then drops to `ids` (uid, gid) if given; with
/// `die_with_parent` (the spawning process's pid), the child is killed when the thread that
/// spawned it ends. Runs in the child between fork and exec, so it only makes raw system calls.
fn enter_namespace(
    fd: RawFd,
    ids: Option<(u32, u32)>,
    die_with_parent: Option<u32>,
) -> io::Result<()> {
    // SAFETY: plain system calls on an open descriptor and integer ids; no memory is touched.
    unsafe {
        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some((uid, gid)) = ids {
            // Supplementary groups first (root's would otherwise stay), then gid, then uid:
            // after setuid there is no privilege left to change the others.
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        // After the change of ids, which clears the parent-death signal.
        if let Some(parent) = die_with_parent {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the signal was armed.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
    }
    Ok(())
}

struct MeshInner {
    prefix: String,
    bridge_ns: String,
    subnet: u8,
    log_dir: PathBuf,
    die_with_parent: bool,
    keep_logs: AtomicBool,
    /// Host numbers handed out so far and pod names in use.
    state: Mutex<MeshState>,
}

struct MeshState {
    next_host: u8,
    /// Nodes other than 0 whose bridge exists.
    nodes: Vec<u8>,
    names: Vec<String>,
    spawned: u32,
}

impl Drop for MeshInner {
    fn drop(&mut self) {
        destroy_namespace(&self.bridge_ns);
        if thread::panicking() {
            eprintln!(
                "netns: test failed; process logs kept in {}",
                self.log_dir.display()
            );
        } else if self.keep_logs.load(Ordering::Relaxed) {
            eprintln!("netns: process logs kept in {}", self.log_dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// A set of pods sharing one L2 segment (a bridge in its own namespace).
/// Cloning shares the same mesh; it is torn down when the last clone and pod are dropped.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<MeshInner>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("prefix", &self.inner.prefix)
            .field("subnet", &self.subnet())
            .finish()
    }
}

/// How a [`Mesh`] keeps its logs and ties its processes to its creator.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// The per-mesh log directories go under this one.
    pub log_root: PathBuf,
    /// Every process spawned in the mesh's pods is killed (SIGKILL) when the thread that
    /// spawned it ends: nothing outlives a program killed with SIGKILL. Spawn from a thread
    /// that lives as long as the mesh (the main thread).
    pub die_with_parent: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            log_root: std::env::temp_dir().join("ferry-tests"),
            die_with_parent: false,
        }
    }
}

impl Mesh {
    /// Creates the bridge namespace, logs under the temporary directory. Needs root.
    pub fn new() -> Result<Mesh> {
        Mesh::with_options(MeshOptions::default())
    }

    /// Creates the bridge namespace with `options`. Needs root.
    pub fn with_options(options: MeshOptions) -> Result<Mesh> {
        sweep_stale();
        let pid = std::process::id();
        let n = MESH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{pid}-{n}");
        // Meshes are isolated from each other anyway; distinct subnets only make logs of
        // parallel tests easier to tell apart.
        let subnet = u8::try_from((pid.wrapping_mul(7).wrapping_add(n)) % 250 + 1).unwrap_or(1);
        let log_dir = options.log_root.join(&prefix);
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir).io_context(|| format!("creating {}", log_dir.display()))?;
        let bridge_ns = format!("{prefix}-br");
        ip(&["netns", "add", &bridge_ns])?;
        // From here on, dropping `inner` undoes whatever was set up.
        let inner = Arc::new(MeshInner {
            prefix,
            bridge_ns,
            subnet,
            log_dir,
            die_with_parent: options.die_with_parent,
            keep_logs: AtomicBool::new(false),
            state: Mutex::new(MeshState {
                next_host: 2,
                nodes: Vec::new(),
                names: Vec::new(),
                spawned: 0,
            }),
        });
        let ns = inner.bridge_ns.as_str();
        let gw4 = format!("{}/24", Self::v4(subnet, 1));
        let gw6 = format!("{}/64", Self::v6(subnet, 1));
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", ns, "addr", "add", &gw4, "dev", BRIDGE])?;
        ip(&["-n", ns, "-6", "addr", "add", &gw6, "dev", BRIDGE, "nodad"])?;
        ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
        Ok(Mesh { inner })
    }

    fn v4(subnet: u8, host: u8) -> Ipv4Addr {
        Self::v4_on(0, subnet, host)
    }

    fn v6(subnet: u8, host: u8) -> Ipv6Addr {
        Self::v6_on(0, subnet, host)
    }

    /// Node `node`'s segment is `10.(77+node).N.0/24`: node 0 is the mesh's own.
    fn v4_on(node: u8, subnet: u8, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77 + node, subnet, host)
    }

    fn v6_on(node: u8, subnet: u8, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd77,
            0,
            u16::from(node),
            u16::from(subnet),
            0,
            0,
            0,
            u16::from(host),
        )
    }

    /// Creates pod `name` (lowercase letters, digits and `-`) on this mesh.
    pub fn pod(&self, name: &str) -> Result<Pod> {
        self.pod_on_node(name, 0)
    }

    /// Creates pod `name` on node `node` (0 to [`MAX_NODE`]) of this mesh, as
    /// [`Mesh::pod`] does for node 0. Each node is an L2 segment of its own (a bridge
    /// `br<node>` with its own subnet, see [`Mesh::node_subnet`]) and the mesh namespace
    /// routes between them, so traffic between pods of different nodes crosses a router as
    /// between two machines of a cluster, while pods of one node share a segment.
    pub fn pod_on_node(&self, name: &str, node: u8) -> Result<Pod> {
        ensure!(node <= MAX_NODE, "node {node}: at most {MAX_NODE}");
        ensure!(
            !name.is_empty()
                && name.len() <= 40
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "pod name {name:?}: use 1-40 lowercase letters, digits and '-'"
        );
        let host = {
            let mut state = self
                .inner
                .state
                .lock()
                .map_err(|_| Error::Failed("mesh state poisoned".into()))?;
            ensure!(
                !state.names.iter().any(|n| n == name),
                "pod {name:?} already exists in this mesh"
            );
            ensure!(state.next_host < 255, "mesh is full");
            state.names.push(name.to_owned());
            let host = state.next_host;
            state.next_host += 1;
            host
        };
        if node != 0 {
            self.node_segment(node)?;
        }
        let ns = format!("{}-{name}", self.inner.prefix);
        ip(&["netns", "add", &ns])?;
        let pod = Pod {
            mesh: Arc::clone(&self.inner),
            name: name.to_owned(),
            ns,
            node,
            ip: Self::v4_on(node, self.inner.subnet, host),
            ip6: Self::v6_on(node, self.inner.subnet, host),
        };
        pod.attach(host)?;
        Ok(pod)
    }

    /// Creates node `node`'s bridge the first time a pod joins it, and turns on forwarding
    /// in the mesh namespace, which from then on routes between the nodes' segments.
    fn node_segment(&self, node: u8) -> Result<()> {
        let mut state = self
            .inner
            .state
            .lock()
            .map_err(|_| Error::Failed("mesh state poisoned".into()))?;
        if state.nodes.contains(&node) {
            return Ok(());
        }
        let ns = self.inner.bridge_ns.as_str();
        let br = format!("br{node}");
        let subnet = self.inner.subnet;
        let gw4 = format!("{}/24", Self::v4_on(node, subnet, 1));
        let gw6 = format!("{}/64", Self::v6_on(node, subnet, 1));
        ip(&["-n", ns, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", ns, "addr", "add", &gw4, "dev", &br])?;
        ip(&["-n", ns, "-6", "addr", "add", &gw6, "dev", &br, "nodad"])?;
        ip(&["-n", ns, "link", "set", &br, "up"])?;
        for (key, what) in [
            ("/proc/sys/net/ipv4/ip_forward", "IPv4"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6"),
        ] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c"])
                .arg(format!("echo 1 > {key}"))
                .output()
                .io_context(|| format!("turning on {what} forwarding in {ns}"))?;
            ensure!(
                out.status.success(),
                "turning on {what} forwarding in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        state.nodes.push(node);
        Ok(())
    }

    /// Node `node`'s IPv4 subnet, `10.(77+node).N.0/24` (node 0's is [`Mesh::subnet`]).
    pub fn node_subnet(&self, node: u8) -> String {
        format!("{}/24", Self::v4_on(node, self.inner.subnet, 0))
    }

    /// The common prefix of this mesh's namespace names.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The namespace holding the bridge.
    pub fn bridge_ns(&self) -> &str {
        &self.inner.bridge_ns
    }

    /// The bridge's IPv4 address: node 0's pods' default gateway (it forwards nothing unless
    /// the mesh has pods on other nodes).
    pub fn gateway(&self) -> Ipv4Addr {
        Self::v4(self.inner.subnet, 1)
    }

    /// The mesh's IPv4 subnet, `10.77.N.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/24", Self::v4(self.inner.subnet, 0))
    }

    /// The directory holding the logs of processes spawned in this mesh's pods. Removed when
    /// the mesh goes away, unless a test is panicking or [`Mesh::keep_logs`] was called.
    pub fn log_dir(&self) -> &Path {
        &self.inner.log_dir
    }

    /// Keeps the log directory when the mesh goes away (after a failure, for the reader).
    pub fn keep_logs(&self) {
        self.inner.keep_logs.store(true, Ordering::Relaxed);
    }
}

/// A pod: a network namespace on a [`Mesh`]. Dropping it kills what runs inside and deletes
/// the namespace.
pub struct Pod {
    mesh: Arc<MeshInner>,
    name: String,
    ns: String,
    /// The node whose segment the pod joins (0: the mesh's own bridge).
    node: u8,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
}

impl fmt::Debug for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pod")
            .field("name", &self.name)
            .field("ns", &self.ns)
            .field("ip", &self.ip)
            .finish()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        destroy_namespace(&self.ns);
    }
}

impl Pod {
    /// Joins the bridge: veth `v<host>` in the bridge namespace, `eth0` in the pod.
    fn attach(&self, host: u8) -> Result<()> {
        let br = self.mesh.bridge_ns.as_str();
        let ns = self.ns.as_str();
        let port = format!("v{host}");
        let addr4 = format!("{}/24", self.ip);
        let addr6 = format!("{}/64", self.ip6);
        let gw4 = Mesh::v4_on(self.node, self.mesh.subnet, 1).to_string();
        let gw6 = Mesh::v6_on(self.node, self.mesh.subnet, 1).to_string();
        let bridge = match self.node {
            0 => BRIDGE.to_owned(),
            n => format!("br{n}"),
        };
        ip(&[
            "-n", br, "link", "add", &port, "type", "veth", "peer", "name", POD_IF, "netns", ns,
        ])?;
        ip(&["-n", br, "link", "set", &port, "master", &bridge])?;
        ip(&["-n", br, "link", "set", &port, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &addr4, "dev", POD_IF])?;
        ip(&[
            "-n", ns, "-6", "addr", "add", &addr6, "dev", POD_IF, "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", POD_IF, "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &gw4])?;
        ip(&["-n", ns, "-6", "route", "add", "default", "via", &gw6])?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node the pod is on ([`Mesh::pod_on_node`]).
    pub fn node(&self) -> u8 {
        self.node
    }

    /// The pod's IPv4 address on the mesh.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 (ULA) address on the mesh.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// The namespace name, for `ip netns exec <ns>` or `ip -n <ns>`.
    pub fn ns_name(&self) -> &str {
        &self.ns
    }

    /// The namespace's path, `/run/netns/<ns>`.
    pub fn ns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.ns)
    }

    /// The mesh this pod belongs to.
    pub fn mesh(&self) -> Mesh {
        Mesh {
            inner: Arc::clone(&self.mesh),
        }
    }

    /// A command to run inside this pod; see [`PodCommand`].
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> PodCommand {
        PodCommand {
            ns_path: self.ns_path(),
            pod: self.name.clone(),
            mesh: Arc::clone(&self.mesh),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            ids: None,
            cwd: None,
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
            label: None,
        }
    }

    /// Starts `program args` in this pod as root; see [`PodCommand::spawn`].
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd(program).args(args).spawn()
    }

    /// Runs `program args` in this pod as root to completion; see [`PodCommand::output`].
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd(program).args(args).output()
    }

    /// Runs `f` on a thread inside this pod's network namespace and returns its result. Sockets
    /// created there stay in the pod even after they are handed back to other threads.
    /// A panic in `f` propagates.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let ns = File::open(self.ns_path())
            .io_context(|| format!("opening namespace of pod {}", self.name))?;
        thread::scope(|scope| {
            let handle = scope.spawn(move || -> Result<T> {
                // SAFETY: setns only changes this (short-lived) thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    fail!("setns: {}", io::Error::last_os_error());
                }
                Ok(f())
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Polls until TCP `port` accepts connections inside the pod, on `127.0.0.1` or on the
    /// pod's address (a listener may be bound to either).
    pub fn wait_port(&self, port: u16, timeout: Duration) -> Result<()> {
        let targets = [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V4(self.ip), port),
        ];
        let ready = self.enter(|| {
            let deadline = Instant::now() + timeout;
            loop {
                if targets
                    .iter()
                    .any(|t| TcpStream::connect_timeout(t, Duration::from_millis(200)).is_ok())
                {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(20));
            }
        })?;
        ensure!(
            ready,
            "port {port} in pod {} not accepting after {timeout:?}",
            self.name
        );
        Ok(())
    }

    /// A handle that opens connections from inside this pod, usable from any thread (a port
    /// forward from the host, say).
    pub fn dialer(&self) -> Dialer {
        Dialer {
            ns_path: self.ns_path(),
            pod: self.name.clone(),
        }
    }

    /// A TCP connection to `addr` opened from inside the pod (the socket stays in the pod's
    /// namespace), with [`http::READ_TIMEOUT`] on reads.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let stream = self.dialer().dial(addr, timeout)?;
        stream.set_read_timeout(Some(http::READ_TIMEOUT))?;
        Ok(stream)
    }

    /// `GET path` from inside the pod to `addr` (no curl needed); `host` is the Host header.
    pub fn http_get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<http::Response> {
        let stream = self.connect(addr, Duration::from_secs(2))?;
        http::get(stream, host, path, headers)
    }

    /// Polls the pod's sidecar admin (`127.0.0.1:15000/ready`, Envoy's and
    /// Ferry's alike) until it answers `LIVE`; on timeout the error carries
    /// the sidecar's log.
    pub fn wait_sidecar_ready(&self, sidecar: &Proc, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .cmd("curl")
                .args(["-s", "--max-time", "2", "http://127.0.0.1:15000/ready"])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).trim() == "LIVE" {
                return Ok(());
            }
            if Instant::now() > deadline {
                fail!(
                    "sidecar of {} not ready: {}",
                    self.name,
                    sidecar.logs().stderr
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A counter or gauge from the pod's sidecar admin `/stats` (0 when the
    /// sidecar has not created it).
    pub fn sidecar_stat(&self, name: &str) -> Result<u64> {
        let out = self
            .cmd("curl")
            .args(["-s", "--max-time", "5", "http://127.0.0.1:15000/stats"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
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

    /// Starts a small HTTP/1.0 responder on `port` (all addresses) that answers
    /// `<tag> local=<ip:port> orig=<ip:port|none> peer=<ip:port>`, where `orig` is the original
    /// destination of a connection iptables redirected. Waits until it accepts.
    pub fn spawn_tag_server(&self, port: u16, tag: &str) -> Result<Proc> {
        self.spawn_tag_server_on("0.0.0.0", port, tag)
    }

    /// [`Pod::spawn_tag_server`] bound to one address.
    pub fn spawn_tag_server_on(&self, bind: &str, port: u16, tag: &str) -> Result<Proc> {
        let proc = self
            .cmd("python3")
            .args(["-u", "-c", TAG_SERVER_PY, &port.to_string(), tag, bind])
            .label(&format!("tag-{tag}"))
            .spawn()?;
        let port_ready = match bind.parse::<Ipv4Addr>() {
            Ok(addr) if !addr.is_unspecified() => {
                self.wait_addr(SocketAddr::new(addr.into(), port))
            }
            _ => self.wait_port(port, Duration::from_secs(5)),
        };
        port_ready.map_err(|e| Error::Failed(format!("tag server {tag}: {e}: {}", proc.logs())))?;
        Ok(proc)
    }

    fn wait_addr(&self, addr: SocketAddr) -> Result<()> {
        let ready = self.enter(|| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                thread::sleep(Duration::from_millis(20));
            }
            false
        })?;
        ensure!(ready, "{addr} in pod {} not accepting", self.name);
        Ok(())
    }
}

/// Opens TCP connections from inside a pod's network namespace; see [`Pod::dialer`].
#[derive(Clone, Debug)]
pub struct Dialer {
    ns_path: PathBuf,
    pod: String,
}

impl Dialer {
    /// Connects to `addr` from inside the pod (a short-lived thread enters its namespace; the
    /// socket stays there).
    pub fn dial(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let ns = File::open(&self.ns_path)
            .io_context(|| format!("opening namespace of pod {}", self.pod))?;
        let stream = thread::scope(|scope| {
            scope
                .spawn(move || -> Result<TcpStream> {
                    // SAFETY: setns only changes this (short-lived) thread's network namespace.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        fail!("setns: {}", io::Error::last_os_error());
                    }
                    TcpStream::connect_timeout(&addr, timeout)
                        .io_context(|| format!("connecting to {addr}"))
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok(stream)
    }
}

/// Whether this process runs as root (network namespaces and iptables need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command to run inside a pod, built like [`std::process::Command`]. By default it runs as
/// root, with stdin empty, the test's environment minus proxy variables, and a 20 s limit for
/// [`output`](PodCommand::output).
pub struct PodCommand {
    ns_path: PathBuf,
    pod: String,
    mesh: Arc<MeshInner>,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    ids: Option<(u32, u32)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    label: Option<String>,
}

impl PodCommand {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs as `uid` with gid `uid` and no supplementary groups (how the proxy runs: 1337).
    pub fn as_uid(self, uid: u32) -> Self {
        self.as_user(uid, uid)
    }

    /// Runs as `uid`/`gid` with no supplementary groups.
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.ids = Some((uid, gid));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Bytes fed to stdin by [`output`](PodCommand::output).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Limit for [`output`](PodCommand::output); the command is killed when it is reached.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Names the log files of [`spawn`](PodCommand::spawn) (default: the program's name).
    pub fn label(mut self, label: &str) -> Self {
        self.label = Some(label.to_owned());
        self
    }

    fn describe(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The std command, set to enter the pod; the namespace file must stay open until spawned.
    fn build(&self) -> Result<(Command, File)> {
        let ns = File::open(&self.ns_path)
            .io_context(|| format!("opening namespace of pod {}", self.pod))?;
        let fd = ns.as_raw_fd();
        let ids = self.ids;
        let die_with_parent = self.mesh.die_with_parent.then(std::process::id);
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        // SAFETY: the hook only makes async-signal-safe system calls (prctl, setns, setgroups,
        // setgid, setuid) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || enter_namespace(fd, ids, die_with_parent));
        }
        Ok((cmd, ns))
    }

    /// Starts the command in the background. Its stdout and stderr go to
    /// `<log_dir>/<pod>/<n>-<label>.{stdout,stderr}`; the returned [`Proc`] kills it on drop.
    pub fn spawn(self) -> Result<Proc> {
        let label = self.label.clone().unwrap_or_else(|| {
            Path::new(&self.program)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "proc".to_owned())
        });
        let seq = {
            let mut state = self
                .mesh
                .state
                .lock()
                .map_err(|_| Error::Failed("mesh state poisoned".into()))?;
            state.spawned += 1;
            state.spawned
        };
        let dir = self.mesh.log_dir.join(&self.pod);
        fs::create_dir_all(&dir).io_context(|| format!("creating {}", dir.display()))?;
        let stdout_path = dir.join(format!("{seq}-{label}.stdout"));
        let stderr_path = dir.join(format!("{seq}-{label}.stderr"));
        let stdout = File::create(&stdout_path)
            .io_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .io_context(|| format!("creating {}", stderr_path.display()))?;
        let (mut cmd, _ns) = self.build()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .io_context(|| format!("spawning `{}` in pod {}", self.describe(), self.pod))?;
        Ok(Proc {
            child,
            label: format!("{}/{label}", self.pod),
            stdout_path,
            stderr_path,
        })
    }

    /// Runs the command to completion and returns its output whatever the exit status; fails
    /// only if it cannot start or outlives its timeout (then it is killed).
    pub fn output(self) -> Result<Output> {
        let (mut cmd, _ns) = self.build()?;
        let what = format!("`{}` in pod {}", self.describe(), self.pod);
        let mut child = cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .io_context(|| format!("spawning {what}"))?;
        let stdin = child
            .stdin
            .take()
            .zip(self.stdin.clone())
            .map(|(mut pipe, bytes)| {
                thread::spawn(move || {
                    // A command that stops reading early is its own business.
                    let _ = pipe.write_all(&bytes);
                })
            });
        let stdout = child.stdout.take().map(read_to_end_thread);
        let stderr = child.stderr.take().map(read_to_end_thread);
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .io_context(|| format!("waiting for {what}"))?
            {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(5));
        };
        if let Some(handle) = stdin {
            let _ = handle.join();
        }
        let collect = |h: Option<thread::JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        let (stdout, stderr) = (collect(stdout), collect(stderr));
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => fail!(
                "{what} timed out after {:?}\nstdout: {}\nstderr: {}",
                self.timeout,
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
        }
    }

    /// Like [`output`](PodCommand::output) but requires success; returns stdout as text.
    pub fn run(self) -> Result<String> {
        let what = format!("`{}` in pod {}", self.describe(), self.pod);
        let out = self.output()?;
        ensure!(
            out.status.success(),
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .map_err(|_| Error::Failed(format!("{what} printed non-UTF-8")))
    }
}

fn read_to_end_thread(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// What a [`Proc`] has written so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logs {
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Logs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// A background process in a pod. Killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    label: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `<pod>/<label>`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Everything written to stdout and stderr so far.
    pub fn logs(&self) -> Logs {
        Logs {
            stdout: fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr_path).unwrap_or_default(),
        }
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                fail!("{} still running after {timeout:?}", self.label);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, to test graceful shutdown).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| Error::Failed(format!("{}: pid out of range", self.label)))?;
        // SAFETY: sending a signal has no memory-safety preconditions; the child is not yet
        // reaped (we hold it), so the pid cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            fail!("kill {}: {}", self.label, io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills and reaps the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
