//! Fuzzing of protocol detection (`ferry_proxy::detect`: `inspect`, which
//! wraps the ClientHello parser and the HTTP inspector, and `h2_preface`).
//! Inputs: real ClientHellos (written by rustls as a client, and
//! hand-assembled ones with chosen SNI, ALPN, session id, cipher list,
//! unknown and duplicated extensions), mutated (bit flips, length fields
//! set to extremes, spliced ranges, records declared up to 64 KiB), HTTP/1
//! request lines built from pieces, the HTTP/2 preface with its prefixes
//! and what may follow them, and random bytes; each under every
//! combination of the two inspectors.
//!
//! Properties: no panic; prefix consistency (the answer on a prefix is
//! either "more bytes" or final, and a final answer never changes when
//! more bytes arrive, up to `MAX_PEEK`, the most the listener ever peeks;
//! the same for `h2_preface`); an unmutated hello needs every byte of its
//! record (any shorter prefix asks for more) and then yields exactly the
//! SNI (lower-cased) and ALPN list that were put in; a well-formed request
//! line yields its version, and the full preface yields `h2c`.
//!
//! A short run is part of `cargo test`; a longer one is
//! `FERRY_FUZZ_ITERS=3000000 cargo test --release -p ferry-proxy --test detect_fuzz`,
//! and `FERRY_FUZZ_SEED=n` replays one seed (each failure prints its seed
//! and input).

use std::sync::Arc;

use ferry_proxy::detect::{Detected, MAX_PEEK, Outcome, h2_preface, inspect};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_rustls::rustls;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const NAMES: &[&str] = &[
    "api.example.com",
    "a",
    "x.y.z.svc.cluster.local",
    "outbound_.8080_._.reviews.default.svc.cluster.local",
    "UPPER.Example.COM",
    "xn--bcher-kva.example",
];

const PROTOCOLS: &[&str] = &[
    "h2",
    "http/1.1",
    "http/1.0",
    "istio",
    "istio-peer-exchange",
    "x",
];

/// What a hello was built to carry.
#[derive(Debug, Clone)]
struct Hello {
    bytes: Vec<u8>,
    sni: Option<String>,
    alpn: Vec<String>,
    /// `supported_versions` lists TLS 1.3.
    tls13: bool,
}

/// ClientHellos written by rustls, one per SNI and ALPN choice.
fn rustls_hellos() -> Vec<Hello> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut out = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let alpn: Vec<String> = PROTOCOLS[..i % PROTOCOLS.len()]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let server = rustls::pki_types::ServerName::try_from(name.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), server).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut bytes).unwrap_or_else(|e| panic!("{e}"));
        }
        out.push(Hello {
            bytes,
            sni: Some(name.to_ascii_lowercase()),
            alpn,
            // rustls's safe defaults: TLS 1.3 and 1.2.
            tls13: true,
        });
    }
    out
}

fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut e = ty.to_be_bytes().to_vec();
    e.extend((data.len() as u16).to_be_bytes());
    e.extend(data);
    e
}

fn with_len16(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend(data);
    v
}

