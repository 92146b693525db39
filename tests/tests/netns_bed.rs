//! Proves the netns test bed itself: pods reach each other over the mesh bridge and nothing
//! else, processes run in the right namespace and as the right user, and everything is torn
//! down on drop, panics included.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_tests::netns::{self, Mesh};

fn namespaces() -> Result<String> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8(out.stdout)?)
}

fn listed(list: &str, ns: &str) -> bool {
    list.lines()
        .any(|l| l.split_whitespace().next() == Some(ns))
}

/// Alive means running or sleeping: a killed process may linger as a zombie until reaped.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

#[test]
fn pods_talk_over_the_bridge() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let a = mesh.pod("productpage")?;
    let b = mesh.pod("reviews-v1")?;
    assert_ne!(a.ip(), b.ip());

    // `python3 -m http.server` on `::` serves IPv4 and IPv6 alike.
    let server = b
        .cmd("python3")
        .args(["-u", "-m", "http.server", "8080", "--bind", "::"])
        .current_dir(mesh.log_dir())
        .spawn()?;
    b.wait_port(8080, Duration::from_secs(5))?;

    let url4 = format!("http://{}:8080/", b.ip());
    let out = a.exec(
        "curl",
        [
            "-q",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{remote_ip}",
            &url4,
        ],
    )?;
    ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?, format!("200 {}", b.ip()));

    let url6 = format!("http://[{}]:8080/", b.ip6());
    let code = a
        .cmd("curl")
        .args([
            "-q",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url6,
        ])
        .run()?;
    assert_eq!(code, "200");

    // A plain TCP connect from test code entered into the pod: the socket's source is the
    // pod's own address.
    let target = SocketAddr::from((b.ip(), 8080));
    let local = a.enter(|| {
        TcpStream::connect_timeout(&target, Duration::from_secs(2)).and_then(|s| s.local_addr())
    })??;
    assert_eq!(local.ip(), a.ip());

    // The server saw the client pod's address.
    let logs = server.logs();
    assert!(logs.stderr.contains(&format!("{} - -", a.ip())), "{logs}");

    // The mesh is closed: the bridge namespace only knows its own subnet, so nothing a pod
    // sends can be routed anywhere else.
    let routes = Command::new("ip")
        .args(["-n", mesh.bridge_ns(), "-4", "route", "show"])
        .output()?;
    let routes = String::from_utf8(routes.stdout)?;
    assert_eq!(routes.lines().count(), 1, "{routes}");
    assert!(routes.starts_with(&mesh.subnet()), "{routes}");
    Ok(())
}

#[test]
fn meshes_are_isolated_from_each_other() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let one = Mesh::new()?;
    let two = Mesh::new()?;
    assert_ne!(one.prefix(), two.prefix());
    let a = one.pod("app")?;
    // The same pod name in another mesh is fine.
    let b = two.pod("app")?;
    assert_ne!(a.ns_name(), b.ns_name());
    let _server = b.spawn_tag_server(8080, "other-mesh")?;
    let target = SocketAddr::from((b.ip(), 8080));
    let reached =
        a.enter(|| TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok())?;
    assert!(!reached, "a pod reached another mesh");
    // A duplicate name in one mesh is refused.
    assert!(one.pod("app").is_err());
    Ok(())
}

#[test]
fn processes_run_as_the_requested_uid() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("proxy")?;

    let id = pod.cmd("id").as_uid(1337).run()?;
    assert_eq!(id.trim(), "uid=1337 gid=1337 groups=1337");
    assert_eq!(pod.cmd("id").arg("-u").run()?.trim(), "0");

    let proc = pod.cmd("sleep").arg("30").as_uid(1337).spawn()?;
    let status = fs::read_to_string(format!("/proc/{}/status", proc.pid()))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["1337"; 4], "{status}");
    assert_eq!(field("Gid:"), ["1337"; 4], "{status}");
    assert!(field("Groups:").is_empty(), "{status}");

    // And it runs inside the pod's network namespace.
    let in_pod = fs::metadata(pod.ns_path())?.ino();
    let of_proc = fs::metadata(format!("/proc/{}/ns/net", proc.pid()))?.ino();
    assert_eq!(in_pod, of_proc);
    Ok(())
}

#[test]
fn logs_are_captured_and_commands_time_out() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("chatty")?;
    let mut proc = pod
        .cmd("sh")
        .args([
            "-c",
            "echo to-out; echo to-err >&2; ip -o -4 addr show dev eth0",
        ])
        .label("chatty")
        .spawn()?;
    assert!(proc.wait_timeout(Duration::from_secs(5))?.success());
    let logs = proc.logs();
    assert!(logs.stdout.starts_with("to-out\n"), "{logs}");
    assert!(
        logs.stdout.contains(&format!("inet {}/24", pod.ip())),
        "{logs}"
    );
    assert_eq!(logs.stderr, "to-err\n");
    assert!(proc.stdout_path().starts_with(mesh.log_dir()));

    let started = std::time::Instant::now();
    let err = pod
        .cmd("sleep")
        .arg("30")
        .timeout(Duration::from_millis(300))
        .output()
        .expect_err("must time out");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let echoed = pod.cmd("cat").stdin("fed on stdin").run()?;
    assert_eq!(echoed, "fed on stdin");
    Ok(())
}

