//! Reverse proxy end to end: in-process echo backends on 127.0.0.1:0
//! (plain and TLS), wsproxy in-process with a routes file.
#![allow(clippy::result_large_err)] // the tungstenite handshake callback signature

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn paths_map_with_query_and_headers_are_forwarded_properly() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let mut chat = route("/chat", "/ws", &[(b.port, 1)]);
    chat["allowed_origins"] = serde_json::json!(["https://app.example"]);
    let server = proxy(&redis, file(vec![chat])).await;
    let mut req = format!("ws://{}/chat/room1?x=1&y=two", server.addr)
        .into_client_request()
        .expect("req");
    let h = req.headers_mut();
    h.insert("origin", HeaderValue::from_static("https://app.example"));
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("chat, superchat"),
    );
    h.insert("x-custom", HeaderValue::from_static("kept"));
    h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
    let (mut ws, resp) = within(
        WAIT,
        "the proxied handshake",
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("proxied handshake");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"superchat"[..])
    );
    assert_eq!(next_text(&mut ws).await, "hello from b0");
    let seen = b.seen.lock().expect("lock");
    assert_eq!(seen.paths, ["/ws/room1?x=1&y=two"]);
    let headers = &seen.headers[0];
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("origin"), Some("https://app.example"));
    assert_eq!(get("x-custom"), Some("kept"));
    assert_eq!(get("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(get("x-forwarded-proto"), Some("http"));
    assert_eq!(get("sec-websocket-protocol"), Some("chat, superchat"));
    assert!(get("keep-alive").is_none());
}

/// A proxy route may claim a path shaped like an event stream's
/// (`/{a}/sse/{s}`); a WebSocket on it is proxied, though wsproxy reads
/// such a connection's first request itself (to serve event streams
/// without hyper) and hands it to hyper only once it sees `Upgrade`.
#[tokio::test]
async fn a_websocket_on_a_route_shaped_like_an_event_stream_is_proxied() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let server = proxy(&redis, file(vec![route("/p/sse", "/", &[(b.port, 1)])])).await;
    let mut ws = open(&server, "/p/sse/x").await.expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b0");
    send_text(&mut ws, "over the route").await;
    assert_eq!(next_text(&mut ws).await, "over the route");
}

#[tokio::test]
async fn every_frame_type_and_close_codes_pass_both_ways() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let server = proxy(&redis, file(vec![route("/echo", "/", &[(b.port, 1)])])).await;
    let mut ws = open(&server, "/echo").await.expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b0");
    send_text(&mut ws, "héllo").await;
    assert_eq!(next_text(&mut ws).await, "héllo");
    ws.send(Message::binary(vec![0u8, 159, 255]))
        .await
        .expect("binary");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b.as_ref(), [0u8, 159, 255]),
        other => panic!("{other:?}"),
    }
    ws.send(Message::Ping("p1".into())).await.expect("ping");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(p.as_ref(), b"p1"),
        other => panic!("expected the backend's pong: {other:?}"),
    }
    // Client closes with its own code: the backend sees it.
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "client bye".into(),
    }))
    .await
    .expect("close");
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.seen.lock().expect("lock").closes.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never saw the close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.seen.lock().expect("lock").closes, [4000]);
    // Backend closes with its code: the client sees it, with the reason.
    let mut ws = open(&server, "/echo").await.expect("proxied");
    next_text(&mut ws).await;
    send_text(&mut ws, "close:4321").await;
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => {
            assert_eq!(u16::from(f.code), 4321);
            assert_eq!(f.reason.as_str(), "backend says bye");
        }
        other => panic!("{other:?}"),
    }
}

/// Megabytes each way while the client is slow to read: the tunnel must
/// hold what the client cannot take yet and lose or reorder nothing.
#[tokio::test]
async fn large_messages_survive_a_slow_reader() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let server = proxy(&redis, file(vec![route("/echo", "/", &[(b.port, 1)])])).await;
    let ws = open(&server, "/echo").await.expect("proxied");
    let (mut tx, mut rx) = ws.split();
    assert!(matches!(rx.next().await, Some(Ok(Message::Text(_)))));
    const N: usize = 8;
    const SIZE: usize = 1 << 20;
    let body = |i: usize| -> Vec<u8> { (0..SIZE).map(|j| (i * 31 + j % 251) as u8).collect() };
    let sender = tokio::spawn(async move {
        for i in 0..N {
            tx.send(Message::binary(body(i))).await.expect("send");
        }
        tx
    });
    // Let the socket buffers fill before reading anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..N {
        match tokio::time::timeout(WAIT, rx.next()).await {
            Ok(Some(Ok(Message::Binary(got)))) => {
                assert_eq!(got.len(), SIZE, "message {i} length");
                assert!(got.as_ref() == body(i).as_slice(), "message {i} differs");
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
    drop(sender.await.expect("sender"));
}

#[tokio::test]
async fn compression_negotiation_reaches_the_backend_and_back() {
    // A hand-written backend that accepts permessage-deflate.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let offered = Arc::new(Mutex::new(String::new()));
    let offered2 = offered.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => return,
                Ok(m) => n += m,
            }
        }
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap_or("")
            .trim()
            .to_owned();
        *offered2.lock().expect("lock") = head;
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
        );
        let _ = s.write_all(resp.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let redis = Redis::start().await;
    let server = proxy(&redis, file(vec![route("/z", "/", &[(port, 1)])])).await;
    let (_c, resp) = raw_upgrade(&server, "/z", "permessage-deflate; client_max_window_bits").await;
    assert!(
        resp.contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover"),
        "{resp}"
    );
    assert!(
        resp.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{resp}"
    );
    assert!(
        offered
            .lock()
            .expect("lock")
            .contains("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    );
}

/// A backend that accepts permessage-deflate and keeps every byte it gets
/// after its 101, until the proxy closes the connection.
async fn recording_deflate_backend() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            n += s.read(&mut buf[n..]).await.expect("request");
        }
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        let end = head.find("\r\n\r\n").expect("end") + 4;
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("key")
            .trim()
            .to_owned();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        );
        s.write_all(resp.as_bytes()).await.expect("101");
        let mut got = buf[end..n].to_vec();
        let _ = s.read_to_end(&mut got).await;
        got
    });
    (port, task)
}

/// A client frame: masked with a fixed key.
fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [7u8, 1, 200, 33];
    let mut f = vec![first];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// One message as permessage-deflate sends it (sync flush, tail removed).
