//! `envoy.filters.http.jwt_authn`: JWT providers, their JSON Web Key Sets,
//! and the rules that say which providers a request needs.
//!
//! A JWKS is parsed once, when the configuration is converted, into the key
//! material the verifier needs (RSA modulus and exponent, EC points); a key
//! Ferry cannot use (another key type, another curve) is skipped as Envoy
//! skips it, while a malformed set is an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::route::RouteMatch;

/// The filter's configuration.
#[derive(Debug, Default)]
pub struct JwtAuthn {
    /// By provider name.
    pub providers: BTreeMap<String, Arc<JwtProvider>>,
    /// `rules`: the first whose match holds gives the request's requirement;
    /// a request no rule matches needs nothing.
    pub rules: Vec<JwtRule>,
    /// `requirement_map`, for routes that name a requirement.
    pub requirement_map: BTreeMap<String, Requirement>,
    /// `bypass_cors_preflight`: an `OPTIONS` request with `origin` and
    /// `access-control-request-method` is not checked.
    pub bypass_cors_preflight: bool,
    /// `strip_failure_response`: a failure answers with its status only,
    /// no body and no `www-authenticate`.
    pub strip_failure_response: bool,
}

/// One `rules` entry.
#[derive(Debug)]
pub struct JwtRule {
    pub route_match: RouteMatch,
    /// `None`: the request needs nothing.
    pub requires: Option<Requirement>,
}

/// `PerRouteConfig`: what a route asks of the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtPerRoute {
    /// `disabled: true`: no verification on this route.
    Disabled,
    /// `requirement_name`: the requirement of the filter's `requirement_map`.
    RequirementName(String),
}

/// `JwtRequirement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Provider(String),
    Any(Vec<Requirement>),
    All(Vec<Requirement>),
    AllowMissing,
    AllowMissingOrFailed,
}

/// `JwtProvider`.
#[derive(Debug, Clone, Default)]
pub struct JwtProvider {
    pub name: String,
    /// Empty: any issuer.
    pub issuer: String,
    /// Empty: any audience.
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    /// `forward`: false removes the token's header after verification.
    pub forward: bool,
    /// `from_headers` (name, value prefix); with no location at all the
    /// defaults apply (`Authorization: Bearer ` and `access_token`).
    pub from_headers: Vec<(String, String)>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    /// `payload_in_metadata`: the key the payload is stored under.
    pub payload_in_metadata: Option<String>,
    /// `normalize_payload_in_metadata.space_delimited_claims`: string
    /// claims stored in the metadata as the list of their words.
    pub space_delimited_claims: Vec<String>,
    /// `forward_payload_header`.
    pub forward_payload_header: Option<String>,
    /// `claim_to_headers` (claim name, header name).
    pub claim_to_headers: Vec<(String, String)>,
    /// `clock_skew_seconds` (60 by default).
    pub clock_skew: u64,
    /// `clear_route_cache`: once this provider's token is verified and it
    /// added a claim header (or stored its payload in the metadata), the
    /// route is chosen again.
    pub clear_route_cache: bool,
}

impl JwtProvider {
    /// The token locations, with Envoy's defaults when none is configured.
    pub fn header_locations(&self) -> Vec<(&str, &str)> {
        if self.from_headers.is_empty()
            && self.from_params.is_empty()
            && self.from_cookies.is_empty()
        {
            return vec![("authorization", "Bearer ")];
        }
        self.from_headers
            .iter()
            .map(|(h, p)| (h.as_str(), p.as_str()))
            .collect()
    }

    pub fn param_locations(&self) -> Vec<&str> {
        if self.from_headers.is_empty()
            && self.from_params.is_empty()
            && self.from_cookies.is_empty()
        {
            return vec!["access_token"];
        }
        self.from_params.iter().map(String::as_str).collect()
    }
}

