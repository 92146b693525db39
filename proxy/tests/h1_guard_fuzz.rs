//! Fuzzing of the HTTP/1 request guard (`ferry_proxy::http::h1_guard`),
//! through its public face: an `H1Guard` over a client that delivers the
//! bytes, read the way hyper reads it. Inputs are pipelined requests built
//! from the pieces that matter to framing: `Content-Length` (valid,
//! duplicated, listed, signed, padded, overflowing), `Transfer-Encoding`
//! (chunked in any case, other codings, lists, duplicates), both at once,
//! obs-fold, bare LF, CR without LF, NUL and other control bytes, huge
//! values, too many headers, upgrades and CONNECT, and bodies: exact,
//! short, long, chunked with extensions, trailers, broken line endings and
//! chunk sizes up to overflow-sized hex. Limits vary (head size, header
//! count, `allow_chunked_length`, custom methods, HTTP/1.0).
//!
//! Properties: no panic, no hang; the verdicts and the bytes released do
//! not depend on how the input is split across reads nor on the reader's
//! buffer size (each input is fed whole, then in random pieces through
//! random buffer sizes); the released stream reads back, verdict by
//! verdict, as heads `httparse` parses whole (a refusal is the fixed
//! placeholder head and the end of the stream), and no released head
//! carries both `Content-Length` and `Transfer-Encoding`, more than one
//! length, a malformed one, or a coding other than a lone `chunked`; a
//! request whose head carries both is never passed with both.
//!
//! A short run is part of `cargo test`; a longer one is
//! `FERRY_FUZZ_ITERS=2000000 cargo test --release -p ferry-proxy --test h1_guard_fuzz`,
//! and `FERRY_FUZZ_SEED=n` replays one seed (each failure prints its seed
//! and input).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use ferry_proxy::http::h1_guard::{H1Guard, H1Shared, Limits, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, ReadBuf};

const PLACEHOLDER: &[u8] = b"GET / HTTP/1.1\r\nhost: refused.invalid\r\n\r\n";

/// A client whose bytes arrive in the given pieces, then end.
struct Client {
    pieces: VecDeque<Vec<u8>>,
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(front) = this.pieces.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                this.pieces.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[derive(Debug)]
struct Case {
    input: Vec<u8>,
    limits: Limits,
    /// Whether each upgrade asked for happens, in order.
    upgrades: Vec<bool>,
    /// What the first request's head was built with.
    first_has_both: bool,
}

fn pick<'a>(rng: &mut StdRng, list: &[&'a str]) -> &'a str {
    list[rng.random_range(0..list.len())]
}

fn eol(rng: &mut StdRng) -> &'static str {
    match rng.random_range(0..40) {
        0 => "\n",
        1 => "\r",
        2 => "\r\r\n",
        3 => "\n\r",
        _ => "\r\n",
    }
}

const LENGTHS: &[&str] = &[
    "0",
    "0",
    "3",
    "5",
    "10",
    "007",
    " 5 ",
    "+5",
    "-1",
    "5,5",
    "5, 6",
    "1e3",
    "0x5",
    "",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
];

const CODINGS: &[&str] = &[
    "chunked",
    "chunked",
    "Chunked",
    " chunked",
    "CHUNKED ",
    "gzip, chunked",
    "chunked, gzip",
    "chunked, chunked",
    "identity",
    "identity, chunked",
    "gzip",
    "",
    "chunked;q=1",
    "\"chunked\"",
];

/// A chunked body, mostly well formed.
fn chunked_body(rng: &mut StdRng) -> String {
    let mut b = String::new();
    for _ in 0..rng.random_range(0..4) {
        let n = rng.random_range(0..12usize);
        let size = match rng.random_range(0..20) {
            0 => "ffffffffffffffffff".to_string(),
            1 => "10000000000000000".to_string(),
            2 => "ffffffffffffffff".to_string(),
            3 => format!("{n:X}"),
            4 => format!("000{n:x}"),
            5 => "g".to_string(),
            6 => String::new(),
            7 => format!("-{n:x}"),
            _ => format!("{n:x}"),
        };
        b.push_str(&size);
        match rng.random_range(0..10) {
            0 => b.push_str(";ext=1"),
            1 => b.push_str(" ;a"),
            2 => b.push(' '),
            3 => b.push_str(&";".repeat(rng.random_range(1..40))),
            _ => {}
        }
        b.push_str(if rng.random_range(0..15) == 0 {
            "\n"
        } else {
            "\r\n"
        });
        b.push_str(&"x".repeat(n));
        b.push_str(if rng.random_range(0..15) == 0 {
            "\n"
        } else {
            "\r\n"
        });
    }
    if rng.random_range(0..6) > 0 {
        b.push_str("0\r\n");
        for _ in 0..rng.random_range(0..3) {
            b.push_str(pick(rng, &["t: v\r\n", "x\r\n", "\r", "trailer: a\n"]));
        }
        b.push_str(if rng.random_range(0..10) == 0 {
            "\n"
        } else {
            "\r\n"
        });
    }
    b
}

