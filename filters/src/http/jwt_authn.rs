//! `envoy.filters.http.jwt_authn`: finds a request's JWT, verifies it
//! against a provider's JWKS (RS256/384/512, PS256/384/512, ES256, ES384,
//! with `ring`), checks `iss`, `aud`, `exp` and `nbf`, and evaluates the
//! rule's requirement as Envoy does.
//!
//! Pure and synchronous: the caller passes the request's pseudo-headers,
//! headers and the current time, and gets back either what a verified
//! request carries on (payloads for the dynamic metadata, header changes)
//! or the local reply's status and text. A malformed token is a
//! [`Status`], never a panic.

use std::collections::BTreeMap;

use ferry_model::Pseudo;
use ferry_model::jwt::{
    EcCurve, Jwk, JwtAuthn, JwtProvider, KeyMaterial, Requirement, b64url_decode,
};
use ferry_model::rbac::MetaValue;
use http::HeaderMap;
use ring::signature;
use serde_json::Value;

/// The filter name the payloads are stored under in the dynamic metadata.
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// A verification outcome, with the texts Envoy answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Status {
    #[error("Jwt is missing")]
    Missing,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBadBase64,
    #[error("Jwt header is an invalid JSON")]
    HeaderBadJson,
    #[error("Jwt header [alg] field is required and must be a string")]
    HeaderBadAlg,
    #[error("Jwt header [alg] is not supported")]
    HeaderNotImplementedAlg,
    #[error("Jwt header [kid] field is not a string")]
    HeaderBadKid,
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBadBase64,
    #[error("Jwt payload is an invalid JSON")]
    PayloadBadJson,
    #[error("Jwt payload [iss] field is not a string")]
    IssNotString,
    #[error("Jwt payload [sub] field is not a string")]
    SubNotString,
    #[error("Jwt payload [iat] field is not an integer")]
    IatNotInteger,
    #[error("Jwt payload [nbf] field is not an integer")]
    NbfNotInteger,
    #[error("Jwt payload [exp] field is not an integer")]
    ExpNotInteger,
    #[error("Jwt payload [jti] field is not a string")]
    JtiNotString,
    #[error("Jwt payload [aud] field is not a string or string list")]
    AudNotString,
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBadBase64,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    #[error("Jwt verification fails")]
    VerificationFail,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    KidAlgMismatch,
}

impl Status {
    /// 403 for a disallowed audience, 401 otherwise (as Envoy).
    pub fn http_status(self) -> u16 {
        if self == Status::AudienceNotAllowed {
            403
        } else {
            401
        }
    }
}

/// A parsed (not yet verified) JWT.
#[derive(Debug, Clone)]
pub struct Jwt {
    pub alg: String,
    pub kid: Option<String>,
    pub iss: Option<String>,
    pub audiences: Vec<String>,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    /// The payload as JSON.
    pub payload: serde_json::Map<String, Value>,
    /// The base64url payload segment as it came.
    pub payload_b64: String,
    /// `header.payload`, what the signature covers.
    signed: String,
    signature: Vec<u8>,
}

const ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256",
    "HS384", "HS512", "EdDSA",
];

fn int_claim(v: Option<&Value>, err: Status) -> Result<Option<u64>, Status> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(err),
        Some(_) => Err(err),
    }
}

fn str_claim(v: Option<&Value>, err: Status) -> Result<Option<String>, Status> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err),
    }
}

