//! The agent's DNS proxy in the netns bed: a pod whose resolver is another
//! pod (`dns_server.py`, which would answer mesh names wrongly if asked) gets
//! `ferry iptables --redirect-dns` and a Ferry sidecar with
//! `ISTIO_META_DNS_CAPTURE=true`, fed by ferry-pilot's name table (NDS).
//! The app's queries to its resolver, over UDP and TCP, are answered by the
//! sidecar: a Service by its full, short and search-expanded names (its
//! cluster IP), a ServiceEntry host (its address); an external name is
//! forwarded to the resolver, which sees the query come from the pod; an
//! unknown name gets the resolver's NXDOMAIN; a ServiceEntry added later is
//! answered once ferry-pilot pushes the new table.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_tests::istio::{App, Workload, agent_sidecar, bootstrap, serve_pilot};
use ferry_tests::netns::{self, Mesh, Pod, Proc, ferry_bin};
use ferry_tests::proxy::apps_dir;

const RESOLVER_PORT: u16 = 53;

fn objects(sleep_ip: std::net::Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio-injection: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: sleep, namespace: default, labels: {{app: sleep, version: v1}}}}\n\
         spec: {{serviceAccountName: sleep, containers: [{{name: sleep, image: sleep}}]}}\nstatus: {{podIP: {sleep_ip}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\n\
         spec: {{clusterIP: 10.96.0.7, selector: {{app: reviews}}, ports: [{{name: http, port: 9080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: other}}\n\
         spec: {{clusterIP: 10.96.0.8, selector: {{app: ratings}}, ports: [{{name: http, port: 9080}}]}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: default}}\n\
         spec: {{hosts: [api.external.test], addresses: [240.240.0.10], location: MESH_EXTERNAL, resolution: NONE, ports: [{{number: 443, name: tls, protocol: TLS}}]}}\n"
    )
}

/// One question from `pod` to `server` as its resolver library would send
/// it: `rcode=… aa=… answers=…`.
fn ask(pod: &Pod, server: &str, name: &str, proto: &str, qtype: &str) -> Result<String> {
    let out = pod
        .cmd("python3")
        .arg(apps_dir().join("dns_client.py"))
        .args([server, name, proto, qtype])
        .timeout(Duration::from_secs(15))
        .run()?;
    Ok(out.trim().to_string())
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_sidecar_answers_the_pods_dns() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let istiod = mesh.pod("istiod")?;
    let sleep = mesh.pod("sleep")?;
    let resolver = mesh.pod("resolver")?;
    let dir = std::env::temp_dir().join(format!("ferry-dns-{}", istiod.ns_name()));
    let cfg = dir.join("config");
    std::fs::create_dir_all(&cfg)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let cleanup = scopeguard(&dir);
    std::fs::write(cfg.join("objects.yaml"), objects(sleep.ip()))?;
    let pilot = serve_pilot(&istiod, &cfg)?;
    // The pod's resolver: answers mesh names wrongly, so an answer that
    // did not come from the sidecar shows.
    let upstream = resolver
        .cmd("python3")
        .arg("-u")
        .arg(apps_dir().join("dns_server.py"))
        .arg(RESOLVER_PORT.to_string())
        .args([
            "www.example.org=203.0.113.7",
            "reviews.default.svc.cluster.local=198.51.100.1",
        ])
        .label("resolver")
        .spawn()?;
    resolver.wait_port(RESOLVER_PORT, Duration::from_secs(15))?;
    let rip = resolver.ip().to_string();

    let resolv_conf = dir.join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        format!(
            "nameserver {rip}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        ),
    )?;
    std::fs::set_permissions(&resolv_conf, std::fs::Permissions::from_mode(0o644))?;
    let out = sleep
        .cmd(ferry_bin())
        .arg("iptables")
        .arg("--resolv-conf")
        .arg(&resolv_conf)
        .env("ISTIO_META_DNS_CAPTURE", "true")
        .output()?;
    ensure!(
        out.status.success(),
        "ferry iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = Workload {
        name: "sleep",
        namespace: "default",
        app: "sleep",
        version: "v1",
        service_account: "sleep",
        injected: true,
        runs: App::None,
    };
    let boot = dir.join("sleep.yaml");
    std::fs::write(&boot, bootstrap(&w, sleep.ip(), istiod.ip()))?;
    std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o644))?;
    let sidecar: Proc = agent_sidecar(&sleep, &boot, istiod.ip())
        .arg("--resolv-conf")
        .arg(&resolv_conf)
        .env("ISTIO_META_DNS_CAPTURE", "true")
        .env("POD_NAMESPACE", "default")
        .label("sidecar")
        .spawn()?;
    sleep.wait_sidecar_ready(&sidecar, Duration::from_secs(30))?;
    let diag = || {
        format!(
            "\n--- sidecar:\n{}\n--- resolver:\n{}\n--- pilot:\n{}",
            sidecar.logs().stderr,
            upstream.logs().stdout,
            pilot.logs().stderr
        )
    };
    // The first table arrives over ADS.
    wait_for("the name table", Duration::from_secs(15), || {
        Ok(ask(
            &sleep,
            &rip,
            "reviews.default.svc.cluster.local",
            "udp",
            "A",
        )?
        .contains("A:10.96.0.7"))
    })
    .with_context(diag)?;

    // Readiness waits for the table, as the agent's.
    let (code, _) = ferry_tests::istio::curl(&sleep, "http://127.0.0.1:15021/healthz/ready", &[])?;
    ensure!(code == 200, "not ready with a name table: {code}");
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "reviews.default.svc.cluster.local",
            "udp",
            "A",
            "rcode=0 aa=1 answers=A:10.96.0.7",
        ),
        ("reviews", "udp", "A", "rcode=0 aa=1 answers=A:10.96.0.7"),
        (
            "reviews.default",
            "udp",
            "A",
            "rcode=0 aa=1 answers=A:10.96.0.7",
        ),
        (
            "reviews.default.svc",
            "tcp",
            "A",
            "rcode=0 aa=1 answers=A:10.96.0.7",
        ),
        // `reviews.default` after the resolver appended the first search
        // domain: a CNAME to the name the table knows.
        (
            "reviews.default.default.svc.cluster.local",
            "udp",
            "A",
            "rcode=0 aa=1 answers=CNAME:reviews.default.,A:10.96.0.7",
        ),
        // Another namespace's service: not by its bare short name.
        (
            "ratings.other",
            "udp",
            "A",
            "rcode=0 aa=1 answers=A:10.96.0.8",
        ),
        (
            "api.external.test",
            "udp",
            "A",
            "rcode=0 aa=1 answers=A:240.240.0.10",
        ),
        (
            "api.external.test",
            "tcp",
            "A",
            "rcode=0 aa=1 answers=A:240.240.0.10",
        ),
        (
            "reviews.default.svc.cluster.local",
            "udp",
            "AAAA",
            "rcode=0 aa=1 answers=",
        ),
        // Forwarded to the pod's resolver, over the query's protocol.
        (
            "www.example.org",
            "udp",
            "A",
            "rcode=0 aa=1 answers=A:203.0.113.7",
        ),
        (
            "www.example.org",
            "tcp",
            "A",
            "rcode=0 aa=1 answers=A:203.0.113.7",
        ),
        ("nosuch.example.org", "udp", "A", "rcode=3 aa=1 answers="),
    ];
    for (name, proto, qtype, want) in cases {
        let got = ask(&sleep, &rip, name, proto, qtype)?;
        ensure!(
            got == *want,
            "{name} {qtype} over {proto}: {got}, want {want}{}",
            diag()
        );
    }
    let log = upstream.logs().stdout;
    let from = format!("from {}", sleep.ip());
    for line in [
        "query udp www.example.org. 1 ",
        "query tcp www.example.org. 1 ",
        "query udp nosuch.example.org. 1 ",
    ] {
        ensure!(
            log.lines()
                .any(|l| l.starts_with(line) && l.ends_with(&from)),
            "the resolver did not get {line:?} {from}:{}",
            diag()
        );
    }
    ensure!(
        !log.contains("reviews") && !log.contains("external.test"),
        "mesh names reached the resolver:{}",
        diag()
    );
    // The sidecar's own traffic is not captured: it reaches the resolver
    // directly (uid 1337).
    let direct = sleep
        .cmd("python3")
        .arg(apps_dir().join("dns_client.py"))
        .args([&rip, "reviews.default.svc.cluster.local", "udp", "A"])
        .as_uid(1337)
        .run()?;
    ensure!(
        direct.contains("A:198.51.100.1"),
        "uid 1337 was captured: {direct}"
    );

    // A ServiceEntry added later: answered once pushed.
    std::fs::write(
        cfg.join("later.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: later, namespace: default}\n\
         spec: {hosts: [later.external.test], addresses: [240.240.0.11], location: MESH_EXTERNAL, resolution: NONE, ports: [{number: 80, name: http, protocol: HTTP}]}\n",
    )?;
    wait_for("the pushed ServiceEntry", Duration::from_secs(20), || {
        Ok(ask(&sleep, &rip, "later.external.test", "udp", "A")?.contains("A:240.240.0.11"))
    })
    .with_context(diag)?;
    drop(cleanup);
    Ok(())
}

