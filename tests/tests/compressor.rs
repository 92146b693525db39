//! `envoy.filters.http.compressor` (gzip, brotli, zstd) compared with Envoy
//! 1.40 header for header:
//!
//! - istio-agent's bootstrap (`bootstrap-default_golden.json`, only its
//!   Unix-socket paths moved to a temporary directory) starts, its ADS comes
//!   from ferry-pilot over the `xds-grpc` Unix socket, and its 15090
//!   `/stats/prometheus` listener answers compressed as Envoy does on the same
//!   bootstrap (encoding, `vary`, no `content-length`, a body that
//!   decompresses to Prometheus text);
//! - a compressor on an ordinary route: a small body, an excluded content
//!   type, strong and weak ETags, no or several accepted encodings, a route
//!   that disables the filter, and the counters under Envoy's names.
//!
//! Envoy comes from `ferry_tests::envoy`; without it the golden test fails
//! (it compares), and the route test runs Ferry's half only with a note,
//! except under `CI=true`, where a missing Envoy fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::proxy::{
    Bootstrap, Ferry, RunLock, StaticPilot, TempDir, accepts, curl, ferry_bin, free_port,
    http_listener, local, unix_relay,
};
use serde_json::{Value, json};

/// What a client sees of one compressed-or-not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: u16,
    content_encoding: Option<String>,
    vary: Option<String>,
    etag: Option<String>,
    has_content_length: bool,
    /// The body after undoing `content-encoding`.
    body: Vec<u8>,
}

fn decode(encoding: Option<&str>, raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match encoding {
        None => out.extend_from_slice(raw),
        Some("gzip") => {
            flate2::read::GzDecoder::new(raw).read_to_end(&mut out)?;
        }
        Some("br") => {
            brotli::Decompressor::new(raw, 4096).read_to_end(&mut out)?;
        }
        Some("zstd") => out = zstd::stream::decode_all(raw)?,
        Some(other) => bail!("unexpected content-encoding {other:?}"),
    }
    Ok(out)
}

/// `GET url` with curl (which undoes the chunking, not the encoding).
fn get(url: &str, accept: Option<&str>) -> Result<Seen> {
    let dir = TempDir::new("curl")?;
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let (hs, bs) = (h.display().to_string(), b.display().to_string());
    let mut args = vec!["--http1.1", "-D", &hs, "-o", &bs];
    let header;
    if let Some(a) = accept {
        header = format!("accept-encoding: {a}");
        args.extend(["-H", &header]);
    }
    args.push(url);
    curl(&args)?;
    let head = std::fs::read_to_string(&h)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let hdr = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let content_encoding = hdr("content-encoding");
    let raw = std::fs::read(&b)?;
    Ok(Seen {
        status,
        body: decode(content_encoding.as_deref(), &raw)
            .with_context(|| format!("decoding {url} ({accept:?})"))?,
        content_encoding,
        vary: hdr("vary"),
        etag: hdr("etag"),
        has_content_length: hdr("content-length").is_some(),
    })
}

// ------------------------------------------------------------- the golden