/// One request: its bytes, and whether its head carries both framings.
fn request(rng: &mut StdRng) -> (Vec<u8>, bool) {
    let method = match rng.random_range(0..12) {
        0 => "POST",
        1 => "CONNECT",
        2 => "FOO",
        3 => "get",
        4 => "PUT",
        _ => "GET",
    };
    let target = if method == "CONNECT" {
        pick(rng, &["h:443", "/", "[::1]:80"])
    } else {
        pick(
            rng,
            &[
                "/",
                "/",
                "/a?b=c",
                "*",
                "http://h/x",
                "/#f",
                "/a b",
                "/\u{7f}",
                "/é",
            ],
        )
    };
    let version = match rng.random_range(0..14) {
        0 => "HTTP/1.0",
        1 => "HTTP/2.0",
        2 => "HTTP/1.1 ",
        3 => "http/1.1",
        _ => "HTTP/1.1",
    };
    let mut head = format!("{method} {target} {version}{}", eol(rng));
    if rng.random_range(0..10) > 0 {
        head.push_str(&format!("Host: h{}", eol(rng)));
    }
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    for _ in 0..rng.random_range(0..6) {
        let line = match rng.random_range(0..16) {
            0..=2 => {
                let v = pick(rng, LENGTHS);
                lengths.push(v);
                format!("{}: {v}", pick(rng, &["Content-Length", "content-length"]))
            }
            3..=5 => {
                let v = pick(rng, CODINGS);
                codings.push(v);
                format!(
                    "{}: {v}",
                    pick(rng, &["Transfer-Encoding", "transfer-encoding"])
                )
            }
            6 => "Upgrade: websocket".into(),
            7 => "Connection: upgrade, keep-alive".into(),
            8 => "X-Fold: a\r\n b".into(),
            9 => "X-Nul: a\0b".into(),
            10 => format!("X-Big: {}", "v".repeat(rng.random_range(100..3000))),
            11 => "NoColon".into(),
            12 => "Bad Name: v".into(),
            13 => " Leading: v".into(),
            14 => "X-Ctl: \u{1}".into(),
            _ => "X-Ok: v".into(),
        };
        head.push_str(&line);
        head.push_str(eol(rng));
    }
    for _ in 0..[0, 0, 0, 5, 150][rng.random_range(0..5)] {
        head.push_str("X-Many: 1\r\n");
    }
    head.push_str(eol(rng));
    let both = !lengths.is_empty() && !codings.is_empty();
    let mut bytes = head.into_bytes();
    let chunked = codings
        .last()
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
    if chunked && rng.random_range(0..4) > 0 {
        bytes.extend(chunked_body(rng).into_bytes());
    } else if let Some(n) = lengths.first().and_then(|l| l.trim().parse::<usize>().ok()) {
        let n = (n.min(64) as i64 + rng.random_range(-2..=2)).max(0) as usize;
        bytes.extend(std::iter::repeat_n(b'b', n));
    }
    if method == "CONNECT" || rng.random_range(0..20) == 0 {
        // What a tunnel would carry, or a stray byte.
        bytes.extend_from_slice(pick(rng, &["\x16\x03\x01", "tunnel", "\r\n", "\0"]).as_bytes());
    }
    (bytes, both)
}

fn case(rng: &mut StdRng) -> Case {
    let mut input = Vec::new();
    if rng.random_range(0..5) == 0 {
        input.extend_from_slice(b"\r\n\n");
    }
    let mut first_has_both = false;
    for i in 0..rng.random_range(1..5) {
        let (r, both) = request(rng);
        if i == 0 {
            first_has_both = both;
        }
        input.extend(r);
    }
    if rng.random_range(0..10) == 0 {
        let n = rng.random_range(0..input.len().max(1));
        input.truncate(n);
    }
    let limits = Limits {
        max_head_bytes: [60 * 1024, 60 * 1024, 1024, 200][rng.random_range(0..4)],
        max_headers: [100, 100, 3, 200][rng.random_range(0..4)],
        allow_chunked_length: rng.random_range(0..4) == 0,
        allow_custom_methods: rng.random_range(0..4) == 0,
        accept_http_10: rng.random_range(0..3) == 0,
        reject_fragment: rng.random_range(0..2) == 0,
    };
    let upgrades = (0..8).map(|_| rng.random()).collect();
    Case {
        input,
        limits,
        upgrades,
        first_has_both,
    }
}

