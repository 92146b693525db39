//! Fuzzing of JWT verification (`ferry_filters::http::jwt_authn`): tokens
//! built from the pieces that matter to it (base64url segments of JSON
//! headers and payloads with odd `alg` and `kid`, huge, negative,
//! fractional and nested numbers, wrong types for `exp`, `nbf`, `iat` and
//! `aud`, extra and missing dots, padding, whitespace, the standard
//! alphabet, non-ASCII, raw bytes) go through `Jwt::parse`, the time and
//! signature checks against a JWKS (an RSA and an EC P-256 key), and the
//! whole filter (`decide`, the token in `authorization`). Each answer must
//! hold: no panic, and a rejection unless the token is one built to be
//! valid (Istio's demo RS256 token, or an ES256 token signed here with
//! the test key) whose signed text and signature bytes came through
//! unchanged. Valid tokens are mutated too (a character changed or
//! removed, the token truncated, padded, given an extra dot or segment,
//! its segments swapped): whatever is accepted must still decode to what
//! was signed. Tokens signed with the test key but wrong in one way
//! (expired or not yet valid beyond the skew, another or no issuer, a
//! claim of the wrong type, a kid or alg the key lacks) must be refused.
//!
//! A short run is part of `cargo test`; a longer one is
//! `FERRY_FUZZ_ITERS=1000000 cargo test --release -p ferry-filters --test jwt_fuzz`,
//! and `FERRY_FUZZ_SEED=n` replays one seed (each failure prints its seed
//! and input; the ES256 key and its signatures are drawn anew each run, so
//! a replayed valid token differs in its signature only).

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_filters::http::jwt_authn::{Decision, Jwt, decide};
use ferry_model::Pseudo;
use ferry_model::jwt::{Jwks, JwtAuthn, JwtProvider, Requirement, b64url_decode, b64url_encode};
use http::{HeaderMap, HeaderValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// Istio's sample key and its never-expiring demo token (iss and sub
/// `testing@secure.istio.io`).
const DEMO_RSA_KEY: &str = r#"{"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}"#;
const DEMO_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTUzMjM4OTcwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.CfNnxWP2tcnR9q0vxyxweaF3ovQYHYZl82hAUsn21bwQd9zP7c-LS9qd_vpdLG4Tn1A15NxfCjp5f7QNBUo-KC9PJqYpgGbaXhaGx7bEdFWjcwv3nZzvc7M__ZpaCERdwU7igUmJqYGBYQ51vr2njU9ZimyKkfDe3axcyiBZde7G6dabliUosJvvKOPcKIWPccCgefSj_GNfwIip3-SsFdlR7BtbVUcqR-yv-XOxJ3Uc1MI0tz3uMiiZcyPV7sNCU4KRnemRIMHVOfuvHsU60_GhGbiSFzgPTAa9WTltbnarTbxudb_YEOx12JiwYToeX0DCPb43W1tzIBxgm8NxUg";
const ISS: &str = "testing@secure.istio.io";
const EC_KID: &str = "ec1";
const NOW: u64 = 1_800_000_000;

struct Keys {
    ec: EcdsaKeyPair,
    /// The provider (ISS, both keys) and the filter requiring it.
    cfg: JwtAuthn,
    jwks: Jwks,
    /// What a valid token signs (`header.payload`) and its signature bytes.
    valid: BTreeMap<String, Vec<u8>>,
}

fn keys() -> Keys {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .unwrap_or_else(|e| panic!("{e}"));
    let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .unwrap_or_else(|e| panic!("{e}"));
    let point = ec.public_key().as_ref();
    let text = format!(
        r#"{{"keys":[{DEMO_RSA_KEY},{{"kty":"EC","crv":"P-256","kid":"{EC_KID}","x":"{}","y":"{}"}}]}}"#,
        b64url_encode(&point[1..33]),
        b64url_encode(&point[33..])
    );
    let jwks = Jwks::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let provider = Arc::new(JwtProvider {
        name: "p".into(),
        issuer: ISS.into(),
        jwks: jwks.clone(),
        forward: true,
        clock_skew: 60,
        ..Default::default()
    });
    let cfg = JwtAuthn {
        providers: [("p".to_string(), provider)].into_iter().collect(),
        ..Default::default()
    };
    let mut valid = BTreeMap::new();
    let (signed, sig) = DEMO_TOKEN.rsplit_once('.').unwrap_or_default();
    valid.insert(signed.to_string(), b64url_decode(sig).unwrap_or_default());
    Keys {
        ec,
        cfg,
        jwks,
        valid,
    }
}

fn pick<'a>(rng: &mut StdRng, list: &[&'a str]) -> &'a str {
    list[rng.random_range(0..list.len())]
}

