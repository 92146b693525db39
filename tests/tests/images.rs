//! The container images of `docker/`: `docker/build.sh --debug` builds the static binaries and
//! the four images with buildah (vfs storage, chroot isolation) into a storage of the test's own,
//! so nothing outside it changes. Each image's binary answers `--version` inside the image
//! (`buildah run`); the images carry the names and tags `ferry-pilot inject` writes and the
//! users and entry points its pod specs rely on; the init image programs the capture rules
//! in a network-namespace pod with its own iptables; and the sidecar image serves a static
//! bootstrap in a pod, its STRICT_DNS cluster resolved through the pod's resolver (the static
//! binary's getaddrinfo, a real DNS query over UDP).
//!
//! Needs root and buildah (`.ci/run` installs it): under `CI=true` a missing one fails.
//! The static debug build is the slow part: about 10 minutes from nothing on 2 cores (a
//! separate target directory, `target/x86_64-unknown-linux-gnu/`), seconds once built; the
//! images themselves take about 15 s.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::netns::{self, Mesh, Pod, workspace_bin};
use ferry_tests::proxy::{Bootstrap, apps_dir};
use serde_json::json;

/// The images `ferry-pilot inject` and the manifests name, with the tag they use.
const IMAGES: [&str; 4] = [
    "ferry-proxy:latest",
    "ferry-gateway:latest",
    "ferry-init:latest",
    "ferry-pilot:latest",
];

/// Whether buildah runs here; without it: a failure under `CI=true`, a notice otherwise.
fn require_buildah() -> bool {
    if Command::new("buildah")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "buildah is not installed and CI=true is set: apt-get install buildah (.ci/run does)"
        );
    }
    eprintln!("note: skipping the image test: buildah is not installed (apt-get install buildah)");
    false
}

/// A buildah storage of the test's own (vfs), removed at the end.
struct Storage {
    dir: PathBuf,
    conf: PathBuf,
}

impl Storage {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferry-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let conf = dir.join("storage.conf");
        std::fs::write(
            &conf,
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
                dir.display()
            ),
        )?;
        Ok(Self { dir, conf })
    }

    fn buildah(&self) -> Command {
        let mut c = Command::new("buildah");
        c.env("CONTAINERS_STORAGE_CONF", &self.conf);
        c
    }

    /// `buildah ARGS`, its standard output; an error carries its standard error.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.buildah().args(args).output().context("buildah")?;
        ensure!(
            out.status.success(),
            "buildah {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A working container of `image`, `extra` given to `buildah from`.
    fn from(&self, image: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["from", "--pull=never", "--quiet"];
        args.extend_from_slice(extra);
        args.push(image);
        self.run(&args)
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = self.buildah().args(["rm", "--all"]).output();
        let _ = self.buildah().args(["rmi", "--all", "--force"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The images `ferry-pilot inject` writes into a pod spec (init, then sidecar).
fn injected_images() -> Result<Vec<String>> {
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app, namespace: default}\n\
        spec:\n  selector: {matchLabels: {app: app}}\n  template:\n    metadata: {labels: {app: app}}\n\
        \x20   spec: {containers: [{name: app, image: app}]}\n";
    let out = Command::new(workspace_bin("ferry-pilot", "ferry-pilot"))
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(deployment.as_bytes())?;
            }
            child.wait_with_output()
        })?;
    ensure!(out.status.success(), "ferry-pilot inject failed");
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .filter(|i| *i != "app")
        .map(str::to_string)
        .collect())
}

#[test]
fn images_build_and_run() -> Result<()> {
    if !netns::require_root() || !require_buildah() {
        return Ok(());
    }
    let storage = Storage::new()?;
    let started = Instant::now();
    let mut build = Command::new("bash");
    build
        .arg(repo().join("docker/build.sh"))
        .arg("--debug")
        .current_dir(repo())
        .env("CONTAINERS_STORAGE_CONF", &storage.conf)
        .env_remove("FERRY_IMAGE_TAG");
    // Cargo's per-package variables of this test and its OUT_DIR (ring's build script reruns
    // when they change, and everything above ring with it): the build must see the
    // environment a shell gives it, so an earlier `docker/build.sh --debug` is reused.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let keep = [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_INCREMENTAL",
            "CARGO_BUILD_",
        ]
        .iter()
        .any(|k| key.starts_with(k));
        if (key.starts_with("CARGO_") && !keep) || key == "OUT_DIR" {
            build.env_remove(&key);
        }
    }
    let out = build.output()?;
    ensure!(
        out.status.success(),
        "docker/build.sh --debug: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    eprintln!("built in {:?}:\n{listing}", started.elapsed());
    for image in IMAGES {
        ensure!(
            listing.lines().any(|l| l.starts_with(&format!("{image} "))),
            "build.sh did not report {image}: {listing}"
        );
    }

    // The names inject writes are images that exist.
    let mut injected = injected_images()?;
    injected.sort();
    ensure!(
        injected == ["ferry-init:latest", "ferry-proxy:latest"],
        "inject names {injected:?}"
    );

    // Each binary answers inside its image; the users and entry points are the ones the pod
    // specs rely on (inject gives arguments only; `ferry wait` runs /usr/local/bin/ferry).
    let version = env!("CARGO_PKG_VERSION");
    for (image, binary, user) in [
        ("ferry-proxy:latest", "ferry", "1337:1337"),
        ("ferry-gateway:latest", "ferry", "1337:1337"),
        ("ferry-init:latest", "ferry", ""),
        ("ferry-pilot:latest", "ferry-pilot", "1337:1337"),
    ] {
        let ctr = storage.from(image, &[])?;
        let path = format!("/usr/local/bin/{binary}");
        let out = storage
            .buildah()
            .args([
                "run",
                "--isolation",
                "chroot",
                &ctr,
                "--",
                &path,
                "--version",
            ])
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{image}: {said}");
        assert!(
            said.lines()
                .any(|l| l.trim() == format!("{binary} {version}")),
            "{image}: {said:?}"
        );
        let config = storage.run(&["inspect", "--type", "image", image])?;
        let config: serde_json::Value = serde_json::from_str(&config)?;
        let oci = &config["OCIv1"]["config"];
        assert_eq!(oci["User"].as_str().unwrap_or(""), user, "{image}");
        assert_eq!(oci["Entrypoint"], json!([path]), "{image}");
        storage.run(&["rm", &ctr])?;
    }

    let mesh = Mesh::new()?;
    init_programs_capture(&storage, &mesh.pod("init")?)?;
    sidecar_resolves_and_serves(&storage, &mesh.pod("sidecar")?)?;
    Ok(())
}