/// Reads everything the guard releases, as hyper would, telling it the
/// upgrade outcomes when it waits for them. `read_sizes` are the reader's
/// buffer sizes in turn (cycled).
fn run(case: &Case, pieces: Vec<Vec<u8>>, read_sizes: &[usize]) -> (Vec<u8>, Vec<Verdict>) {
    let shared = Arc::new(H1Shared::default());
    let client = Client {
        pieces: pieces.into(),
    };
    let mut guard = H1Guard::new(client, case.limits.clone(), None, shared.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let (mut out, mut verdicts) = (Vec::new(), Vec::new());
    let mut told = 0;
    let mut polls = 0usize;
    loop {
        polls += 1;
        assert!(polls < 1_000_000, "the guard never finishes");
        let size = read_sizes[polls % read_sizes.len()];
        let mut storage = vec![0u8; size];
        let mut buf = ReadBuf::new(&mut storage);
        let r = Pin::new(&mut guard).poll_read(&mut cx, &mut buf);
        while let Some(v) = shared.next_verdict() {
            verdicts.push(v);
        }
        match r {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => out.extend_from_slice(buf.filled()),
            Poll::Ready(Err(e)) => panic!("read error {e}"),
            Poll::Pending => {
                let asked = verdicts
                    .iter()
                    .filter(|v| matches!(v, Verdict::Pass { upgrade: true }))
                    .count();
                if asked > told {
                    shared.upgrade_done(case.upgrades.get(told).copied().unwrap_or(false));
                    told += 1;
                } else {
                    break;
                }
            }
        }
    }
    (out, verdicts)
}

/// A head in the released stream: its length, and its framing headers.
fn released_head(out: &[u8]) -> Result<(usize, Vec<String>, Vec<String>, String), String> {
    let mut slots = [httparse::EMPTY_HEADER; 512];
    let mut req = httparse::Request::new(&mut slots);
    let n = match req.parse(out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => {
            return Err(format!(
                "released head does not parse: {other:?} in {:?}",
                String::from_utf8_lossy(&out[..out.len().min(300)])
            ));
        }
    };
    let values = |name: &str| -> Vec<String> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .collect()
    };
    let method = req.method.unwrap_or_default().to_string();
    Ok((
        n,
        values("content-length"),
        values("transfer-encoding"),
        method,
    ))
}

/// Where a chunked body that starts at `out[0]` ends, if it does well formed.
fn chunked_end(out: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let line_end = out[i..].windows(2).position(|w| w == b"\r\n")? + i;
        let line = &out[i..line_end];
        let hex_end = line
            .iter()
            .position(|b| !b.is_ascii_hexdigit())
            .unwrap_or(line.len());
        let size = u64::from_str_radix(std::str::from_utf8(&line[..hex_end]).ok()?, 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let e = out[i..].windows(2).position(|w| w == b"\r\n")? + i;
                let empty = e == i;
                i = e + 2;
                if empty {
                    return Some(i);
                }
            }
        }
        let size = usize::try_from(size).ok()?;
        if out.len() < i.checked_add(size)?.checked_add(2)?
            || &out[i + size..i + size + 2] != b"\r\n"
        {
            return None;
        }
        i += size + 2;
    }
}