/// A JSON value that some claim or header field may carry.
fn odd_value(rng: &mut StdRng, depth: u32) -> String {
    const SCALARS: &[&str] = &[
        "null",
        "true",
        "0",
        "-1",
        "1.5",
        "-0.0",
        "1e3",
        "1e308",
        "1e400",
        "-1e400",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "4685989700",
        "1800000000",
        "\"\"",
        "\"soon\"",
        "\"RS256\"",
        "\"ES256\"",
        "\"none\"",
        "\"ec1\"",
        "\"testing@secure.istio.io\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"é\"",
        "{}",
        "[]",
    ];
    match rng.random_range(0..10) {
        0 if depth < 4 => {
            let n = rng.random_range(0..4);
            let items: Vec<String> = (0..n).map(|_| odd_value(rng, depth + 1)).collect();
            format!("[{}]", items.join(","))
        }
        1 if depth < 4 => format!("{{\"a\":{}}}", odd_value(rng, depth + 1)),
        2 => {
            // Deep nesting, past what serde_json allows (128).
            let d = rng.random_range(1..200);
            format!("{}{}", "[".repeat(d), "]".repeat(d))
        }
        _ => pick(rng, SCALARS).to_string(),
    }
}

fn object(rng: &mut StdRng, fields: &[(&str, &[&str])]) -> String {
    let mut parts = Vec::new();
    for (name, good) in fields {
        match rng.random_range(0..6) {
            0 => {}
            1 => parts.push(format!("\"{name}\":{}", odd_value(rng, 0))),
            _ => parts.push(format!("\"{name}\":{}", pick(rng, good))),
        }
    }
    if rng.random_range(0..4) == 0 {
        // A duplicate key, or one nobody reads.
        let (name, good) = fields[rng.random_range(0..fields.len())];
        parts.push(format!("\"{name}\":{}", pick(rng, good)));
    }
    if rng.random_range(0..6) == 0 {
        parts.push(format!("\"x\":{}", odd_value(rng, 0)));
    }
    let mut text = format!("{{{}}}", parts.join(","));
    match rng.random_range(0..20) {
        0 => {
            let n = rng.random_range(0..=text.len());
            text = String::from_utf8_lossy(&text.as_bytes()[..n]).into_owned();
        }
        1 => text.push_str("garbage"),
        2 => text = format!(" \n{text}\t"),
        _ => {}
    }
    text
}

fn header(rng: &mut StdRng) -> String {
    object(
        rng,
        &[
            (
                "alg",
                &[
                    "\"ES256\"",
                    "\"RS256\"",
                    "\"PS256\"",
                    "\"ES384\"",
                    "\"HS256\"",
                    "\"none\"",
                    "\"EdDSA\"",
                    "\"es256\"",
                    "\"\"",
                ],
            ),
            (
                "kid",
                &[
                    "\"ec1\"",
                    "\"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ\"",
                    "\"other\"",
                    "\"\"",
                ],
            ),
            ("typ", &["\"JWT\""]),
        ],
    )
}

fn payload(rng: &mut StdRng) -> String {
    object(
        rng,
        &[
            ("iss", &["\"testing@secure.istio.io\"", "\"other\"", "\"\""]),
            ("sub", &["\"s\"", "\"testing@secure.istio.io\""]),
            (
                "exp",
                &["4685989700", "1799999000", "1800000059", "0", "-5"],
            ),
            ("nbf", &["1700000000", "1800000061", "1800000000"]),
            ("iat", &["1532389700"]),
            ("aud", &["\"a\"", "[\"a\",\"b\"]", "[]", "[\"a\",1]"]),
            ("jti", &["\"j\""]),
        ],
    )
}