fn deflated(c: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .expect("deflate");
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A route with a message size limit still lets client and backend agree
/// on compression; compressed messages pass untouched, and are measured
/// by what they inflate to: one that inflates past the limit never reaches
/// the backend, which gets a close in its place, and the client gets 1009.
#[tokio::test]
async fn limited_routes_keep_compression_and_measure_inflated_messages() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (port, recorded) = recording_deflate_backend().await;
    let redis = Redis::start().await;
    let mut limited = route("/z", "/", &[(port, 1)]);
    limited["max_message_bytes"] = 1000.into();
    let server = proxy(&redis, file(vec![limited])).await;
    let (mut c, resp) = raw_upgrade(&server, "/z", "permessage-deflate").await;
    let mut buf = vec![0u8; 4096];
    assert!(
        resp.contains("sec-websocket-extensions: permessage-deflate\r\n"),
        "{resp}"
    );
    let mut z = flate2::Compress::new(flate2::Compression::default(), false);
    // 900 bytes inflated: allowed.
    let small = masked_frame(0xc1, &deflated(&mut z, &[b'a'; 900]));
    // 5,000 bytes inflated, in under 50 on the wire: refused.
    let bomb = masked_frame(0xc1, &deflated(&mut z, &[b'b'; 5000]));
    assert!(bomb.len() < 50, "{}", bomb.len());
    c.write_all(&small).await.expect("small");
    c.write_all(&bomb).await.expect("bomb");
    // The client's close: 1009, unmasked, from the proxy.
    let mut got = Vec::new();
    while got.len() < 4 {
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .expect("close in time")
            .expect("read");
        assert!(n > 0, "closed without a close frame");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got[0], 0x88, "{got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1009, "{got:?}");
    drop(c);
    // The backend got the small message byte for byte, then a close
    // (1001) instead of the bomb.
    let backend = tokio::time::timeout(WAIT, recorded)
        .await
        .expect("backend done")
        .expect("backend");
    assert!(backend.starts_with(&small), "{backend:?}");
    let close = &backend[small.len()..];
    assert_eq!(close[0], 0x88, "{close:?}");
    let key = &close[2..6];
    let payload: Vec<u8> = close[6..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect();
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    assert_eq!(usize::from(close[1] & 0x7f), payload.len());
}

#[tokio::test]
async fn dead_backend_is_502_and_silent_backend_is_504() {
    let redis = Redis::start().await;
    let dead = closed_port();
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s); // accept, never answer
        }
    });
    let mut slow = route("/slow", "/", &[(silent_port, 1)]);
    slow["connect_timeout_ms"] = 300.into();
    let server = proxy(&redis, file(vec![route("/dead", "/", &[(dead, 1)]), slow])).await;
    let err = open(&server, "/dead").await.expect_err("no backend");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (502, Some("backend_unavailable")),
        "{:?}",
        err.1
    );
    let err = open(&server, "/slow").await.expect_err("too slow");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (504, Some("backend_timeout")),
        "{:?}",
        err.1
    );
    let (status, body) = http_get(server.addr, "/dead").await.expect("plain GET");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not_a_websocket"));
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("route=\"/dead\",backend=\"") && metrics.contains("reason=\"refused\""),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"timeout\""), "{metrics}");
}

const JWT_SECRET: &str = "route-file-secret-route-file-secret!";