/// A hand-assembled ClientHello.
fn built_hello(rng: &mut StdRng) -> Hello {
    let sni = (rng.random_range(0..4) > 0).then(|| NAMES[rng.random_range(0..NAMES.len())]);
    let alpn: Vec<&str> = (0..rng.random_range(0..4))
        .map(|_| PROTOCOLS[rng.random_range(0..PROTOCOLS.len())])
        .collect();
    let dup = rng.random_range(0..5) == 0;
    let mut exts = Vec::new();
    let unknown = |rng: &mut StdRng| {
        let ty: u16 = [5u16, 10, 13, 45, 51, 0xfe0d, 0x0a0a][rng.random_range(0..7)];
        let data: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
        ext(ty, &data)
    };
    for _ in 0..rng.random_range(0..3) {
        exts.extend(unknown(rng));
    }
    let mut sni_ext = Vec::new();
    if let Some(name) = sni {
        let mut entry = vec![0u8];
        entry.extend(with_len16(name.as_bytes()));
        sni_ext = ext(0, &with_len16(&entry));
    }
    let mut alpn_ext = Vec::new();
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in &alpn {
            list.push(p.len() as u8);
            list.extend(p.as_bytes());
        }
        alpn_ext = ext(16, &with_len16(&list));
    }
    exts.extend(&sni_ext);
    exts.extend(&alpn_ext);
    // supported_versions: none, TLS 1.2 alone, or TLS 1.3 and 1.2.
    let versions: &[u8] = [&[][..], &[2, 3, 3], &[4, 3, 4, 3, 3]][rng.random_range(0..3)];
    let tls13 = versions.len() == 5;
    if !versions.is_empty() {
        exts.extend(ext(43, versions));
    }
    if dup {
        // The same extensions again: the last name wins, protocols add up.
        exts.extend(&sni_ext);
        exts.extend(&alpn_ext);
    }
    for _ in 0..rng.random_range(0..2) {
        exts.extend(unknown(rng));
    }
    let mut body = vec![3, 3];
    body.extend((0..32).map(|_| rng.random::<u8>()));
    let sid = [0usize, 32][rng.random_range(0..2)];
    body.push(sid as u8);
    body.extend(std::iter::repeat_n(7u8, sid));
    let suites = rng.random_range(1..20) * 2;
    body.extend(with_len16(&vec![0x13; suites]));
    body.extend([1, 0]);
    if !exts.is_empty() || rng.random() {
        body.extend(with_len16(&exts));
    }
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(&body);
    let mut bytes = vec![0x16, 3, [1u8, 3][rng.random_range(0..2)]];
    bytes.extend(with_len16(&hs));
    let mut alpn: Vec<String> = alpn.iter().map(|p| p.to_string()).collect();
    if dup {
        alpn.extend(alpn.clone());
    }
    Hello {
        bytes,
        sni: sni.map(|n| n.to_ascii_lowercase()),
        alpn,
        tls13,
    }
}

fn mutate(rng: &mut StdRng, b: &mut Vec<u8>) {
    if b.is_empty() {
        return;
    }
    for _ in 0..rng.random_range(1..4) {
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => {
                // A length field set to an extreme: the record's, the
                // handshake's, the session id's or anywhere.
                let at = [3, 6, 7, 43, i][rng.random_range(0..5)].min(b.len() - 1);
                let v: u8 = [0, 0xff, 1, 0x80][rng.random_range(0..4)];
                b[at] = v;
                if at + 1 < b.len() {
                    b[at + 1] = v;
                }
            }
            3 => {
                // A range spliced in again (duplicated extensions and all).
                let j = rng.random_range(i..=b.len().min(i + 64));
                let piece = b[i..j].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, piece);
            }
            4 => b.truncate(rng.random_range(1..=b.len())),
            _ => {
                // A record declared long and padded towards MAX_PEEK.
                if b.len() >= 5 {
                    let len: u16 = [0x4000, 0x4001, 0xffff][rng.random_range(0..3)];
                    b[3..5].copy_from_slice(&len.to_be_bytes());
                    let to = rng.random_range(b.len()..=b.len().max(MAX_PEEK + 16));
                    b.resize(to, 0);
                }
            }
        }
    }
}

