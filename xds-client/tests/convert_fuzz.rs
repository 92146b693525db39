//! Fuzzing of the xDS conversion (`ferry_xds::convert::listener` and
//! `cluster`) and of the bootstrap loader (`ferry_xds::bootstrap::parse_bootstrap`).
//! The working listener and cluster of the converters' coverage probe
//! (`src/convert/coverage/probe.rs`, copied here: every filter, route
//! feature and cluster option the converters read) are encoded to
//! protobuf and mutated: bytes flipped or set, truncated, ranges spliced
//! or duplicated (protobuf merges a repeated message and lets a later
//! scalar win), fields appended with extreme varints; what prost decodes
//! is converted. They are also mutated as JSON trees (a value replaced by
//! an extreme number, an odd duration, string or type, a key dropped, a
//! list element duplicated), read through the xDS descriptors as Envoy
//! reads them, and converted. The bootstrap loader gets the two as a
//! bootstrap, mutated as a tree and as text (bytes changed, truncated,
//! YAML anchors, aliases, tags and merge keys put in).
//!
//! Properties: the unmutated resources and bootstrap convert; every
//! mutated one converts or is refused with an error, never a panic; a
//! refusal names its resource; every call returns (a hang stalls the
//! run) and none allocates without bound (an alias bomb in YAML is
//! refused).
//!
//! A short run is part of `cargo test`; a longer one is
//! `FERRY_FUZZ_ITERS=50000 cargo test --release -p ferry-xds --test convert_fuzz`,
//! and `FERRY_FUZZ_SEED=n` replays one seed (each failure prints its seed
//! and input).

use std::panic::{AssertUnwindSafe, catch_unwind};

use envoy_types::pb::envoy::config::{cluster::v3 as c, listener::v3 as l};
use ferry_xds::Warnings;
use ferry_xds::bootstrap::parse_bootstrap;
use ferry_xds::convert::{cluster, listener};
use ferry_xds::json::Descriptors;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The coverage probe's working listener (shared with `probe.rs`).
const LISTENER: &str = include_str!("data/probe-listener.json");

/// The coverage probe's working cluster (shared with `probe.rs`).
const CLUSTER: &str = include_str!("data/probe-cluster.json");

const LISTENER_TYPE: &str = "envoy.config.listener.v3.Listener";
const CLUSTER_TYPE: &str = "envoy.config.cluster.v3.Cluster";

/// A second cluster, for what the listener names besides `c`.
const MIRROR: &str = r#"{"name": "m", "type": "STATIC", "connect_timeout": "1s"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listener,
    Cluster,
}

/// Converts a resource; a panic is reported as an error.
fn convert(kind: Kind, bytes: &[u8]) -> Result<Option<Result<(), String>>, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let mut w = Warnings::default();
        match kind {
            Kind::Listener => l::Listener::decode(bytes)
                .ok()
                .map(|m| listener(&m, &mut w).map(|_| ()).map_err(|e| e.to_string())),
            Kind::Cluster => c::Cluster::decode(bytes)
                .ok()
                .map(|m| cluster(&m, &mut w).map(|_| ()).map_err(|e| e.to_string())),
        }
    }))
    .map_err(panic_text)
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    let text = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    format!("panicked: {text}")
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>) {
    // One change mostly: more seldom decode.
    let changes = if rng.random_range(0..3) == 0 {
        rng.random_range(2..5)
    } else {
        1
    };
    for _ in 0..changes {
        if b.is_empty() {
            return;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..7) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = [0, 0xff, 0x7f, 0x80, 1][rng.random_range(0..5)],
            2 => b.truncate(i),
            3 => {
                // A range spliced in elsewhere (a field duplicated, or a
                // message's bytes where another's were).
                let j = rng.random_range(i..=b.len().min(i + 200));
                let piece = b[i..j].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, piece);
            }
            4 => {
                // The whole message again: repeated fields doubled,
                // sub-messages merged.
                let copy = b.clone();
                b.extend(copy);
            }
            5 => {
                // A field appended: any number, varint or length-delimited,
                // with an extreme value.
                let field: u64 = rng.random_range(1..120);
                let wire: u64 = [0, 2][rng.random_range(0..2)];
                varint(field << 3 | wire, b);
                let v = [0, 1, u64::from(u32::MAX), u64::MAX, 1 << 63][rng.random_range(0..5)];
                if wire == 0 {
                    varint(v, b);
                } else {
                    let n = rng.random_range(0..16);
                    varint(n as u64, b);
                    b.extend((0..n).map(|_| rng.random::<u8>()));
                }
            }
            _ => {
                let n = rng.random_range(1..8).min(b.len() - i);
                b.drain(i..i + n);
            }
        }
    }
}