fn route_token(sub: &str, iss: &str, secret: &str, exp_offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": now + exp_offset, "iat": now, "iss": iss, "aud": "websocket-clients"}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

#[tokio::test]
async fn auth_required_routes_check_the_jwt_and_pass_the_subject() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let mut r = route("/secure", "/ws", &[(b.port, 1)]);
    r["auth_required"] = true.into();
    let mut f = file(vec![r]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    let err = open(&server, "/secure").await.expect_err("no token");
    assert_eq!(err.0, 401);
    for bad in [
        route_token(
            "mallory",
            "kairos-gateway",
            "wrong-secret-wrong-secret-wrong-secret",
            600,
        ),
        route_token("mallory", "someone-else", JWT_SECRET, 600),
        route_token("mallory", "kairos-gateway", JWT_SECRET, -120),
        signed_token(
            jsonwebtoken::Algorithm::HS256,
            serde_json::json!({"sub": "mallory", "exp": now() + 600, "iss": "kairos-gateway", "aud": "other-clients"}),
        ),
        // The right secret, another algorithm.
        signed_token(
            jsonwebtoken::Algorithm::HS512,
            serde_json::json!({"sub": "mallory", "exp": now() + 600, "iss": "kairos-gateway", "aud": "websocket-clients"}),
        ),
        // No subject to pass on.
        signed_token(
            jsonwebtoken::Algorithm::HS256,
            serde_json::json!({"exp": now() + 600, "iss": "kairos-gateway", "aud": "websocket-clients"}),
        ),
        unsigned_token(
            serde_json::json!({"sub": "mallory", "exp": now() + 600, "iss": "kairos-gateway", "aud": "websocket-clients"}),
        ),
    ] {
        let url = format!("/secure?access_token={bad}");
        let err = open(&server, &url).await.expect_err("bad token");
        assert_eq!(
            (err.0, err.1["error"].as_str()),
            (403, Some("invalid_token")),
            "{bad}"
        );
    }
    let good = route_token("alice", "kairos-gateway", JWT_SECRET, 600);
    let mut req = format!("ws://{}/secure", server.addr)
        .into_client_request()
        .expect("req");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {good}")).expect("hdr"),
    );
    let mut ws = connect_request(req).await.expect("valid token");
    assert_eq!(next_text(&mut ws).await, "hello from b0");
    let seen = b.seen.lock().expect("lock");
    assert!(
        seen.headers[0]
            .iter()
            .any(|(k, v)| k == "x-auth-subject" && v == "alice")
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn signed_token(alg: jsonwebtoken::Algorithm, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("encode")
}

/// `alg: none`, no signature.
fn unsigned_token(claims: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

async fn greeting_backend(server: &Server, path: &str) -> String {
    let mut ws = open(server, path).await.expect("proxied");
    let hello = next_text(&mut ws).await;
    let _ = ws.close(None).await;
    hello.trim_start_matches("hello from ").to_owned()
}

#[tokio::test]
async fn weights_spread_connections_and_sticky_keys_stay() {
    let redis = Redis::start().await;
    let (b0, b1, b2) = (
        echo_backend("b0").await,
        echo_backend("b1").await,
        echo_backend("b2").await,
    );
    let mut sticky = route("/sticky", "/", &[(b0.port, 1), (b1.port, 1), (b2.port, 1)]);
    sticky["sticky"] = serde_json::json!({"by": "query", "name": "user"});
    let server = proxy(
        &redis,
        file(vec![
            route("/lb", "/", &[(b0.port, 3), (b1.port, 2), (b2.port, 1)]),
            sticky,
        ]),
    )
    .await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..60 {
        *counts
            .entry(greeting_backend(&server, "/lb").await)
            .or_insert(0) += 1;
    }
    assert_eq!(
        (counts["b0"], counts["b1"], counts["b2"]),
        (30, 20, 10),
        "{counts:?}"
    );
    let mut spread = std::collections::HashSet::new();
    for user in 0..12 {
        let path = format!("/sticky?user=u{user}");
        let first = greeting_backend(&server, &path).await;
        for _ in 0..3 {
            assert_eq!(
                greeting_backend(&server, &path).await,
                first,
                "user u{user} moved"
            );
        }
        spread.insert(first);
    }
    assert!(spread.len() >= 2, "12 users all on one backend: {spread:?}");
}

#[tokio::test]
async fn a_killed_backend_is_taken_out_and_connections_go_to_the_others() {
    let redis = Redis::start().await;
    let (b0, b1) = (echo_backend("b0").await, echo_backend("b1").await);
    let mut r = route("/ha", "/", &[(b0.port, 1), (b1.port, 1)]);
    r["health_check"] = serde_json::json!({"interval_ms": 100, "timeout_ms": 100});
    r["circuit_breaker"] = serde_json::json!({"failures": 1, "cooldown_ms": 60000});
    let server = proxy(&redis, file(vec![r])).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(greeting_backend(&server, "/ha").await);
    }
    assert_eq!(seen.len(), 2);
    let b0_port = b0.port;
    drop(b0); // kill: its listener goes away
    // Every connection succeeds: the first may hit b0, fail, and be retried
    // on b1; after that the breaker and the health check keep b0 out.
    for _ in 0..10 {
        assert_eq!(greeting_backend(&server, "/ha").await, "b1");
    }
    // b0 was tried at most once (the breaker opens at the first failure,
    // and the health check takes it out too): a retry alone would have
    // sent every other connection to it first.
    let of_b0 = |metric: &str, extra: &str| {
        format!("wsproxy_upstream_{metric}{{route=\"/ha\",backend=\"{b0_port}\"{extra}}}")
    };
    let refused = server
        .metric(&of_b0("failures_total", ",reason=\"refused\""))
        .await;
    assert!(refused <= 1.0, "b0 tried {refused} times after it died");
    server
        .wait_metric(&of_b0("failures_total", ",reason=\"health_check\""), 1.0)
        .await;
    let text = server.metrics().await;
    assert!(
        text.contains(&format!("{} 0\n", of_b0("backend_healthy", ""))),
        "{text}"
    );
}

#[tokio::test]
async fn rate_limit_size_limit_and_connection_limit() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let mut limited = route("/limited", "/", &[(b.port, 1)]);
    limited["rate_limit"] = serde_json::json!({"messages_per_sec": 5, "burst": 5});
    limited["max_message_bytes"] = 100.into();
    let mut small = route("/small", "/", &[(b.port, 1)]);
    small["max_connections"] = 2.into();
    let server = proxy(&redis, file(vec![limited, small])).await;

    let mut ws = open(&server, "/limited").await.expect("proxied");
    next_text(&mut ws).await;
    send_text(&mut ws, &"x".repeat(150)).await;
    assert_eq!(close_code(&mut ws).await, 1009);
    drop(ws); // ends the tunnel (else it waits up to 5 s for the client)

    let mut ws = open(&server, "/limited").await.expect("proxied");
    next_text(&mut ws).await;
    for i in 0..20 {
        if ws.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, 1008);
    drop(ws);
    // Counted by reason once each tunnel has ended.
    let broke = |reason: &str| {
        format!(
            "wsproxy_upstream_failures_total{{route=\"/limited\",backend=\"{}\",reason=\"{reason}\"}}",
            b.port
        )
    };
    server.wait_metric(&broke("too_big"), 1.0).await;
    server.wait_metric(&broke("too_fast"), 1.0).await;
    assert_eq!(server.metric(&broke("bad_compression")).await, 0.0);

    let _a = open(&server, "/small").await.expect("1st");
    let _b = open(&server, "/small").await.expect("2nd");
    let err = open(&server, "/small")
        .await
        .expect_err("3rd is over the limit");
    assert_eq!((err.0, err.1["error"].as_str()), (503, Some("route_full")));
    drop((_a, _b));
}

#[tokio::test]
async fn sighup_reloads_routes_without_dropping_connections() {
    let redis = Redis::start().await;
    let (b0, b1) = (echo_backend("b0").await, echo_backend("b1").await);
    let path = routes_file(file(vec![route("/one", "/", &[(b0.port, 1)])]));
    let p2 = path.clone();
    let server = Server::start_with(&redis.url(), move |c| c.routes_file = Some(p2)).await;
    let mut kept = open(&server, "/one").await.expect("proxied");
    assert_eq!(next_text(&mut kept).await, "hello from b0");

    std::fs::write(
        &path,
        file(vec![route("/two", "/", &[(b1.port, 1)])]).to_string(),
    )
    .expect("write");
    sighup_self();
    let deadline = tokio::time::Instant::now() + WAIT;
    while open(&server, "/two").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new route never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open(&server, "/one").await.expect_err("old route gone").0,
        404
    );
    // The connection opened before the reload still works.
    send_text(&mut kept, "still here").await;
    assert_eq!(next_text(&mut kept).await, "still here");

    // A bad file is refused; the routes in use stay.
    std::fs::write(&path, r#"{"version":1,"routers":[{"protocol":"http"}]}"#).expect("write");
    sighup_self();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(greeting_backend(&server, "/two").await, "b1");
}

fn self_signed() -> (String, String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (c, k) = (
        dir.join(format!("{}.crt", unique("tls"))),
        dir.join(format!("{}.key", unique("tls"))),
    );
    std::fs::write(&c, cert.cert.pem()).expect("write cert");
    std::fs::write(&k, cert.signing_key.serialize_pem()).expect("write key");
    (
        c.display().to_string(),
        k.display().to_string(),
        cert.cert.pem(),
    )
}

fn acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn wss_backend_with_private_ca_and_tls_listener() {
    let redis = Redis::start().await;
    let (cert, key, _) = self_signed();
    let b = echo_backend_tls("secure", Some(acceptor(&cert, &key))).await;
    let mut f = file(vec![]);
    f["routers"] = serde_json::json!([{
        "protocol": "websocket",
        "backends": [{"host": "wss://localhost", "port": b.port}],
        "external_path": "/tls", "internal_path": "/", "methods": ["GET"]
    }]);
    let routes = routes_file(f);
    // wsproxy itself listens with TLS too, with its own certificate.
    let (gw_cert, gw_key, gw_pem) = self_signed();
    let ca = cert.clone();
    let server = {
        let mut config = wsproxy::config::Config::for_redis(redis.url());
        config.routes_file = Some(routes);
        config.upstream_ca_file = Some(ca.into());
        config.tls = Some((gw_cert.into(), gw_key.into()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(wsproxy::run(config, listener, shutdown.clone()));
        (addr, shutdown, task)
    };
    // A wss:// client that trusts wsproxy's certificate.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(gw_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("add");
    }
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let deadline = tokio::time::Instant::now() + WAIT;
    let tls = loop {
        if let Ok(tcp) = tokio::net::TcpStream::connect(server.0).await
            && let Ok(tls) = connector
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").expect("name"),
                    tcp,
                )
                .await
        {
            break tls;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "TLS listener never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let req = "wss://localhost/tls".into_client_request().expect("req");
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("wss through wss");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "hello from secure"),
        other => panic!("{other:?}"),
    }
    let seen = b.seen.lock().expect("lock");
    assert!(
        seen.headers[0]
            .iter()
            .any(|(k, v)| k == "x-forwarded-proto" && v == "https")
    );
    server.1.cancel();
}

/// On a limited route too, a ping goes through to the backend, whose pong
/// comes back: one pong per ping.
#[tokio::test]
async fn limited_routes_answer_each_ping_once() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let mut limited = route("/limited", "/", &[(b.port, 1)]);
    limited["max_message_bytes"] = 4096.into();
    let server = proxy(&redis, file(vec![limited])).await;
    let mut ws = open(&server, "/limited").await.expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b0");
    ws.send(Message::Ping("once".into())).await.expect("ping");
    send_text(&mut ws, "after the ping").await;
    let mut pongs = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => {
                assert_eq!(p.as_ref(), b"once");
                pongs += 1;
            }
            Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "after the ping"),
            Err(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pongs, 1, "each ping gets exactly one pong");
}

/// A proxy with the same backend behind a route without limits (`/echo`)
/// and one with a message size limit (`/limited`).
async fn plain_and_limited(redis: &Redis, port: u16) -> Server {
    let mut limited = route("/limited", "/", &[(port, 1)]);
    limited["max_message_bytes"] = 1000.into();
    proxy(
        redis,
        file(vec![route("/echo", "/", &[(port, 1)]), limited]),
    )
    .await
}

