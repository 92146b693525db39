//! Fuzzing of the connection manager's path normalization
//! (`ferry_filters::http::path_normalization`): paths built from the pieces
//! that matter to it (dots and escaped dots, escaped and back slashes, lone
//! and nested `%`, NUL, `;` parameters, queries, non-ASCII, raw bytes) go
//! through every settings combination, and each answer must hold the
//! properties of Envoy's algorithm: no panic, a path that starts with `/`,
//! no `.` or `..` segment left after `normalize_path`, no `//` left after
//! `merge_slashes`, the query never touched, and a second pass that changes
//! nothing — except where Envoy's own algorithm is not idempotent: a `.;x`
//! or `..;x` segment made of `%2E` dots, which Envoy's parameter stripping
//! (literal dots only) does not see on the first pass.
//!
//! A short run is part of `cargo test`; a longer one is
//! `FERRY_FUZZ_ITERS=5000000 cargo test --release -p ferry-filters --test path_normalization_fuzz`,
//! and `FERRY_FUZZ_SEED=n` replays one seed (each failure prints its seed
//! and input).

use std::borrow::Cow;

use ferry_filters::http::path_normalization::{
    Rejected, Verdict, merge_slashes, normalize, rfc3986_normalize, unescape_slashes,
};
use ferry_model::listener::{EscapedSlashesAction, PathNormalization};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The pieces paths are made of, chosen for what the normalizer reads.
const PIECES: &[&str] = &[
    "/", "/", "/", "//", ".", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%", "%%",
    "%25", "%00", "\0", "%41", "%61", "%7e", "%7E", "%3B", "%3b", "%2", "%g1", "%30", "%3", ";",
    ";", "?", "=", "&", "a", "b", "admin", "x", "~", "-", "_", "é", "\u{7f}", " ", "\"", "{", "|",
    "^", "`", "<", "#", "@", ":", "+", "[", "]",
];

fn piece(rng: &mut StdRng) -> Cow<'static, str> {
    if rng.random_range(0..20) == 0 {
        // Now and then a raw byte, as the path may carry it.
        let b: u8 = rng.random();
        return Cow::Owned(String::from_utf8_lossy(&[b]).into_owned());
    }
    Cow::Borrowed(PIECES[rng.random_range(0..PIECES.len())])
}

fn path(rng: &mut StdRng) -> String {
    let mut p = String::new();
    if rng.random_range(0..10) > 0 {
        p.push('/');
    }
    for _ in 0..rng.random_range(0..14) {
        p.push_str(&piece(rng));
    }
    p
}

fn configs() -> Vec<PathNormalization> {
    use EscapedSlashesAction as A;
    let mut out = Vec::new();
    for normalize_path in [false, true] {
        for merge_slashes in [false, true] {
            for escaped_slashes in [
                A::KeepUnchanged,
                A::RejectRequest,
                A::UnescapeAndRedirect,
                A::UnescapeAndForward,
            ] {
                out.push(PathNormalization {
                    normalize_path,
                    merge_slashes,
                    escaped_slashes,
                });
            }
        }
    }
    out
}

fn split(p: &str) -> (&str, &str) {
    p.find('?').map_or((p, ""), |i| p.split_at(i))
}

/// A segment `.;x` or `..;x`: Envoy strips the parameters of literal dots
/// only, so one made of `%2E` dots survives the first pass and not the
/// second.
fn has_dot_parameters(p: &str) -> bool {
    split(p).0.split('/').any(|s| {
        let dots = s.bytes().take_while(|&b| b == b'.').count();
        (dots == 1 || dots == 2) && s.as_bytes().get(dots) == Some(&b';')
    })
}