fn request_line(rng: &mut StdRng) -> (Vec<u8>, Option<&'static str>) {
    const METHODS: &[&str] = &[
        "GET", "POST", "PUT", "DELETE", "M-SEARCH", "X_CUSTOM", "PRI", "CONNECT", "OPTIONS",
    ];
    const BAD_METHODS: &[&str] = &["get", "", "G ET", "GET\t", "\u{16}ET", "GÉT"];
    const TARGETS: &[&str] = &["/", "/a?b=c", "*", "http://x/", "x:443", "/%00", "/a b"];
    const VERSIONS: &[(&str, Option<&str>)] = &[
        ("HTTP/1.1", Some("http/1.1")),
        ("HTTP/1.0", Some("http/1.0")),
        ("HTTP/2.0", None),
        ("HTTP/1.2", None),
        ("http/1.1", None),
        ("HTTP/1.1 ", None),
        ("HTTP/1", None),
        ("", None),
    ];
    let good_method = rng.random_range(0..5) > 0;
    let method = if good_method {
        METHODS[rng.random_range(0..METHODS.len())]
    } else {
        BAD_METHODS[rng.random_range(0..BAD_METHODS.len())]
    };
    let target = TARGETS[rng.random_range(0..TARGETS.len())];
    let (version, proto) = VERSIONS[rng.random_range(0..VERSIONS.len())];
    let eol = ["\r\n", "\n", "\r", ""][rng.random_range(0..4)];
    let mut line = format!("{method} {target} {version}{eol}").into_bytes();
    if rng.random() {
        line.extend_from_slice(b"Host: x\r\n\r\n");
    }
    // Only a well-formed line has a known answer.
    let spaced_target = target.contains(' ');
    let known = good_method && !spaced_target && eol.ends_with('\n');
    (line, if known { proto } else { None })
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let max = [16, 200, 9000][rng.random_range(0..3)];
    let n = rng.random_range(0..max);
    let uppercase = rng.random_range(0..3) == 0;
    (0..n)
        .map(|_| {
            if uppercase {
                b"GETPOS-_ \r\n"[rng.random_range(0..11)]
            } else {
                rng.random()
            }
        })
        .collect()
}