/// Bytes and frames are counted while a connection is open, not only when
/// it closes, on routes with and without limits.
#[tokio::test]
async fn bytes_and_frames_are_counted_live() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let server = plain_and_limited(&redis, b.port).await;
    for path in ["/echo", "/limited"] {
        let mut ws = open(&server, path).await.expect("proxied");
        next_text(&mut ws).await;
        for i in 0..3 {
            send_text(&mut ws, &format!("message {i}")).await;
            next_text(&mut ws).await;
        }
        let up = format!(
            "wsproxy_upstream_frames_total{{route=\"{path}\",backend=\"{}\",direction=\"client_to_backend\"}}",
            b.port
        );
        let down = format!(
            "wsproxy_upstream_frames_total{{route=\"{path}\",backend=\"{}\",direction=\"backend_to_client\"}}",
            b.port
        );
        let bytes = format!(
            "wsproxy_upstream_bytes_total{{route=\"{path}\",backend=\"{}\",direction=\"client_to_backend\"}}",
            b.port
        );
        let open = format!(
            "wsproxy_upstream_backend_connections_active{{route=\"{path}\",backend=\"{}\"}}",
            b.port
        );
        assert_eq!(server.metric(&open).await, 1.0, "{path}");
        // The greeting and three echoes down, three messages up.
        assert_eq!(server.metric(&up).await, 3.0, "{path}");
        assert_eq!(server.metric(&down).await, 4.0, "{path}");
        // Each "message i" is 9 bytes of payload, plus headers in the tunnel.
        assert!(server.metric(&bytes).await >= 27.0, "{path}");
        ws.close(None).await.expect("close");
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
        drop(ws);
        let deadline = tokio::time::Instant::now() + WAIT;
        while server.metric(&open).await != 0.0 {
            assert!(tokio::time::Instant::now() < deadline, "{open} stayed up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// On shutdown, connections with and without limits alike get 1001 and the
/// backend sees an orderly close, long before the grace period ends.
#[tokio::test]
async fn shutdown_closes_proxied_connections_with_1001() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let server = plain_and_limited(&redis, b.port).await;
    let mut tunnelled = open(&server, "/echo").await.expect("proxied");
    let mut limited = open(&server, "/limited").await.expect("proxied");
    for ws in [&mut tunnelled, &mut limited] {
        next_text(ws).await;
        send_text(ws, "still here").await;
        assert_eq!(next_text(ws).await, "still here");
    }
    let stopping = tokio::spawn(server.stop());
    for ws in [&mut tunnelled, &mut limited] {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 1001);
                assert_eq!(f.reason.as_str(), "server shutting down");
            }
            other => panic!("expected a 1001 close: {other:?}"),
        }
        // Drive the reply out and wait for the end of the stream.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    }
    drop((tunnelled, limited));
    // `stop` waits for every proxied connection; the grace period is 30 s.
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("connections drained before the grace period")
        .expect("stopped");
    let closes = b.seen.lock().expect("lock").closes.clone();
    assert_eq!(closes, [1001, 1001], "the backend saw each close once");
}

/// A backend that accepts TCP connections but refuses every upgrade.
async fn refusing_backend() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (port, task)
}

/// Health checks do a WebSocket handshake (on the configured path), so a
/// backend that accepts TCP but refuses upgrades is taken out before any
/// client is sent to it.
#[tokio::test]
async fn health_checks_complete_a_websocket_handshake() {
    let redis = Redis::start().await;
    let good = echo_backend("good").await;
    let (bad, _bad_task) = refusing_backend().await;
    let mut r = route("/hc", "/app", &[(good.port, 1), (bad, 1)]);
    r["health_check"] =
        serde_json::json!({"interval_ms": 100, "timeout_ms": 500, "path": "/probe"});
    let server = proxy(&redis, file(vec![r])).await;
    let failed = |port: u16, reason: &str| {
        format!(
            "wsproxy_upstream_failures_total{{route=\"/hc\",backend=\"{port}\",reason=\"{reason}\"}}"
        )
    };
    server.wait_metric(&failed(bad, "health_check"), 1.0).await;
    for _ in 0..6 {
        assert_eq!(greeting_backend(&server, "/hc").await, "good");
    }
    assert_eq!(server.metric(&failed(bad, "refused")).await, 0.0);
    assert_eq!(server.metric(&failed(good.port, "health_check")).await, 0.0);
    let healthy =
        |port: u16| format!("wsproxy_upstream_backend_healthy{{route=\"/hc\",backend=\"{port}\"}}");
    assert_eq!(server.metric(&healthy(good.port)).await, 1.0);
    let text = server.metrics().await;
    assert!(text.contains(&format!("{} 0", healthy(bad))), "{text}");
    let paths = good.seen.lock().expect("lock").paths.clone();
    assert!(paths.iter().any(|p| p == "/probe"), "{paths:?}");
    assert_eq!(
        paths.iter().filter(|p| *p == "/app").count(),
        6,
        "{paths:?}"
    );
}

/// A reload keeps what it can: a route's open-connection count (so
/// `max_connections` holds across it) and the state of backends configured
/// as before (an open breaker stays open).
#[tokio::test]
async fn reload_keeps_connection_counts_and_backend_state() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let dead_port = closed_port();
    let mut small = route("/small", "/", &[(b.port, 1)]);
    small["max_connections"] = 2.into();
    let mut ha = route("/ha", "/", &[(b.port, 1), (dead_port, 1)]);
    ha["circuit_breaker"] = serde_json::json!({"failures": 1, "cooldown_ms": 60000});
    let (server, path) = reloadable(&redis, file(vec![small.clone(), ha.clone()])).await;
    let refused = format!(
        "wsproxy_upstream_failures_total{{route=\"/ha\",backend=\"{dead_port}\",reason=\"refused\"}}"
    );
    // Until the dead backend has been tried once, and its breaker opened.
    while server.metric(&refused).await < 1.0 {
        assert_eq!(greeting_backend(&server, "/ha").await, "b0");
    }
    let _a = open(&server, "/small").await.expect("1st");
    let _b = open(&server, "/small").await.expect("2nd");

    rewrite_and_reload(
        &path,
        file(vec![small, ha, route("/new", "/", &[(b.port, 1)])]),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while open(&server, "/new").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "reload not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = open(&server, "/small").await.expect_err("still two open");
    assert_eq!((err.0, err.1["error"].as_str()), (503, Some("route_full")));
    for _ in 0..4 {
        assert_eq!(greeting_backend(&server, "/ha").await, "b0");
    }
    assert_eq!(
        server.metric(&refused).await,
        1.0,
        "the open breaker was forgotten"
    );
}

/// `balance: least_connections` sends new connections to the backend with
/// the fewest open ones, where round robin would keep alternating.
#[tokio::test]
async fn least_connections_fills_the_emptier_backend() {
    let redis = Redis::start().await;
    let (b0, b1) = (echo_backend("b0").await, echo_backend("b1").await);
    let mut r = route("/lc", "/", &[(b0.port, 1), (b1.port, 1)]);
    r["balance"] = "least_connections".into();
    let server = proxy(&redis, file(vec![r])).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut ws = open_ws(&server, "/lc").await;
        let who = next_text(&mut ws).await;
        open.push((who, ws));
    }
    let on = |open: &[(String, Ws)], b: &str| {
        open.iter()
            .filter(|(w, _)| w == &format!("hello from {b}"))
            .count()
    };
    assert_eq!((on(&open, "b0"), on(&open, "b1")), (2, 2));
    // Both of b1's connections go; the next two belong on b1.
    let (mut gone, kept): (Vec<_>, Vec<_>) =
        open.into_iter().partition(|(w, _)| w == "hello from b1");
    for (_, ws) in gone.iter_mut() {
        ws.close(None).await.expect("close");
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    }
    drop(gone);
    let metric = format!(
        "wsproxy_upstream_backend_connections_active{{route=\"/lc\",backend=\"{}\"}}",
        b1.port
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric(&metric).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b1 kept its connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fresh = Vec::new();
    for _ in 0..2 {
        let mut ws = open_ws(&server, "/lc").await;
        assert_eq!(next_text(&mut ws).await, "hello from b1");
        fresh.push(ws); // kept open, so the second sees it
    }
    drop((kept, fresh));
}

async fn open_ws(server: &Server, path: &str) -> Ws {
    open(server, path).await.expect("proxied")
}

/// A backend that completes the handshake and then never reads.
async fn backend_that_never_reads() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let Some(key) = head.lines().find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key"))
                        .map(|(_, v)| v.trim().to_owned())
                }) else {
                    return;
                };
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                if s.write_all(reply.as_bytes()).await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
    });
    port
}