impl Jwt {
    /// Parses the compact serialisation.
    pub fn parse(token: &str) -> Result<Self, Status> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Status::BadFormat);
        };
        let header = b64url_decode(h).ok_or(Status::HeaderBadBase64)?;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&header).map_err(|_| Status::HeaderBadJson)?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a.clone(),
            _ => return Err(Status::HeaderBadAlg),
        };
        if !ALGS.contains(&alg.as_str()) {
            return Err(Status::HeaderNotImplementedAlg);
        }
        let kid = str_claim(header.get("kid"), Status::HeaderBadKid)?;
        let payload = b64url_decode(p).ok_or(Status::PayloadBadBase64)?;
        let payload: serde_json::Map<String, Value> =
            serde_json::from_slice(&payload).map_err(|_| Status::PayloadBadJson)?;
        let iss = str_claim(payload.get("iss"), Status::IssNotString)?;
        str_claim(payload.get("sub"), Status::SubNotString)?;
        int_claim(payload.get("iat"), Status::IatNotInteger)?;
        let nbf = int_claim(payload.get("nbf"), Status::NbfNotInteger)?;
        let exp = int_claim(payload.get("exp"), Status::ExpNotInteger)?;
        str_claim(payload.get("jti"), Status::JtiNotString)?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|a| a.as_str().map(str::to_string).ok_or(Status::AudNotString))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(Status::AudNotString),
        };
        let signature = b64url_decode(s).ok_or(Status::SignatureBadBase64)?;
        Ok(Jwt {
            alg,
            kid,
            iss,
            audiences,
            exp,
            nbf,
            payload,
            payload_b64: p.to_string(),
            signed: format!("{h}.{p}"),
            signature,
        })
    }

    /// `exp` and `nbf` against `now` (seconds since the epoch) with `skew`.
    pub fn check_time(&self, now: u64, skew: u64) -> Result<(), Status> {
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(skew)) {
            return Err(Status::NotYetValid);
        }
        if self.exp.is_some_and(|exp| exp.saturating_add(skew) < now) {
            return Err(Status::Expired);
        }
        Ok(())
    }

    /// Verifies the signature with the first key whose `kid`, `alg` and type fit.
    pub fn verify_signature(&self, keys: &[Jwk]) -> Result<(), Status> {
        let mut candidate = false;
        for k in keys {
            if let (Some(want), Some(have)) = (&self.kid, &k.kid)
                && want != have
            {
                continue;
            }
            if k.alg.as_ref().is_some_and(|a| *a != self.alg) {
                continue;
            }
            let ok = match (&k.key, self.alg.as_str()) {
                (KeyMaterial::Rsa { n, e }, alg) => {
                    let params: &'static signature::RsaParameters = match alg {
                        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                        "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                        "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                        "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                        "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                        "PS512" => &signature::RSA_PSS_2048_8192_SHA512,
                        _ => continue,
                    };
                    let strip = |b: &[u8]| -> Vec<u8> {
                        let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                        b[start..].to_vec()
                    };
                    signature::RsaPublicKeyComponents {
                        n: strip(n),
                        e: strip(e),
                    }
                    .verify(params, self.signed.as_bytes(), &self.signature)
                    .is_ok()
                }
                (KeyMaterial::Ec { curve, point }, alg) => {
                    let params: &'static signature::EcdsaVerificationAlgorithm = match (curve, alg)
                    {
                        (EcCurve::P256, "ES256") => &signature::ECDSA_P256_SHA256_FIXED,
                        (EcCurve::P384, "ES384") => &signature::ECDSA_P384_SHA384_FIXED,
                        _ => continue,
                    };
                    signature::UnparsedPublicKey::new(params, point)
                        .verify(self.signed.as_bytes(), &self.signature)
                        .is_ok()
                }
            };
            candidate = true;
            if ok {
                return Ok(());
            }
        }
        Err(if candidate {
            Status::VerificationFail
        } else {
            Status::KidAlgMismatch
        })
    }
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Header(String),
    Param(String),
    Cookie(String),
}

/// A token found in a request.
#[derive(Debug, Clone)]
struct Found {
    token: String,
    location: Location,
}

fn extract(p: &JwtProvider, pseudo: &Pseudo<'_>, headers: &HeaderMap) -> Vec<Found> {
    let mut out = Vec::new();
    for (name, prefix) in p.header_locations() {
        for v in headers.get_all(name) {
            let Ok(v) = v.to_str() else { continue };
            // Envoy looks for the prefix anywhere in the value and takes
            // all that follows it, but leading whitespace, as the token
            // (`Bearer t, u` and `Bearer t u` are malformed tokens, not
            // `t`; Envoy 1.40 answers them so).
            let tok = if prefix.is_empty() {
                Some(v)
            } else {
                v.find(prefix)
                    .map(|i| v[i + prefix.len()..].trim_start_matches([' ', '\t']))
            };
            if let Some(tok) = tok
                && !tok.is_empty()
            {
                out.push(Found {
                    token: tok.to_string(),
                    location: Location::Header(name.to_string()),
                });
            }
        }
    }
    let params = p.param_locations();
    if !params.is_empty()
        && let Some((_, query)) = pseudo.path.split_once('?')
    {
        let query = query.split('#').next().unwrap_or_default();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if params.contains(&k) && !v.is_empty() {
                out.push(Found {
                    token: v.to_string(),
                    location: Location::Param(k.to_string()),
                });
            }
        }
    }
    if !p.from_cookies.is_empty() {
        for v in headers.get_all(http::header::COOKIE) {
            let Ok(v) = v.to_str() else { continue };
            for c in v.split(';') {
                let (k, val) = c.trim().split_once('=').unwrap_or((c.trim(), ""));
                if p.from_cookies.iter().any(|n| n == k) && !val.is_empty() {
                    out.push(Found {
                        token: val.to_string(),
                        location: Location::Cookie(k.to_string()),
                    });
                }
            }
        }
    }
    out
}

