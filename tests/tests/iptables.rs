//! `ferry iptables` against real iptables inside pod namespaces: the chains it installs,
//! idempotency, cleanup, dry runs, and the traffic it actually redirects (outbound to 15001,
//! inbound to 15006) while the proxy's uid goes straight through.

use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Result, ensure};
use ferry_tests::netns::{self, Mesh, Pod, ferry_bin};

/// Fails clearly when the `ferry` binary found has no `iptables` subcommand (yet), instead of
/// letting every assertion below fail on an empty nat table.
fn check_subcommand() -> Result<()> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let bin = ferry_bin();
            let help = Command::new(&bin)
                .args(["iptables", "--help"])
                .output()
                .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
            if String::from_utf8_lossy(&help.stdout).contains("--proxy-uid") {
                Ok(())
            } else {
                Err(format!(
                    "{} has no `iptables` subcommand: build the current ferry-proxy \
                     (`cargo build -p ferry-proxy`)",
                    bin.display()
                ))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs `ferry iptables <args>` in `pod` as root.
fn ferry_iptables(pod: &Pod, args: &[&str]) -> Result<Output> {
    check_subcommand()?;
    Ok(pod.cmd(ferry_bin()).arg("iptables").args(args).output()?)
}

/// Runs `ferry iptables <args>` in `pod` and requires success.
fn apply(pod: &Pod, args: &[&str]) -> Result<()> {
    let out = ferry_iptables(pod, args)?;
    ensure!(
        out.status.success(),
        "ferry iptables {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The pod's nat table as `<save> -t nat` prints it, minus the timestamped comment lines and
/// packet counters (which traffic changes).
fn nat_table(pod: &Pod, save: &str) -> Result<String> {
    let text = pod.cmd(save).args(["-t", "nat"]).run()?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.rfind(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

fn nat(pod: &Pod) -> Result<String> {
    nat_table(pod, "iptables-save")
}

/// `curl -s http://<ip>:<port>/` from `pod`, optionally as `uid`; returns the body.
fn curl(pod: &Pod, uid: Option<u32>, ip: impl std::fmt::Display, port: u16) -> Result<String> {
    let url = format!("http://{ip}:{port}/");
    let mut cmd = pod.cmd("curl").args(["-q", "-sS", "--max-time", "5", &url]);
    if let Some(uid) = uid {
        cmd = cmd.as_uid(uid);
    }
    Ok(cmd.run()?)
}

#[test]
fn installs_istio_chains_and_jumps() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    apply(&pod, &[])?;
    let table = nat(&pod)?;
    for needle in [
        ":ISTIO_INBOUND -",
        ":ISTIO_IN_REDIRECT -",
        ":ISTIO_OUTPUT -",
        ":ISTIO_REDIRECT -",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "--dports 15000,15001,15004,15006,15008,15020,15021,15090 -j RETURN",
    ] {
        assert!(table.contains(needle), "missing {needle:?} in:\n{table}");
    }
    // Autodetection must not have instantiated legacy tables beside the nft ones.
    let legacy = pod.cmd("cat").arg("/proc/net/ip_tables_names").run()?;
    assert!(
        !legacy.lines().any(|t| t == "nat"),
        "legacy nat table created"
    );
    Ok(())
}

#[test]
fn running_twice_gives_the_same_rules() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    apply(&pod, &[])?;
    let first = nat(&pod)?;
    apply(&pod, &[])?;
    assert_eq!(nat(&pod)?, first);

    // Other options replace the rules rather than adding to them, and going back restores
    // exactly the first rule set.
    apply(&pod, &["-o", "3306", "-x", "10.0.0.0/8", "-b", "9080"])?;
    let other = nat(&pod)?;
    assert_ne!(other, first);
    assert_eq!(other.matches("-j ISTIO_OUTPUT").count(), 1, "{other}");
    assert_eq!(other.matches("-j ISTIO_INBOUND").count(), 1, "{other}");
    apply(&pod, &[])?;
    assert_eq!(nat(&pod)?, first);
    Ok(())
}

#[test]
fn cleanup_removes_everything_and_is_idempotent() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    // Somebody else's rule in a built-in chain must survive both install and cleanup.
    pod.cmd("iptables")
        .args([
            "-w", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN",
        ])
        .run()?;
    let before = nat(&pod)?;

    // Cleanup on a pod that never had the rules is a no-op, not an error.
    apply(&pod, &["--cleanup"])?;
    assert_eq!(nat(&pod)?, before);

    apply(&pod, &[])?;
    let installed = nat(&pod)?;
    assert!(installed.contains("ISTIO_"));
    // `--cleanup --dry-run` (the README's `[--dry-run] [--cleanup]`) prints
    // what removing the current rules would run, and removes nothing.
    let out = ferry_iptables(&pod, &["--cleanup", "--dry-run"])?;
    ensure!(
        out.status.success(),
        "--cleanup --dry-run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let removal = String::from_utf8_lossy(&out.stdout);
    assert!(
        removal.starts_with("*nat\n")
            && removal.contains("-D OUTPUT -p tcp -j ISTIO_OUTPUT")
            && removal.contains("-X ISTIO_OUTPUT")
            && removal.ends_with("COMMIT\n"),
        "{removal}"
    );
    assert_eq!(nat(&pod)?, installed, "a dry run changed the rules");
    apply(&pod, &["--cleanup"])?;
    let after = nat(&pod)?;
    assert!(!after.contains("ISTIO_"), "{after}");
    assert_eq!(after, before);
    apply(&pod, &["--cleanup"])?;
    assert_eq!(nat(&pod)?, before);
    Ok(())
}

#[test]
fn dry_run_prints_rules_and_changes_nothing() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    let before = nat(&pod)?;
    let out = ferry_iptables(&pod, &["--dry-run"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8(out.stdout)?;
    assert!(rules.contains("*nat\n:ISTIO_INBOUND - [0:0]\n"), "{rules}");
    assert!(
        rules.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n"),
        "{rules}"
    );
    assert_eq!(nat(&pod)?, before);

    // The printed text is valid iptables-restore input.
    pod.cmd("iptables-restore")
        .args(["--test", "--noflush"])
        .stdin(rules)
        .run()?;
    assert_eq!(nat(&pod)?, before);
    Ok(())
}

#[test]
fn bad_flags_are_rejected_by_name_and_change_nothing() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    let before = nat(&pod)?;
    for (args, flag) in [
        (["-x", "10.0.0.0/40"], "--exclude-outbound-ip-ranges"),
        (["-i", "not-a-cidr"], "--include-outbound-ip-ranges"),
        (["-d", "70000"], "--exclude-inbound-ports"),
        (["-b", "http"], "--include-inbound-ports"),
        (["-o", "0"], "--exclude-outbound-ports"),
    ] {
        let out = ferry_iptables(&pod, &args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    assert_eq!(nat(&pod)?, before);
    Ok(())
}

#[test]
fn ipv6_programs_ip6tables_too() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    apply(&pod, &["--ipv6", "-x", "fd00:dead::/32,10.9.0.0/16"])?;
    let v6 = nat_table(&pod, "ip6tables-save")?;
    assert!(v6.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT"), "{v6}");
    assert!(
        v6.contains("-A ISTIO_OUTPUT -d fd00:dead::/32 -j RETURN"),
        "{v6}"
    );
    assert!(
        v6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
        "{v6}"
    );
    assert!(!v6.contains("10.9.0.0"), "{v6}");
    let v4 = nat(&pod)?;
    assert!(
        v4.contains("-A ISTIO_OUTPUT -d 10.9.0.0/16 -j RETURN"),
        "{v4}"
    );
    assert!(!v4.contains("fd00"), "{v4}");

    apply(&pod, &["--cleanup"])?;
    assert!(!nat_table(&pod, "ip6tables-save")?.contains("ISTIO_"));
    assert!(!nat(&pod)?.contains("ISTIO_"));
    Ok(())
}

#[test]
fn legacy_backend_on_request_and_found_again_for_cleanup() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    apply(&pod, &["--iptables-bin", "iptables-legacy"])?;
    let legacy = nat_table(&pod, "iptables-legacy-save")?;
    assert!(
        legacy.contains("-A OUTPUT -p tcp -j ISTIO_OUTPUT"),
        "{legacy}"
    );
    assert!(!nat(&pod)?.contains("ISTIO_"), "rules went to nft as well");
    // Without --iptables-bin, the flavour holding Ferry's chains is the one cleaned.
    apply(&pod, &["--cleanup"])?;
    assert!(!nat_table(&pod, "iptables-legacy-save")?.contains("ISTIO_"));
    Ok(())
}

#[test]
fn outbound_is_redirected_except_for_the_proxy_uid() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let app = mesh.pod("app")?;
    let dest = mesh.pod("dest")?;
    let _dest_server = dest.spawn_tag_server(8080, "dest")?;
    // Before the rules, the app reaches the destination directly.
    assert!(curl(&app, None, dest.ip(), 8080)?.starts_with("dest "));

    apply(&app, &[])?;
    let _capture = app.spawn_tag_server(15001, "outbound-capture")?;
    let _local = app.spawn_tag_server_on("127.0.0.1", 9000, "local")?;

    // The app's connection lands on 15001, which still knows where it was going.
    let captured = curl(&app, None, dest.ip(), 8080)?;
    assert!(captured.starts_with("outbound-capture "), "{captured}");
    assert!(
        captured.contains(&format!("orig={}:8080", dest.ip())),
        "{captured}"
    );

    // The proxy's uid goes straight to the real destination, from the pod's address.
    let direct = curl(&app, Some(1337), dest.ip(), 8080)?;
    assert!(direct.starts_with("dest "), "{direct}");
    assert!(direct.contains(&format!("peer={}:", app.ip())), "{direct}");

    // Loopback is never captured.
    let local = curl(&app, None, "127.0.0.1", 9000)?;
    assert!(local.starts_with("local "), "{local}");
    Ok(())
}

#[test]
fn outbound_exclusions_bypass_the_proxy() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let app = mesh.pod("app")?;
    let dest = mesh.pod("dest")?;
    let _http = dest.spawn_tag_server(8080, "dest-8080")?;
    let _db = dest.spawn_tag_server(3306, "dest-3306")?;
    let _capture = app.spawn_tag_server(15001, "outbound-capture")?;

    apply(&app, &["-o", "3306"])?;
    assert!(curl(&app, None, dest.ip(), 3306)?.starts_with("dest-3306 "));
    assert!(curl(&app, None, dest.ip(), 8080)?.starts_with("outbound-capture "));

    apply(&app, &["-x", &format!("{}/32", dest.ip())])?;
    assert!(curl(&app, None, dest.ip(), 8080)?.starts_with("dest-8080 "));

    apply(&app, &["-i", "192.0.2.0/24"])?;
    assert!(curl(&app, None, dest.ip(), 8080)?.starts_with("dest-8080 "));
    Ok(())
}

#[test]
fn inbound_is_redirected_except_proxy_and_excluded_ports() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let client = mesh.pod("client")?;
    let server = mesh.pod("server")?;
    let _app = server.spawn_tag_server(8080, "app")?;
    let _health = server.spawn_tag_server(15021, "health")?;
    let _capture = server.spawn_tag_server(15006, "inbound-capture")?;
    apply(&server, &[])?;

    let captured = curl(&client, None, server.ip(), 8080)?;
    assert!(captured.starts_with("inbound-capture "), "{captured}");
    assert!(
        captured.contains(&format!("orig={}:8080", server.ip())),
        "{captured}"
    );
    assert!(
        captured.contains(&format!("peer={}:", client.ip())),
        "{captured}"
    );

    // The proxy's own ports are never redirected.
    assert!(curl(&client, None, server.ip(), 15021)?.starts_with("health "));

    // An excluded port reaches the app directly; re-running replaces the previous rules.
    apply(&server, &["-d", "8080"])?;
    assert!(curl(&client, None, server.ip(), 8080)?.starts_with("app "));

    // Only the listed ports are captured.
    apply(&server, &["-b", "9999"])?;
    assert!(curl(&client, None, server.ip(), 8080)?.starts_with("app "));
    Ok(())
}

#[test]
fn own_pod_ip_hairpin_goes_inbound_only_for_the_proxy() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("app")?;
    let _app = pod.spawn_tag_server(9080, "app")?;
    let _inbound = pod.spawn_tag_server(15006, "inbound-capture")?;
    let _outbound = pod.spawn_tag_server(15001, "outbound-capture")?;
    apply(&pod, &[])?;

    // The app calling its own pod IP travels over lo and is left alone.
    assert!(curl(&pod, None, pod.ip(), 9080)?.starts_with("app "));

    // The proxy calling its own pod IP (an app reaching itself through a service) is sent
    // through the inbound side, as Istio does.
    let hairpin = curl(&pod, Some(1337), pod.ip(), 9080)?;
    assert!(hairpin.starts_with("inbound-capture "), "{hairpin}");
    assert!(
        hairpin.contains(&format!("orig={}:9080", pod.ip())),
        "{hairpin}"
    );

    // The proxy handing an inbound connection to the app from the passthrough source
    // 127.0.0.6 is not captured again.
    let url = format!("http://{}:9080/", pod.ip());
    let passthrough = pod
        .cmd("curl")
        .args([
            "-q",
            "-sS",
            "--max-time",
            "5",
            "--interface",
            "127.0.0.6",
            &url,
        ])
        .as_uid(1337)
        .run()?;
    assert!(passthrough.starts_with("app "), "{passthrough}");
    assert!(passthrough.contains("peer=127.0.0.6:"), "{passthrough}");
    Ok(())
}