/// A connection on a limited route whose backend stopped reading (so the
/// tunnel waits to write) still gets its 1001 promptly on shutdown, and
/// the server stops well before the end of the grace period.
#[tokio::test]
async fn shutdown_reaches_a_tunnel_stuck_sending_to_a_backend() {
    let redis = Redis::start().await;
    let port = backend_that_never_reads().await;
    let mut limited = route("/limited", "/", &[(port, 1)]);
    limited["max_message_bytes"] = 2_000_000.into();
    let server = proxy(&redis, file(vec![limited])).await;
    let ws = open(&server, "/limited").await.expect("proxied");
    let (mut tx, mut rx) = ws.split();
    let writer = tokio::spawn(async move {
        let big = vec![0u8; 1_000_000];
        for _ in 0..200 {
            if tx.send(Message::binary(big.clone())).await.is_err() {
                break;
            }
        }
    });
    // Until the socket buffers on the way to the backend are full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "the sends should be stuck by now");
    let stopping = tokio::spawn(server.stop());
    match tokio::time::timeout(WAIT, rx.next()).await {
        Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected a 1001 close within {WAIT:?}: {other:?}"),
    }
    writer.abort();
    drop(rx);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("drained before the 30 s grace period")
        .expect("stopped");
}

/// A backend that answers each upgrade with `answer(request line, headers)`:
/// a status and extra response headers. A 101 gets a correct accept key and
/// the connection is then held until the proxy closes it; any other status
/// is sent with an empty body. Returns the port and the request lines seen.
async fn scripted_backend(
    answer: impl Fn(&str, &str) -> (u16, String) + Send + Sync + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (answer, seen2) = (Arc::new(answer), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (answer, seen) = (answer.clone(), seen2.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let (line, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
                seen.lock().expect("lock").push(line.to_owned());
                let (status, extra) = answer(line, &headers.to_ascii_lowercase());
                if status != 101 {
                    let _ = s
                        .write_all(format!("HTTP/1.1 {status} No\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n").as_bytes())
                        .await;
                    return;
                }
                let key = headers
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let _ = s
                    .write_all(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extra}\r\n").as_bytes())
                    .await;
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (port, seen)
}

/// `..` and `.` segments, plain or encoded, would let a backend that
/// resolves them serve another route's path, past its `auth_required`.
#[tokio::test]
async fn paths_that_could_leave_their_route_are_refused() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut secure = route("/secure", "/admin", &[(b.port, 1)]);
    secure["auth_required"] = true.into();
    let mut f = file(vec![route("/public", "/pub", &[(b.port, 1)]), secure]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    for path in [
        "/public/../admin",
        "/public/%2e%2E/admin",
        "/public/..%2fadmin",
        "/public/./x",
    ] {
        let (status, body) = refused_upgrade(&server, path, "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_path")),
            "{path}: {body}"
        );
    }
    assert!(open(&server, "/public/a..b").await.is_ok());
    let paths = b.seen.lock().expect("lock").paths.clone();
    assert_eq!(paths, ["/pub/a..b"]);
}

/// A backend's 4xx answer to the upgrade reaches the client as it is and
/// says nothing against the backend: a client cannot open the breakers of
/// a route by asking for paths its backends do not serve. A 5xx counts.
/// Neither answer tells the client where the backend is.
#[tokio::test]
async fn a_backends_4xx_is_passed_on_and_does_not_open_its_breaker() {
    let redis = Redis::start().await;
    let answer = |line: &str, _: &str| {
        if line.contains("/bad") {
            (404, String::new())
        } else if line.contains("/broken") {
            (500, String::new())
        } else {
            (101, String::new())
        }
    };
    let (p0, seen0) = scripted_backend(answer).await;
    let (p1, seen1) = scripted_backend(answer).await;
    let mut r = route("/multi", "/m", &[(p0, 1), (p1, 1)]);
    r["circuit_breaker"] = serde_json::json!({"failures": 1, "cooldown_ms": 60000});
    let server = proxy(&redis, file(vec![r])).await;
    for _ in 0..3 {
        let (status, body) = refused_upgrade(&server, "/multi/bad", "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("backend_rejected")),
            "{body}"
        );
        assert!(!body.to_string().contains("127.0.0.1"), "{body}");
    }
    let tried = |s: &Arc<Mutex<Vec<String>>>| s.lock().expect("lock").len();
    assert_eq!(
        tried(&seen0) + tried(&seen1),
        3,
        "a 4xx is not retried on the other backend"
    );
    for _ in 0..4 {
        assert!(
            open(&server, "/multi").await.is_ok(),
            "breakers stayed closed"
        );
    }
    let breaker =
        |port: u16| format!("wsproxy_upstream_circuit_open{{route=\"/multi\",backend=\"{port}\"}}");
    assert_eq!(
        server.metric(&breaker(p0)).await + server.metric(&breaker(p1)).await,
        0.0
    );
    // A 5xx is the backend failing: both are tried, both breakers open.
    let (status, body) = refused_upgrade(&server, "/multi/broken", "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("backend_unavailable")),
        "{body}"
    );
    assert!(!body.to_string().contains("127.0.0.1"), "{body}");
    assert_eq!(
        server.metric(&breaker(p0)).await + server.metric(&breaker(p1)).await,
        2.0
    );
}

/// A backend that picks a subprotocol or an extension the client never
/// offered would make the client fail its handshake after our 101: it is
/// refused before, with a 502.
#[tokio::test]
async fn a_backend_answer_the_client_did_not_offer_is_refused() {
    let redis = Redis::start().await;
    let (proto, _) =
        scripted_backend(|_, _| (101, "Sec-WebSocket-Protocol: admin\r\n".into())).await;
    let (ext, _) = scripted_backend(|_, _| {
        (
            101,
            "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n".into(),
        )
    })
    .await;
    let server = proxy(
        &redis,
        file(vec![
            route("/proto", "/", &[(proto, 1)]),
            route("/ext", "/", &[(ext, 1)]),
        ]),
    )
    .await;
    let (status, body) = refused_upgrade(
        &server,
        "/proto",
        "Sec-WebSocket-Protocol: chat, superchat\r\n",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("backend_unavailable")),
        "{body}"
    );
    let (status, body) = refused_upgrade(
        &server,
        "/ext",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("backend_unavailable")),
        "{body}"
    );
    // What was offered may be agreed to.
    let mut req = format!("ws://{}/proto", server.addr)
        .into_client_request()
        .expect("req");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("user, admin"),
    );
    let ws = connect_request(req).await.expect("admin was offered");
    drop(ws);
}

/// A route wins over the session bridge for the paths it names, even when
/// they have the shape of a session path (`/{agent}/ws/{session}`), as the
/// seed's `/secure/ws` route has below it; other session paths stay the
/// bridge's.
#[tokio::test]
async fn a_route_takes_its_paths_that_look_like_session_paths() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let server = proxy(
        &redis,
        file(vec![route("/secure/ws", "/ws", &[(b.port, 1)])]),
    )
    .await;
    let mut ws = open(&server, "/secure/ws/room1?x=1")
        .await
        .expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b");
    assert_eq!(b.seen.lock().expect("lock").paths, ["/ws/room1?x=1"]);
    // Not the route's: the bridge answers (no token).
    let err = open(&server, "/agent/ws/room1").await.expect_err("bridge");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (401, Some("missing_token")),
        "{:?}",
        err.1
    );
}