/// The init image's `ferry iptables`, with the image's own iptables, in a pod (NET_ADMIN and
/// NET_RAW, as inject's init container asks).
fn init_programs_capture(storage: &Storage, pod: &Pod) -> Result<()> {
    let ctr = storage.from("ferry-init:latest", &[])?;
    let out = pod
        .cmd("buildah")
        .env("CONTAINERS_STORAGE_CONF", &storage.conf)
        .args(["run", "--isolation", "chroot"])
        .args(["--cap-add", "CAP_NET_ADMIN", "--cap-add", "CAP_NET_RAW"])
        .args([ctr.as_str(), "--", "/usr/local/bin/ferry", "iptables"])
        .timeout(Duration::from_secs(60))
        .output()?;
    ensure!(
        out.status.success(),
        "ferry iptables in the init image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = pod.cmd("iptables-save").args(["-t", "nat"]).run()?;
    for rule in [
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    ] {
        ensure!(rules.contains(rule), "missing {rule:?} in\n{rules}");
    }
    storage.run(&["rm", &ctr])?;
    Ok(())
}

/// The sidecar image on a static bootstrap: an HTTP listener to a STRICT_DNS cluster whose
/// name only the pod's resolver (a DNS server in the pod) knows.
fn sidecar_resolves_and_serves(storage: &Storage, pod: &Pod) -> Result<()> {
    const LISTENER: u16 = 18000;
    const BACKEND: u16 = 18081;
    const NAME: &str = "backend.ferry.test";
    let dir = storage.dir.join("etc-ferry");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let cluster = json!({
        "name": "backend", "type": "STRICT_DNS", "connect_timeout": "1s",
        "dns_lookup_family": "V4_ONLY",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": NAME, "port_value": BACKEND}}}}
        ]}]}
    });
    let boot = Bootstrap::new()
        .http("in", LISTENER, "backend")
        .cluster(cluster)
        .render();
    let path = dir.join("bootstrap.yaml");
    std::fs::write(&path, boot)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;

    let _backend = pod.spawn_tag_server(BACKEND, "image-backend")?;
    let dns = pod
        .cmd("python3")
        .arg("-u")
        .arg(apps_dir().join("dns_server.py"))
        .args(["53", &format!("{NAME}=127.0.0.1")])
        .label("dns")
        .spawn()?;
    pod.wait_port(53, Duration::from_secs(15))?;

    // The container's /etc/resolv.conf names the pod's resolver, as a pod's would.
    let ctr = storage.from("ferry-proxy:latest", &["--dns", "127.0.0.1"])?;
    let volume = format!("{}:/etc/ferry:ro", dir.display());
    let sidecar = pod
        .cmd("buildah")
        .env("CONTAINERS_STORAGE_CONF", &storage.conf)
        .args([
            "run",
            "--isolation",
            "chroot",
            "--volume",
            &volume,
            &ctr,
            "--",
        ])
        .args([
            "/usr/local/bin/ferry",
            "sidecar",
            "--config",
            "/etc/ferry/bootstrap.yaml",
        ])
        .args(["--concurrency", "1", "--status-addr", "off"])
        .label("sidecar")
        .spawn()?;
    pod.wait_port(LISTENER, Duration::from_secs(30))
        .with_context(|| format!("sidecar log: {}", read(sidecar.stderr_path())))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        match pod.http_get(
            format!("127.0.0.1:{LISTENER}").parse()?,
            "backend",
            "/",
            &[],
        ) {
            Ok(r) if r.status == 200 => break r,
            other if Instant::now() > deadline => bail!(
                "no answer through the sidecar: {other:?}\nsidecar: {}\ndns: {}",
                read(sidecar.stderr_path()),
                read(dns.stdout_path())
            ),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    ensure!(answer.body.contains("image-backend"), "{}", answer.body);
    let queries = read(dns.stdout_path());
    ensure!(
        queries.contains(NAME),
        "the resolver saw no query for {NAME}: {queries}"
    );
    drop(sidecar);
    storage.run(&["rm", &ctr])?;
    Ok(())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
