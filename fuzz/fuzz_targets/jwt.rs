//! The waypoint's JWT parser and validator (`zmesh::waypoint::jwt`): `Jwks::parse` and
//! `Validator::validate`.
//!
//! Input: a mode letter, then its text.
//! - `J<jwks json>`: `Jwks::parse`; a JWKS it accepts is then used to validate a fixed token.
//! - `T<token>`: the token as a request carries it, against a validator with one ES256 key
//!   (kid `k1`, issuer `https://issuer.example`, audience `api`, now = 2023-11-14T22:13:20Z).
//! - `S<header json>\n<payload json>`: the two parts are base64url-encoded and signed with that
//!   key, so the checks after the signature (claims, dates, issuer, audience, `crit`) are reached.
//! Properties: no panic; a token accepted carries the validator's issuer; a token correctly
//! signed with `alg: ES256`, no `crit` and a matching or absent `kid` never fails the
//! signature check.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{Map, Value};
use zmesh::waypoint::jwt::{es256_jwk, new_es256_key, Jwks, JwtError, Validator};

const ISSUER: &str = "https://issuer.example";

struct Rig {
    key: EcdsaKeyPair,
    validator: Validator,
    rng: ring::rand::SystemRandom,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let pkcs8 = new_es256_key();
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .expect("the generated key");
        let jwks = serde_json::json!({ "keys": [es256_jwk(&pkcs8, "k1")] }).to_string();
        let validator = Validator {
            issuer: ISSUER.to_string(),
            audiences: vec!["api".to_string()],
            jwks: Jwks::parse(&jwks).expect("the generated JWKS"),
        };
        Rig {
            key,
            validator,
            rng,
        }
    })
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn check(validator: &Validator, token: &str) -> Result<Map<String, Value>, JwtError> {
    let got = validator.validate(token, now());
    if let Ok(claims) = &got {
        assert_eq!(
            claims.get("iss").and_then(Value::as_str),
            Some(validator.issuer.as_str())
        );
    }
    got
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let r = rig();
    let mut chars = text.chars();
    match chars.next() {
        Some('J') => {
            if let Ok(jwks) = Jwks::parse(chars.as_str()) {
                let v = Validator {
                    issuer: ISSUER.to_string(),
                    audiences: vec![],
                    jwks,
                };
                let _ = check(&v, "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0.AAAA");
            }
        }
        Some('T') => {
            let _ = check(&r.validator, chars.as_str());
        }
        Some('S') => {
            let (header, payload) = chars
                .as_str()
                .split_once('\n')
                .unwrap_or((chars.as_str(), ""));
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(payload)
            );
            let sig = r.key.sign(&r.rng, input.as_bytes()).expect("signing");
            let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
            let got = check(&r.validator, &token);
            let h: Option<Map<String, Value>> = serde_json::from_str(header).ok();
            let signable = h.is_some_and(|h| {
                h.get("alg") == Some(&Value::from("ES256"))
                    && !h.contains_key("crit")
                    && h.get("kid")
                        .and_then(Value::as_str)
                        .is_none_or(|k| k == "k1")
            });
            if signable && token.len() <= 16 * 1024 {
                assert_ne!(got, Err(JwtError::Signature), "a correctly signed token");
            }
        }
        _ => {}
    }
});