/// Stickiness by header, cookie and token subject, end to end (by query
/// parameter is in `weights_spread_connections_and_sticky_keys_stay`).
#[tokio::test]
async fn sticky_keys_from_header_cookie_and_subject() {
    let redis = Redis::start().await;
    let (b0, b1, b2) = (
        echo_backend("b0").await,
        echo_backend("b1").await,
        echo_backend("b2").await,
    );
    let ports = [(b0.port, 1), (b1.port, 1), (b2.port, 1)];
    let keyed = |path: &str, sticky: serde_json::Value| {
        let mut r = route(path, "/", &ports);
        r["sticky"] = sticky;
        r
    };
    let mut by_subject = keyed("/by-subject", serde_json::json!({"by": "subject"}));
    by_subject["auth_required"] = true.into();
    let mut f = file(vec![
        keyed(
            "/by-header",
            serde_json::json!({"by": "header", "name": "x-user"}),
        ),
        keyed(
            "/by-cookie",
            serde_json::json!({"by": "cookie", "name": "sid"}),
        ),
        by_subject,
    ]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    let greeting = |path: &'static str, header: &'static str, value: String| {
        let addr = server.addr;
        async move {
            let mut req = format!("ws://{addr}{path}")
                .into_client_request()
                .expect("req");
            req.headers_mut()
                .insert(header, HeaderValue::from_str(&value).expect("hdr"));
            let mut ws = connect_request(req).await.expect("proxied");
            next_text(&mut ws).await
        }
    };
    for (path, header, value) in [
        (
            "/by-header",
            "x-user",
            (|u: usize| format!("user-{u}")) as fn(usize) -> String,
        ),
        ("/by-cookie", "cookie", |u| format!("theme=dark; sid=s{u}")),
        ("/by-subject", "authorization", |u| {
            format!(
                "Bearer {}",
                route_token(&format!("u{u}"), "kairos-gateway", JWT_SECRET, 600)
            )
        }),
    ] {
        let mut spread = std::collections::HashSet::new();
        for u in 0..10 {
            let first = greeting(path, header, value(u)).await;
            for _ in 0..2 {
                assert_eq!(
                    greeting(path, header, value(u)).await,
                    first,
                    "{path}: key {u} moved"
                );
            }
            spread.insert(first);
        }
        assert!(
            spread.len() >= 2,
            "{path}: 10 keys all on one backend: {spread:?}"
        );
    }
}

/// The circuit gauge shows the breaker as it is when scraped: back to 0
/// once the cool-down is over, with no traffic to say so. A backend a
/// reload removed leaves no gauge behind.
#[tokio::test]
async fn circuit_gauges_follow_the_cool_down_and_the_reload() {
    let redis = Redis::start().await;
    let b = echo_backend("b0").await;
    let dead_port = closed_port();
    let mut ha = route("/cb", "/", &[(b.port, 1), (dead_port, 1)]);
    ha["circuit_breaker"] = serde_json::json!({"failures": 1, "cooldown_ms": 400});
    let (server, path) = reloadable(&redis, file(vec![ha])).await;
    let gauge = format!("wsproxy_upstream_circuit_open{{route=\"/cb\",backend=\"{dead_port}\"}}");
    let refused = format!(
        "wsproxy_upstream_failures_total{{route=\"/cb\",backend=\"{dead_port}\",reason=\"refused\"}}"
    );
    while server.metric(&refused).await < 1.0 {
        assert_eq!(greeting_backend(&server, "/cb").await, "b0");
    }
    assert_eq!(server.metric(&gauge).await, 1.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = server.metrics().await;
    assert!(text.contains(&format!("{gauge} 0\n")), "{text}");

    rewrite_and_reload(&path, file(vec![route("/cb", "/", &[(b.port, 1)])]));
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metrics().await.contains(&gauge) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed backend's gauge stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = format!(
        "wsproxy_upstream_circuit_open{{route=\"/cb\",backend=\"{}\"}} 0\n",
        b.port
    );
    assert!(server.metrics().await.contains(&kept));
}

/// A WebSocket endpoint answers another method than GET with 405, `Allow:
/// GET` and a JSON body, whether a route or the session bridge has the path.
#[tokio::test]
async fn other_methods_get_405_with_allow() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let server = proxy(
        &redis,
        file(vec![route("/secure/ws", "/ws", &[(b.port, 1)])]),
    )
    .await;
    for path in ["/secure/ws/s1", "/agent/ws/s1"] {
        for method in ["POST", "DELETE", "HEAD"] {
            let mut s = tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect");
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            s.write_all(request.as_bytes()).await.expect("write");
            let mut raw = Vec::new();
            tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
                .await
                .expect("in time")
                .expect("read");
            let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
            assert!(text.starts_with("http/1.1 405"), "{method} {path}: {text}");
            assert!(
                text.contains("\r\nallow: get\r\n"),
                "{method} {path}: {text}"
            );
            if method != "HEAD" {
                assert!(
                    text.contains("method_not_allowed"),
                    "{method} {path}: {text}"
                );
            }
        }
    }
    assert!(b.seen.lock().expect("lock").paths.is_empty());
}

/// A 4xx in between does not reset a failing backend's count: its breaker
/// opens after `failures` failures however the requests are mixed.
#[tokio::test]
async fn a_4xx_does_not_keep_a_failing_breaker_shut() {
    let redis = Redis::start().await;
    let (port, _) = scripted_backend(|line: &str, _: &str| {
        if line.contains("/bad") {
            (404, String::new())
        } else {
            (500, String::new())
        }
    })
    .await;
    let mut r = route("/x", "/", &[(port, 1)]);
    r["circuit_breaker"] = serde_json::json!({"failures": 2, "cooldown_ms": 60000});
    let server = proxy(&redis, file(vec![r])).await;
    for (path, status) in [("/x/a", 502), ("/x/bad", 404), ("/x/b", 502)] {
        assert_eq!(refused_upgrade(&server, path, "").await.0, status, "{path}");
    }
    let (status, body) = refused_upgrade(&server, "/x/bad", "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("no_backend")),
        "{body}"
    );
}

/// A health check offers no subprotocol: a backend that always names its
/// own is still up (only a client's offer binds the backend's answer).
#[tokio::test]
async fn a_backend_naming_its_subprotocol_passes_its_health_check() {
    let redis = Redis::start().await;
    let (port, seen) =
        scripted_backend(|_, _| (101, "Sec-WebSocket-Protocol: v1\r\n".into())).await;
    let mut r = route("/hc", "/", &[(port, 1)]);
    r["health_check"] = serde_json::json!({"interval_ms": 100, "timeout_ms": 500});
    let server = proxy(&redis, file(vec![r])).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.lock().expect("lock").len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no health checks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = format!(
        "wsproxy_upstream_failures_total{{route=\"/hc\",backend=\"{port}\",reason=\"health_check\"}}"
    );
    assert_eq!(server.metric(&failed).await, 0.0);
    let mut req = format!("ws://{}/hc", server.addr)
        .into_client_request()
        .expect("req");
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("v1"));
    assert!(connect_request(req).await.is_ok());
}

/// A server whose routes file the test may rewrite (see
/// [`rewrite_and_reload`]); returns the server and the file's path.
async fn reloadable(redis: &Redis, routes: serde_json::Value) -> (Server, std::path::PathBuf) {
    let path = routes_file(routes);
    let p2 = path.clone();
    let server = Server::start_with(&redis.url(), move |c| c.routes_file = Some(p2)).await;
    (server, path)
}

/// Writes `routes` over the file at `path`, then sends SIGHUP.
fn rewrite_and_reload(path: &std::path::Path, routes: serde_json::Value) {
    std::fs::write(path, routes.to_string()).expect("write routes");
    sighup_self();
}