#[test]
fn drop_removes_namespaces_and_processes() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let (names, tracked, orphan, log_dir) = {
        let mesh = Mesh::new()?;
        let pod = mesh.pod("short-lived")?;
        let tracked = pod.spawn("sleep", ["60"])?;
        // A grandchild the bed never saw: the pod's teardown must kill it too.
        let orphan: u32 = pod
            .cmd("sh")
            .args(["-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
            .run()?
            .trim()
            .parse()
            .context("pid")?;
        assert!(alive(orphan));
        let names = [mesh.bridge_ns().to_owned(), pod.ns_name().to_owned()];
        let list = namespaces()?;
        assert!(names.iter().all(|n| listed(&list, n)), "{list}");
        let log_dir = mesh.log_dir().to_owned();
        assert!(log_dir.is_dir());
        (names, tracked.pid(), orphan, log_dir)
    };
    let list = namespaces()?;
    for name in &names {
        assert!(!listed(&list, name), "{name} left behind:\n{list}");
    }
    assert!(!alive(tracked), "tracked process survived");
    // SIGKILL is delivered asynchronously; give the orphan a moment to die.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while alive(orphan) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(orphan), "orphan process survived");
    assert!(!log_dir.exists(), "log dir kept after a passing test");
    Ok(())
}

#[test]
fn panicking_test_still_cleans_up() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let seen = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let mesh = Mesh::new().expect("mesh");
        let pod = mesh.pod("doomed").expect("pod");
        let proc = pod.spawn("sleep", ["60"]).expect("spawn");
        seen.lock().expect("lock").extend([
            mesh.bridge_ns().to_owned(),
            pod.ns_name().to_owned(),
            proc.pid().to_string(),
            mesh.log_dir().display().to_string(),
        ]);
        panic!("deliberate panic inside a netns test");
    });
    assert!(result.is_err());
    let seen = seen.into_inner().expect("lock");
    let [bridge, pod, pid, log_dir] = seen.as_slice() else {
        panic!("setup did not complete: {seen:?}");
    };
    let list = namespaces()?;
    assert!(!listed(&list, bridge) && !listed(&list, pod), "{list}");
    assert!(!alive(pid.parse()?));
    // Logs of a failed test are kept for the post-mortem; this failure was on purpose.
    ensure!(
        fs::metadata(log_dir).is_ok(),
        "logs of a failed test must be kept"
    );
    fs::remove_dir_all(log_dir)?;
    Ok(())
}

#[test]
fn ferry_bin_points_into_the_target_dir() {
    // Only the path logic: building the binary is the caller's job.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    if std::env::var_os("FERRY_BIN").is_none() && profile_dir.join("ferry").is_file() {
        assert_eq!(netns::ferry_bin(), profile_dir.join("ferry"));
    }
    let missing =
        std::panic::catch_unwind(|| netns::workspace_bin("no-such-binary-here", "ferry-nothing"));
    let message = missing
        .expect_err("must panic")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(
        message.contains("cargo build -p ferry-nothing"),
        "{message}"
    );
}

#[test]
fn namespaces_of_dead_test_runs_are_swept() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    // A namespace named like one of ours, owned by a process id that does not exist.
    let dead = (4_000_000..4_100_000u32)
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .context("no free pid")?;
    let stale = format!("ferry-{dead}-0-br");
    // Other tests sweep concurrently and may remove it while `ip` is still
    // creating it: that is the sweep working, and another try is due.
    let mut created = false;
    for _ in 0..10 {
        let out = Command::new("ip").args(["netns", "add", &stale]).output()?;
        if out.status.success() {
            created = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ensure!(created, "ip netns add {stale} failed ten times");
    let _mesh = Mesh::new()?;
    assert!(!listed(&namespaces()?, &stale), "{stale} not swept");
    Ok(())
}

/// Pods on two nodes: each node is a segment of its own, and traffic between them is routed by
/// the mesh namespace (one hop: a TTL of 1 dies there, 2 arrives), in IPv4 and IPv6, with the
/// source kept; pods of one node reach each other with no hop.
#[test]
fn pods_on_two_nodes_talk_through_a_router() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let a = mesh.pod_on_node("client", 0)?;
    let b = mesh.pod_on_node("server", 1)?;
    let c = mesh.pod_on_node("neighbour", 1)?;
    assert_eq!((a.node(), b.node(), c.node()), (0, 1, 1));
    let net = |ip: std::net::Ipv4Addr| ip.octets()[..3].to_vec();
    assert_ne!(net(a.ip()), net(b.ip()), "two segments");
    assert_eq!(net(b.ip()), net(c.ip()), "one segment per node");
    let o = b.ip().octets();
    assert_eq!(
        mesh.node_subnet(1),
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    );

    for target in [
        SocketAddr::from((b.ip(), 0)),
        SocketAddr::from((b.ip6(), 0)),
    ] {
        let listener = b.enter(|| std::net::TcpListener::bind(target))??;
        let to = listener.local_addr()?;
        let s = a
            .enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(6)))?
            .with_context(|| format!("connecting to {to}"))?;
        let (_accepted, from) = listener.accept()?;
        assert_eq!(
            from.ip(),
            s.local_addr()?.ip(),
            "the source is the client pod's"
        );
    }
    let listener = b.enter(|| std::net::TcpListener::bind((b.ip(), 0)))??;
    let port = listener.local_addr()?.port().to_string();
    // Connects from `pod` to the server with the IP TTL `ttl`: whether it got through.
    let with_ttl = |pod: &netns::Pod, ttl: &str| -> Result<bool> {
        let out = pod.exec(
            "python3",
            [
                "-c",
                "import socket,sys; s=socket.socket(); \
                 s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, int(sys.argv[3])); \
                 s.settimeout(1.5); s.connect((sys.argv[1], int(sys.argv[2])))",
                &b.ip().to_string(),
                &port,
                ttl,
            ],
        )?;
        Ok(out.status.success())
    };
    assert!(!with_ttl(&a, "1")?, "a TTL of 1 does not cross the router");
    assert!(with_ttl(&a, "2")?, "a TTL of 2 does");
    assert!(with_ttl(&c, "1")?, "same node: no router");
    drop(listener);
    Ok(())
}