/// What a verified token leaves behind.
#[derive(Debug, Clone)]
pub struct Verified {
    pub provider: String,
    pub location: Location,
    pub jwt: Jwt,
}

/// Checks one token against one provider.
fn verify(p: &JwtProvider, token: &str, now: u64) -> Result<Jwt, Status> {
    let jwt = Jwt::parse(token)?;
    if !p.issuer.is_empty() && jwt.iss.as_deref() != Some(p.issuer.as_str()) {
        return Err(Status::UnknownIssuer);
    }
    jwt.check_time(now, p.clock_skew)?;
    if !p.audiences.is_empty() && !jwt.audiences.iter().any(|a| audience_ok(&p.audiences, a)) {
        return Err(Status::AudienceNotAllowed);
    }
    jwt.verify_signature(&p.jwks.keys)?;
    Ok(jwt)
}

/// Envoy compares audiences without a scheme and a trailing slash.
fn audience_ok(allowed: &[String], aud: &str) -> bool {
    let norm = |s: &str| {
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s).to_string()
    };
    let aud = norm(aud);
    allowed.iter().any(|a| norm(a) == aud)
}

/// Tokens of one provider, verified in turn: the first good one wins,
/// otherwise the last failure stands.
fn provider_status(
    cfg: &JwtAuthn,
    name: &str,
    pseudo: &Pseudo<'_>,
    headers: &HeaderMap,
    now: u64,
    done: &mut Vec<Verified>,
) -> Result<(), Status> {
    let Some(p) = cfg.providers.get(name) else {
        return Err(Status::UnknownIssuer);
    };
    let found = extract(p, pseudo, headers);
    if found.is_empty() {
        return Err(Status::Missing);
    }
    let mut last = Status::Missing;
    for f in found {
        match verify(p, &f.token, now) {
            Ok(jwt) => {
                done.push(Verified {
                    provider: p.name.clone(),
                    location: f.location,
                    jwt,
                });
                return Ok(());
            }
            Err(s) => last = s,
        }
    }
    Err(last)
}

/// Which of two failures a set of alternatives reports: a missing token
/// least, then an issuer no provider names, then the latest other failure
/// (an expired token of a known issuer is what the client needs to hear).
fn worse(so_far: Status, next: Status) -> Status {
    match next {
        Status::Missing => so_far,
        Status::UnknownIssuer if so_far != Status::Missing => so_far,
        s => s,
    }
}

/// The evaluation of a requirement: `Ok(())` or the failing status.
fn requirement(
    cfg: &JwtAuthn,
    req: &Requirement,
    pseudo: &Pseudo<'_>,
    headers: &HeaderMap,
    now: u64,
    done: &mut Vec<Verified>,
) -> Result<(), Status> {
    match req {
        Requirement::Provider(name) => provider_status(cfg, name, pseudo, headers, now, done),
        Requirement::All(list) => {
            for r in list {
                requirement(cfg, r, pseudo, headers, now, done)?;
            }
            Ok(())
        }
        Requirement::Any(list) => {
            // `allow_missing` among the alternatives turns "no token" into
            // a pass; a token that fails still fails (one no provider's
            // issuer names included, as Envoy 1.40 answers it).
            let allow_missing = list.contains(&Requirement::AllowMissing);
            let mut fin = Status::Missing;
            for r in list.iter().filter(|r| **r != Requirement::AllowMissing) {
                match requirement(cfg, r, pseudo, headers, now, done) {
                    Ok(()) => return Ok(()),
                    Err(s) => fin = worse(fin, s),
                }
            }
            if allow_missing && fin == Status::Missing {
                Ok(())
            } else {
                Err(fin)
            }
        }
        Requirement::AllowMissing | Requirement::AllowMissingOrFailed => {
            // Any provider's token is verified (by its issuer); the first
            // verdict counts for `allow_missing`.
            let failed = req == &Requirement::AllowMissingOrFailed;
            let mut fin = Status::Missing;
            for name in cfg.providers.keys() {
                if let Err(s) = provider_status(cfg, name, pseudo, headers, now, done) {
                    fin = worse(fin, s);
                }
            }
            if failed || fin == Status::Missing {
                Ok(())
            } else {
                Err(fin)
            }
        }
    }
}

