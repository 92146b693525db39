//! `layered_runtime` compared with Envoy 1.40: the static layer of
//! istio-agent's bootstrap (`bootstrap-default_golden.json`) on a listener
//! of our own, with the fragment flag as istio-agent sets it (false: the
//! fragment is stripped before routing and forwarding) and at Envoy's
//! default (true: 400), over HTTP/1.1 and over HTTP/2 (a `:path` with '#',
//! written frame by frame); a route's `runtime_fraction` reading the layer's
//! value for its `runtime_key`; `/runtime` listing the layers as Envoy's
//! does; a refused
//! key failing start-up by name.
//!
//! Envoy comes from `ferry_tests::envoy`; without it the comparisons fail.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, curl, free_port, http_listener, local, read_response,
};
use serde_json::{Value, json};

/// The golden's `layered_runtime`, with the fragment flag set to `flag`.
fn golden_runtime(flag: bool) -> Result<Value> {
    let p = ferry_tests::istio_material(
        "istio-config-dumps/istio-upstream-testdata/bootstrap-default_golden.json",
    )?;
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
    let mut lr = golden["layered_runtime"].clone();
    let layer = &mut lr["layers"][0]["static_layer"];
    anyhow::ensure!(
        layer["envoy.reloadable_features.http_reject_path_with_fragment"] == json!(false),
        "the golden no longer sets the fragment flag: {lr}"
    );
    layer["envoy.reloadable_features.http_reject_path_with_fragment"] = json!(flag);
    // A route below reads this key.
    layer["ferry.test.route_share"] = json!(0);
    Ok(lr)
}

/// One listener: `/a` to the echo backend, the 0 % share of `/shared`
/// (by runtime) too, everything else a direct 404.
fn config(port: u16, backend: u16, runtime: Value) -> Value {
    let routes = vec![
        json!({"match": {"path": "/a"}, "route": {"cluster": "echo"}}),
        json!({"match": {"path": "/shared", "runtime_fraction": {
            "default_value": {"numerator": 100, "denominator": "HUNDRED"},
            "runtime_key": "ferry.test.route_share"}},
            "route": {"cluster": "echo"}}),
        json!({"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "other"}}}),
    ];
    let b = Bootstrap::new()
        .listener(http_listener("rt", port, routes))
        .static_cluster("echo", &[backend], Upstream::Http1);
    let mut doc: Value = serde_json::from_str(&b.render()).unwrap_or_default();
    doc["layered_runtime"] = runtime;
    doc
}

/// What a client sees: the status, and the path the backend received
/// (none for a local answer).
fn ask(port: u16, target: &str) -> Result<(u16, Option<String>)> {
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )?;
    let r = read_response(&mut BufReader::new(s))?;
    let path = match r.status {
        200 => Some(
            r.json()?["path"]
                .as_str()
                .context("the backend's answer has no path")?
                .to_string(),
        ),
        _ => None,
    };
    Ok((r.status, path))
}

/// The same over HTTP/2 (prior knowledge), with `target` as the `:path` byte for byte:
/// the frames are written here, since HTTP/2 clients drop a fragment before sending.
/// The answer's status is read from the first field of its header block (a static
/// table index, as both encoders send the common statuses); a reset of the stream is
/// status 0.
fn ask_h2(port: u16, target: &str) -> Result<(u16, Option<String>)> {
    use std::io::Read;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    anyhow::ensure!(target.len() < 127, "a short target");
    // :method GET, :scheme http (indexed), :path and :authority (literal, not indexed).
    let mut block = vec![0x82, 0x86, 0x04, target.len() as u8];
    block.extend_from_slice(target.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'x']);
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
    s.write_all(&frame(4, 0, 0, &[]))?;
    s.write_all(&frame(1, 0x5, 1, &block))?;
    let (mut status, mut body) = (None, Vec::new());
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        match (kind, stream) {
            (4, 0) if flags & 1 == 0 => s.write_all(&frame(4, 1, 0, &[]))?,
            (1, 1) => {
                // Dynamic table size updates (001xxxxx) may come first.
                let first = payload
                    .iter()
                    .find(|b| *b & 0xe0 != 0x20)
                    .copied()
                    .unwrap_or_default();
                status = Some(match first & 0x7f {
                    8 => 200,
                    9 => 204,
                    12 => 400,
                    13 => 404,
                    14 => 500,
                    _ => anyhow::bail!("a status not from the static table: {payload:?}"),
                });
            }
            (0, 1) => body.extend_from_slice(&payload),
            (3, 1) => return Ok((0, None)),
            (7, _) => anyhow::bail!("GOAWAY before an answer"),
            _ => {}
        }
        if stream == 1 && flags & 1 == 1 && matches!(kind, 0 | 1) {
            break;
        }
    }
    let status = status.context("no header block")?;
    let path = match status {
        200 => Some(
            serde_json::from_slice::<Value>(&body)?["path"]
                .as_str()
                .context("the backend's answer has no path")?
                .to_string(),
        ),
        _ => None,
    };
    Ok((status, path))
}

