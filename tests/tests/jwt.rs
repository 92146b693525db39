//! The JWT authentication filter proven equal to Envoy's: one static bootstrap
//! (`envoy.filters.http.jwt_authn` in istiod's shape, an RBAC filter whose principals read
//! the verified payload from the dynamic metadata, the router) runs through Ferry and
//! through Envoy 1.40 in front of the same `tests/apps/echo.py` backend, and the same
//! requests — no token, Istio's demo tokens (RS256), tokens signed here with a fresh ES256
//! key (expired, not yet valid, another issuer, another audience, tampered, in a query
//! parameter), garbage, a CORS preflight — must give the same status, body,
//! `www-authenticate` and the same token and claim headers at the backend.
//!
//! Envoy comes from `ferry_tests::envoy`; without it the test is skipped with a note,
//! except under `CI=true`, where a missing Envoy fails the test.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use ferry_tests::envoy::{self, Envoy};
use ferry_tests::pki::{ISTIO_DEMO_JWKS as DEMO_JWKS, ISTIO_DEMO_JWT as DEMO};
use ferry_tests::proxy::{
    App, Bootstrap, Ferry, RunLock, Upstream, free_port, http_connection_manager, http_request,
    listener, local, read_response, static_cluster,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

/// Another of Istio's sample tokens (see [`DEMO`]): claims `groups: [group1, group2]`,
/// `scope`, expires in 2082.
const GROUPS: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjM1MzczOTExMDQsImdyb3VwcyI6WyJncm91cDEiLCJncm91cDIiXSwiaWF0IjoxNTM3MzkxMTA0LCJpc3MiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyIsInNjb3BlIjpbInNjb3BlMSIsInNjb3BlMiJdLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.EdJnEZSH6X8hcyEii7c8H5lnhgjB5dwo07M5oheC8Xz8mOllyg--AHCFWHybM48reunF--oGaG6IXVngCEpVF0_P5DwsUoBgpPmK1JOaKN6_pe9sh0ZwTtdgK_RP01PuI7kUdbOTlkuUi2AO-qUyOm7Art2POzo36DLQlUXv8Ad7NBOqfQaKjE9ndaPWT7aexUsBHxmgiGbz1SyLH879f7uHYPbPKlpHU6P9S-DaKnGLaEchnoKnov7ajhrEhGXAQRukhDPKUHO9L30oPIr5IJllEQfHYtt6IZvlNUGeLUcif3wpry1R5tBXRicx2sXMQ7LyuDremDbcNy_iE76Upg";
const ISTIO_ISS: &str = "testing@secure.istio.io";
const EC_ISS: &str = "https://ec.ferry.test";

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A P-256 key made for this run, with its JWKS.
struct EcKey {
    pair: EcdsaKeyPair,
    jwks: String,
}

impl EcKey {
    fn new() -> Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot make an EC key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("cannot load the EC key"))?;
        let p = pair.public_key().as_ref();
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "ec1", "alg": "ES256",
            "x": b64url(&p[1..33]), "y": b64url(&p[33..])}]})
        .to_string();
        Ok(EcKey { pair, jwks })
    }

    /// An ES256 token with these claims (`kid` ec1).
    fn sign(&self, claims: Value) -> String {
        let h = b64url(br#"{"alg":"ES256","kid":"ec1","typ":"JWT"}"#);
        let p = b64url(claims.to_string().as_bytes());
        let sig = self
            .pair
            .sign(&SystemRandom::new(), format!("{h}.{p}").as_bytes())
            .map(|s| b64url(s.as_ref()))
            .unwrap_or_default();
        format!("{h}.{p}.{sig}")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The bootstrap: istiod's jwt_authn shape (`origins-0` for Istio's demo issuer with the
/// payload forwarded in a header, `origins-1` for the ES256 issuer with an audience, the
/// token also read from `?token=`, not forwarded, `sub` copied to `x-jwt-sub`; any of
/// them or none, except under `/strict` where `origins-0` is required), then RBAC on the
/// payload, then the router.
fn config(port: u16, backend: u16, ec_jwks: &str) -> String {
    with_jwt_filter(port, backend, own_jwt_filter(ec_jwks))
}

/// The JWT filter istiod makes of two RequestAuthentication rules (the demo issuer and
/// the ES256 one, both at the default locations): any provider, or for each provider its
/// token or none.
fn istiod_jwt_filter(ec_jwks: &str) -> Value {
    let provider = |iss: &str, jwks: &str| {
        json!({"issuer": iss, "local_jwks": {"inline_string": jwks},
            "payload_in_metadata": "payload",
            "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]}})
    };
    let name = |n: &str| json!({"provider_name": n});
    let or_missing =
        |n: &str| json!({"requires_any": {"requirements": [name(n), {"allow_missing": {}}]}});
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "origins-0": provider(EC_ISS, ec_jwks),
                "origins-1": provider(ISTIO_ISS, DEMO_JWKS),
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                name("origins-0"),
                name("origins-1"),
                {"requires_all": {"requirements": [or_missing("origins-0"), or_missing("origins-1")]}},
            ]}}}],
            "bypass_cors_preflight": true,
        },
    })
}