/// The filter's answer.
#[derive(Debug)]
pub enum Decision {
    /// Carry on, with what the verified tokens leave behind.
    Pass(Vec<Verified>),
    /// A CORS preflight, let through unchecked (`bypass_cors_preflight`).
    Preflight,
    /// Reply with [`Status::http_status`] and the status text.
    Deny(Status),
}

/// Runs the filter on a request; `now` is seconds since the epoch;
/// `route_requirement` is a route's `requirement_name` resolved, if any.
pub fn decide(
    cfg: &JwtAuthn,
    route_requirement: Option<&Requirement>,
    pseudo: &Pseudo<'_>,
    headers: &HeaderMap,
    now: u64,
) -> Decision {
    if cfg.bypass_cors_preflight
        && pseudo.method == "OPTIONS"
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return Decision::Preflight;
    }
    let req = match route_requirement {
        Some(r) => Some(r),
        None => cfg
            .rules
            .iter()
            .find(|r| r.route_match.matches_pseudo(pseudo, headers, 0))
            .and_then(|r| r.requires.as_ref()),
    };
    let Some(req) = req else {
        return Decision::Pass(Vec::new());
    };
    let mut done = Vec::new();
    match requirement(cfg, req, pseudo, headers, now, &mut done) {
        Ok(()) => Decision::Pass(done),
        Err(s) => Decision::Deny(s),
    }
}

/// Whether the verified tokens have the route chosen again
/// (`clear_route_cache`, as Envoy clears its route cache): a provider with
/// it set added a claim header, or stores its payload in the metadata.
pub fn clears_route_cache(cfg: &JwtAuthn, verified: &[Verified]) -> bool {
    verified.iter().any(|v| {
        cfg.providers.get(&v.provider).is_some_and(|p| {
            p.clear_route_cache
                && (p.payload_in_metadata.is_some()
                    || p.claim_to_headers.iter().any(|(claim, _)| {
                        matches!(
                            v.jwt.payload.get(claim),
                            Some(Value::String(_) | Value::Number(_) | Value::Bool(_))
                        )
                    }))
        })
    })
}

/// The request changes and metadata of the verified tokens: removes
/// tokens that are not forwarded, adds payload and claim headers, and
/// returns the metadata entries of [`METADATA_NAMESPACE`].
pub fn apply(
    cfg: &JwtAuthn,
    verified: &[Verified],
    headers: &mut HeaderMap,
) -> BTreeMap<String, MetaValue> {
    let mut md = BTreeMap::new();
    for v in verified {
        let Some(p) = cfg.providers.get(&v.provider) else {
            continue;
        };
        if !p.forward
            && let Location::Header(h) = &v.location
        {
            headers.remove(h.as_str());
        }
        if let Some(h) = &p.forward_payload_header
            && let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(h.as_bytes()),
                http::HeaderValue::from_str(&v.jwt.payload_b64),
            )
        {
            headers.insert(name, value);
        }
        for (claim, header) in &p.claim_to_headers {
            let value = match v.jwt.payload.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => continue,
            };
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(header.as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        if let Some(key) = &p.payload_in_metadata {
            let payload = v
                .jwt
                .payload
                .iter()
                .map(|(k, x)| match x {
                    Value::String(words) if p.space_delimited_claims.contains(k) => (
                        k.clone(),
                        MetaValue::List(
                            words
                                .split_whitespace()
                                .map(|w| MetaValue::String(w.to_string()))
                                .collect(),
                        ),
                    ),
                    _ => (k.clone(), meta(x)),
                })
                .collect();
            md.insert(key.clone(), MetaValue::Struct(payload));
        }
    }
    md
}