/// A segment: the base64url of `json`, or something near it.
fn segment(rng: &mut StdRng, json: &str) -> String {
    let mut s = b64url_encode(json.as_bytes());
    match rng.random_range(0..24) {
        0 => s.push_str("=="),
        1 => s.push('='),
        2 => s = s.replace('-', "+").replace('_', "/"),
        3 if !s.is_empty() => {
            let i = rng.random_range(0..s.len());
            s.insert(i, ' ');
        }
        4 => s.push('é'),
        5 => s.push('.'),
        6 => s.push('A'),
        7 => s = String::from_utf8_lossy(&random_bytes(rng, 16)).into_owned(),
        8 => s.clear(),
        _ => {}
    }
    s
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

/// Signs `header.payload` with the test key; `valid`: the claims are
/// good, so the token may pass.
fn sign_es256(keys: &mut Keys, h: &str, p: &str, valid: bool) -> String {
    let signed = format!("{h}.{p}");
    let sig = keys
        .ec
        .sign(&SystemRandom::new(), signed.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    if valid {
        keys.valid.insert(signed.clone(), sig.as_ref().to_vec());
    }
    format!("{signed}.{}", b64url_encode(sig.as_ref()))
}

/// A token signed with the test key whose header or claims are wrong in
/// one way: expired or not yet valid beyond the skew, another or no
/// issuer, a claim of the wrong type, a kid or alg the key does not have.
fn signed_bad_token(rng: &mut StdRng, keys: &mut Keys) -> String {
    let mut header = format!("{{\"alg\":\"ES256\",\"kid\":\"{EC_KID}\"}}");
    let mut claims = vec![
        format!("\"iss\":\"{ISS}\""),
        "\"exp\":4685989700".to_string(),
    ];
    match rng.random_range(0..8) {
        0 => claims[1] = "\"exp\":1799999900".into(),
        1 => claims.push("\"nbf\":1800000100".into()),
        2 => claims[0] = "\"iss\":\"other\"".into(),
        3 => {
            claims.remove(0);
        }
        4 => claims[1] = "\"exp\":\"4685989700\"".into(),
        5 => claims.push("\"aud\":5".into()),
        6 => header = "{\"alg\":\"ES256\",\"kid\":\"other\"}".into(),
        _ => header = format!("{{\"alg\":\"ES384\",\"kid\":\"{EC_KID}\"}}"),
    }
    let h = b64url_encode(header.as_bytes());
    let p = b64url_encode(format!("{{{}}}", claims.join(",")).as_bytes());
    sign_es256(keys, &h, &p, false)
}

/// A token valid at NOW for the provider: ES256 signed here, or the demo.
fn valid_token(rng: &mut StdRng, keys: &mut Keys) -> String {
    if rng.random_range(0..4) == 0 {
        return DEMO_TOKEN.to_string();
    }
    let kid = if rng.random() {
        format!(",\"kid\":\"{EC_KID}\"")
    } else {
        String::new()
    };
    let h = b64url_encode(format!("{{\"alg\":\"ES256\"{kid},\"typ\":\"JWT\"}}").as_bytes());
    let exp = pick(rng, &["4685989700", "1800000030", "1799999950"]);
    let aud = pick(rng, &["", ",\"aud\":\"a\"", ",\"aud\":[\"a\",\"b\"]"]);
    let p = b64url_encode(
        format!("{{\"iss\":\"{ISS}\",\"sub\":\"s\",\"exp\":{exp},\"nbf\":1799999990{aud}}}")
            .as_bytes(),
    );
    sign_es256(keys, &h, &p, true)
}

fn mutate(rng: &mut StdRng, token: &str) -> String {
    let mut t: Vec<u8> = token.as_bytes().to_vec();
    match rng.random_range(0..8) {
        0 if !t.is_empty() => {
            let i = rng.random_range(0..t.len());
            t[i] = *b"AQgw-_+/.= \x00\xff"
                .get(rng.random_range(0..13))
                .unwrap_or(&b'A');
        }
        1 => t.truncate(rng.random_range(0..=t.len())),
        2 => t.extend_from_slice(b"=="),
        3 => t.extend_from_slice(b".x"),
        4 => {
            // Segments swapped.
            let parts: Vec<&str> = token.split('.').collect();
            if parts.len() == 3 {
                t = format!("{}.{}.{}", parts[1], parts[0], parts[2]).into_bytes();
            }
        }
        5 if !t.is_empty() => {
            let i = rng.random_range(0..t.len());
            t.insert(i, b'.');
        }
        6 if !t.is_empty() => {
            let i = rng.random_range(0..t.len());
            t.remove(i);
        }
        _ => {}
    }
    String::from_utf8_lossy(&t).into_owned()
}

/// A token of pieces, not signed with the key (a signature spliced from a
/// valid token at most).
fn random_token(rng: &mut StdRng, keys: &Keys) -> String {
    if rng.random_range(0..10) == 0 {
        return String::from_utf8_lossy(&random_bytes(rng, 64)).into_owned();
    }
    let h = header(rng);
    let p = payload(rng);
    let mut parts = vec![segment(rng, &h), segment(rng, &p)];
    parts.push(match rng.random_range(0..4) {
        0 => {
            let sigs: Vec<&Vec<u8>> = keys.valid.values().collect();
            b64url_encode(sigs[rng.random_range(0..sigs.len())])
        }
        1 => String::new(),
        _ => b64url_encode(&random_bytes(rng, 300)),
    });
    match rng.random_range(0..12) {
        0 => {
            parts.pop();
        }
        1 => parts.push(String::new()),
        2 => parts.push("x".into()),
        _ => {}
    }
    parts.join(".")
}

/// Whether `token` carries, unchanged, what a valid token signed.
fn carries_valid(keys: &Keys, token: &str) -> bool {
    let Some((signed, sig)) = token.rsplit_once('.') else {
        return false;
    };
    keys.valid
        .get(signed)
        .is_some_and(|want| b64url_decode(sig).as_deref() == Some(want.as_slice()))
}

fn check(keys: &Keys, token: &str, built_valid: bool) -> Result<(), String> {
    // The pieces: parse, time, signature.
    let verdict = Jwt::parse(token).and_then(|jwt| {
        if jwt.iss.as_deref() != Some(ISS) {
            return Err(ferry_filters::http::jwt_authn::Status::UnknownIssuer);
        }
        jwt.check_time(NOW, 60)?;
        jwt.verify_signature(&keys.jwks.keys)?;
        Ok(jwt)
    });
    let may_pass = carries_valid(keys, token);
    match &verdict {
        Ok(_) if !may_pass => return Err("accepted".into()),
        Err(s) if built_valid => return Err(format!("a valid token refused: {s}")),
        _ => {}
    }
    // The whole filter, the token in `authorization`.
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, v);
        let pseudo = Pseudo {
            method: "GET",
            path: "/",
            authority: "example.com",
            scheme: "http",
        };
        let req = Requirement::Provider("p".into());
        match decide(&keys.cfg, Some(&req), &pseudo, &headers, NOW) {
            Decision::Pass(v) => {
                if v.is_empty() || !may_pass {
                    return Err(format!("filter passed: {v:?}"));
                }
                if verdict.is_err() {
                    return Err("filter passed a token the pieces refused".into());
                }
            }
            Decision::Preflight => return Err("preflight".into()),
            Decision::Deny(s) => {
                if verdict.is_ok() && !token.trim().contains(char::is_whitespace) {
                    return Err(format!("filter refused a token the pieces accepted: {s}"));
                }
            }
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
fn jwt_fuzz() {
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
    let mut keys = keys();
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let (token, built_valid) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match rng.random_range(0..10) {
                0 => (valid_token(&mut rng, &mut keys), true),
                1 | 2 => {
                    let t = valid_token(&mut rng, &mut keys);
                    (mutate(&mut rng, &t), false)
                }
                3 => (signed_bad_token(&mut rng, &mut keys), false),
                _ => (random_token(&mut rng, &keys), false),
            }
        }))
        .unwrap_or_else(|_| panic!("FERRY_FUZZ_SEED={seed}: building the input panicked"));
        if let Err(e) = guarded(|| check(&keys, &token, built_valid)) {
            panic!("FERRY_FUZZ_SEED={seed}: token {token:?}: {e}");
        }
    }
}

