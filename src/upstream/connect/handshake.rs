//! The WebSocket handshake with a backend, written by hand: the request
//! head (which client headers go through, which are added) and the check
//! of the backend's response.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, header};
use tokio::io::AsyncReadExt;

use super::super::routes::Backend;
use super::{BackendStream, DialError, DialFailure};

/// Largest backend handshake response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The request line and headers sent to the backend.
pub struct Upgrade<'a> {
    /// Path and query on the backend.
    pub path_and_query: &'a str,
    /// The client's request headers.
    pub client_headers: &'a HeaderMap,
    /// The client's address (for X-Forwarded-For).
    pub peer: Option<SocketAddr>,
    /// The client connected over TLS.
    pub client_tls: bool,
    /// A client's upgrade (a health check's is not): pass
    /// `Sec-WebSocket-Extensions`, and hold the backend's answer to what the
    /// client offered.
    pub pass_extensions: bool,
    /// The verified token subject, sent as `X-Auth-Subject`.
    pub subject: Option<&'a str>,
    /// Leave out the client's `Authorization` header: wsproxy consumed it
    /// to authenticate, and the route does not forward the token.
    pub strip_authorization: bool,
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and the handshake headers
/// the proxy generates itself for the backend (`name` in lower case, `_`
/// read as `-`: see [`dashed`]).
fn not_forwarded(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-accept"
            | "sec-websocket-extensions"
            | "x-auth-subject"
            | "content-length"
    )
}

