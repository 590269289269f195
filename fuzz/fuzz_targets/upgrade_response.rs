//! `upstream::connect::check_response`: a backend's answer to the upgrade
//! wsproxy sent it, as it arrives, in any pieces.
//!
//! Input: a flags byte (bit 0: a client's upgrade, which passes its
//! subprotocols and extensions; clear: a health check's), then the
//! client's `Sec-WebSocket-Protocol` and `Sec-WebSocket-Extensions` (a line
//! each; an empty or unusable one is left out), then the backend's bytes.
//! The key sent is fixed (`KEY`), so its accept value can be in the seeds.
//!
//! Checked: never a panic; the answer does not depend on how the bytes
//! were split across reads; a 101 is accepted only with the right
//! `Sec-WebSocket-Accept`, a subprotocol and extensions the client offered,
//! and the frames after the head start where HTTP says the head ends; a
//! 4xx is passed on as such.

#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use wsproxy::upstream::connect::{DialError, Upgrade, check_response};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455's accept value for `KEY`.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The decision alone: incomplete, accepted (with what), or refused (the
/// error's text).
fn outcome(r: &Result<Option<wsproxy::upstream::connect::Agreed>, DialError>) -> String {
    match r {
        Ok(None) => "incomplete".into(),
        Ok(Some(a)) => format!("{} {:?} {:?}", a.head_len, a.protocol, a.extensions),
        Err(e) => e.to_string(),
    }
}

fn names(values: Vec<&str>) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let mut client = HeaderMap::new();
    for name in [header::SEC_WEBSOCKET_PROTOCOL, header::SEC_WEBSOCKET_EXTENSIONS] {
        if let Some(Ok(v)) = parts
            .next()
            .filter(|v| !v.is_empty())
            .map(HeaderValue::from_bytes)
        {
            client.insert(name, v);
        }
    }
    let buf = parts.next().unwrap_or_default();
    let up = Upgrade {
        path_and_query: "/",
        client_headers: &client,
        peer: None,
        client_tls: false,
        pass_extensions: flags & 1 != 0,
        subject: None,
        strip_authorization: flags & 2 != 0,
    };
    let full = check_response(buf, KEY, &up, "backend:1");
    let decided = outcome(&full);

    // Read in pieces: a prefix either waits for more or decides as the
    // whole does.
    let step = (buf.len() / 64).max(1);
    for cut in (0..buf.len()).step_by(step) {
        let part = check_response(&buf[..cut], KEY, &up, "backend:1");
        if !matches!(part, Ok(None)) {
            assert_eq!(outcome(&part), decided, "cut at {cut}");
        }
    }

    match &full {
        Ok(Some(agreed)) => {
            // Where HTTP says the head ends, the frames begin.
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            let parsed = response.parse(buf).expect("an accepted head parses");
            assert_eq!(
                parsed,
                httparse::Status::Complete(agreed.head_len),
                "the frames start elsewhere"
            );
            assert_eq!(response.code, Some(101));
            let values = |name: &str| -> Vec<String> {
                response
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    .collect()
            };
            assert_eq!(
                values("sec-websocket-accept").first().map(String::as_str),
                Some(ACCEPT),
                "accepted without the right Sec-WebSocket-Accept"
            );
            let protocols = values("sec-websocket-protocol");
            let first_protocol = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
                .map(|h| h.value);
            assert_eq!(agreed.protocol.as_ref().map(|v| v.as_bytes()), first_protocol);
            if up.pass_extensions {
                let offered: Vec<String> = client
                    .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|p| p.trim().to_owned())
                    .collect();
                for p in &protocols {
                    assert!(offered.iter().any(|o| o == p.trim()), "{p:?} not offered");
                }
                // Every extension the backend agreed to (on any of its
                // header lines) was offered, and reaches the client.
                let offered = names(
                    client
                        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect(),
                );
                let passed = agreed
                    .extensions
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                let passed = names(passed.iter().map(String::as_str).collect());
                let agreed_lines = values("sec-websocket-extensions");
                for name in names(agreed_lines.iter().map(String::as_str).collect()) {
                    assert!(offered.contains(&name), "{name:?} not offered");
                    assert!(passed.contains(&name), "{name:?} agreed but not passed on");
                }
            } else {
                assert!(agreed.extensions.is_none());
            }
        }
        Err(DialError::Rejected { status, .. }) => assert!((400..500).contains(status)),
        Err(DialError::Timeout(_)) => panic!("no clock here"),
        Ok(None) | Err(DialError::Refused(_)) => {}
    }
});