/// Values a field may be given, whatever its type.
fn odd_value(rng: &mut StdRng) -> Value {
    let texts = [
        r#"0"#,
        r#"-1"#,
        r#"4294967295"#,
        r#"4294967296"#,
        r#"18446744073709551615"#,
        r#"-9223372036854775808"#,
        r#"1e300"#,
        r#"0.5"#,
        r#""""#,
        r#""0s""#,
        r#""-1s""#,
        r#""315576000001s""#,
        r#""1.5s""#,
        r#""99999999999999999999s""#,
        r#""\u0000""#,
        r#""*""#,
        r#""[""#,
        r#""(?P<""#,
        r#""::1""#,
        r#""256.0.0.1""#,
        r#""UNKNOWN_ENUM""#,
        r#""type.googleapis.com/x""#,
        r#"true"#,
        r#"null"#,
        r#"{}"#,
        r#"[]"#,
        r#"[{}]"#,
        r#"{"@type": "type.googleapis.com/google.protobuf.Empty"}"#,
    ];
    let text = texts[rng.random_range(0..texts.len())];
    if rng.random_range(0..10) == 0 {
        return Value::String("x".repeat(rng.random_range(1000..70_000)));
    }
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Every place in a tree, as a path of keys and indices.
fn places(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                path.push(Value::String(k.clone()));
                out.push(path.clone());
                places(child, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(Value::from(i));
                out.push(path.clone());
                places(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn parent_mut<'a>(root: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    let mut v = root;
    for step in &path[..path.len().saturating_sub(1)] {
        v = match step {
            Value::String(k) => v.get_mut(k.as_str())?,
            Value::Number(i) => v.get_mut(usize::try_from(i.as_u64()?).ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn mutate_tree(rng: &mut StdRng, root: &mut Value) {
    let mut all = Vec::new();
    places(root, &mut Vec::new(), &mut all);
    for _ in 0..rng.random_range(1..4) {
        if all.is_empty() {
            return;
        }
        let path = &all[rng.random_range(0..all.len())];
        let Some(parent) = parent_mut(root, path) else {
            continue;
        };
        let last = &path[path.len() - 1];
        match (parent, last) {
            (Value::Object(m), Value::String(k)) => match rng.random_range(0..4) {
                0 => {
                    m.remove(k);
                }
                1 => {
                    if let Some(Value::Array(a)) = m.get_mut(k)
                        && let Some(first) = a.first().cloned()
                    {
                        a.push(first);
                    }
                }
                _ => {
                    m.insert(k.clone(), odd_value(rng));
                }
            },
            (Value::Array(a), Value::Number(i)) => {
                let i = i.as_u64().unwrap_or(0) as usize;
                if i < a.len() {
                    match rng.random_range(0..3) {
                        0 => {
                            a.remove(i);
                        }
                        1 => {
                            let dup = a[i].clone();
                            a.insert(i, dup);
                        }
                        _ => a[i] = odd_value(rng),
                    }
                }
            }
            _ => {}
        }
        // The tree changed: its places too.
        all.clear();
        places(root, &mut Vec::new(), &mut all);
    }
}

fn mutate_text(rng: &mut StdRng, t: &mut String) {
    const INSERTS: &[&str] = &[
        "&a ",
        "*a",
        "!!binary ",
        "!!str ",
        "<<: *a\n",
        "\t",
        "\n- ",
        ": ",
        "---\n",
        "\"",
        "'",
        "{",
        "}",
        "[",
        "]",
        ",",
        "#",
        "%YAML 1.1\n",
        "? ",
        "|\n",
        "\u{feff}",
        "\0",
        "é",
        "~",
    ];
    let mut b = std::mem::take(t).into_bytes();
    for _ in 0..rng.random_range(1..4) {
        if b.is_empty() {
            break;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..4) {
            0 => b[i] = rng.random(),
            1 => b.truncate(i),
            2 => {
                let insert = INSERTS[rng.random_range(0..INSERTS.len())];
                b.splice(i..i, insert.bytes());
            }
            _ => {
                let j = rng.random_range(i..=b.len().min(i + 100));
                let piece = b[i..j].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, piece);
            }
        }
    }
    *t = String::from_utf8_lossy(&b).into_owned();
}

fn bootstrap_value(listener: &Value, cluster: &Value, mirror: &Value) -> Value {
    serde_json::json!({
        "node": {"id": "sidecar~10.0.0.1~p.ns~ns.svc.cluster.local", "cluster": "c"},
        "static_resources": {"listeners": [listener], "clusters": [cluster, mirror]},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}}
    })
}

/// A bootstrap's text through the loader; a panic is reported as an error.
fn load(text: &str) -> Result<Result<(), String>, String> {
    catch_unwind(AssertUnwindSafe(|| {
        parse_bootstrap("fuzz.yaml", text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }))
    .map_err(panic_text)
}

struct Base {
    descriptors: Descriptors,
    listener: Value,
    cluster: Value,
    mirror: Value,
    listener_pb: Vec<u8>,
    cluster_pb: Vec<u8>,
}

fn base() -> Base {
    let descriptors = Descriptors::load().unwrap_or_else(|e| panic!("{e}"));
    let json = |t: &str| serde_json::from_str::<Value>(t).unwrap_or_else(|e| panic!("{e}"));
    let (listener, cluster, mirror) = (json(LISTENER), json(CLUSTER), json(MIRROR));
    let listener_pb = descriptors
        .from_json::<l::Listener>(LISTENER_TYPE, listener.clone())
        .unwrap_or_else(|e| panic!("{e}"))
        .encode_to_vec();
    let cluster_pb = descriptors
        .from_json::<c::Cluster>(CLUSTER_TYPE, cluster.clone())
        .unwrap_or_else(|e| panic!("{e}"))
        .encode_to_vec();
    Base {
        descriptors,
        listener,
        cluster,
        mirror,
        listener_pb,
        cluster_pb,
    }
}

/// What one iteration fed in, to print on failure.
#[derive(Debug)]
enum Input {
    Bytes(Kind, Vec<u8>),
    Tree(Kind, Value),
    Bootstrap(String),
}

fn input(rng: &mut StdRng, base: &Base) -> Input {
    let kind = if rng.random() {
        Kind::Listener
    } else {
        Kind::Cluster
    };
    match rng.random_range(0..20) {
        0..=10 => {
            let mut b = match kind {
                Kind::Listener => base.listener_pb.clone(),
                Kind::Cluster => base.cluster_pb.clone(),
            };
            mutate_bytes(rng, &mut b);
            Input::Bytes(kind, b)
        }
        11..=18 => {
            let mut v = match kind {
                Kind::Listener => base.listener.clone(),
                Kind::Cluster => base.cluster.clone(),
            };
            mutate_tree(rng, &mut v);
            Input::Tree(kind, v)
        }
        _ => {
            let (mut listener, mut cluster) = (base.listener.clone(), base.cluster.clone());
            if rng.random() {
                mutate_tree(rng, &mut listener);
            } else {
                mutate_tree(rng, &mut cluster);
            }
            let v = bootstrap_value(&listener, &cluster, &base.mirror);
            let mut text = if rng.random() {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            } else {
                v.to_string()
            };
            if rng.random() {
                mutate_text(rng, &mut text);
            }
            Input::Bootstrap(text)
        }
    }
}

fn check(base: &Base, input: &Input) -> Result<(), String> {
    let named = |r: Result<(), String>, kind: Kind| match r {
        Err(e)
            if !e.contains(if kind == Kind::Listener {
                "listener"
            } else {
                "cluster"
            }) =>
        {
            Err(format!("a refusal that does not name its resource: {e}"))
        }
        _ => Ok(()),
    };
    match input {
        Input::Bytes(kind, b) => match convert(*kind, b)? {
            Some(r) => named(r, *kind),
            None => Ok(()),
        },
        Input::Tree(kind, v) => {
            let bytes = match kind {
                Kind::Listener => base
                    .descriptors
                    .from_json::<l::Listener>(LISTENER_TYPE, v.clone())
                    .map(|m| m.encode_to_vec()),
                Kind::Cluster => base
                    .descriptors
                    .from_json::<c::Cluster>(CLUSTER_TYPE, v.clone())
                    .map(|m| m.encode_to_vec()),
            };
            match bytes {
                Ok(bytes) => match convert(*kind, &bytes)? {
                    Some(r) => named(r, *kind),
                    None => Err("re-encoded resource does not decode".into()),
                },
                Err(_) => Ok(()),
            }
        }
        Input::Bootstrap(text) => load(text).map(|_| ()),
    }
}

/// Runs the process in a scratch directory of its own: a mutated
/// `FileAccessLog.path` such as `0s` is a relative file the conversion
/// creates (as Envoy opens access logs at load time), and it must not land
/// in the source tree.
fn in_scratch_dir() {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ferry-convert-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    });
    std::env::set_current_dir(dir).expect("entering the scratch directory");
}

#[test]
fn convert_fuzz() {
    in_scratch_dir();
    let iters: u64 = std::env::var("FERRY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
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
    let base = base();
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let input =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| input(&mut rng, &base)))
                .unwrap_or_else(|_| panic!("FERRY_FUZZ_SEED={seed}: building the input panicked"));
        if let Err(e) = check(&base, &input) {
            let shown: String = format!("{input:?}").chars().take(4000).collect();
            panic!("FERRY_FUZZ_SEED={seed}: input {shown}: {e}");
        }
    }
}

/// The unmutated resources convert, the bootstrap loads, and inputs on
/// the edges are refused without a panic.
#[test]
fn convert_corpus() {
    in_scratch_dir();
    let base = base();
    for (kind, bytes) in [
        (Kind::Listener, &base.listener_pb),
        (Kind::Cluster, &base.cluster_pb),
    ] {
        match convert(kind, bytes) {
            Ok(Some(Ok(()))) => {}
            other => panic!("{kind:?}: {other:?}"),
        }
    }
    let text = bootstrap_value(&base.listener, &base.cluster, &base.mirror).to_string();
    match load(&text) {
        Ok(Ok(())) => {}
        other => panic!("bootstrap: {other:?}"),
    }
    for (kind, bytes) in [
        (Kind::Listener, &b""[..]),
        (Kind::Cluster, b""),
        (Kind::Listener, b"\x0a\xff\xff\xff\xff\x0f"),
        (Kind::Cluster, b"\x12\x00"),
    ] {
        if let Err(e) = convert(kind, bytes) {
            panic!("{kind:?} {bytes:?}: {e}");
        }
    }
    // A billion laughs: aliases that expand exponentially.
    let mut bomb = String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
    for i in 0..9 {
        let prev = (b'a' + i) as char;
        let next = (b'a' + i + 1) as char;
        bomb.push_str(&format!("{next}: &{next} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
    }
    for text in [
        "",
        "~",
        "[]",
        "{",
        "static_resources: 1",
        "*a",
        "&a [*a]",
        bomb.as_str(),
    ] {
        match load(text) {
            Ok(Err(_)) => {}
            other => panic!("{text:?}: {other:?}"),
        }
    }
}