fn golden() -> Result<PathBuf> {
    ferry_tests::istio_material(
        "istio-config-dumps/istio-upstream-testdata/bootstrap-default_golden.json",
    )
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(child: &mut Child, port: u16, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !accepts(port) {
        if let Some(st) = child.try_wait()? {
            bail!(
                "exited ({st}) before port {port} listened:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "port {port} not listening:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What 15090 answers for each accepted encoding. (The golden's
/// `stats_matcher` keeps the compressors' own counters out of the stats, so
/// their names are compared on the ordinary route below.)
fn scrape() -> Result<Vec<Seen>> {
    let mut seen = Vec::new();
    for accept in [Some("gzip"), Some("br"), Some("zstd"), None] {
        let mut s = get("http://127.0.0.1:15090/stats/prometheus", accept)?;
        let text = String::from_utf8_lossy(&s.body);
        if !text.contains("# TYPE ") {
            bail!("{accept:?}: not Prometheus text: {:.200}", text);
        }
        // The contents are each proxy's own counters.
        s.body.clear();
        // Uncompressed, the answer keeps its admin server's framing (Envoy's
        // admin streams it chunked, Ferry's sends a length).
        if s.content_encoding.is_none() {
            s.has_content_length = false;
        }
        seen.push(s);
    }
    Ok(seen)
}

#[test]
fn golden_bootstrap_starts_and_its_stats_listener_compresses_as_envoy() -> Result<()> {
    // 15000, 15021 and 15090 are the golden's own ports.
    let _lock = RunLock::exclusive();
    let bin = envoy::require_bin()?;
    let dir = TempDir::new("golden")?;
    let text = std::fs::read_to_string(golden()?)?;
    let xds = dir.path().join("XDS");
    let sds = dir.path().join("test.sock");
    // Only the Unix-socket paths move.
    let text = text
        .replace("\"/tmp/XDS\"", &format!("{:?}", xds.display().to_string()))
        .replace(
            "\"./var/run/secrets/workload-spiffe-uds/test.sock\"",
            &format!("{:?}", sds.display().to_string()),
        );
    let cfg = dir.path().join("bootstrap.json");
    std::fs::write(&cfg, &text)?;
    let pilot = StaticPilot::start(dir.path())?;
    let pilot_port = pilot.port;
    unix_relay(&xds, move || Ok(TcpStream::connect(local(pilot_port))?))?;

    let ferry_log = dir.path().join("ferry.log");
    let mut ferry = Killed(
        Command::new(ferry_bin()?)
            .args(["sidecar", "--config"])
            .arg(&cfg)
            // The golden's own listeners take 15021 and 15090 (the built-in
            // endpoints stand aside by themselves); the agent's status port off.
            .args(["--status-addr", "off"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&ferry_log)?)
            .spawn()?,
    );
    wait_port(&mut ferry.0, 15090, &ferry_log)?;
    let ours = scrape().with_context(|| {
        format!(
            "through ferry:\n{}",
            std::fs::read_to_string(&ferry_log).unwrap_or_default()
        )
    })?;
    drop(ferry);
    // The listeners must be gone before Envoy binds them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while accepts(15090) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }

    let envoy_log = dir.path().join("envoy.log");
    let mut envoy = Killed(
        Command::new(&bin)
            .arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .args(["--base-id", &free_port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&envoy_log)?)
            .spawn()?,
    );
    wait_port(&mut envoy.0, 15090, &envoy_log)?;
    let theirs = scrape().with_context(|| {
        format!(
            "through envoy:\n{}",
            std::fs::read_to_string(&envoy_log).unwrap_or_default()
        )
    })?;
    assert_eq!(ours, theirs, "15090 answers alike");
    let encodings: Vec<_> = ours.iter().map(|s| s.content_encoding.as_deref()).collect();
    assert_eq!(encodings, [Some("gzip"), Some("br"), Some("zstd"), None]);
    Ok(())
}

// --------------------------------------------------------- an ordinary route

/// An HTTP/1.1 backend: `/LEN/TYPE/ETAG` answers LEN bytes of text with
/// `content-type` TYPE (`_` for `/`) and, unless ETAG is `-`, that `etag`
/// (`weak` gives `W/"v1"`, `strong` gives `"v1"`).
fn backend() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else { return };
                let mut r = BufReader::new(c);
                loop {
                    let mut line = String::new();
                    if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                        return;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                    loop {
                        let mut h = String::new();
                        if !matches!(r.read_line(&mut h), Ok(n) if n > 0) {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                    }
                    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                    let len: usize = parts.first().and_then(|p| p.parse().ok()).unwrap_or(0);
                    let ctype = parts.get(1).unwrap_or(&"text_html").replace('_', "/");
                    let etag = match parts.get(2).copied() {
                        Some("weak") => "etag: W/\"v1\"\r\n",
                        Some("strong") => "etag: \"v1\"\r\n",
                        _ => "",
                    };
                    let body: Vec<u8> = (0..len).map(|i| b"abcdefgh "[i % 9]).collect();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\n{etag}content-length: {len}\r\n\r\n"
                    );
                    if w.write_all(head.as_bytes()).is_err() || w.write_all(&body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

fn compressor_filter(name: &str, library: &str, extra: Value) -> Value {
    let lib_type = match library {
        "gzip" => "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip",
        "brotli" => "type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli",
        _ => "type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd",
    };
    let mut tc = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
        "compressor_library": {"name": name, "typed_config": {"@type": lib_type}},
    });
    if let (Some(o), Some(e)) = (tc.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    json!({"name": name, "typed_config": tc})
}

fn route_config(port: u16, backend: u16) -> Value {
    let routes = vec![
        json!({"match": {"prefix": "/off/"}, "route": {"cluster": "b", "prefix_rewrite": "/"},
               "typed_per_filter_config": {"gz": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.CompressorPerRoute",
                   "disabled": true}}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "b"}}),
    ];
    let mut l = http_listener("c", port, routes);
    let hcm = &mut l["filter_chains"][0]["filters"][0]["typed_config"];
    let router = hcm["http_filters"][0].clone();
    hcm["http_filters"] = json!([
        compressor_filter(
            "br",
            "brotli",
            json!({"response_direction_config": {
            "common_config": {"min_content_length": 100, "content_type": ["text/html", "application/json"]}}})
        ),
        compressor_filter(
            "gz",
            "gzip",
            json!({"response_direction_config": {
            "common_config": {"min_content_length": 100}}})
        ),
        router,
    ]);
    let doc = Bootstrap::new()
        .listener(l)
        .static_cluster("b", &[backend], ferry_tests::proxy::Upstream::Http1)
        .render();
    serde_json::from_str(&doc).unwrap_or(Value::Null)
}

/// Each request: (path, accept-encoding).
const CASES: &[(&str, Option<&str>)] = &[
    ("/400/text_html/-", Some("gzip")),
    ("/400/text_html/-", Some("br")),
    ("/400/text_html/-", Some("gzip;q=0.5, br;q=0.8")),
    ("/400/text_html/-", Some("br;q=0, *")),
    ("/400/text_html/-", Some("*")),
    ("/400/text_html/-", Some("identity")),
    ("/400/text_html/-", Some("deflate")),
    ("/400/text_html/-", None),
    // Under min_content_length.
    ("/50/text_html/-", Some("gzip")),
    // Not in brotli's list, in gzip's default one.
    ("/400/text_css/-", Some("br, gzip;q=0.9")),
    // In neither.
    ("/400/image_png/-", Some("gzip")),
    ("/400/text_html/strong", Some("gzip")),
    ("/400/text_html/weak", Some("gzip")),
    // The route turns gzip off (brotli still runs).
    ("/off/400/text_html/-", Some("gzip")),
    ("/off/400/text_html/-", Some("br")),
];

fn observe_route(port: u16) -> Result<Vec<Seen>> {
    CASES
        .iter()
        .map(|(p, a)| {
            get(&format!("http://127.0.0.1:{port}{p}"), *a).with_context(|| format!("{p} {a:?}"))
        })
        .collect()
}

#[test]
fn compressor_on_a_route_answers_as_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let b = backend()?;
    let port = free_port();
    let cfg = route_config(port, b);
    let ferry = Ferry::start(&cfg.to_string())?;
    let ours = observe_route(port).with_context(|| format!("ferry:\n{}", ferry.log()))?;
    // What each case must be, whatever Envoy says.
    let enc: Vec<_> = ours.iter().map(|s| s.content_encoding.as_deref()).collect();
    assert_eq!(
        enc,
        [
            Some("gzip"),
            Some("br"),
            Some("br"),
            Some("gzip"),
            Some("br"),
            None,
            None,
            None,
            None,
            Some("gzip"),
            None,
            Some("gzip"),
            Some("gzip"),
            None,
            Some("br"),
        ]
    );
    for (s, (p, _)) in ours.iter().zip(CASES) {
        let len: usize = p
            .trim_start_matches("/off")
            .split('/')
            .nth(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        assert_eq!(s.body.len(), len, "{p}: the body decompresses whole");
        assert_eq!(s.has_content_length, s.content_encoding.is_none(), "{p}");
    }
    let stats = ferry.stats()?;
    assert_eq!(
        stats
            .get("http.c.compressor.gz.gzip.response.compressed")
            .copied(),
        Some(5),
        "{stats:#?}"
    );
    drop(ferry);
    let Some(bin) = envoy::bin()? else {
        return Ok(());
    };
    let port = free_port();
    let e = Envoy::start(&bin, &route_config(port, b), port)?;
    let theirs = observe_route(port).with_context(|| format!("envoy:\n{}", e.log()))?;
    for ((a, b), case) in ours.iter().zip(&theirs).zip(CASES) {
        assert_eq!(a, b, "{case:?}: ferry (left) and envoy (right)");
    }
    assert_eq!(e.stat("http.c.compressor.gz.gzip.response.compressed")?, 5);
    Ok(())
}
