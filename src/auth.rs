//! Authentication: session-bridge tokens (this file), JSON Web Tokens for
//! topic pub/sub ([`jwt`]) and the users file behind them ([`users`]).
//!
//! # Session-bridge tokens
//!
//! The backend stores a token for a session with
//! `SETEX session:{session_id}:auth <ttl> <token>`. A client proves it holds
//! that token with `Authorization: Bearer <token>` or, because browsers
//! cannot set headers on a WebSocket, with an `access_token` query parameter.
//!
//! The check is one Redis round trip: a small Lua script reads the stored
//! token and, only when it matches, resets the key's TTL to the grace period
//! so a reconnect with the same token works. The script compares SHA-1
//! digests (so its timing says nothing about the token); the decision that
//! lets a client in is then taken here with a constant-time comparison of the
//! tokens themselves. Tokens are never logged.

pub mod issue;
pub mod jwt;
pub mod users;

use std::sync::LazyLock;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use redis::aio::ConnectionLike;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// Longest token accepted; longer ones are refused without asking Redis.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Reads the stored token; resets the TTL only if the presented token's
/// digest matches. Returns the stored token, or nil if there is none or
/// the key holds something other than a string (a hash, a list: no token,
/// so an invalid one, not a Redis failure).
const CHECK_AND_TOUCH: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return false end
local stored = redis.call('GET', KEYS[1])
if not stored then return false end
if redis.sha1hex(stored) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return stored
";

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header and no `access_token` parameter, or
    /// an empty/oversized/garbled one.
    #[error("{0}")]
    Missing(&'static str),
    /// The token does not match the session's, or the session has none.
    #[error("token is invalid or expired")]
    Invalid,
    /// Redis could not be asked.
    #[error("Redis is unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not confirm the subscription that admits the client.
    #[error("Redis is unavailable: {0}")]
    Subscribe(#[from] crate::broker::BrokerError),
    /// A reliable session's history could not be read.
    #[error("Redis is unavailable: {0}")]
    History(#[from] crate::session::history::HistoryError),
}

/// Extracts the bearer token from the `Authorization` header, falling back
/// to the `access_token` query parameter. The header wins when both exist.
pub fn bearer_token<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
) -> Result<&'a str, AuthError> {
    let token = match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| AuthError::Missing("Authorization header is not valid text"))?;
            let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Missing(
                "Authorization header must be \"Bearer <token>\"",
            ))?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Missing(
                    "Authorization header must use the Bearer scheme",
                ));
            }
            rest.trim()
        }
        None => query_token
            .ok_or(AuthError::Missing(
                "missing token: send \"Authorization: Bearer <token>\" or ?access_token=<token>",
            ))?
            .trim(),
    };
    if token.is_empty() {
        return Err(AuthError::Missing("the bearer token is empty"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Missing("the bearer token is too long"));
    }
    Ok(token)
}

/// The Redis key holding a session's token.
pub fn auth_key(keys: crate::keys::Keys, session_id: &str) -> String {
    keys.session_auth(session_id)
}

/// The token check's script. `Script::new` hashes the source: once per
/// process, not per connect.
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CHECK_AND_TOUCH));

/// Puts the token check's script in Redis's script cache (on a cluster,
/// in every master's), so that the first connects after a start-up or a
/// Redis restart do not each get `NOSCRIPT` and pay a second round trip
/// (`server::keep_libraries` calls it with the libraries). A check that
/// still finds it missing loads it itself.
pub async fn load_token_script<C: ConnectionLike>(redis: &mut C) -> redis::RedisResult<()> {
    SCRIPT.load_async(redis).await.map(|_| ())
}

/// Checks `token` against the session's stored token and, when it matches,
/// resets the key's TTL to `grace` — atomically, in one round trip.
pub async fn check_session_token<C: ConnectionLike>(
    redis: &mut C,
    keys: crate::keys::Keys,
    session_id: &str,
    token: &str,
    grace: Duration,
) -> Result<(), AuthError> {
    // The digest in hex, on the stack: 20 bytes make 40 digits.
    let mut digest = [0u8; 40];
    hex::encode_to_slice(Sha1::digest(token.as_bytes()), &mut digest)
        .map_err(|_| AuthError::Invalid)?;
    let key = auth_key(keys, session_id);
    // `EVALSHA` built here with room for all of it, where `Script`'s
    // invocation copies every key and argument into vectors of its own
    // first; `SCRIPT LOAD` and again when Redis does not know the script
    // (a restart, `SCRIPT FLUSH`), as the invocation does.
    let mut evalsha = redis::Cmd::with_capacity(6, 64 + key.len() + digest.len());
    evalsha
        .arg("EVALSHA")
        .arg(SCRIPT.get_hash())
        .arg(1)
        .arg(key.as_str())
        .arg(&digest[..])
        .arg(grace.as_secs().max(1));
    let stored: Option<Vec<u8>> = match evalsha.query_async(redis).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            SCRIPT.load_async(redis).await?;
            evalsha.query_async(redis).await?
        }
        stored => stored?,
    };
    match stored {
        Some(stored) if bool::from(stored.as_slice().ct_eq(token.as_bytes())) => Ok(()),
        _ => Err(AuthError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(auth).expect("valid header"),
        );
        h
    }

    #[test]
    fn bearer_header_is_parsed() {
        assert_eq!(bearer_token(&headers("Bearer abc"), None).ok(), Some("abc"));
        assert_eq!(
            bearer_token(&headers("bearer  abc "), None).ok(),
            Some("abc")
        );
    }

    #[test]
    fn header_wins_over_query() {
        assert_eq!(
            bearer_token(&headers("Bearer h"), Some("q")).ok(),
            Some("h")
        );
        assert_eq!(bearer_token(&HeaderMap::new(), Some("q")).ok(), Some("q"));
    }

    #[test]
    fn malformed_headers_are_missing_tokens() {
        for bad in ["Basic abc", "Bearer", "Bearer   ", "abc"] {
            assert!(
                matches!(
                    bearer_token(&headers(bad), None),
                    Err(AuthError::Missing(_))
                ),
                "{bad:?} should be refused"
            );
        }
        assert!(matches!(
            bearer_token(&HeaderMap::new(), None),
            Err(AuthError::Missing(_))
        ));
        assert!(matches!(
            bearer_token(&HeaderMap::new(), Some("")),
            Err(AuthError::Missing(_))
        ));
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            bearer_token(&HeaderMap::new(), Some(&long)),
            Err(AuthError::Missing(_))
        ));
    }
}