/// A JSON Web Key Set, as far as it holds usable keys.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub key: KeyMaterial,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// Big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed point (`04 || x || y`).
    Ec { curve: EcCurve, point: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcCurve {
    P256,
    P384,
}

/// Why a JWKS is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is not JSON: {0}")]
    Json(String),
    #[error("the JWKS has no \"keys\" array")]
    NoKeys,
    #[error("keys[{index}].{field}: {message}")]
    Key {
        index: usize,
        field: &'static str,
        message: String,
    },
    #[error("the JWKS holds no usable RSA or EC key")]
    NoUsableKey,
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`); a single JWK object is
    /// accepted as a set of one.
    pub fn parse(text: &str) -> Result<Self, JwksError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| JwksError::Json(e.to_string()))?;
        let keys: Vec<&serde_json::Value> = match v.get("keys") {
            Some(serde_json::Value::Array(a)) => a.iter().collect(),
            Some(_) => return Err(JwksError::NoKeys),
            None if v.get("kty").is_some() => vec![&v],
            None => return Err(JwksError::NoKeys),
        };
        let mut out = Vec::new();
        for (index, k) in keys.into_iter().enumerate() {
            let s = |field: &'static str| -> Result<Option<&str>, JwksError> {
                match k.get(field) {
                    None => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                    Some(_) => Err(JwksError::Key {
                        index,
                        field,
                        message: "is not a string".into(),
                    }),
                }
            };
            let bytes = |field: &'static str| -> Result<Vec<u8>, JwksError> {
                let v = s(field)?.ok_or(JwksError::Key {
                    index,
                    field,
                    message: "is missing".into(),
                })?;
                b64url_decode(v).ok_or(JwksError::Key {
                    index,
                    field,
                    message: "is not base64url".into(),
                })
            };
            let kid = s("kid")?.map(str::to_string);
            let alg = s("alg")?.map(str::to_string);
            let key = match s("kty")? {
                Some("RSA") => KeyMaterial::Rsa {
                    n: bytes("n")?,
                    e: bytes("e")?,
                },
                Some("EC") => {
                    let (curve, len) = match s("crv")? {
                        Some("P-256") => (EcCurve::P256, 32),
                        Some("P-384") => (EcCurve::P384, 48),
                        // Other curves (P-521, secp256k1) are not usable here.
                        _ => continue,
                    };
                    let (x, y) = (bytes("x")?, bytes("y")?);
                    if x.len() != len || y.len() != len {
                        return Err(JwksError::Key {
                            index,
                            field: "x",
                            message: format!("coordinates must be {len} bytes"),
                        });
                    }
                    let mut point = Vec::with_capacity(1 + 2 * len);
                    point.push(4);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    KeyMaterial::Ec { curve, point }
                }
                Some(_) => continue,
                None => {
                    return Err(JwksError::Key {
                        index,
                        field: "kty",
                        message: "is missing".into(),
                    });
                }
            };
            out.push(Jwk { kid, alg, key });
        }
        if out.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Jwks { keys: out })
    }
}

/// base64url that takes what Envoy's decoder takes: padding optional,
/// non-zero trailing bits ignored (the hand-made tokens of Istio's samples
/// have them).
const LENIENT_URL_SAFE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes base64url, with or without padding (`None` when malformed).
/// Standard-alphabet characters are accepted too, and whitespace is
/// skipped, as Envoy's decoder does (a token with a space in it decodes,
/// then fails its signature check).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let s = s.trim_end_matches(|c: char| c == '=' || c.is_ascii_whitespace());
    // The usual token is plain base64url and is decoded as it is; only the
    // odd one (whitespace, the standard alphabet) is rewritten first.
    if s.bytes()
        .any(|c| matches!(c, b'+' | b'/') || c.is_ascii_whitespace())
    {
        let plain: String = s
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        return LENIENT_URL_SAFE.decode(plain.trim_end_matches('=')).ok();
    }
    LENIENT_URL_SAFE.decode(s).ok()
}

/// Encodes base64url without padding.
pub fn b64url_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trip() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\xfe\x00"] {
            assert_eq!(b64url_decode(&b64url_encode(data)).as_deref(), Some(data));
        }
        assert_eq!(b64url_decode("Zm9v").as_deref(), Some(&b"foo"[..]));
        assert!(b64url_decode("Zm9v!").is_none());
        assert_eq!(b64url_decode(" Zm 9v\n").as_deref(), Some(&b"foo"[..]));
        assert!(b64url_decode("Z").is_none());
        // Both alphabets, padding or not, stray trailing bits.
        assert_eq!(b64url_decode("+/+/"), b64url_decode("-_-_"));
        assert_eq!(b64url_decode("Zm8="), b64url_decode("Zm8"));
        assert_eq!(b64url_decode("Zm9").as_deref(), Some(&b"fo"[..]));
        assert!(b64url_decode("Zm=9v").is_none());
    }

    #[test]
    fn jwks_keys_and_errors() {
        let j = Jwks::parse(
            r#"{"keys":[{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"},
            {"kty":"oct","k":"abc"},{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}]}"#,
        )
        .unwrap();
        assert_eq!(j.keys.len(), 1);
        assert_eq!(j.keys[0].kid.as_deref(), Some("a"));
        assert_eq!(Jwks::parse("[]").unwrap_err(), JwksError::NoKeys);
        assert!(matches!(Jwks::parse("nope"), Err(JwksError::Json(_))));
        assert_eq!(
            Jwks::parse(r#"{"keys":[{"kty":"oct"}]}"#).unwrap_err(),
            JwksError::NoUsableKey
        );
        assert!(matches!(
            Jwks::parse(r#"{"keys":[{"kty":"RSA","n":"!!","e":"AQAB"}]}"#),
            Err(JwksError::Key { field: "n", .. })
        ));
        assert!(matches!(
            Jwks::parse(r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AQAB","y":"AQAB"}]}"#),
            Err(JwksError::Key { field: "x", .. })
        ));
    }
}
