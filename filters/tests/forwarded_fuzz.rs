//! Fuzzing of client-address detection (`ferry_filters::http::forwarded`):
//! `x-forwarded-for` lists built from the pieces that matter to it (IPv4
//! and IPv6 addresses with and without brackets and ports, zone ids,
//! garbage, empty entries, spaces and commas in every arrangement, several
//! header lines, non-UTF-8 bytes) go through `mutate_request` under every
//! kind of trust setting (`use_remote_address`, `xff_num_trusted_hops`,
//! `skip_xff_append`, internal address ranges, the XFF extension with
//! trusted CIDRs, the custom-header extension). Each answer must hold: no
//! panic; the client address is the peer or, with port 0, an address
//! listed in `x-forwarded-for` (or the custom header); with the default
//! detection it is exactly the entry `xff_num_trusted_hops` from the right
//! when that entry parses; `last_xff_address` agrees with a plain
//! split-on-commas reading; an appended `x-forwarded-for` ends with the
//! peer (this host's address for a loopback peer); `x-envoy-internal` is
//! set exactly for internal requests, and an internal request is never an
//! edge one.
//!
//! A short run is part of `cargo test`; a longer one is
//! `FERRY_FUZZ_ITERS=10000000 cargo test --release -p ferry-filters --test forwarded_fuzz`,
//! and `FERRY_FUZZ_SEED=n` replays one seed (each failure prints its seed
//! and input).

use std::net::{IpAddr, SocketAddr};

use ferry_filters::http::forwarded::{Downstream, last_xff_address, mutate_request};
use ferry_model::cidr::CidrRange;
use ferry_model::forwarded::{ClientTrust, InternalAddresses, IpDetection};
use http::{HeaderMap, HeaderValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ENTRIES: &[&str] = &[
    "10.0.0.1",
    "192.168.1.7",
    "1.2.3.4",
    "127.0.0.1",
    "1.2.3.4:80",
    "0.0.0.0",
    "255.255.255.255",
    "256.1.1.1",
    "1.2.3",
    "01.2.3.4",
    "::1",
    "::",
    "[::1]",
    "[::1]:443",
    "2001:db8::1",
    "[2001:db8::1]:8080",
    "fd00::5",
    "fe80::1%eth0",
    "::ffff:10.0.0.1",
    "2001:db8::1::2",
    "unknown",
    "_hidden",
    "",
    " ",
    "\t",
    "é",
    ";",
    "\"1.2.3.4\"",
];

const SEPARATORS: &[&str] = &[",", ", ", " ,", ",,", " , ", ",\t"];

const PEERS: &[&str] = &[
    "10.1.2.3:5000",
    "127.0.0.1:4000",
    "[::1]:4000",
    "[2001:db8::7]:1234",
    "8.8.8.8:53",
];

fn cidr(a: &str, len: u8) -> CidrRange {
    CidrRange::new(a.parse().unwrap_or_else(|e| panic!("{e}")), len)
        .unwrap_or_else(|| panic!("{a}/{len}"))
}

fn xff_list(rng: &mut StdRng) -> String {
    let mut s = String::new();
    if rng.random_range(0..6) == 0 {
        s.push(' ');
    }
    for i in 0..rng.random_range(0..7) {
        if i > 0 {
            s.push_str(SEPARATORS[rng.random_range(0..SEPARATORS.len())]);
        }
        s.push_str(ENTRIES[rng.random_range(0..ENTRIES.len())]);
    }
    if rng.random_range(0..8) == 0 {
        s.push(',');
    }
    s
}

struct Case {
    /// Each `x-forwarded-for` line, as bytes (not always UTF-8).
    xff: Vec<Vec<u8>>,
    custom: Option<String>,
    peer: SocketAddr,
    use_remote_address: bool,
    trust: ClientTrust,
}

fn case(rng: &mut StdRng) -> Case {
    let mut xff = Vec::new();
    for _ in 0..rng.random_range(0..4) {
        let mut line = xff_list(rng).into_bytes();
        if rng.random_range(0..15) == 0 {
            line.push(0xff);
        }
        xff.push(line);
    }
    let custom = (rng.random_range(0..2) == 0)
        .then(|| ENTRIES[rng.random_range(0..ENTRIES.len())].to_string());
    let peer = PEERS[rng.random_range(0..PEERS.len())]
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let internal = match rng.random_range(0..3) {
        0 => InternalAddresses::None,
        1 => InternalAddresses::Private,
        _ => InternalAddresses::Ranges(vec![cidr("10.0.0.0", 8), cidr("2001:db8::", 32)]),
    };
    let mut detection = Vec::new();
    for _ in 0..rng.random_range(0..3) {
        detection.push(match rng.random_range(0..3) {
            0 => IpDetection::Xff {
                num_trusted_hops: rng.random_range(0..4),
                trusted_cidrs: None,
                skip_xff_append: rng.random(),
            },
            1 => IpDetection::Xff {
                num_trusted_hops: 0,
                trusted_cidrs: Some(vec![
                    cidr("10.0.0.0", 8),
                    cidr("127.0.0.1", 32),
                    cidr("::", rng.random_range(0..=128)),
                ]),
                skip_xff_append: rng.random(),
            },
            _ => IpDetection::CustomHeader {
                header: "x-real-ip".into(),
                trusted: rng.random(),
                reject_with: [None, Some(403), Some(999)][rng.random_range(0..3)],
            },
        });
    }
    Case {
        xff,
        custom,
        peer,
        use_remote_address: rng.random(),
        trust: ClientTrust {
            xff_num_trusted_hops: rng.random_range(0..5),
            skip_xff_append: rng.random(),
            internal,
            detection,
            preserve_external_request_id: false,
        },
    }
}

fn headers(c: &Case) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in &c.xff {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            h.append("x-forwarded-for", v);
        }
    }
    if let Some(v) = c
        .custom
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert("x-real-ip", v);
    }
    h.insert("x-envoy-internal", HeaderValue::from_static("true"));
    h
}