/// A header name as CGI, WSGI and other servers read it, `_` as `-`
/// (`X-Auth_Subject` is `HTTP_X_AUTH_SUBJECT`, as `X-Auth-Subject` is), so
/// that a name the proxy strips or replaces is stripped in every spelling.
fn dashed(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains('_') {
        std::borrow::Cow::Owned(name.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Headers a backend takes from the proxy in front of it as who the
/// client is or which URL it asked for (`name` dashed, lower case): a
/// client's own would be believed, so they are dropped. The proxy sets
/// `X-Forwarded-Proto` and `-Host` itself and appends the peer to
/// `X-Forwarded-For`, as proxies do (the backend trusts the last entry).
fn about_the_client(name: &str) -> bool {
    (name.starts_with("x-forwarded-") && name != "x-forwarded-for")
        || matches!(
            name,
            "forwarded"
                | "x-real-ip"
                | "x-client-ip"
                | "true-client-ip"
                | "x-cluster-client-ip"
                | "cf-connecting-ip"
                | "x-original-url"
                | "x-original-uri"
                | "x-rewrite-url"
                | "x-original-host"
        )
}

/// Builds the backend request head.
pub(super) fn request_head(backend: &Backend, up: &Upgrade<'_>, key: &str) -> String {
    let mut head = String::with_capacity(512);
    let host = if backend.host.contains(':') {
        format!("[{}]", backend.host)
    } else {
        backend.host.clone()
    };
    let default_port = if backend.tls { 443 } else { 80 };
    head.push_str(&format!("GET {} HTTP/1.1\r\n", up.path_and_query));
    if backend.port == default_port {
        head.push_str(&format!("Host: {host}\r\n"));
    } else {
        head.push_str(&format!("Host: {host}:{}\r\n", backend.port));
    }
    head.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n");
    head.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
    // Headers the client listed in Connection are hop-by-hop too.
    let listed: Vec<String> = up
        .client_headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut forwarded_for = None;
    for (name, value) in up.client_headers {
        let n = name.as_str();
        let d = dashed(n);
        if not_forwarded(&d)
            || listed.iter().any(|l| l == n)
            || (up.strip_authorization && n == "authorization")
        {
            continue;
        }
        let Ok(v) = value.to_str() else { continue };
        if n == "x-forwarded-for" {
            forwarded_for = Some(v.to_owned());
            continue;
        }
        if d == "x-forwarded-for" || about_the_client(&d) {
            continue; // set below (`X_Forwarded_For` is not appended to)
        }
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if up.pass_extensions {
        for v in up.client_headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
            if let Ok(v) = v.to_str() {
                head.push_str(&format!("Sec-WebSocket-Extensions: {v}\r\n"));
            }
        }
    }
    if let Some(peer) = up.peer {
        let xff = match forwarded_for {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        head.push_str(&format!("X-Forwarded-For: {xff}\r\n"));
    }
    head.push_str(&format!(
        "X-Forwarded-Proto: {}\r\n",
        if up.client_tls { "https" } else { "http" }
    ));
    if let Some(h) = up
        .client_headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        head.push_str(&format!("X-Forwarded-Host: {h}\r\n"));
    }
    if let Some(sub) = up.subject {
        head.push_str(&format!("X-Auth-Subject: {sub}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Reads the backend's response head and checks it ([`check_response`]),
/// reading until the head is complete.
pub(super) async fn read_response(
    stream: &mut BackendStream,
    backend: &Backend,
    key: &str,
    up: &Upgrade<'_>,
) -> Result<(Agreed, Vec<u8>), DialError> {
    let name = backend.authority();
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|error| DialFailure::Read {
                backend: name.clone(),
                error,
            })?;
        if n == 0 {
            return Err(DialFailure::Closed { backend: name }.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(agreed) = check_response(&buf, key, up, &name)? {
            let leftover = buf.get(agreed.head_len..).unwrap_or_default().to_vec();
            return Ok((agreed, leftover));
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(DialFailure::Oversized { backend: name }.into());
        }
    }
}

/// What a backend's 101 agreed to ([`check_response`]).
#[doc(hidden)]
#[derive(Debug)]
pub struct Agreed {
    /// Length of the response head: what follows it is frames.
    pub head_len: usize,
    /// The backend's `Sec-WebSocket-Protocol`, if any.
    pub protocol: Option<HeaderValue>,
    /// The backend's `Sec-WebSocket-Extensions`, if any (only when
    /// `up.pass_extensions`).
    pub extensions: Option<HeaderValue>,
}

/// Checks what a backend sent so far (`buf`) in answer to the upgrade
/// `up` sent with `key`: `Ok(None)` while its response head is
/// incomplete, or what the 101 agreed to, or why it is refused
/// (`backend` names it in errors). Public for the fuzz target.
#[doc(hidden)]
pub fn check_response(
    buf: &[u8],
    key: &str,
    up: &Upgrade<'_>,
    backend: &str,
) -> Result<Option<Agreed>, DialError> {
    let authority = || backend.to_owned();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    // The head ends where httparse says (it takes bare LF line ends too):
    // the frames start there.
    let end = match response
        .parse(buf)
        .map_err(|error| DialFailure::BadResponse {
            backend: authority(),
            error,
        })? {
        httparse::Status::Complete(end) => end,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    if status != 101 {
        return Err(if (400..500).contains(&status) {
            DialError::Rejected {
                backend: authority(),
                status,
            }
        } else {
            DialFailure::Status {
                backend: authority(),
                status,
            }
            .into()
        });
    }
    let find = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if find("sec-websocket-accept") != Some(expected.as_bytes()) {
        return Err(DialFailure::WrongAccept {
            backend: authority(),
        }
        .into());
    }
    // What the backend agreed to must be among what the client offered, or
    // the client would fail its own handshake check after our 101. (Not for
    // a health check, which offers nothing: a backend that always names its
    // subprotocol is still up.)
    // (Subprotocol names compare exactly and whole: a subprotocol has no
    // parameters, so `chat; x` offers nothing called `chat`. Extension
    // names compare without case and without their parameters.)
    let offered = |name: header::HeaderName| {
        let parameters = name == header::SEC_WEBSOCKET_EXTENSIONS;
        up.client_headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| match t.split_once(';') {
                Some((name, _)) if parameters => name.trim().to_owned(),
                _ => t.trim().to_owned(),
            })
            .collect::<Vec<_>>()
    };
    // Every line counts: extensions may be split over several (RFC 6455
    // 9.1), and the client can be told only one subprotocol.
    let all = |name: &str| -> Vec<&[u8]> {
        response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let protocols = all("sec-websocket-protocol");
    if up.pass_extensions && !protocols.is_empty() {
        let chosen = protocols
            .iter()
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
            .collect::<Vec<_>>()
            .join(", ");
        if protocols.len() > 1 || !offered(header::SEC_WEBSOCKET_PROTOCOL).contains(&chosen) {
            return Err(DialFailure::Subprotocol {
                backend: authority(),
                chosen,
            }
            .into());
        }
    }
    let mut extensions = None;
    if up.pass_extensions {
        let agreed = all("sec-websocket-extensions").join(&b", "[..]);
        let client = offered(header::SEC_WEBSOCKET_EXTENSIONS);
        for ext in String::from_utf8_lossy(&agreed).split(',') {
            let name = ext.split(';').next().unwrap_or("").trim();
            if !name.is_empty() && !client.iter().any(|c| c.eq_ignore_ascii_case(name)) {
                return Err(DialFailure::Extension {
                    backend: authority(),
                    name: name.to_owned(),
                }
                .into());
            }
        }
        if !agreed.is_empty() {
            extensions = HeaderValue::from_bytes(&agreed).ok();
        }
    }
    Ok(Some(Agreed {
        head_len: end,
        protocol: find("sec-websocket-protocol").and_then(|v| HeaderValue::from_bytes(v).ok()),
        extensions,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// A header map of `pairs` (lower-case names, any spelling).
    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(
                axum::http::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        h
    }

    fn backend_b() -> Backend {
        Backend {
            tls: false,
            host: "b".into(),
            port: 80,
            weight: 1,
            name: "0".into(),
        }
    }

    fn client_upgrade(headers: &HeaderMap) -> Upgrade<'_> {
        Upgrade {
            path_and_query: "/",
            client_headers: headers,
            peer: None,
            client_tls: false,
            pass_extensions: true,
            subject: None,
            strip_authorization: false,
        }
    }

    /// Found by the upgrade_response fuzz target: a head with bare LF line
    /// ends (which httparse reads, as RFC 9112 allows) was taken to end at
    /// the first CRLFCRLF, inside the frames after it, which were lost.
    #[test]
    fn the_frames_start_where_the_head_ends() {
        let headers = HeaderMap::new();
        let up = client_upgrade(&headers);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\nSec-WebSocket-Accept: {ACCEPT}\n\n"
        );
        let frame = b"\x81\x04\r\n\r\n";
        let buf = [head.as_bytes(), frame].concat();
        let agreed = check_response(&buf, KEY, &up, "b:1")
            .expect("a 101")
            .expect("complete");
        assert_eq!(&buf[agreed.head_len..], frame);
        // Without frames after it, such a head is complete too.
        let agreed = check_response(head.as_bytes(), KEY, &up, "b:1")
            .expect("a 101")
            .expect("complete");
        assert_eq!(agreed.head_len, head.len());
        // And a CRLF head still ends at its blank line.
        let crlf = head.replace('\n', "\r\n");
        let buf = [crlf.as_bytes(), frame].concat();
        let agreed = check_response(&buf, KEY, &up, "b:1")
            .expect("a 101")
            .expect("complete");
        assert_eq!(agreed.head_len, crlf.len());
        assert!(matches!(
            check_response(&buf[..crlf.len() - 1], KEY, &up, "b:1"),
            Ok(None)
        ));
    }

    /// Found by the upgrade_response fuzz target: only the first
    /// `Sec-WebSocket-Extensions` line of a 101 was checked and passed on,
    /// so an extension the backend agreed to on a second line (RFC 6455
    /// 9.1 lets it split them) was unknown to the client, or not offered.
    #[test]
    fn every_line_of_what_the_backend_agreed_to_counts() {
        let answer = |lines: &[&str]| {
            let mut head =
                format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {ACCEPT}\r\n");
            for l in lines {
                head.push_str(l);
                head.push_str("\r\n");
            }
            head + "\r\n"
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate, x-foo"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, superchat"),
        );
        let up = client_upgrade(&headers);
        let two = answer(&[
            "Sec-WebSocket-Extensions: x-foo",
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover",
        ]);
        let agreed = check_response(two.as_bytes(), KEY, &up, "b:1")
            .expect("both offered")
            .expect("complete");
        assert_eq!(
            agreed.extensions.expect("passed on"),
            "x-foo, permessage-deflate; server_no_context_takeover"
        );
        let mut only_foo = HeaderMap::new();
        only_foo.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("x-foo"),
        );
        let err = check_response(two.as_bytes(), KEY, &client_upgrade(&only_foo), "b:1")
            .expect_err("permessage-deflate was not offered");
        assert!(
            matches!(&err, DialError::Refused(DialFailure::Extension { name, .. }) if name == "permessage-deflate"),
            "{err}"
        );
        // Two subprotocols: the client could only be told one.
        let both = answer(&[
            "Sec-WebSocket-Protocol: chat",
            "Sec-WebSocket-Protocol: superchat",
        ]);
        let err = check_response(both.as_bytes(), KEY, &up, "b:1").expect_err("two subprotocols");
        assert!(
            matches!(&err, DialError::Refused(DialFailure::Subprotocol { .. })),
            "{err}"
        );
        // A subprotocol has no parameters: `superchat; x` (not a token)
        // does not offer `superchat` (found by the upgrade_response fuzzer).
        let mut odd = HeaderMap::new();
        odd.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, superchat; server_no_context_takeover"),
        );
        let superchat = answer(&["Sec-WebSocket-Protocol: superchat"]);
        let err = check_response(superchat.as_bytes(), KEY, &client_upgrade(&odd), "b:1")
            .expect_err("superchat was not offered as such");
        assert!(
            matches!(&err, DialError::Refused(DialFailure::Subprotocol { chosen, .. }) if chosen == "superchat"),
            "{err}"
        );
    }

    /// Security review, finding 3: `X-Auth_Subject: admin` passed, since
    /// only `x-auth-subject` was stripped, and a CGI or WSGI server (and
    /// others) reads `_` as `-`: the backend could take the client's
    /// subject for wsproxy's. A stripped or replaced name is stripped in
    /// every such spelling.
    #[test]
    fn a_stripped_header_spelled_with_underscores_is_stripped_too() {
        let h = headers(&[
            ("x-auth_subject", "admin"),
            ("x_auth_subject", "root"),
            ("x_forwarded_for", "10.6.6.6"),
            ("x-forwarded_proto", "evil-proto"),
            ("x_forwarded_host", "evil.example"),
            ("sec_websocket_key", "evil-key"),
            ("transfer_encoding", "chunked"),
            ("content_length", "7"),
            ("proxy_authorization", "Basic ZXZpbA=="),
            ("x_custom", "kept"),
            ("authorization", "Bearer t"),
        ]);
        let backend = backend_b();
        let up = Upgrade {
            subject: Some("alice"),
            strip_authorization: true,
            peer: Some("192.0.2.7:5555".parse().expect("addr")),
            ..client_upgrade(&h)
        };
        let head = request_head(&backend, &up, KEY).to_ascii_lowercase();
        for gone in [
            "admin",
            "root",
            "10.6.6.6",
            "evil",
            "chunked",
            "content_length",
            "zxzpba",
            "bearer t",
        ] {
            assert!(!head.contains(gone), "{gone} passed:\n{head}");
        }
        for kept in [
            "x_custom: kept",
            "x-auth-subject: alice",
            "x-forwarded-for: 192.0.2.7",
            "x-forwarded-proto: http",
        ] {
            assert_eq!(head.matches(kept).count(), 1, "{kept}:\n{head}");
        }
    }

    #[test]
    fn what_a_client_says_of_itself_or_its_url_is_dropped() {
        let h = headers(&[
            ("forwarded", "for=10.6.6.1;proto=https;host=admin.internal"),
            ("x-real-ip", "10.6.6.2"),
            ("x-forwarded-port", "6661"),
            ("x-forwarded-prefix", "/evil-prefix"),
            ("x-forwarded-ssl", "on-evil"),
            ("x_forwarded_server", "evil-server"),
            ("x-original-url", "/evil-url"),
            ("x-rewrite-url", "/evil-rewrite"),
            ("true-client-ip", "10.6.6.3"),
            ("x-client-ip", "10.6.6.4"),
            ("x-forwardedness", "kept"),
        ]);
        let backend = backend_b();
        let up = Upgrade {
            peer: Some("192.0.2.7:5555".parse().expect("addr")),
            ..client_upgrade(&h)
        };
        let head = request_head(&backend, &up, KEY).to_ascii_lowercase();
        for gone in ["10.6.6", "evil", "6661", "admin.internal"] {
            assert!(!head.contains(gone), "{gone} passed:\n{head}");
        }
        assert!(head.contains("x-forwardedness: kept"), "{head}");
        assert!(head.contains("x-forwarded-for: 192.0.2.7\r\n"), "{head}");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_forwarding_headers_added() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("gw.example"));
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("origin", HeaderValue::from_static("https://app.example"));
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("chat, superchat"),
        );
        h.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let backend = Backend {
            tls: false,
            host: "127.0.0.1".into(),
            port: 3000,
            weight: 1,
            name: "0".into(),
        };
        let up = Upgrade {
            path_and_query: "/ws?room=1",
            client_headers: &h,
            peer: Some("192.0.2.7:5555".parse().expect("addr")),
            client_tls: false,
            pass_extensions: true,
            subject: Some("alice"),
            strip_authorization: false,
        };
        let head = request_head(&backend, &up, "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(
            head.starts_with("GET /ws?room=1 HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"),
            "{head}"
        );
        for present in [
            "origin: https://app.example",
            "sec-websocket-protocol: chat, superchat",
            "Sec-WebSocket-Extensions: permessage-deflate",
            "X-Forwarded-For: 10.0.0.1, 192.0.2.7",
            "X-Forwarded-Proto: http",
            "X-Forwarded-Host: gw.example",
            "X-Auth-Subject: alice",
        ] {
            assert!(head.contains(present), "{present} missing:\n{head}");
        }
        for absent in ["x-secret-hop", "keep-alive", "gw.example\r\nHost"] {
            assert!(!head.contains(absent), "{absent} leaked:\n{head}");
        }
    }
}