fn check(input: &str, cfgs: &[PathNormalization]) -> Result<(), String> {
    let query = split(input).1;
    // The primitives alone.
    if let Some(normalized) = rfc3986_normalize(input) {
        let (path, q) = split(&normalized);
        if !path.starts_with('/') {
            return Err(format!("normalize_path gave {normalized:?}"));
        }
        if path.split('/').any(|s| s == "." || s == "..") {
            return Err(format!("dot segment left in {normalized:?}"));
        }
        if q != query {
            return Err(format!("query changed: {normalized:?}"));
        }
        if !has_dot_parameters(&normalized) {
            let again = rfc3986_normalize(&normalized).map(Cow::into_owned);
            if again.as_deref() != Some(&*normalized) {
                return Err(format!(
                    "normalize_path not idempotent: {normalized:?} → {again:?}"
                ));
            }
        }
    } else if !(input.contains('\0') || split(input).0.contains("%00")) {
        return Err("rejected without a NUL".into());
    }
    if let Some(merged) = merge_slashes(input) {
        let (path, q) = split(&merged);
        if path.contains("//") && path != "//" {
            return Err(format!("merge_slashes left {merged:?}"));
        }
        if q != query || merge_slashes(&merged).is_some_and(|m| m != merged) {
            return Err(format!("merge_slashes: {merged:?}"));
        }
    }
    if let Some(unescaped) = unescape_slashes(input)
        && (split(&unescaped).1 != query || unescape_slashes(&unescaped).is_some())
    {
        return Err(format!("unescape_slashes: {unescaped:?}"));
    }
    // The connection manager's whole pass, per settings.
    for cfg in cfgs {
        let out = match normalize(cfg, input) {
            Verdict::Forward(p) => p.into_owned(),
            Verdict::Redirect(p) => {
                if cfg.escaped_slashes != EscapedSlashesAction::UnescapeAndRedirect {
                    return Err(format!("{cfg:?}: redirect to {p:?}"));
                }
                p
            }
            Verdict::Reject(Rejected::EscapedSlash) => {
                if cfg.escaped_slashes != EscapedSlashesAction::RejectRequest {
                    return Err(format!("{cfg:?}: rejected for a slash"));
                }
                continue;
            }
            Verdict::Reject(Rejected::Invalid) => {
                if !cfg.normalize_path {
                    return Err(format!("{cfg:?}: rejected without normalize_path"));
                }
                continue;
            }
        };
        if !input.starts_with('/') {
            if out != input {
                return Err(format!("{cfg:?}: a non-path changed to {out:?}"));
            }
            continue;
        }
        if !out.starts_with('/') || split(&out).1 != query {
            return Err(format!("{cfg:?}: gave {out:?}"));
        }
        if has_dot_parameters(&out) {
            continue;
        }
        match normalize(cfg, &out) {
            Verdict::Forward(again) if again == out => {}
            other => return Err(format!("{cfg:?}: {out:?} then {other:?}")),
        }
    }
    Ok(())
}

#[test]
fn path_normalization_fuzz() {
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
    let cfgs = configs();
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let input = path(&mut rng);
        if let Err(e) = check(&input, &cfgs) {
            panic!("FERRY_FUZZ_SEED={seed}: input {input:?}: {e}");
        }
    }
}

/// Inputs the fuzzer once found or that sit on the edges of the algorithm.
#[test]
fn path_normalization_corpus() {
    let cfgs = configs();
    for input in [
        "",
        "/",
        "//",
        "///",
        "?",
        "/?",
        "*",
        "/%",
        "/%%",
        "/%%%",
        "/%%30%30",
        "/%%%30%30",
        "/%2%65",
        "/%%32%46",
        "/.%2",
        "/..%",
        "/%2e%2e;a/x",
        "/.;",
        "/..;/..;/",
        "\\..\\",
        "/%5c%2e%2e%5c",
        "/a/%2f%2e%2e%2f",
        "/\0",
        "/%00?%00",
        "/a?b?c/../",
    ] {
        if let Err(e) = check(input, &cfgs) {
            panic!("input {input:?}: {e}");
        }
    }
}
