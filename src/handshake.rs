//! Checks every WebSocket upgrade passes before any endpoint looks at it:
//! the page's origin first ([`crate::origin`]), then the form of
//! `Sec-WebSocket-Key`.

use axum::http::{HeaderMap, header};
use base64::Engine;

use crate::error::{ApiError, Refusal};
use crate::origin::AllowedOrigins;

/// Refuses an upgrade from a page `origins` does not allow (403), or one
/// whose `Sec-WebSocket-Key` is not the base64 of 16 bytes (400, RFC 6455
/// section 4.2.1). A missing key is left to the endpoint, which refuses a
/// request that is not an upgrade at all in its own words.
pub fn admit(headers: &HeaderMap, origins: &AllowedOrigins) -> Result<(), ApiError> {
    origins.check(headers)?;
    if let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY)
        && !valid_key(key.as_bytes())
    {
        return Err(ApiError::from(Refusal::InvalidWebsocketKey(
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes".into(),
        )));
    }
    Ok(())
}

/// True for the base64 encoding of exactly 16 bytes (24 characters, with
/// padding, canonical).
pub fn valid_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sixteen_bytes_of_base64_make_a_key() {
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(valid_key(b"AAAAAAAAAAAAAAAAAAAAAA=="));
        for bad in [
            &b""[..],
            b"!!",
            b"AAAAAAAAAAA=",                 // 8 bytes
            b"dGhlIHNhbXBsZSBub25jZQ",       // unpadded
            b"dGhlIHNhbXBsZSBub25jZQ==dGhl", // 19 bytes
            b"dGhlIHNhbXBsZSBub25jZ!==",     // not base64
            b"AAAAAAAAAAAAAAAAAAAAAAAA",     // 18 bytes
        ] {
            assert!(!valid_key(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