/// The joined list, as Envoy keeps one header.
fn joined(h: &HeaderMap) -> Option<String> {
    let lines: Vec<&str> = h
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    (!lines.is_empty()).then(|| lines.join(","))
}

/// `last_xff_address` as a plain reading: the entry `skip` from the right.
fn reference_last(h: &HeaderMap, skip: u32) -> (Option<SocketAddr>, bool) {
    let Some(list) = joined(h) else {
        return (None, false);
    };
    let entries: Vec<&str> = list.split(',').collect();
    let skip = skip as usize;
    if skip >= entries.len() {
        return (None, false);
    }
    match entries[entries.len() - 1 - skip].trim().parse::<IpAddr>() {
        Ok(ip) => (
            Some(SocketAddr::new(ip, 0)),
            entries.len() == 1 && skip == 0,
        ),
        Err(_) => (None, false),
    }
}

fn check(c: &Case) -> Result<(), String> {
    let original = headers(c);
    for skip in 0..5 {
        let got = last_xff_address(&original, skip);
        let want = reference_last(&original, skip);
        if got != want {
            return Err(format!(
                "last_xff_address(skip {skip}): {got:?}, not {want:?}"
            ));
        }
    }
    let listed: Vec<IpAddr> = joined(&original)
        .unwrap_or_default()
        .split(',')
        .filter_map(|e| e.trim().parse().ok())
        .chain(
            original
                .get("x-real-ip")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        )
        .collect();
    let local: IpAddr = "10.9.9.9".parse().unwrap_or_else(|e| panic!("{e}"));
    let d = Downstream {
        peer: c.peer,
        local,
        scheme: "https",
        use_remote_address: c.use_remote_address,
        trust: &c.trust,
        internal_only_headers: &[],
    };
    let mut h = original.clone();
    let client = match mutate_request(&mut h, &d) {
        Ok(client) => client,
        Err(status) => {
            let refused = c.trust.detection.iter().any(|e| {
                matches!(e, IpDetection::CustomHeader { reject_with: Some(s), .. } if *s == status)
            });
            if c.use_remote_address || !refused {
                return Err(format!("refused with {status}"));
            }
            return Ok(());
        }
    };
    if client.remote != c.peer
        && !(client.remote.port() == 0 && listed.contains(&client.remote.ip()))
    {
        return Err(format!(
            "client {} is neither peer nor listed",
            client.remote
        ));
    }
    if client.internal && client.edge {
        return Err("internal and edge".into());
    }
    if h.contains_key("x-envoy-internal") != client.internal {
        return Err(format!("x-envoy-internal vs {client:?}"));
    }
    if client.edge != (c.use_remote_address && !client.internal) {
        return Err(format!("edge: {client:?}"));
    }
    let hops = c.trust.xff_num_trusted_hops;
    if c.use_remote_address {
        let want = if hops == 0 {
            c.peer
        } else {
            reference_last(&original, hops - 1).0.unwrap_or(c.peer)
        };
        if client.remote != want {
            return Err(format!("client {}, not {want}", client.remote));
        }
        if !c.trust.skip_xff_append {
            let appended = if c.peer.ip().is_loopback() {
                local
            } else {
                c.peer.ip()
            };
            let list = joined(&h).unwrap_or_default();
            let last = list.rsplit(',').next().unwrap_or_default();
            if last.parse::<IpAddr>().ok() != Some(appended) {
                return Err(format!("x-forwarded-for after append: {list:?}"));
            }
        }
    } else if c.trust.detection.is_empty() {
        let want = reference_last(&original, hops).0.unwrap_or(c.peer);
        if client.remote != want {
            return Err(format!("client {}, not {want}", client.remote));
        }
        if joined(&h) != joined(&original) {
            return Err("x-forwarded-for changed".into());
        }
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
fn forwarded_fuzz() {
    let iters: u64 = std::env::var("FERRY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
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
        let c = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng)))
            .unwrap_or_else(|_| panic!("FERRY_FUZZ_SEED={seed}: building the input panicked"));
        if let Err(e) = guarded(|| check(&c)) {
            let xff: Vec<String> = c
                .xff
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            panic!(
                "FERRY_FUZZ_SEED={seed}: x-forwarded-for {xff:?}, x-real-ip {:?}, peer {}, \
                 use_remote_address {}, {:?}: {e}",
                c.custom, c.peer, c.use_remote_address, c.trust
            );
        }
    }
}
