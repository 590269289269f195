//! `server::event_stream`: the first bytes of a plain HTTP/1.1 connection,
//! as wsproxy's own event-stream writer reads them (the request line it
//! peeks at, then the head it parses with httparse).
//!
//! Input: the connection's first bytes, raw.
//!
//! Checked: never a panic; the request line is taken only when it is
//! `GET /<a>/sse/<s>[?query] HTTP/1.1` with non-empty `<a>` and `<s>`;
//! a head is parsed only once it is complete (a blank line ends it), and
//! every prefix of the input without one is incomplete; a parsed request
//! keeps the method, target and every header line as sent, carries no
//! `Upgrade`, `Transfer-Encoding` or non-zero `Content-Length` (those go
//! to hyper); a refusal is `400` or `431` with a JSON body naming it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::server::event_stream::{Head, parse_head, request_line_is_event_stream};

/// Whether `bytes` hold the blank line that ends a head (httparse takes
/// both CRLF and bare LF line ends).
fn has_blank_line(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

fuzz_target!(|data: &[u8]| {
    if request_line_is_event_stream(data) {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a taken line ends with CRLF");
        let line = std::str::from_utf8(&data[..end]).expect("a taken line is UTF-8");
        let target = line
            .strip_prefix("GET ")
            .and_then(|l| l.strip_suffix(" HTTP/1.1"))
            .expect("GET ... HTTP/1.1");
        let path = target.split('?').next().unwrap_or_default();
        let segments: Vec<&str> = path.split('/').collect();
        assert_eq!(segments.len(), 4, "{line:?}");
        assert!(segments[0].is_empty() && segments[2] == "sse", "{line:?}");
        assert!(!segments[1].is_empty() && !segments[3].is_empty(), "{line:?}");
        assert!(!target.contains(' '), "{line:?}");
    }
    match parse_head(data) {
        Ok(None) => {}
        Ok(Some(Head::ForHyper)) => {
            assert!(has_blank_line(data), "complete without a blank line");
        }
        Ok(Some(Head::Request(request))) => {
            assert!(has_blank_line(data), "complete without a blank line");
            // What httparse parses again from the same bytes.
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut again = httparse::Request::new(&mut headers);
            assert!(matches!(again.parse(data), Ok(httparse::Status::Complete(_))));
            assert_eq!(Some(request.method().as_str()), again.method);
            // An origin-form target is kept as sent (up to a fragment,
            // which a URI drops).
            let target = again.path.expect("a complete head has a target");
            if target.starts_with('/') {
                let kept = request.uri().path_and_query().map(|p| p.as_str());
                let kept = kept.expect("an origin-form target has a path");
                assert!(target.starts_with(kept), "{target:?} -> {kept:?}");
            }
            assert_eq!(request.headers().len(), again.headers.len());
            assert!(!request.headers().contains_key("upgrade"));
            assert!(!request.headers().contains_key("transfer-encoding"));
            if let Some(length) = request.headers().get("content-length") {
                assert_eq!(length.as_bytes(), b"0");
            }
            // No prefix that stops before the blank line is a request.
            let cut = data.len() / 2;
            if !has_blank_line(&data[..cut]) {
                assert!(!matches!(
                    parse_head(&data[..cut]),
                    Ok(Some(Head::Request(_)))
                ));
            }
        }
        Err(refusal) => {
            let status = refusal.status().as_u16();
            assert!(status == 400 || status == 431, "{status}");
            assert_eq!(
                refusal
                    .headers()
                    .get("content-type")
                    .map(|v| v.as_bytes()),
                Some(&b"application/json"[..])
            );
        }
    }
});