/// The released stream read back, verdict by verdict.
fn check_released(out: &[u8], verdicts: &[Verdict]) -> Result<(), String> {
    let mut pos = 0;
    for v in verdicts {
        let rest = &out[pos..];
        match v {
            Verdict::Refuse(_) => {
                if rest != PLACEHOLDER {
                    return Err(format!(
                        "refused, and released {:?}",
                        String::from_utf8_lossy(&rest[..rest.len().min(300)])
                    ));
                }
                return Ok(());
            }
            Verdict::Pass { upgrade } => {
                let (n, lengths, codings, method) = released_head(rest)?;
                if !lengths.is_empty() && !codings.is_empty() {
                    return Err(format!("released with both: {lengths:?} {codings:?}"));
                }
                if lengths.len() > 1
                    || lengths.first().is_some_and(|l| {
                        l.trim().parse::<u64>().is_err() || l.trim().starts_with('+')
                    })
                {
                    return Err(format!("released with lengths {lengths:?}"));
                }
                if codings.len() > 1
                    || codings
                        .first()
                        .is_some_and(|c| !c.trim().eq_ignore_ascii_case("chunked"))
                {
                    return Err(format!("released with codings {codings:?}"));
                }
                pos += n;
                if *upgrade || method == "CONNECT" {
                    return Ok(());
                }
                let body = if codings.is_empty() {
                    let len = lengths
                        .first()
                        .map_or(Some(0), |l| l.trim().parse::<usize>().ok());
                    match len {
                        Some(len) if pos.checked_add(len).is_some_and(|e| e <= out.len()) => len,
                        _ => return Ok(()),
                    }
                } else {
                    match chunked_end(&out[pos..]) {
                        Some(n) => n,
                        None => return Ok(()),
                    }
                };
                pos += body;
            }
        }
    }
    if pos != out.len() {
        return Err(format!(
            "released past the last verdict: {:?}",
            String::from_utf8_lossy(&out[pos..out.len().min(pos + 300)])
        ));
    }
    Ok(())
}

fn check(rng: &mut StdRng, case: &Case) -> Result<(), String> {
    let whole = run(case, vec![case.input.clone()], &[64 * 1024]);
    // The same bytes in random pieces, through random buffer sizes.
    for _ in 0..2 {
        let mut pieces = Vec::new();
        let mut rest = &case.input[..];
        while !rest.is_empty() {
            let max = [1, 7, 64, 4096][rng.random_range(0..4)];
            let n = rng.random_range(1..=rest.len().min(max));
            pieces.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        let sizes: Vec<usize> = (0..7)
            .map(|_| {
                let max = [1, 16, 8192][rng.random_range(0..3)];
                rng.random_range(1..=max)
            })
            .collect();
        let split = run(case, pieces, &sizes);
        if split != whole {
            return Err(format!(
                "split reads differ: whole {:?} {:?}, split {:?} {:?}",
                whole.1,
                String::from_utf8_lossy(&whole.0),
                split.1,
                String::from_utf8_lossy(&split.0)
            ));
        }
    }
    let (out, verdicts) = whole;
    check_released(&out, &verdicts)?;
    if case.first_has_both
        && let Some(Verdict::Pass { .. }) = verdicts.first()
        && !case.limits.allow_chunked_length
    {
        return Err("a request with both framings passed".into());
    }
    Ok(())
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
fn h1_guard_fuzz() {
    let iters: u64 = std::env::var("FERRY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
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
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let case = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng)))
            .unwrap_or_else(|_| panic!("FERRY_FUZZ_SEED={seed}: building the input panicked"));
        if let Err(e) = guarded(|| check(&mut rng, &case)) {
            panic!(
                "FERRY_FUZZ_SEED={seed}: input {:?} with {:?}, upgrades {:?}: {e}",
                String::from_utf8_lossy(&case.input),
                case.limits,
                case.upgrades
            );
        }
    }
}

/// Inputs on the edges of the framing rules.
#[test]
fn h1_guard_corpus() {
    let mut rng = StdRng::seed_from_u64(0);
    let limits = Limits {
        max_head_bytes: 60 * 1024,
        max_headers: 100,
        allow_chunked_length: false,
        allow_custom_methods: false,
        accept_http_10: false,
        reject_fragment: true,
    };
    for (input, both) in [
        (&b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], true),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", true),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", false),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab", false),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551615\r\n\r\nab", false),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551616\r\n\r\n", false),
        (b"GET / HTTP/1.1\nHost: h\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", false),
        (b"GET / HTTP/1.1\rHost: h\r\r", false),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", false),
        (b"GET / HTTP/1.1\r\nHost: h\0\r\n\r\n", false),
        (b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", false),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01", false),
        (b"\r\n\r\n\r\n", false),
    ] {
        for allow_chunked_length in [false, true] {
            let case = Case {
                input: input.to_vec(),
                limits: Limits {
                    allow_chunked_length,
                    ..limits.clone()
                },
                upgrades: vec![false, true],
                first_has_both: both,
            };
            if let Err(e) = check(&mut rng, &case) {
                panic!("input {:?}, {:?}: {e}", String::from_utf8_lossy(input), case.limits);
            }
        }
    }
}
