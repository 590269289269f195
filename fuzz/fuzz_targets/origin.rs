//! `origin::AllowedOrigins::parse` and `allows`, and `handshake::admit`,
//! with any allow-list and any `Origin`, `Host` and `Sec-WebSocket-Key`.
//!
//! Input: four lines: the allow-list (comma-separated, as
//! `WS_ALLOWED_ORIGINS`), then the `Origin`, `Host` and
//! `Sec-WebSocket-Key` header values (each left out when its line is
//! missing or `HeaderValue` refuses it).

#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use wsproxy::handshake;
use wsproxy::origin::AllowedOrigins;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(4, |&b| b == b'\n');
    let list = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for name in [header::ORIGIN, header::HOST, header::SEC_WEBSOCKET_KEY] {
        if let Some(Ok(v)) = lines.next().map(HeaderValue::from_bytes) {
            headers.insert(name, v);
        }
    }
    let default = AllowedOrigins::SameOrigin;
    let same = default.allows(&headers);
    let parsed = AllowedOrigins::parse(list.split(','));
    if let Ok(AllowedOrigins::List(origins)) = &parsed {
        assert!(!origins.is_empty());
        for o in origins {
            assert!(o == "null" || o.contains("://"), "{o:?}");
            assert!(o.is_ascii() && *o == o.to_ascii_lowercase(), "{o:?}");
        }
    }
    for origins in [Ok(default.clone()), Ok(AllowedOrigins::Any), parsed] {
        let Ok(origins) = origins else { continue };
        let allowed = origins.allows(&headers);
        // A request without Origin is not a page's: always allowed. A list
        // only adds to wsproxy's own origin.
        if !headers.contains_key(header::ORIGIN) {
            assert!(allowed);
        }
        if same {
            assert!(allowed, "{origins:?} refuses what the default allows");
        }
        // (A wildcard entry, `scheme://*.domain`, is a pattern: an Origin
        // spelled like it has a `*` for a host, which no page has.)
        if let AllowedOrigins::List(list) = &origins
            && let Some(o) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
            && list
                .iter()
                .any(|l| !l.contains("://*.") && l.eq_ignore_ascii_case(o.trim()))
        {
            assert!(allowed, "{o:?} is listed");
        }
        // What a list allows beyond wsproxy's own origin is an entry, or a
        // subdomain of a wildcard entry's domain, in its scheme and port.
        if let AllowedOrigins::List(list) = &origins
            && allowed
            && !same
            && let Some(o) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        {
            let o = o.trim().to_ascii_lowercase();
            let by_entry = list.iter().any(|l| *l == o);
            let by_wildcard = list.iter().any(|l| {
                l.split_once("://*.").is_some_and(|(scheme, domain)| {
                    o.strip_prefix(scheme)
                        .and_then(|r| r.strip_prefix("://"))
                        .and_then(|host| host.strip_suffix(domain))
                        .is_some_and(|labels| {
                            labels.len() > 1
                                && labels.ends_with('.')
                                && !labels.contains("..")
                                && labels
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                        })
                })
            });
            assert!(by_entry || by_wildcard, "{o:?} allowed by {list:?}");
        }
        let admitted = handshake::admit(&headers, &origins);
        if !allowed {
            assert!(admitted.is_err());
        }
    }
    if same && let Some(o) = headers.get(header::ORIGIN) {
        // Same-origin needs a web scheme, and a Host.
        let o = o
            .to_str()
            .expect("allowed, so text")
            .trim()
            .to_ascii_lowercase();
        assert!(
            ["http://", "https://", "ws://", "wss://"]
                .iter()
                .any(|s| o.starts_with(s)),
            "{o:?}"
        );
        assert!(headers.contains_key(header::HOST));
    }
});