fn preface_like(rng: &mut StdRng) -> Vec<u8> {
    let mut b = PREFACE[..rng.random_range(0..=PREFACE.len())].to_vec();
    match rng.random_range(0..4) {
        0 => b.extend_from_slice(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"),
        1 => b.push(rng.random()),
        2 => b.extend_from_slice(b"HTTP/1.1\r\n"),
        _ => {}
    }
    b
}

/// The lengths at which a growing buffer is inspected: every one near the
/// start and the record boundary, some in between, the whole.
fn lengths(rng: &mut StdRng, input: &[u8]) -> Vec<usize> {
    let len = input.len().min(MAX_PEEK);
    let mut ls: Vec<usize> = (0..=len.min(48)).collect();
    if input.len() >= 5 {
        let record = 5 + (usize::from(input[3]) << 8 | usize::from(input[4]));
        for l in [record.saturating_sub(1), record, record + 1] {
            ls.push(l.min(len));
        }
    }
    if len > 0 {
        ls.extend((0..24).map(|_| rng.random_range(0..=len)));
    }
    ls.push(len);
    ls.sort_unstable();
    ls.dedup();
    ls
}

fn check_prefixes(rng: &mut StdRng, input: &[u8]) -> Result<(), String> {
    let ls = lengths(rng, input);
    for (tls, http) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut fin: Option<(usize, Detected)> = None;
        for &n in &ls {
            let got = inspect(&input[..n], tls, http);
            match (&fin, got) {
                (None, Outcome::NeedMore) => {}
                (None, Outcome::Done(d)) => fin = Some((n, d)),
                (Some((at, d)), got) => {
                    if got != Outcome::Done(d.clone()) {
                        return Err(format!(
                            "inspectors tls {tls} http {http}: {d:?} at {at} bytes, {got:?} at {n}"
                        ));
                    }
                }
            }
        }
    }
    let mut fin = None;
    for &n in &ls {
        match (fin, h2_preface(&input[..n])) {
            (None, got) => fin = got.map(|g| (n, g)),
            (Some((at, was)), got) if got != Some(was) => {
                return Err(format!("h2_preface: {was} at {at} bytes, {got:?} at {n}"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_hello(h: &Hello) -> Result<(), String> {
    let b = &h.bytes;
    let record = 5 + (usize::from(b[3]) << 8 | usize::from(b[4]));
    for n in 0..record {
        if inspect(&b[..n], true, true) != Outcome::NeedMore {
            return Err(format!("final answer at {n} of {record} bytes"));
        }
    }
    let want = Detected {
        tls: true,
        server_name: h.sni.clone(),
        application_protocols: h.alpn.clone(),
        offers_tls13: h.tls13,
    };
    for (n, http) in [(record, true), (b.len(), false)] {
        let got = inspect(&b[..n], true, http);
        if got != Outcome::Done(want.clone()) {
            return Err(format!("{got:?}, not {want:?}"));
        }
    }
    Ok(())
}

enum Input {
    Hello(Hello),
    Mutated(Vec<u8>),
    Line(Vec<u8>, Option<&'static str>),
    Other(Vec<u8>),
}

fn input(rng: &mut StdRng, real: &[Hello]) -> Input {
    let hello = |rng: &mut StdRng| {
        if rng.random() {
            real[rng.random_range(0..real.len())].clone()
        } else {
            built_hello(rng)
        }
    };
    match rng.random_range(0..10) {
        0 | 1 => Input::Hello(hello(rng)),
        2..=4 => {
            let mut b = hello(rng).bytes;
            mutate(rng, &mut b);
            Input::Mutated(b)
        }
        5 | 6 => {
            let (line, proto) = request_line(rng);
            Input::Line(line, proto)
        }
        7 => Input::Other(preface_like(rng)),
        _ => Input::Other(random_bytes(rng)),
    }
}

fn check(rng: &mut StdRng, input: &Input) -> Result<(), String> {
    match input {
        Input::Hello(h) => {
            check_hello(h)?;
            check_prefixes(rng, &h.bytes)
        }
        Input::Mutated(b) | Input::Other(b) => check_prefixes(rng, b),
        Input::Line(line, proto) => {
            check_prefixes(rng, line)?;
            if let Some(p) = proto {
                let want = Outcome::Done(Detected {
                    application_protocols: vec![p.to_string()],
                    ..Default::default()
                });
                let got = inspect(line, true, true);
                if got != want {
                    return Err(format!("{got:?}, not {want:?}"));
                }
            }
            Ok(())
        }
    }
}

fn shown(input: &Input) -> String {
    match input {
        Input::Hello(h) => format!("{h:?}"),
        Input::Mutated(b) | Input::Other(b) | Input::Line(b, _) => {
            let head = &b[..b.len().min(600)];
            format!("{} bytes {:?}", b.len(), String::from_utf8_lossy(head))
        }
    }
}

/// Runs one check, a panic counted as a failure (so that it, too, prints
/// its seed).
fn guarded(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let text = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {text}"))
    })
}

#[test]
fn detect_fuzz() {
    let iters: u64 = std::env::var("FERRY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let seeds: Vec<u64> = match std::env::var("FERRY_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let base: u64 = rand::random();
            (0..iters).map(|i| base.wrapping_add(i)).collect()
        }
    };
    // rustls's hellos carry fresh randoms and key shares each run; what
    // detection reads from them (lengths, SNI, ALPN) does not change.
    let real = rustls_hellos();
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let input =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| input(&mut rng, &real)))
                .unwrap_or_else(|_| panic!("FERRY_FUZZ_SEED={seed}: building the input panicked"));
        if let Err(e) = guarded(|| check(&mut rng, &input)) {
            panic!("FERRY_FUZZ_SEED={seed}: input {}: {e}", shown(&input));
        }
    }
}

/// Inputs on the edges of the parsers.
#[test]
fn detect_corpus() {
    let mut rng = StdRng::seed_from_u64(0);
    let mut long_line = b"GET /".to_vec();
    long_line.resize(9000, b'a');
    let mut max_record = vec![0x16, 3, 1, 0xff, 0xff, 1, 0xff, 0xff, 0xff];
    max_record.resize(MAX_PEEK + 100, 0xff);
    for input in [
        &b""[..],
        b"\x16",
        b"\x16\x03",
        b"\x16\x03\x01\x00\x00",
        b"\x16\x02\x01\x00\x00",
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",
        b"\x16\x03\x01\x00\x01\x01",
        b"\n",
        b"\r\n",
        b" GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1",
        b"GET\r\n",
        b"GET  HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r",
        PREFACE,
        &long_line,
        &max_record,
    ] {
        if let Err(e) = check_prefixes(&mut rng, input) {
            panic!(
                "input {:?}: {e}",
                String::from_utf8_lossy(&input[..input.len().min(64)])
            );
        }
    }
    for h in rustls_hellos() {
        if let Err(e) = check_hello(&h) {
            panic!("{h:?}: {e}");
        }
    }
}
