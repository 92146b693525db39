//! What a newcomer meets first on the command line of `ferry` and
//! `ferry-pilot`: an error says its cause once, every binary answers
//! `--version`, `ferry gateway --help` gives a gateway's node id, the demo
//! bootstrap the README links runs as it is, and `analyze`'s conflicts name
//! the files they come from.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Result, ensure};
use ferry_tests::netns::{self, Mesh, ferry_bin, workspace_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn pilot_bin() -> PathBuf {
    workspace_bin("ferry-pilot", "ferry-pilot")
}

fn run(bin: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(bin).args(args).output()?)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A failure whose message carries `cause` exactly once.
fn fails_saying_once(out: &Output, cause: &str) {
    let t = text(out);
    assert!(!out.status.success(), "succeeded: {t}");
    assert_eq!(t.matches(cause).count(), 1, "{cause:?} not said once: {t}");
}

#[test]
fn errors_say_their_cause_once() -> Result<()> {
    let missing = "/nonexistent/ferry-cli-test.yaml";
    let enoent = "No such file or directory";
    fails_saying_once(
        &run(&ferry_bin(), &["sidecar", "--config", missing])?,
        enoent,
    );
    let pilot = pilot_bin();
    fails_saying_once(&run(&pilot, &["serve", "--config", missing])?, enoent);
    fails_saying_once(&run(&pilot, &["analyze", missing])?, enoent);
    fails_saying_once(&run(&pilot, &["inject", "-f", missing])?, enoent);

    // A bootstrap with a bad regex: the field and the parser's reason, once.
    let dir = ferry_tests::proxy::TempDir::new("cli-regex")?;
    let bootstrap = dir.path().join("bad.yaml");
    std::fs::write(
        &bootstrap,
        ferry_tests::proxy::Bootstrap::new()
            .listener(ferry_tests::proxy::http_listener(
                "l",
                1,
                vec![serde_json::json!({
                    "match": {"safe_regex": {"regex": "/a(("}},
                    "direct_response": {"status": 200}
                })],
            ))
            .render(),
    )?;
    let out = run(
        &ferry_bin(),
        &[
            "sidecar",
            "--config",
            bootstrap.to_str().unwrap_or_default(),
        ],
    )?;
    fails_saying_once(&out, "unclosed group");
    fails_saying_once(&out, "safe_regex.regex");
    Ok(())
}

#[test]
fn every_binary_answers_version() -> Result<()> {
    for (bin, name) in [(ferry_bin(), "ferry"), (pilot_bin(), "ferry-pilot")] {
        let out = run(&bin, &["--version"])?;
        ensure!(out.status.success(), "{name} --version: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
    }
    Ok(())
}

#[test]
fn gateway_help_gives_the_gateway_node_id() -> Result<()> {
    let gateway = text(&run(&ferry_bin(), &["gateway", "--help"])?);
    assert!(
        gateway.contains("`router~$INSTANCE_IP~") && !gateway.contains("sidecar~"),
        "{gateway}"
    );
    let sidecar = text(&run(&ferry_bin(), &["sidecar", "--help"])?);
    assert!(sidecar.contains("`sidecar~$INSTANCE_IP~"), "{sidecar}");
    Ok(())
}

/// `proxy/src/demo/bootstrap.yaml`, which the README links, is fed to
/// `ferry sidecar` unchanged (in a pod of its own, so its fixed ports are
/// free) and answers on its listener.
#[test]
fn the_demo_bootstrap_runs_as_is() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("demo")?;
    let config = repo().join("proxy/src/demo/bootstrap.yaml");
    let sidecar = pod
        .cmd(ferry_bin())
        .args(["sidecar", "--config"])
        .arg(&config)
        .label("sidecar")
        .spawn()?;
    pod.wait_port(10000, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("{e}: {}", sidecar.logs().stderr))?;
    let answer = pod.http_get(([127, 0, 0, 1], 10000).into(), "demo", "/ferry", &[])?;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "answered by ferry itself\n");
    // Its admin is where the file says.
    let ready = pod.http_get(([127, 0, 0, 1], 9901).into(), "admin", "/ready", &[])?;
    assert_eq!(ready.body.trim(), "LIVE", "{ready:?}");
    Ok(())
}

/// Istio's bookinfo samples define `reviews` in several files: each
/// IST0109 finding names the other definitions with their files, never the
/// same name over and over.
#[test]
fn conflicts_name_the_other_files() -> Result<()> {
    let out = run(
        &pilot_bin(),
        &[
            "analyze",
            repo().join("samples/bookinfo").to_str().unwrap_or_default(),
        ],
    )?;
    let t = text(&out);
    let line = t
        .lines()
        .find(|l| l.contains("IST0109") && l.contains("virtual-service-all-v1.yaml:12"))
        .unwrap_or_else(|| panic!("no IST0109 for reviews in virtual-service-all-v1.yaml: {t}"));
    for other in [
        "virtual-service-reviews-50-v3.yaml:1)",
        "virtual-service-reviews-test-v2.yaml:1)",
        "virtual-service-reviews-v3.yaml:1)",
    ] {
        assert!(line.contains(other), "{other} not named: {line}");
    }
    // The finding's own file is not listed among the others.
    assert_eq!(
        line.matches("virtual-service-all-v1.yaml").count(),
        1,
        "{line}"
    );
    assert!(
        line.contains("`kubectl apply` keeps the last one applied"),
        "{line}"
    );
    Ok(())
}
