//! `auth::bearer_token` with any `Authorization` value (as far as
//! `HeaderValue` takes it) and any `access_token` parameter.
//!
//! Input: a flags byte (bit 0: send the header, bit 1: send the parameter),
//! then the header's bytes, a newline, and the parameter (UTF-8, lossy).

#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use wsproxy::auth::{MAX_TOKEN_LEN, bearer_token};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (value, query) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let query = String::from_utf8_lossy(query);
    let query = (flags & 2 != 0).then_some(query.as_ref());
    let mut headers = HeaderMap::new();
    if flags & 1 != 0 {
        let Ok(v) = HeaderValue::from_bytes(value) else {
            return;
        };
        headers.insert(header::AUTHORIZATION, v);
    }
    let Ok(token) = bearer_token(&headers, query) else {
        return;
    };
    assert!(!token.is_empty());
    assert!(token.len() <= MAX_TOKEN_LEN, "{} bytes", token.len());
    assert_eq!(token, token.trim(), "untrimmed");
    // The header wins; the parameter only counts without it.
    match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().expect("a token came from it");
            let (scheme, _) = v.split_once(' ').expect("scheme");
            assert!(scheme.eq_ignore_ascii_case("bearer"), "{scheme:?}");
            assert!(v.trim_end().ends_with(token), "{v:?} {token:?}");
        }
        None => assert_eq!(Some(token), query.map(str::trim)),
    }
});