/// Sends SIGHUP to this test process: every server in it reloads.
fn sighup_self() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// A port nothing listens on (bound, then closed again).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A raw WebSocket echo backend on plain std threads (it must not need the
/// test's runtime, which the test blocks): answers the upgrade, then sends
/// back every byte it gets.
fn std_echo_backend() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_owned())
                    })
                    .expect("key");
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let _ = write!(
                    s,
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                let _ = s.write_all(&buf[end..]);
                loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 || s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A masked client text frame (short).
fn text_frame(text: &str) -> Vec<u8> {
    masked_frame(0x81, text.as_bytes())
}

/// Bytes the client sends in the same write as its upgrade request reach
/// the backend; then the tunnel keeps working while the runtime that ran
/// the handshakes (this test's thread) is blocked, which only holds if the
/// tunnel runs on a worker's event loop.
#[tokio::test]
async fn a_plain_tunnel_keeps_early_bytes_and_runs_off_the_main_runtime() {
    let redis = Redis::start().await;
    let port = std_echo_backend();
    let server = proxy(&redis, file(vec![route("/echo", "/", &[(port, 1)])])).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let early = text_frame("right behind the upgrade");
    let mut out = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
    out.extend_from_slice(&early);
    c.write_all(&out).await.expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let body = tokio::time::timeout(WAIT, async {
        loop {
            let n = c.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n")
                && got.len() >= i + 4 + early.len()
            {
                return got[i + 4..].to_vec();
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "early bytes never echoed; got {:?}",
            String::from_utf8_lossy(&got)
        )
    });
    assert!(got.starts_with(b"HTTP/1.1 101"));
    assert_eq!(body, early, "early bytes came back intact");

    // Let the main runtime finish with the handshake, then block it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    use std::io::{Read, Write};
    let mut s = c.into_std().expect("std");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let frame = text_frame("while the main runtime is blocked");
    s.write_all(&frame).expect("write");
    let mut back = vec![0u8; frame.len()];
    s.read_exact(&mut back)
        .expect("echo through the tunnel with the main runtime blocked");
    assert_eq!(back, frame);

    // Shutdown reaches the worker's tunnel: a 1001 close.
    s.set_nonblocking(true).expect("nonblocking");
    let mut c = tokio::net::TcpStream::from_std(s).expect("tokio");
    let stopping = tokio::spawn(server.stop());
    let mut close = [0u8; 4];
    tokio::time::timeout(WAIT, c.read_exact(&mut close))
        .await
        .expect("close in time")
        .expect("read close");
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1001);
    drop(c);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stopped in time")
        .expect("stopped");
}

/// Issue 11, defect 1: `/good//secret` matched the open route `/good` and
/// reached the backend as `/in/good/secret`, the authenticated route's
/// path, with no token. Empty segments are refused, and the backend never
/// sees such a request.
#[tokio::test]
async fn empty_segments_cannot_reach_an_authenticated_route() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut secret = route("/good/secret", "/in/good/secret", &[(b.port, 1)]);
    secret["auth_required"] = true.into();
    let mut private = route("/private", "/private", &[(b.port, 1)]);
    private["auth_required"] = true.into();
    let mut f = file(vec![
        route("/good", "/in/good", &[(b.port, 1)]),
        secret,
        route("/", "/", &[(b.port, 1)]),
        private,
    ]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    assert_eq!(refused_upgrade(&server, "/good/secret", "").await.0, 401);
    for path in [
        "/good//secret",
        "/good///secret/x",
        "//private/data",
        "/x//private",
    ] {
        let (status, body) = refused_upgrade(&server, path, "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_path")),
            "{path}: {body}"
        );
    }
    assert!(b.seen.lock().expect("lock").paths.is_empty());
}

/// Security review, finding 1: with `/admin` (auth_required) and `/`
/// (open) to one backend, `/%61dmin` missed `/admin` (compared byte for
/// byte) and went through `/` to a backend that decodes it to `/admin`, no
/// token asked; `/admin;x` the same to a backend that drops `;`
/// parameters. Routes now match decoded segments without their
/// parameters, and the backend gets the path in normal form.
#[tokio::test]
async fn an_encoded_path_cannot_leave_its_route_through_a_broader_one() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut admin = route("/admin", "/admin", &[(b.port, 1)]);
    admin["auth_required"] = true.into();
    let mut f = file(vec![admin, route("/", "/", &[(b.port, 1)])]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    for (path, status, code) in [
        ("/%61dmin", 401, "missing_token"),
        ("/ad%6Din/x", 401, "missing_token"),
        ("/%61%64%6d%69%6e?q=1", 401, "missing_token"),
        ("/admin;x", 400, "bad_path"),
        ("/admin;jsessionid=1/x", 400, "bad_path"),
        ("/%61dmin%3Bx", 400, "bad_path"),
        ("/;x/admin", 400, "bad_path"),
    ] {
        let Err((got, body)) = open(&server, path).await else {
            panic!("{path} was proxied without a token");
        };
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
    }
    assert!(b.seen.lock().expect("lock").paths.is_empty());
    // With a token, the backend gets the path in normal form; other paths
    // keep their parameters and escaped reserved characters as they came.
    let token = route_token("alice", "kairos-gateway", JWT_SECRET, 600);
    let mut ws = open(
        &server,
        &format!("/%61dmin/r%6Fom%3b1?access_token={token}"),
    )
    .await
    .expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b");
    let mut ws = open(&server, "/other;x/%7e%3A").await.expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b");
    assert_eq!(
        b.seen.lock().expect("lock").paths,
        ["/admin/room%3B1", "/other;x/~%3A"]
    );
}

/// Issue 11, defect 2: a catch-all route `/` -> `/` sent `GET foo/bar`.
#[tokio::test]
async fn a_catch_all_route_forwards_the_path_with_its_leading_slash() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let server = proxy(&redis, file(vec![route("/", "/", &[(b.port, 1)])])).await;
    let mut ws = open(&server, "/foo/bar?q=1").await.expect("proxied");
    assert_eq!(next_text(&mut ws).await, "hello from b");
    assert_eq!(b.seen.lock().expect("lock").paths, ["/foo/bar?q=1"]);
}

/// Issue 11, defect 13: the token an `auth_required` route consumed went
/// on to the backend in the query. It is removed (the backend gets the
/// subject header), unless the route keeps it.
#[tokio::test]
async fn a_routes_token_stays_at_the_proxy_unless_the_route_forwards_it() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut inner = route("/inner", "/in", &[(b.port, 1)]);
    inner["auth_required"] = true.into();
    let mut kept = route("/kept", "/kept", &[(b.port, 1)]);
    kept["auth_required"] = true.into();
    kept["forward_access_token"] = true.into();
    let mut f = file(vec![inner, kept, route("/open", "/open", &[(b.port, 1)])]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    let token = route_token("alice", "kairos-gateway", JWT_SECRET, 600);
    for path in [
        format!("/inner/x?a=1&access_token={token}&b=%20"),
        format!("/inner/y?access_token={token}"),
        format!("/kept?access_token={token}"),
        "/open?access_token=not-ours".to_owned(),
    ] {
        let mut ws = open(&server, &path).await.expect("proxied");
        assert_eq!(next_text(&mut ws).await, "hello from b");
    }
    let seen = b.seen.lock().expect("lock");
    assert_eq!(
        seen.paths,
        [
            "/in/x?a=1&b=%20".to_owned(),
            "/in/y".to_owned(),
            format!("/kept?access_token={token}"),
            "/open?access_token=not-ours".to_owned(),
        ]
    );
    assert!(
        seen.headers[0]
            .iter()
            .any(|(k, v)| k == "x-auth-subject" && v == "alice")
    );
}