/// Removes the test's directory when dropped.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scopeguard(dir: &std::path::Path) -> Cleanup {
    Cleanup(dir.to_path_buf())
}

/// DNS capture rules are installed in one transaction (nat and raw), a
/// second run leaves exactly the same rules, a run without DNS capture
/// removes the DNS chains, and `--cleanup` removes everything.
#[test]
fn dns_capture_rules_are_idempotent_and_removable() -> Result<()> {
    if !netns::require_root() {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let pod = mesh.pod("pod")?;
    let dir = std::env::temp_dir().join(format!("ferry-dns-rules-{}", pod.ns_name()));
    std::fs::create_dir_all(&dir)?;
    let cleanup = scopeguard(&dir);
    let resolv_conf = dir.join("resolv.conf");
    std::fs::write(&resolv_conf, "nameserver 10.96.0.10\n")?;
    let run = |args: &[&str]| -> Result<()> {
        let out = pod
            .cmd(ferry_bin())
            .arg("iptables")
            .args(args)
            .arg("--resolv-conf")
            .arg(&resolv_conf)
            .output()?;
        ensure!(
            out.status.success(),
            "ferry iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let save = || -> Result<String> {
        let nat = pod.cmd("iptables-save").args(["-t", "nat"]).run()?;
        let raw = pod.cmd("iptables-save").args(["-t", "raw"]).run()?;
        // Counters and the generation comments differ between saves.
        Ok(format!("{nat}{raw}")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    };
    run(&["--redirect-dns"])?;
    let first = save()?;
    for rule in [
        "-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
        "-A ISTIO_INBOUND -s 10.96.0.10/32 -p udp -m udp --sport 53 -j CT --zone 1",
        "-A OUTPUT -j ISTIO_OUTPUT\n",
    ] {
        ensure!(first.contains(rule.trim_end()), "no {rule:?} in\n{first}");
    }
    run(&["--redirect-dns"])?;
    ensure!(save()? == first, "a second run changed the rules");
    run(&[])?;
    let plain = save()?;
    ensure!(
        !plain.contains("ISTIO_OUTPUT_DNS") && !plain.contains("CT --zone"),
        "DNS rules left behind:\n{plain}"
    );
    run(&["--redirect-dns"])?;
    run(&["--cleanup"])?;
    let after = save()?;
    ensure!(!after.contains("ISTIO"), "left after cleanup:\n{after}");
    drop(cleanup);
    Ok(())
}