const TARGETS: [&str; 4] = ["/a", "/a#frag", "/a?q=1#frag", "/shared"];

/// Each target over HTTP/1.1, then over HTTP/2.
fn answers(port: u16) -> Result<Vec<(u16, Option<String>)>> {
    let mut out: Vec<_> = TARGETS
        .iter()
        .map(|t| ask(port, t))
        .collect::<Result<_>>()?;
    for t in TARGETS {
        out.push(ask_h2(port, t).with_context(|| format!("HTTP/2 {t}"))?);
    }
    Ok(out)
}

#[test]
fn fragment_flag_and_runtime_fraction_behave_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let bin = envoy::require_bin()?;
    let backend = App::http("echo", &[])?;
    for flag in [false, true] {
        let runtime = golden_runtime(flag)?;
        let port = free_port();
        let cfg = config(port, backend.port, runtime);
        let ferry = Ferry::start(&serde_json::to_string(&cfg)?)?;
        let ours = answers(port).with_context(|| ferry.log())?;
        drop(ferry);
        let eport = free_port();
        let envoy = Envoy::start(
            &bin,
            &config(eport, backend.port, golden_runtime(flag)?),
            eport,
        )?;
        let theirs = answers(eport).with_context(|| envoy.log())?;
        assert_eq!(ours, theirs, "flag {flag}: Ferry and Envoy answer alike");
        // What Envoy does, spelled out.
        let expect_a = if flag {
            (400, None)
        } else {
            (200, Some("/a".to_string()))
        };
        assert_eq!(ours[1], expect_a, "flag {flag}: /a#frag");
        let expect_q = if flag {
            (400, None)
        } else {
            (200, Some("/a?q=1".to_string()))
        };
        assert_eq!(ours[2], expect_q, "flag {flag}: /a?q=1#frag");
        // The same over HTTP/2.
        assert_eq!(ours[5], expect_a, "flag {flag}: HTTP/2 /a#frag");
        assert_eq!(ours[6], expect_q, "flag {flag}: HTTP/2 /a?q=1#frag");
        // The layer's 0 overrides the route's 100 % default.
        assert_eq!(ours[3], (404, None), "runtime_fraction reads the layer");
    }
    Ok(())
}

#[test]
fn admin_runtime_lists_the_layers_and_refused_keys_fail_start_up() -> Result<()> {
    let _lock = RunLock::shared();
    let backend = App::http("echo", &[])?;
    let port = free_port();
    let ferry = Ferry::start(&serde_json::to_string(&config(
        port,
        backend.port,
        golden_runtime(false)?,
    ))?)?;
    let mut s = TcpStream::connect(local(ferry.admin))?;
    write!(
        s,
        "GET /runtime HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )?;
    let r = read_response(&mut BufReader::new(s))?;
    let v = r.json()?;
    assert_eq!(v["layers"], json!(["global config", "admin"]));
    let e = &v["entries"]["envoy.reloadable_features.http_reject_path_with_fragment"];
    assert_eq!(e["final_value"], json!("false"), "{v}");
    assert_eq!(e["layer_values"], json!(["false", ""]), "{v}");
    assert_eq!(
        v["entries"]["re2.max_program_size.error_level"]["final_value"],
        json!("32768")
    );
    // Envoy prints the same layers and entries for the same layer.
    let bin = envoy::require_bin()?;
    let eport = free_port();
    let envoy = Envoy::start(
        &bin,
        &config(eport, backend.port, golden_runtime(false)?),
        eport,
    )?;
    // Envoy's admin answers chunked: curl reads it.
    let out = curl(&["-s", &format!("http://{}/runtime", local(envoy.admin()))])?;
    let theirs: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v, theirs, "/runtime as Envoy prints it");
    drop(envoy);
    let log = ferry.log();
    assert!(
        log.contains("envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update"),
        "an inert key is reported by name:\n{log}"
    );
    drop(ferry);

    let mut runtime = golden_runtime(false)?;
    runtime["layers"][0]["static_layer"]["upstream.healthy_panic_threshold.echo"] = json!(0);
    let mut bad = Ferry::spawn(
        &serde_json::to_string(&config(free_port(), backend.port, runtime))?,
        &[],
    )?;
    let status = bad.wait_exit(Duration::from_secs(10))?;
    assert!(!status.success());
    let log = bad.log();
    assert!(
        log.contains("upstream.healthy_panic_threshold.echo") && log.contains("not supported"),
        "the refused key is named:\n{log}"
    );
    Ok(())
}
