//! JSON Web Tokens for topic pub/sub: issued by `POST /auth/token`, checked
//! on `GET /ws`. HS256 only: the algorithm is fixed by the server, never
//! taken from the token, so `alg: none` and algorithm-confusion tokens are
//! refused. `exp`, `iss` and `aud` are always required, `nbf` is honoured
//! when present (RFC 7519 section 4.1.5), and a header that names critical
//! extensions (`crit`, RFC 7515 section 4.1.11) is refused: wsproxy
//! understands none.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::JwtConfig;

/// Clock skew tolerated when checking `exp`.
const LEEWAY_SECS: u64 = 5;

/// The claims wsproxy issues and expects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The session the token is bound to.
    pub sid: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// jsonwebtoken refused it: malformed, bad signature or algorithm,
    /// expired, not yet valid, wrong issuer or audience, a claim missing.
    #[error("invalid token: {0}")]
    Rejected(#[source] jsonwebtoken::errors::Error),
    /// Its header names critical extensions (`crit`).
    #[error(
        "invalid token: the token's header names critical extensions (crit), which this server does not support"
    )]
    CriticalExtensions,
    /// A token could not be signed (issuing only).
    #[error("could not sign the token: {0}")]
    Signing(#[source] jsonwebtoken::errors::Error),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Issues a token for `user` bound to `session`.
pub fn issue(
    config: &JwtConfig,
    user: &str,
    session: &str,
) -> Result<(String, Claims), TokenError> {
    let iat = now();
    let claims = Claims {
        sub: user.to_owned(),
        sid: session.to_owned(),
        iat,
        exp: iat.saturating_add(config.ttl.as_secs()),
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&config.secret),
    )
    .map_err(TokenError::Signing)?;
    Ok((token, claims))
}

/// Verifies signature, algorithm, expiry, issuer and audience.
pub fn verify(config: &JwtConfig, token: &str) -> Result<Claims, TokenError> {
    verify_as(&config.secret, &config.issuer, &config.audience, token)
}

/// The checks of [`verify`] for any claims type: HS256 with `secret` only,
/// `exp`, `sub`, and the given `iss` and `aud` required. The reverse
/// proxy uses it with the routes file's own secret.
pub fn verify_as<T: serde::de::DeserializeOwned>(
    secret: &[u8],
    issuer: &str,
    audience: &str,
    token: &str,
) -> Result<T, TokenError> {
    check_header(token)?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<T>(token, &DecodingKey::from_secret(secret), &validation)
        .map(|data| data.claims)
        .map_err(TokenError::Rejected)
}

/// Refuses a token whose header names critical extensions (`crit`), which
/// jsonwebtoken would ignore. Everything else about the header (its
/// encoding, `alg`) is left to jsonwebtoken, which refuses what it cannot
/// read.
pub fn check_header(token: &str) -> Result<(), TokenError> {
    match jsonwebtoken::decode_header(token) {
        Ok(header) if header.crit.is_some() => Err(TokenError::CriticalExtensions),
        _ => Ok(()),
    }
}

/// Time left before `claims` expire (zero if already expired).
pub fn remaining(claims: &Claims) -> Duration {
    Duration::from_secs(claims.exp.saturating_sub(now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JwtConfig {
        JwtConfig {
            secret: b"0123456789abcdef0123456789abcdef".to_vec(),
            issuer: "wsproxy".into(),
            audience: "wsproxy".into(),
            ttl: Duration::from_secs(60),
        }
    }

    fn b64(data: &[u8]) -> String {
        use std::fmt::Write as _;
        // URL-safe base64 without padding, enough for hand-made tokens.
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                let _ = out.write_char(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn issued_tokens_verify() {
        let c = config();
        let (token, claims) = issue(&c, "alice", "session-a").expect("issue");
        assert_eq!(verify(&c, &token).expect("valid"), claims);
        assert!(remaining(&claims) > Duration::from_secs(50));
    }

    #[test]
    fn wrong_secret_issuer_audience_and_expired_are_refused() {
        let c = config();
        let (token, _) = issue(&c, "alice", "s").expect("issue");
        let other = JwtConfig {
            secret: b"another-secret-another-secret-xx".to_vec(),
            ..config()
        };
        assert!(verify(&other, &token).is_err());
        let iss = JwtConfig {
            issuer: "someone-else".into(),
            ..config()
        };
        assert!(verify(&iss, &token).is_err());
        let aud = JwtConfig {
            audience: "other-app".into(),
            ..config()
        };
        assert!(verify(&aud, &token).is_err());
        let mut claims = verify(&c, &token).expect("valid");
        claims.exp = now() - 60;
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&c.secret),
        )
        .expect("encode");
        assert!(matches!(
            verify(&c, &expired),
            Err(TokenError::Rejected(e)) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature)
        ));
    }

    fn signed(header: Header, claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).expect("encode")
    }

    #[test]
    fn not_yet_valid_and_critical_extension_tokens_are_refused() {
        let c = config();
        let claims = |nbf: u64| {
            serde_json::json!({
                "sub": "alice", "sid": "s", "exp": now() + 600, "iat": now(), "nbf": nbf,
                "iss": "wsproxy", "aud": "wsproxy"
            })
        };
        let hs256 = Header::new(Algorithm::HS256);
        let ok = signed(hs256.clone(), claims(now() - 10), &c.secret);
        assert!(verify(&c, &ok).is_ok());
        let early = signed(hs256.clone(), claims(now() + 3600), &c.secret);
        assert!(verify(&c, &early).is_err(), "nbf an hour ahead");
        let crit = Header {
            crit: Some(vec!["exp-ext".into()]),
            ..hs256
        };
        let crit = signed(crit, claims(now() - 10), &c.secret);
        let e = verify(&c, &crit).expect_err("crit");
        assert!(e.to_string().contains("crit"), "{e}");
    }

    #[test]
    fn a_huge_expiry_is_a_token_that_lasts_not_a_panic() {
        let c = config();
        let claims = serde_json::json!({
            "sub": "alice", "sid": "s", "exp": u64::MAX, "iat": now(),
            "iss": "wsproxy", "aud": "wsproxy"
        });
        let token = signed(Header::new(Algorithm::HS256), claims, &c.secret);
        let claims = verify(&c, &token).expect("valid");
        assert!(remaining(&claims) > Duration::from_secs(1 << 40));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let c = config();
        let claims = serde_json::json!({
            "sub": "mallory", "sid": "s", "exp": now() + 600, "iat": now(),
            "iss": "wsproxy", "aud": "wsproxy"
        });
        let body = b64(claims.to_string().as_bytes());
        let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), body);
        assert!(verify(&c, &none).is_err());
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(&c.secret),
        )
        .expect("encode");
        assert!(verify(&c, &hs512).is_err());
    }
}
