//! `auth::jwt::check_header` and `verify_as` (and `verify`, with wsproxy's
//! claims) on any token, and on tokens built from the input so that the
//! header and claims JSON parsers are reached.
//!
//! Input: byte 0 picks the form.
//! - even: the rest is the token, as sent (UTF-8, lossy);
//! - odd: the rest is up to three parts split at NUL bytes: the header's
//!   JSON, the claims' JSON and, if given, the signature's bytes; each is
//!   base64url-encoded and joined with dots. Without a third part the
//!   token is signed (HS256) with the secret it is checked with, so that
//!   its claims are read.
//!
//! Checked: an accepted token is HS256 without `crit`, with the required
//! issuer, audience and subject, and an `exp` not long past.

#![no_main]

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use wsproxy::auth::jwt::{self, Claims};
use wsproxy::config::JwtConfig;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret!";

fn token(rest: &[u8]) -> String {
    let mut parts = rest.splitn(3, |&b| b == 0);
    let header = parts.next().unwrap_or_default();
    let claims = parts.next().unwrap_or_default();
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = match parts.next() {
        Some(sig) => URL_SAFE_NO_PAD.encode(sig),
        None => jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .expect("HS256 signs anything"),
    };
    format!("{message}.{signature}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let token = if form & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        token(rest)
    };
    let header_ok = jwt::check_header(&token).is_ok();
    let verified = jwt::verify_as::<serde_json::Value>(SECRET, "iss", "aud", &token);
    let config = JwtConfig {
        secret: SECRET.to_vec(),
        issuer: "iss".into(),
        audience: "aud".into(),
        ttl: Duration::from_secs(60),
    };
    let typed = jwt::verify(&config, &token);
    // (Typed claims may verify where JSON ones do not: a number out of
    // f64's range in an unknown field is skipped by the one, an error to
    // the other.)
    if let Ok(claims) = &typed {
        let claims: &Claims = claims;
        assert_eq!((claims.iss.as_str(), claims.aud.as_str()), ("iss", "aud"));
        assert!(
            claims.exp.saturating_add(60) >= now(),
            "expired: {claims:?}"
        );
        let _ = jwt::remaining(claims);
    }
    let Ok(claims) = verified else {
        return;
    };
    assert!(header_ok, "a token with crit was accepted");
    let header = jsonwebtoken::decode_header(&token).expect("an accepted header decodes");
    assert_eq!(header.alg, Algorithm::HS256);
    assert!(header.crit.is_none());
    assert_eq!(claims["iss"], "iss", "{claims}");
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == "aud",
        serde_json::Value::Array(list) => list.iter().any(|a| a == "aud"),
        _ => false,
    };
    assert!(aud_ok, "{claims}");
    assert!(!claims["sub"].is_null(), "{claims}");
    let exp = claims["exp"].as_f64().expect("exp is a number");
    assert!(
        exp + 60.0 >= now() as f64,
        "an expired token passed: {claims}"
    );
    if let Some(nbf) = claims.get("nbf").and_then(serde_json::Value::as_f64) {
        assert!(
            nbf <= now() as f64 + 60.0,
            "a token not yet valid passed: {claims}"
        );
    }
});
