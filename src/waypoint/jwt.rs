//! JWT request authentication (Istio RequestAuthentication): compact JWS with ES256 or RS256,
//! keys from a JWKS document, issuer / audience / expiry checks.
//!
//! Only asymmetric algorithms are accepted, and the algorithm must agree with the key's type:
//! `alg: none`, HMAC algorithms and an RSA key offered for an ES256 token (the classic
//! algorithm-confusion attacks) are all refused. Signatures are checked with ring, the crypto
//! rustls already uses.
//!
//! Time claims (`exp`, `nbf`, `iat`) are RFC 7519 NumericDates: any JSON number, integer or
//! fractional, negative or huge. Another type (a string, a bool, an object) refuses the token
//! rather than being ignored, since an `exp` that is skipped means a token that never expires.
//! Comparisons are done in `f64` seconds, which cannot overflow (`exp + leeway` stays finite for
//! every number JSON can carry). `exp` and `nbf` are enforced with `LEEWAY_SECS`; `iat` is only
//! type-checked, as Envoy's jwt_authn does. A `crit` header (RFC 7515 §4.1.11) names extensions
//! the verifier must understand: this one understands none, so any `crit` is refused, and so is
//! a `crit` that is not a non-empty array of strings.
//!
//! Why not the `jsonwebtoken` crate (evaluated at 9.3.1, the version in the lock file): it has
//! no `crit` support (the header parameter is silently ignored), reads `exp`/`nbf` only as
//! integers (a fractional or string `exp` is skipped unless the claim is made mandatory, and then
//! refused as "missing", never enforced as a date), and its releases from 10 on no longer use
//! ring. The checks below are small and covered by the RFC 7515 vectors.

use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Tokens longer than this are refused before any decoding (Envoy's default header limit is
/// 60 KiB; a JWT is a few hundred bytes).
const MAX_TOKEN: usize = 16 * 1024;
/// Clock skew tolerated on `exp` and `nbf`, as Istio's default.
const LEEWAY_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted (ES256 or RS256 only)")]
    Algorithm(String),
    #[error("no key in the JWKS verifies this token")]
    Signature,
    #[error("issuer {got:?} is not {want:?}")]
    Issuer { got: String, want: String },
    #[error("audience does not include any of {0:?}")]
    Audience(Vec<String>),
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("claim {claim:?} must be a number of seconds (RFC 7519 NumericDate), not {found}")]
    BadDate {
        claim: &'static str,
        found: &'static str,
    },
    #[error("critical header parameters {0:?} are not understood")]
    Critical(Vec<String>),
}

/// The JSON type of a value, for error messages.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A NumericDate claim as seconds since the epoch: absent is `None`, a number is its value,
/// anything else refuses the token.
fn numeric_date(claims: &Map<String, Value>, claim: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(claim) {
        None => Ok(None),
        // serde_json refuses numbers it cannot hold, so every Number has a finite f64.
        Some(Value::Number(n)) => {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or(JwtError::BadDate {
                    claim,
                    found: "a number out of range",
                })
        }
        Some(other) => Err(JwtError::BadDate {
            claim,
            found: json_type(other),
        }),
    }
}

/// RFC 7515 §4.1.11: `crit` lists extensions the verifier must understand; none are, so any
/// valid `crit` is refused by name, and a malformed one as malformed.
fn check_crit(header: &Map<String, Value>) -> Result<(), JwtError> {
    let Some(crit) = header.get("crit") else {
        return Ok(());
    };
    let names: Option<Vec<String>> = crit
        .as_array()
        .filter(|a| !a.is_empty())
        .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect());
    match names {
        Some(names) => Err(JwtError::Critical(names)),
        None => Err(JwtError::Malformed(
            "crit must be a non-empty array of strings".into(),
        )),
    }
}