/// Providers with every token location and output (see [`config`]).
fn own_jwt_filter(ec_jwks: &str) -> Value {
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "origins-0": {
                    "issuer": ISTIO_ISS,
                    "local_jwks": {"inline_string": DEMO_JWKS},
                    "forward": true,
                    "forward_payload_header": "x-jwt-payload",
                    "payload_in_metadata": "payload",
                },
                "origins-1": {
                    "issuer": EC_ISS,
                    "audiences": ["ferry.test"],
                    "local_jwks": {"inline_string": ec_jwks},
                    "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
                    "from_params": ["token"],
                    "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}],
                    "payload_in_metadata": "payload",
                },
            },
            "rules": [
                {"match": {"prefix": "/strict"}, "requires": {"provider_name": "origins-0"}},
                {"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                    {"provider_name": "origins-0"},
                    {"provider_name": "origins-1"},
                    {"allow_missing": {}},
                ]}}},
            ],
            "requirement_map": {"istio-only": {"provider_name": "origins-0"}},
            "bypass_cors_preflight": true,
        },
    })
}

/// The bootstrap around a JWT filter: RBAC on the verified payload, the router.
fn with_jwt_filter(port: u16, backend: u16, jwt: Value) -> String {
    let md = |path: &[&str], m: Value| {
        json!({"metadata": {"filter": "envoy.filters.http.jwt_authn",
            "path": path.iter().map(|k| json!({"key": k})).collect::<Vec<_>>(),
            "value": m}})
    };
    let exact = |s: &str| json!({"string_match": {"exact": s}});
    let path = |p: &str| json!({"url_path": {"path": {"prefix": p}}});
    let rbac = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {
                "public": {"permissions": [{"or_rules": {"rules": [
                        path("/public"), path("/strict"), path("/open"), path("/named"), path("/wrong")]}}],
                    "principals": [{"any": true}]},
                "istio-user": {"permissions": [path("/secure")],
                    "principals": [{"and_ids": {"ids": [
                        md(&["payload", "iss"], exact(ISTIO_ISS)),
                        md(&["payload", "sub"], exact(ISTIO_ISS)),
                    ]}}]},
                "group1": {"permissions": [path("/groups")],
                    "principals": [md(&["payload", "groups"],
                        json!({"list_match": {"one_of": exact("group1")}}))]},
                "scope-read": {"permissions": [path("/scope")],
                    "principals": [md(&["payload", "scope"],
                        json!({"list_match": {"one_of": exact("read")}}))]},
                "ec-user": {"permissions": [path("/ec")],
                    "principals": [md(&["payload", "iss"], exact(EC_ISS))]},
            }},
        },
    });
    let per_route = |cfg: Value| {
        let mut c = cfg;
        c["@type"] =
            json!("type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig");
        json!({"envoy.filters.http.jwt_authn": c})
    };
    let routes = vec![
        json!({"match": {"prefix": "/open"}, "route": {"cluster": "backend", "timeout": "5s"},
            "typed_per_filter_config": per_route(json!({"disabled": true}))}),
        json!({"match": {"prefix": "/wrong"}, "route": {"cluster": "backend", "timeout": "5s"},
            "typed_per_filter_config": per_route(json!({"requirement_name": "nope"}))}),
        json!({"match": {"prefix": "/named"}, "route": {"cluster": "backend", "timeout": "5s"},
            "typed_per_filter_config": per_route(json!({"requirement_name": "istio-only"}))}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "5s"}}),
    ];
    let mut hcm = http_connection_manager("in", routes);
    if let Some(list) = hcm["typed_config"]["http_filters"].as_array_mut() {
        list.insert(0, rbac);
        list.insert(0, jwt);
    }
    Bootstrap::new()
        .listener(listener("in", port, vec![json!({"filters": [hcm]})]))
        .cluster(static_cluster("backend", &[backend], Upstream::Http1))
        .render()
}

/// Every non-zero counter whose name has a `jwt_authn` part, but for Envoy's token cache
/// (`jwt_cache_*`: Ferry keeps no cache of verified tokens).
fn jwt_stats(admin: u16) -> Result<Vec<(String, u64)>> {
    let (_, body) = http_request(local(admin), "GET", "/stats")?;
    Ok(body
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            let v: u64 = v.trim().parse().ok()?;
            (k.contains("jwt_authn") && !k.contains("jwt_cache") && v > 0)
                .then(|| (k.trim().to_string(), v))
        })
        .collect())
}