/// Issue 22, defect 1: the `Authorization` header an `auth_required` route
/// authenticated with reached the backend unchanged. It stays at the proxy
/// unless the route forwards the token; on an open route it belongs to the
/// backend and passes as it is.
#[tokio::test]
async fn a_routes_authorization_header_stays_at_the_proxy_unless_forwarded() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut inner = route("/inner", "/in", &[(b.port, 1)]);
    inner["auth_required"] = true.into();
    let mut kept = route("/kept", "/kept", &[(b.port, 1)]);
    kept["auth_required"] = true.into();
    kept["forward_access_token"] = true.into();
    let mut f = file(vec![inner, kept, route("/open", "/open", &[(b.port, 1)])]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    let token = route_token("alice", "kairos-gateway", JWT_SECRET, 600);
    for (path, value) in [
        ("/inner/x", format!("Bearer {token}")),
        ("/kept", format!("Bearer {token}")),
        ("/open", "Basic YmFja2VuZDpzZWNyZXQ=".to_owned()),
    ] {
        let mut req = format!("ws://{}{path}", server.addr)
            .into_client_request()
            .expect("req");
        req.headers_mut()
            .insert("authorization", HeaderValue::from_str(&value).expect("hdr"));
        let mut ws = connect_request(req).await.expect("proxied");
        assert_eq!(next_text(&mut ws).await, "hello from b");
    }
    let seen = b.seen.lock().expect("lock");
    let authorization = |i: usize| {
        seen.headers[i]
            .iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        authorization(0),
        Vec::<String>::new(),
        "consumed by the proxy"
    );
    assert_eq!(authorization(1), [format!("Bearer {token}")]);
    assert_eq!(authorization(2), ["Basic YmFja2VuZDpzZWNyZXQ=".to_owned()]);
    assert!(
        seen.headers[0]
            .iter()
            .any(|(k, v)| k == "x-auth-subject" && v == "alice")
    );
}

/// Security review, finding 2: wsproxy verified the first of two tokens
/// (two `access_token` parameters, two `Authorization` headers, or one of
/// each) and a route with `forward_access_token` passed them all on, while
/// many frameworks read the last one, or the parameter: the backend could
/// act on a token nobody verified. A route that checks a token takes
/// exactly one.
#[tokio::test]
async fn a_route_that_checks_a_token_takes_exactly_one() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut inner = route("/inner", "/in", &[(b.port, 1)]);
    inner["auth_required"] = true.into();
    let mut kept = route("/kept", "/kept", &[(b.port, 1)]);
    kept["auth_required"] = true.into();
    kept["forward_access_token"] = true.into();
    let mut f = file(vec![inner, kept, route("/open", "/open", &[(b.port, 1)])]);
    f["jwt"] = serde_json::json!({"secret": JWT_SECRET, "issuer": "kairos-gateway", "audience": "websocket-clients"});
    let server = proxy(&redis, f).await;
    let good = route_token("alice", "kairos-gateway", JWT_SECRET, 600);
    let forged = route_token(
        "admin",
        "kairos-gateway",
        "not-the-secret-not-the-secret-not-the-secret",
        600,
    );
    let upgrade = |path: &str, authorization: &[&str]| {
        let mut req = format!("ws://{}{path}", server.addr)
            .into_client_request()
            .expect("req");
        for a in authorization {
            req.headers_mut().append(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {a}")).expect("hdr"),
            );
        }
        req
    };
    for (path, authorization) in [
        (
            format!("/kept?access_token={good}&access_token={forged}"),
            vec![],
        ),
        (
            format!("/kept?access_token={good}&access%5Ftoken={forged}"),
            vec![],
        ),
        ("/kept".to_owned(), vec![&good, &forged]),
        (format!("/kept?access_token={forged}"), vec![&good]),
        // A backend whose query parser splits on `;` would read this one.
        (format!("/kept?x=1;access_token={forged}"), vec![&good]),
        (
            format!("/inner?access_token={good}&access_token={good}"),
            vec![],
        ),
        ("/inner".to_owned(), vec![&good, &good]),
    ] {
        let authorization: Vec<&str> = authorization.iter().map(|s| s.as_str()).collect();
        let Err((status, body)) = connect_request(upgrade(&path, &authorization)).await else {
            panic!(
                "{path} with {} Authorization headers was proxied",
                authorization.len()
            );
        };
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("ambiguous_token")),
            "{path}: {body}"
        );
    }
    assert!(b.seen.lock().expect("lock").paths.is_empty());
    // One token is enough; an open route's query is the backend's.
    for req in [
        upgrade(&format!("/kept?access_token={good}"), &[]),
        upgrade("/kept", &[&good]),
        upgrade("/open?access_token=a&access_token=b", &[]),
    ] {
        let mut ws = connect_request(req).await.expect("proxied");
        assert_eq!(next_text(&mut ws).await, "hello from b");
    }
    assert_eq!(b.seen.lock().expect("lock").paths.len(), 3);
}

/// Issue 11, defect 6: `/metrics` named backends by address. Now by the
/// routes file's `name`, or by position; and METRICS_TOKEN closes it.
#[tokio::test]
async fn metrics_name_backends_without_their_addresses_and_can_require_a_token() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut r = route("/m", "/", &[(b.port, 1)]);
    r["backends"] = serde_json::json!([
        {"host": "ws://127.0.0.1", "port": b.port},
        {"host": "ws://127.0.0.1", "port": closed_port(), "name": "spare"},
    ]);
    let path = routes_file(file(vec![r]));
    let server = Server::start_with(&redis.url(), move |c| {
        c.routes_file = Some(path);
        c.metrics_token = Some(wsproxy::config::Secret::new("metrics-token-0123456789"));
    })
    .await;
    for _ in 0..4 {
        if let Ok(mut ws) = open(&server, "/m").await {
            let _ = next_text(&mut ws).await;
        }
    }
    let (status, body) = http_get(server.addr, "/metrics").await.expect("GET");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("metrics_token_required"), "{body}");
    let (status, text) = http_request(
        server.addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer metrics-token-0123456789\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("GET");
    assert_eq!(status, 200);
    assert!(
        text.contains("wsproxy_upstream_connects_total{route=\"/m\",backend=\"0\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("route=\"/m\",backend=\"spare\",reason=\"refused\""),
        "{text}"
    );
    assert!(
        !text.contains("127.0.0.1"),
        "an address in /metrics: {text}"
    );
}

/// Issue 11, defect 12: WebSocket upgrades from another site's page are
/// refused (403) before anything else, by default and per route.
#[tokio::test]
async fn upgrades_from_other_origins_are_refused_per_route_and_by_default() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let mut app = route("/app", "/", &[(b.port, 1)]);
    app["allowed_origins"] = serde_json::json!(["https://app.example"]);
    let mut any = route("/any", "/", &[(b.port, 1)]);
    any["allowed_origins"] = serde_json::json!(["*"]);
    let server = proxy(
        &redis,
        file(vec![app, any, route("/plain", "/", &[(b.port, 1)])]),
    )
    .await;
    let origin = |o: &str| format!("Origin: {o}\r\n");
    for (path, from, allowed) in [
        ("/plain", "https://evil.example", false),
        ("/plain", "null", false),
        ("/app", "https://evil.example", false),
        ("/app", "https://app.example", true),
        ("/any", "https://evil.example", true),
    ] {
        if allowed {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
                origin(from)
            );
            assert_eq!(
                http_status(server.addr, &request).await,
                101,
                "{path} from {from}"
            );
        } else {
            let (status, body) = refused_upgrade(&server, path, &origin(from)).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (403, Some("origin_not_allowed")),
                "{path} from {from}"
            );
        }
    }
    // The server's own origin, and clients that send none, pass.
    let own = origin(&format!("http://{}", server.addr));
    let request = format!(
        "GET /plain HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{own}\r\n",
        server.addr
    );
    assert_eq!(http_status(server.addr, &request).await, 101);
    assert!(open(&server, "/plain").await.is_ok());
}

/// Issue 11, defect 11, on a proxied route: a key that is not 16 bytes of
/// base64 is refused (400) before a backend is dialled.
#[tokio::test]
async fn invalid_websocket_keys_are_refused_on_routes() {
    let redis = Redis::start().await;
    let b = echo_backend("b").await;
    let server = proxy(&redis, file(vec![route("/k", "/", &[(b.port, 1)])])).await;
    for key in ["!!", "", "AAAAAAAAAAA=", "not base64 at all!!!!!!!"] {
        let request = format!(
            "GET /k HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        let (status, body) = http_request(server.addr, &request).await.expect("answer");
        assert_eq!(status, 400, "{key:?}: {body}");
    }
    assert!(b.seen.lock().expect("lock").paths.is_empty());
}