#[derive(Debug, Clone)]
enum Key {
    /// Uncompressed P-256 point (0x04 || x || y).
    Es256(Vec<u8>),
    Rs256 {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    key: Key,
}

/// A parsed JWKS document.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

fn b64(field: &str, v: Option<&Value>) -> Result<Vec<u8>, String> {
    let s = v
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing {field}"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("{field}: {e}"))
}

impl Jwks {
    /// Parses `{"keys": [...]}`. Keys of other types (or `use: enc`) are skipped; a document
    /// with no usable key is an error, since it could verify nothing.
    pub fn parse(json: &str) -> Result<Jwks, String> {
        let doc: Value =
            serde_json::from_str(json).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no \"keys\" array")?;
        let mut out = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if k.get("use").and_then(Value::as_str) == Some("enc") {
                continue;
            }
            let kid = k.get("kid").and_then(Value::as_str).map(str::to_string);
            let key = match k.get("kty").and_then(Value::as_str) {
                Some("EC") => {
                    if k.get("crv").and_then(Value::as_str) != Some("P-256") {
                        continue;
                    }
                    let x = b64("x", k.get("x")).map_err(|e| format!("keys[{i}]: {e}"))?;
                    let y = b64("y", k.get("y")).map_err(|e| format!("keys[{i}]: {e}"))?;
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("keys[{i}]: P-256 coordinates must be 32 bytes"));
                    }
                    let mut point = vec![4u8];
                    point.extend(x);
                    point.extend(y);
                    Key::Es256(point)
                }
                Some("RSA") => Key::Rs256 {
                    n: b64("n", k.get("n")).map_err(|e| format!("keys[{i}]: {e}"))?,
                    e: b64("e", k.get("e")).map_err(|e| format!("keys[{i}]: {e}"))?,
                },
                _ => continue,
            };
            out.push(Jwk { kid, key });
        }
        if out.is_empty() {
            return Err("JWKS holds no ES256 (EC P-256) or RS256 (RSA) key".into());
        }
        Ok(Jwks { keys: out })
    }
}

/// Checks one issuer's tokens.
#[derive(Debug, Clone)]
pub struct Validator {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: Jwks,
}

impl Validator {
    /// Validates `token` at `now`; returns its claims.
    pub fn validate(&self, token: &str, now: SystemTime) -> Result<Map<String, Value>, JwtError> {
        let bad = |m: &str| JwtError::Malformed(m.to_string());
        if token.len() > MAX_TOKEN {
            return Err(bad("longer than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("a JWT has three dot-separated parts"));
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| bad("bad base64url"))
        };
        let header: Map<String, Value> =
            serde_json::from_slice(&decode(h)?).map_err(|_| bad("header is not a JSON object"))?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg != "ES256" && alg != "RS256" {
            return Err(JwtError::Algorithm(alg.to_string()));
        }
        check_crit(&header)?;
        let kid = header.get("kid").and_then(Value::as_str);
        let sig = decode(s)?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let verified = self
            .jwks
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref().is_none() || k.kid.as_deref() == kid)
            .any(|k| match (&k.key, alg) {
                (Key::Es256(point), "ES256") => {
                    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(signed, &sig)
                        .is_ok()
                }
                (Key::Rs256 { n, e }, "RS256") => signature::RsaPublicKeyComponents { n, e }
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                    .is_ok(),
                _ => false,
            });
        if !verified {
            return Err(JwtError::Signature);
        }
        let claims: Map<String, Value> =
            serde_json::from_slice(&decode(p)?).map_err(|_| bad("payload is not a JSON object"))?;
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if iss != self.issuer {
            return Err(JwtError::Issuer {
                got: iss.to_string(),
                want: self.issuer.clone(),
            });
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|w| w == a)),
                _ => false,
            };
            if !ok {
                return Err(JwtError::Audience(self.audiences.clone()));
            }
        }
        let exp = numeric_date(&claims, "exp")?;
        let nbf = numeric_date(&claims, "nbf")?;
        numeric_date(&claims, "iat")?;
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = LEEWAY_SECS as f64;
        if exp.is_some_and(|exp| now > exp + leeway) {
            return Err(JwtError::Expired);
        }
        if nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err(JwtError::NotYetValid);
        }
        Ok(claims)
    }
}