/// What one request shows.
#[derive(Debug, PartialEq)]
struct Seen {
    what: String,
    status: u16,
    /// The proxy's own answer (anything but 200).
    body: Option<String>,
    www_authenticate: Option<String>,
    /// At the backend: the token, payload and claim headers it received.
    backend: Option<Vec<(String, String)>>,
}

fn request(port: u16, method: &str, path: &str, headers: &[(&str, String)]) -> Result<Seen> {
    let s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: api.ferry.test\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    (&s).write_all(head.as_bytes())?;
    let resp = read_response(&mut BufReader::new(s))?;
    let what = format!(
        "{method} {path} {:?}",
        headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.chars().take(24).collect::<String>()))
            .collect::<Vec<_>>()
    );
    let backend = if resp.status == 200 {
        let j = resp.json()?;
        let mut seen: Vec<(String, String)> = j["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                let k = h[0].as_str()?.to_ascii_lowercase();
                let v = h[1].as_str()?.to_string();
                matches!(k.as_str(), "authorization" | "x-jwt-payload" | "x-jwt-sub")
                    .then_some((k, v))
            })
            .collect();
        seen.sort();
        Some(seen)
    } else {
        None
    };
    Ok(Seen {
        what,
        status: resp.status,
        body: (resp.status != 200).then(|| String::from_utf8_lossy(&resp.body).into_owned()),
        www_authenticate: resp.header("www-authenticate").map(str::to_string),
        backend,
    })
}

/// A request: method, path and query, extra headers.
type Case = (&'static str, String, Vec<(&'static str, String)>);

#[test]
fn jwt_authn_matches_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; differential test skipped");
        return Ok(());
    };
    let app = App::http("backend", &[])?;
    let key = EcKey::new()?;
    let t = now();
    let ec = |extra: Value| {
        let mut c = json!({"iss": EC_ISS, "sub": "ec-user", "aud": "ferry.test", "exp": t + 3600});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        key.sign(c)
    };
    let bearer = |tok: &str| vec![("authorization", format!("Bearer {tok}"))];
    let good_ec = ec(json!({}));
    let mut tampered: Vec<String> = good_ec.split('.').map(str::to_string).collect();
    tampered[1] = b64url(
        json!({"iss": EC_ISS, "sub": "root", "aud": "ferry.test"})
            .to_string()
            .as_bytes(),
    );
    let tampered = tampered.join(".");
    let cases: Vec<Case> = vec![
        ("GET", "/public".into(), vec![]),
        ("GET", "/secure".into(), vec![]),
        ("GET", "/secure".into(), bearer(DEMO)),
        ("GET", "/groups".into(), bearer(DEMO)),
        ("GET", "/groups".into(), bearer(GROUPS)),
        ("GET", "/public".into(), bearer("garbage")),
        ("GET", "/public".into(), bearer("a.b.c")),
        ("GET", "/public?x=1".into(), bearer(&tampered)),
        ("GET", "/ec".into(), bearer(&good_ec)),
        (
            "GET",
            "/ec".into(),
            vec![("authorization", format!("Bearer {good_ec} trailing"))],
        ),
        (
            "GET",
            "/ec".into(),
            vec![("authorization", format!("x Bearer {good_ec}"))],
        ),
        (
            "GET",
            "/ec".into(),
            vec![("authorization", format!("Bearer {good_ec}, other"))],
        ),
        (
            "GET",
            "/ec".into(),
            vec![("authorization", format!("Bearer   {good_ec}"))],
        ),
        ("GET", format!("/ec?token={good_ec}"), vec![]),
        ("GET", "/ec".into(), bearer(&ec(json!({"exp": t - 3600})))),
        ("GET", "/ec".into(), bearer(&ec(json!({"exp": t - 30})))),
        ("GET", "/ec".into(), bearer(&ec(json!({"nbf": t + 3600})))),
        (
            "GET",
            "/ec".into(),
            bearer(&ec(json!({"aud": "elsewhere"}))),
        ),
        (
            "GET",
            "/ec".into(),
            bearer(&ec(json!({"iss": "https://other.test"}))),
        ),
        (
            "GET",
            "/secure".into(),
            bearer(&ec(json!({"iss": "https://other.test"}))),
        ),
        ("GET", "/strict".into(), vec![]),
        ("GET", "/open".into(), bearer("garbage")),
        ("GET", "/named".into(), vec![]),
        ("GET", "/wrong".into(), bearer(DEMO)),
        ("GET", "/named".into(), bearer(DEMO)),
        ("GET", "/named".into(), bearer(&good_ec)),
        ("GET", "/strict".into(), bearer(DEMO)),
        ("GET", "/strict".into(), bearer(&good_ec)),
        (
            "OPTIONS",
            "/strict".into(),
            vec![
                ("origin", "https://app.test".into()),
                ("access-control-request-method", "GET".into()),
            ],
        ),
        (
            "GET",
            "/public".into(),
            vec![("authorization", format!("Basic {DEMO}"))],
        ),
    ];
    run_both(&bin, |port| config(port, app.port, &key.jwks), &cases)
}