/// Tokens on the edges: segment counts, padding, types, huge numbers.
#[test]
fn jwt_corpus() {
    let mut keys = keys();
    let seg = |s: &str| b64url_encode(s.as_bytes());
    let good_h = seg(r#"{"alg":"ES256","kid":"ec1"}"#);
    let good_p = seg(r#"{"iss":"testing@secure.istio.io","exp":4685989700}"#);
    let mut inputs = vec![
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "a.b.c".into(),
        "====.====.====".into(),
        "é.é.é".into(),
        format!("{good_h}.{good_p}."),
        format!("{good_h}.{good_p}"),
        format!("{good_h}..{good_p}"),
        format!("{}.{good_p}.", seg(r#"{"alg":"none"}"#)),
        format!("{}.{good_p}.", seg(r#"{"alg":["ES256"]}"#)),
        format!("{}.{good_p}.", seg(r#"{"alg":"ES256","kid":7}"#)),
        format!("{good_h}.{}.", seg(r#"{"exp":1e400}"#)),
        format!("{good_h}.{}.", seg(r#"{"exp":18446744073709551616}"#)),
        format!("{good_h}.{}.", seg(r#"{"exp":-1}"#)),
        format!("{good_h}.{}.", seg(r#"{"nbf":"now"}"#)),
        format!("{good_h}.{}.", seg(r#"{"aud":{"a":1}}"#)),
        format!(
            "{good_h}.{}.",
            seg(&format!("{}{}", "[".repeat(500), "]".repeat(500)))
        ),
        format!("{good_h}.{}.", seg("[]")),
        format!("{good_h}.{good_p}.{}", "A".repeat(10_000)),
    ];
    let valid = sign_es256(&mut keys, &good_h, &good_p, true);
    inputs.push(format!("{valid}=="));
    for input in &inputs {
        if let Err(e) = check(&keys, input, false) {
            panic!("token {input:?}: {e}");
        }
    }
    for input in [valid.as_str(), DEMO_TOKEN] {
        if let Err(e) = check(&keys, input, true) {
            panic!("token {input:?}: {e}");
        }
    }
}