fn meta(v: &Value) -> MetaValue {
    match v {
        Value::Null => MetaValue::Null,
        Value::Bool(b) => MetaValue::Bool(*b),
        Value::Number(n) => MetaValue::Number(n.as_f64().unwrap_or_default()),
        Value::String(s) => MetaValue::String(s.clone()),
        Value::Array(a) => MetaValue::List(a.iter().map(meta).collect()),
        Value::Object(o) => {
            MetaValue::Struct(o.iter().map(|(k, x)| (k.clone(), meta(x))).collect())
        }
    }
}

/// `www-authenticate` of a denial: the request's URL (with its query, as
/// Envoy 1.40 sends it) as the realm, and `error="invalid_token"` unless the token was missing.
pub fn www_authenticate(status: Status, pseudo: &Pseudo<'_>, headers: &HeaderMap) -> String {
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(pseudo.scheme);
    let mut v = format!(
        "Bearer realm=\"{scheme}://{}{}\"",
        pseudo.authority, pseudo.path
    );
    if status != Status::Missing {
        v.push_str(", error=\"invalid_token\"");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::jwt::{Jwks, JwtRule, b64url_encode};
    use ferry_model::{PathMatch, RouteMatch};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use std::sync::Arc;

    /// Istio's sample JWKS and its never-expiring demo token (iss and sub
    /// `testing@secure.istio.io`).
    const DEMO_JWKS: &str = r#"{ "keys":[ {"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}"#;
    const DEMO_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTUzMjM4OTcwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.CfNnxWP2tcnR9q0vxyxweaF3ovQYHYZl82hAUsn21bwQd9zP7c-LS9qd_vpdLG4Tn1A15NxfCjp5f7QNBUo-KC9PJqYpgGbaXhaGx7bEdFWjcwv3nZzvc7M__ZpaCERdwU7igUmJqYGBYQ51vr2njU9ZimyKkfDe3axcyiBZde7G6dabliUosJvvKOPcKIWPccCgefSj_GNfwIip3-SsFdlR7BtbVUcqR-yv-XOxJ3Uc1MI0tz3uMiiZcyPV7sNCU4KRnemRIMHVOfuvHsU60_GhGbiSFzgPTAa9WTltbnarTbxudb_YEOx12JiwYToeX0DCPb43W1tzIBxgm8NxUg";
    const ISS: &str = "testing@secure.istio.io";
    const NOW: u64 = 1_800_000_000;

    struct EcKey {
        pair: EcdsaKeyPair,
        jwks: String,
    }

    fn ec_key(kid: &str) -> EcKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"{kid}","x":"{}","y":"{}"}}]}}"#,
            b64url_encode(&point[1..33]),
            b64url_encode(&point[33..])
        );
        EcKey { pair, jwks }
    }

    fn sign(key: &EcKey, kid: &str, payload: &serde_json::Value) -> String {
        let h = b64url_encode(format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT"}}"#).as_bytes());
        let p = b64url_encode(payload.to_string().as_bytes());
        let sig = key
            .pair
            .sign(&SystemRandom::new(), format!("{h}.{p}").as_bytes())
            .unwrap();
        format!("{h}.{p}.{}", b64url_encode(sig.as_ref()))
    }

    fn provider(name: &str, issuer: &str, jwks: &str) -> Arc<JwtProvider> {
        Arc::new(JwtProvider {
            name: name.into(),
            issuer: issuer.into(),
            jwks: Jwks::parse(jwks).unwrap(),
            forward: true,
            payload_in_metadata: Some("payload".into()),
            clock_skew: 60,
            ..Default::default()
        })
    }

    /// Istio's shape: any of the providers, or no token at all.
    fn istio_like(providers: Vec<Arc<JwtProvider>>) -> JwtAuthn {
        let any = providers
            .iter()
            .map(|p| Requirement::Provider(p.name.clone()))
            .chain([Requirement::AllowMissing])
            .collect();
        JwtAuthn {
            providers: providers.into_iter().map(|p| (p.name.clone(), p)).collect(),
            rules: vec![JwtRule {
                route_match: RouteMatch {
                    path: PathMatch::Prefix("/".into()),
                    ignore_path_parameters: false,
                    case_sensitive: true,
                    headers: vec![],
                    query_parameters: vec![],
                    grpc: false,
                    runtime_fraction: None,
                },
                requires: Some(Requirement::Any(any)),
            }],
            bypass_cors_preflight: true,
            ..Default::default()
        }
    }

    fn run(cfg: &JwtAuthn, path: &str, auth: Option<&str>) -> Decision {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().unwrap());
        }
        let pseudo = Pseudo {
            method: "GET",
            path,
            authority: "example.com",
            scheme: "http",
        };
        decide(cfg, None, &pseudo, &h, NOW)
    }

    fn denied(d: Decision) -> Status {
        match d {
            Decision::Deny(s) => s,
            Decision::Pass(_) | Decision::Preflight => panic!("passed"),
        }
    }

    #[test]
    fn demo_rsa_token_verifies_and_fills_metadata() {
        let cfg = istio_like(vec![provider("origins-0", ISS, DEMO_JWKS)]);
        let Decision::Pass(v) = run(&cfg, "/", Some(&format!("Bearer {DEMO_TOKEN}"))) else {
            panic!("denied")
        };
        assert_eq!(v.len(), 1);
        let mut h = HeaderMap::new();
        let md = apply(&cfg, &v, &mut h);
        let MetaValue::Struct(p) = &md["payload"] else {
            panic!()
        };
        assert_eq!(p["sub"], MetaValue::String(ISS.into()));
        assert_eq!(p["foo"], MetaValue::String("bar".into()));
        // Space-delimited claims become lists.
        let key = ec_key("k1");
        let mut prov = (*provider("p", "iss-a", &key.jwks)).clone();
        prov.space_delimited_claims = vec!["scope".into()];
        let cfg = istio_like(vec![Arc::new(prov)]);
        let t = sign(
            &key,
            "k1",
            &serde_json::json!({"iss": "iss-a", "scope": "read write"}),
        );
        let Decision::Pass(v) = run(&cfg, "/", Some(&format!("Bearer {t}"))) else {
            panic!("denied")
        };
        let md = apply(&cfg, &v, &mut h);
        let MetaValue::Struct(p) = &md["payload"] else {
            panic!()
        };
        assert_eq!(
            p["scope"],
            MetaValue::List(vec![
                MetaValue::String("read".into()),
                MetaValue::String("write".into())
            ])
        );
    }

    #[test]
    fn missing_garbage_and_tampered_tokens() {
        let cfg = istio_like(vec![provider("origins-0", ISS, DEMO_JWKS)]);
        assert!(matches!(run(&cfg, "/", None), Decision::Pass(ref v) if v.is_empty()));
        assert_eq!(
            denied(run(&cfg, "/", Some("Bearer garbage"))),
            Status::BadFormat
        );
        assert_eq!(
            denied(run(&cfg, "/", Some("Bearer YQ.b.c"))),
            Status::HeaderBadJson
        );
        let mut parts: Vec<&str> = DEMO_TOKEN.split('.').collect();
        let other = b64url_encode(br#"{"iss":"testing@secure.istio.io","sub":"x"}"#);
        parts[1] = &other;
        assert_eq!(
            denied(run(&cfg, "/", Some(&format!("Bearer {}", parts.join("."))))),
            Status::VerificationFail
        );
        // The token from the default query parameter.
        let q = format!("/?access_token={DEMO_TOKEN}");
        assert!(matches!(run(&cfg, &q, None), Decision::Pass(ref v) if v.len() == 1));
    }

    #[test]
    fn es256_time_issuer_audience_and_keys() {
        let key = ec_key("k1");
        let mut p = (*provider("p", "iss-a", &key.jwks)).clone();
        p.audiences = vec!["https://svc.example/".into()];
        let cfg = istio_like(vec![Arc::new(p)]);
        let tok = |claims: serde_json::Value| format!("Bearer {}", sign(&key, "k1", &claims));
        let good =
            serde_json::json!({"iss": "iss-a", "sub": "u", "aud": "svc.example", "exp": NOW + 10});
        assert!(matches!(run(&cfg, "/", Some(&tok(good))), Decision::Pass(ref v) if v.len() == 1));
        // Within the 60 s skew, then past it.
        let skewed = serde_json::json!({"iss": "iss-a", "aud": "svc.example", "exp": NOW - 30});
        assert!(matches!(
            run(&cfg, "/", Some(&tok(skewed))),
            Decision::Pass(_)
        ));
        let expired = serde_json::json!({"iss": "iss-a", "aud": "svc.example", "exp": NOW - 61});
        assert_eq!(denied(run(&cfg, "/", Some(&tok(expired)))), Status::Expired);
        let early = serde_json::json!({"iss": "iss-a", "aud": "svc.example", "nbf": NOW + 120});
        assert_eq!(
            denied(run(&cfg, "/", Some(&tok(early)))),
            Status::NotYetValid
        );
        let aud = serde_json::json!({"iss": "iss-a", "aud": ["other"]});
        let s = denied(run(&cfg, "/", Some(&tok(aud))));
        assert_eq!((s, s.http_status()), (Status::AudienceNotAllowed, 403));
        // A token of an issuer no provider names is no missing token.
        let stranger = serde_json::json!({"iss": "someone-else", "aud": "svc.example"});
        assert_eq!(
            denied(run(&cfg, "/", Some(&tok(stranger)))),
            Status::UnknownIssuer
        );
        // A key the JWKS does not have.
        let other = ec_key("k2");
        let t = sign(
            &other,
            "k2",
            &serde_json::json!({"iss": "iss-a", "aud": "svc.example"}),
        );
        assert_eq!(
            denied(run(&cfg, "/", Some(&format!("Bearer {t}")))),
            Status::KidAlgMismatch
        );
        let t = sign(
            &other,
            "k1",
            &serde_json::json!({"iss": "iss-a", "aud": "svc.example"}),
        );
        assert_eq!(
            denied(run(&cfg, "/", Some(&format!("Bearer {t}")))),
            Status::VerificationFail
        );
    }

    #[test]
    fn strict_requirement_forward_and_claim_headers() {
        let key = ec_key("k1");
        let mut p = (*provider("p", "iss-a", &key.jwks)).clone();
        p.forward = false;
        p.claim_to_headers = vec![("sub".into(), "x-sub".into())];
        p.forward_payload_header = Some("x-payload".into());
        let mut cfg = istio_like(vec![Arc::new(p)]);
        cfg.rules[0].requires = Some(Requirement::Provider("p".into()));
        assert_eq!(denied(run(&cfg, "/", None)), Status::Missing);
        let t = sign(
            &key,
            "k1",
            &serde_json::json!({"iss": "iss-a", "sub": "alice"}),
        );
        let Decision::Pass(v) = run(&cfg, "/", Some(&format!("Bearer {t}"))) else {
            panic!("denied")
        };
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        apply(&cfg, &v, &mut h);
        assert!(h.get("authorization").is_none());
        assert_eq!(h["x-sub"], "alice");
        assert_eq!(h["x-payload"], t.split('.').nth(1).unwrap());
        // A missing token is named as such in the realm; a bad one is not.
        let pseudo = Pseudo {
            method: "GET",
            path: "/a?b=c",
            authority: "h",
            scheme: "http",
        };
        assert_eq!(
            www_authenticate(Status::Missing, &pseudo, &HeaderMap::new()),
            "Bearer realm=\"http://h/a?b=c\""
        );
        assert_eq!(
            www_authenticate(Status::Expired, &pseudo, &HeaderMap::new()),
            "Bearer realm=\"http://h/a?b=c\", error=\"invalid_token\""
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for t in [
            "",
            ".",
            "..",
            "a.b",
            "a.b.c.d",
            "\u{7f}.x.y",
            "eyJ9.eyJ9.!!",
        ] {
            assert!(Jwt::parse(t).is_err(), "{t:?}");
        }
        let h = b64url_encode(br#"{"alg":"none"}"#);
        assert_eq!(
            Jwt::parse(&format!("{h}.e30.")).unwrap_err(),
            Status::HeaderNotImplementedAlg
        );
        let h = b64url_encode(br#"{"alg":"RS256"}"#);
        let p = b64url_encode(br#"{"exp":"soon"}"#);
        assert_eq!(
            Jwt::parse(&format!("{h}.{p}.")).unwrap_err(),
            Status::ExpNotInteger
        );
    }
}