/// Test and tooling helper: signs `claims` as an ES256 JWT with a PKCS#8 P-256 key.
pub fn sign_es256(pkcs8: &[u8], kid: &str, claims: &Value) -> String {
    let rng = ring::rand::SystemRandom::new();
    let key = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
        &rng,
    )
    .expect("a P-256 PKCS#8 key");
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(&rng, signing_input.as_bytes()).expect("signing");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// The JWKS entry for an ES256 key pair (PKCS#8), for tests and tools.
pub fn es256_jwk(pkcs8: &[u8], kid: &str) -> Value {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let key = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
        &rng,
    )
    .expect("a P-256 PKCS#8 key");
    let point = key.public_key().as_ref();
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    })
}

/// A fresh P-256 key in PKCS#8, for tests and tools.
pub fn new_es256_key() -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .expect("key generation")
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn setup() -> (Vec<u8>, Validator) {
        let key = new_es256_key();
        let jwks = json!({"keys": [es256_jwk(&key, "k1")]}).to_string();
        let v = Validator {
            issuer: "https://issuer.test".into(),
            audiences: vec!["shop".into()],
            jwks: Jwks::parse(&jwks).unwrap(),
        };
        (key, v)
    }

    fn claims(exp_in: i64) -> Value {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        json!({"iss": "https://issuer.test", "sub": "alice", "aud": ["shop", "x"], "exp": now + exp_in})
    }

    #[test]
    fn a_valid_es256_token_yields_its_claims() {
        let (key, v) = setup();
        let t = sign_es256(&key, "k1", &claims(600));
        let c = v.validate(&t, SystemTime::now()).unwrap();
        assert_eq!(c["sub"], "alice");
    }

    #[test]
    fn every_bad_token_is_refused_with_its_reason() {
        let (key, v) = setup();
        let now = SystemTime::now();
        let good = sign_es256(&key, "k1", &claims(600));
        let other_key = new_es256_key();
        let cases: Vec<(String, JwtError)> = vec![
            (
                sign_es256(&other_key, "k1", &claims(600)),
                JwtError::Signature,
            ),
            (sign_es256(&key, "k1", &claims(-3600)), JwtError::Expired),
            (
                sign_es256(&key, "k1", &json!({"iss": "https://evil", "aud": "shop"})),
                JwtError::Issuer {
                    got: "https://evil".into(),
                    want: "https://issuer.test".into(),
                },
            ),
            (
                sign_es256(
                    &key,
                    "k1",
                    &json!({"iss": "https://issuer.test", "aud": "other"}),
                ),
                JwtError::Audience(vec!["shop".into()]),
            ),
            (
                "a.b".into(),
                JwtError::Malformed("a JWT has three dot-separated parts".into()),
            ),
        ];
        for (token, want) in cases {
            assert_eq!(v.validate(&token, now).unwrap_err(), want, "{token}");
        }
        // alg: none and HS256, with the real payload and no or any signature.
        let parts: Vec<&str> = good.split('.').collect();
        for alg in ["none", "HS256"] {
            let h = URL_SAFE_NO_PAD.encode(json!({"alg": alg}).to_string());
            let forged = format!("{h}.{}.", parts[1]);
            assert_eq!(
                v.validate(&forged, now).unwrap_err(),
                JwtError::Algorithm(alg.into())
            );
        }
        // A tampered payload breaks the signature.
        let tampered_payload = URL_SAFE_NO_PAD.encode(
            json!({"iss": "https://issuer.test", "sub": "root", "aud": "shop"}).to_string(),
        );
        let tampered = format!("{}.{tampered_payload}.{}", parts[0], parts[2]);
        assert_eq!(v.validate(&tampered, now).unwrap_err(), JwtError::Signature);
        // Within the leeway an expired token still passes; past it, not.
        let t = sign_es256(&key, "k1", &claims(-30));
        assert!(v.validate(&t, now).is_ok());
        assert_eq!(
            v.validate(&t, now + Duration::from_secs(60)).unwrap_err(),
            JwtError::Expired
        );
    }

    /// Signs raw header and payload JSON text with an ES256 key (text, so that values
    /// `json!` cannot build, such as `1e400`, can be tried).
    fn sign_raw(pkcs8: &[u8], header: &str, payload: &str) -> String {
        let rng = ring::rand::SystemRandom::new();
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        )
        .unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let sig = key.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn time_claims_are_numeric_dates_enforced_without_overflow() {
        let (key, v) = setup();
        const T: u64 = 1_700_000_000;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(T);
        let header = r#"{"alg":"ES256","kid":"k1"}"#;
        let date =
            |claim: &'static str, found: &'static str| Err(JwtError::BadDate { claim, found });
        // (the time claims as JSON text, the verdict at T)
        let cases: Vec<(String, Result<(), JwtError>)> = vec![
            (format!(r#""exp":{}"#, T + 600), Ok(())),
            (format!(r#""exp":{}.5"#, T + 600), Ok(())),
            (format!(r#""exp":{}.5"#, T - 60), Ok(())),
            (format!(r#""exp":{}.5"#, T - 61), Err(JwtError::Expired)),
            (format!(r#""exp":{}"#, T - 61), Err(JwtError::Expired)),
            (format!(r#""exp":{}"#, u64::MAX), Ok(())),
            (r#""exp":1e300"#.into(), Ok(())),
            (r#""exp":-1e300"#.into(), Err(JwtError::Expired)),
            (format!(r#""exp":{}"#, i64::MIN), Err(JwtError::Expired)),
            (r#""exp":-1"#.into(), Err(JwtError::Expired)),
            (r#""exp":0"#.into(), Err(JwtError::Expired)),
            (r#""exp":"9999999999""#.into(), date("exp", "a string")),
            (r#""exp":true"#.into(), date("exp", "a boolean")),
            (r#""exp":null"#.into(), date("exp", "null")),
            (r#""exp":{"t":1}"#.into(), date("exp", "an object")),
            (r#""exp":[9999999999]"#.into(), date("exp", "an array")),
            (format!(r#""nbf":{}"#, T + 61), Err(JwtError::NotYetValid)),
            (format!(r#""nbf":{}.9"#, T + 59), Ok(())),
            (format!(r#""nbf":{}.5"#, T + 60), Err(JwtError::NotYetValid)),
            (format!(r#""nbf":{}"#, u64::MAX), Err(JwtError::NotYetValid)),
            (r#""nbf":-5"#.into(), Ok(())),
            (r#""nbf":"0""#.into(), date("nbf", "a string")),
            (format!(r#""iat":{}.25"#, T), Ok(())),
            (format!(r#""iat":{}"#, u64::MAX), Ok(())),
            (r#""iat":"now""#.into(), date("iat", "a string")),
            (r#""iat":false"#.into(), date("iat", "a boolean")),
            (
                format!(r#""exp":{},"nbf":"x""#, T + 600),
                date("nbf", "a string"),
            ),
            (
                r#""exp":1e400"#.into(),
                Err(JwtError::Malformed("payload is not a JSON object".into())),
            ),
        ];
        for (times, want) in cases {
            let payload = format!(r#"{{"iss":"https://issuer.test","aud":"shop",{times}}}"#);
            let token = sign_raw(&key, header, &payload);
            assert_eq!(v.validate(&token, at).map(|_| ()), want, "{times}");
        }
        // A token without any time claim has no lifetime to enforce.
        let token = sign_raw(
            &key,
            header,
            r#"{"iss":"https://issuer.test","aud":"shop"}"#,
        );
        assert!(v.validate(&token, at).is_ok());
    }

    #[test]
    fn crit_headers_are_refused() {
        let (key, v) = setup();
        let payload = r#"{"iss":"https://issuer.test","aud":"shop"}"#;
        let malformed = || {
            Err(JwtError::Malformed(
                "crit must be a non-empty array of strings".into(),
            ))
        };
        let cases: Vec<(&str, Result<(), JwtError>)> = vec![
            (r#"{"alg":"ES256"}"#, Ok(())),
            (
                r#"{"alg":"ES256","crit":["exp"],"exp":1}"#,
                Err(JwtError::Critical(vec!["exp".into()])),
            ),
            (
                r#"{"alg":"ES256","crit":["b64","x"],"b64":false}"#,
                Err(JwtError::Critical(vec!["b64".into(), "x".into()])),
            ),
            (r#"{"alg":"ES256","crit":[]}"#, malformed()),
            (r#"{"alg":"ES256","crit":"b64"}"#, malformed()),
            (r#"{"alg":"ES256","crit":[1]}"#, malformed()),
            (r#"{"alg":"ES256","crit":["b64",null]}"#, malformed()),
            (r#"{"alg":"ES256","crit":null}"#, malformed()),
            (r#"{"alg":"ES256","crit":{"b64":true}}"#, malformed()),
        ];
        for (header, want) in cases {
            let token = sign_raw(&key, header, payload);
            assert_eq!(
                v.validate(&token, SystemTime::now()).map(|_| ()),
                want,
                "{header}"
            );
        }
    }

    #[test]
    fn jwks_without_usable_keys_is_refused() {
        assert!(Jwks::parse("{}").is_err());
        assert!(Jwks::parse(r#"{"keys": [{"kty": "oct", "k": "AAAA"}]}"#).is_err());
        assert!(Jwks::parse("not json").is_err());
    }

    /// RS256 against the public test vector of RFC 7515 appendix A.2 (key and token from the
    /// RFC; the token expired in 2011, so it is checked at a time before that).
    #[test]
    fn rs256_rfc7515_a2_vector_verifies() {
        let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        let n = strip(
            "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx
             HmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMs
             D1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH
             SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdV
             MTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8
             NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
        );
        let token = strip(
            "eyJhbGciOiJSUzI1NiJ9.
             eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt
             cGxlLmNvbS9pc19yb290Ijp0cnVlfQ.
             cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7
             AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4
             BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K
             0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqv
             hJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrB
             p0igcN_IoypGlUPQGe77Rw",
        );
        let jwks = json!({"keys": [{"kty": "RSA", "n": n, "e": "AQAB"}]}).to_string();
        let v = Validator {
            issuer: "joe".into(),
            audiences: vec![],
            jwks: Jwks::parse(&jwks).unwrap(),
        };
        let before_exp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_300_819_000);
        let claims = v.validate(&token, before_exp).unwrap();
        assert_eq!(claims["http://example.com/is_root"], true);
        assert_eq!(
            v.validate(&token, SystemTime::now()).unwrap_err(),
            JwtError::Expired
        );
        // One flipped signature character breaks it.
        let at = token.len() - 20;
        let flipped = if &token[at..at + 1] == "A" { "B" } else { "A" };
        let bad = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
        assert_eq!(
            v.validate(&bad, before_exp).unwrap_err(),
            JwtError::Signature
        );
        // An RSA key cannot vouch for an ES256 header (algorithm confusion).
        let es_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256"}"#);
        let parts: Vec<&str> = token.split('.').collect();
        let confused = format!("{es_header}.{}.{}", parts[1], parts[2]);
        assert_eq!(
            v.validate(&confused, before_exp).unwrap_err(),
            JwtError::Signature
        );
    }
}