/// Istiod's shape for two RequestAuthentication rules whose tokens share the default
/// locations: a token of either issuer passes when valid, is refused when not, and none
/// at all passes.
#[test]
fn istiod_shaped_jwt_authn_matches_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; differential test skipped");
        return Ok(());
    };
    let app = App::http("backend", &[])?;
    let key = EcKey::new()?;
    let t = now();
    let ec = |extra: Value| {
        let mut c =
            json!({"iss": EC_ISS, "sub": "ec-user", "scope": "read write", "exp": t + 3600});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        key.sign(c)
    };
    let bearer = |tok: &str| vec![("authorization", format!("Bearer {tok}"))];
    let cases: Vec<Case> = vec![
        ("GET", "/public".into(), vec![]),
        ("GET", "/secure".into(), vec![]),
        ("GET", "/secure".into(), bearer(DEMO)),
        ("GET", format!("/secure?access_token={DEMO}"), vec![]),
        ("GET", "/groups".into(), bearer(GROUPS)),
        ("GET", "/ec".into(), bearer(&ec(json!({})))),
        ("GET", "/scope".into(), bearer(&ec(json!({})))),
        (
            "GET",
            "/scope".into(),
            bearer(&ec(json!({"scope": "write"}))),
        ),
        (
            "GET",
            "/public".into(),
            bearer(&ec(json!({"exp": t - 3600}))),
        ),
        (
            "GET",
            "/public".into(),
            bearer(&ec(json!({"iss": "https://other.test"}))),
        ),
        ("GET", "/public".into(), bearer("garbage")),
        ("GET", "/public".into(), bearer(&format!("{DEMO}x"))),
    ];
    run_both(
        &bin,
        |port| with_jwt_filter(port, app.port, istiod_jwt_filter(&key.jwks)),
        &cases,
    )
}

/// Sends `cases` through Ferry, then through Envoy, each started on `config(port)`, and
/// asserts the same observations and the same `jwt_authn` counters.
fn run_both(bin: &std::path::Path, config: impl Fn(u16) -> String, cases: &[Case]) -> Result<()> {
    let observe = |port: u16| -> Result<Vec<Seen>> {
        cases
            .iter()
            .map(|(m, p, h)| request(port, m, p, h))
            .collect()
    };

    let port = free_port();
    let ferry = Ferry::start(&config(port))?;
    let through_ferry =
        observe(port).with_context(|| format!("through ferry:\n{}", ferry.log()))?;
    let ferry_stats = jwt_stats(ferry.admin)?;
    drop(ferry);
    let port = free_port();
    let envoy = Envoy::start(bin, &serde_json::from_str(&config(port))?, port)?;
    let through_envoy =
        observe(port).with_context(|| format!("through envoy:\n{}", envoy.log()))?;
    let envoy_stats = jwt_stats(envoy.admin())?;
    let mut differ = Vec::new();
    for (f, e) in through_ferry.iter().zip(&through_envoy) {
        if f == e {
            eprintln!("both saw: {f:?}");
        } else {
            differ.push(format!("ferry: {f:#?}\nenvoy: {e:#?}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    assert_eq!(ferry_stats, envoy_stats, "jwt_authn counters");
    eprintln!("both counted: {ferry_stats:?}");
    Ok(())
}

/// `strip_failure_response`: failures keep their status, lose their body and
/// `www-authenticate`.
#[test]
fn stripped_failures_match_envoy() -> Result<()> {
    let _lock = RunLock::shared();
    let Some(bin) = envoy::bin()? else {
        eprintln!("envoy not installed; differential test skipped");
        return Ok(());
    };
    let app = App::http("backend", &[])?;
    let key = EcKey::new()?;
    let bearer = |tok: &str| vec![("authorization", format!("Bearer {tok}"))];
    let cases: Vec<Case> = vec![
        ("GET", "/public".into(), bearer("garbage")),
        ("GET", "/strict".into(), vec![]),
        ("GET", "/secure".into(), bearer(DEMO)),
        (
            "GET",
            "/ec".into(),
            bearer(&key.sign(json!({"iss": EC_ISS, "aud": "elsewhere"}))),
        ),
    ];
    run_both(
        &bin,
        |port| {
            let mut f = own_jwt_filter(&key.jwks);
            f["typed_config"]["strip_failure_response"] = json!(true);
            with_jwt_filter(port, app.port, f)
        },
        &cases,
    )
}
