//! Session bridge, end to end: real redis-server, real sockets, wsproxy
//! in-process on 127.0.0.1:0.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[tokio::test]
async fn bad_ids_get_400_before_redis_is_touched() {
    // Redis is deliberately absent: a 400 proves the check needs no Redis.
    let redis = Redis::start().await;
    let url = redis.url();
    let server = Server::start(&url).await;
    drop(redis);
    for (agent, session) in [
        ("agent", "a%3Ab"),    // ':'
        ("agent", "a%2A"),     // '*'
        ("agent", "a%3F"),     // '?'
        ("agent", "a%5Bb%5D"), // '[' ']'
        ("agent", "a%20b"),    // space
        ("ag%3Aent", "s"),
    ] {
        let err = server
            .try_connect(agent, session, Some("t"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{agent}/{session} must be refused"));
        assert_eq!(err.0, 400, "{agent}/{session}: {:?}", err.1);
        assert_eq!(err.1["error"], "invalid_id");
    }
    let long = "x".repeat(129);
    let err = server
        .try_connect("a", &long, Some("t"))
        .await
        .expect_err("refused");
    assert_eq!(err.0, 400);
}

#[tokio::test]
async fn missing_or_malformed_token_is_401_wrong_or_expired_is_403() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "right", 60).await;

    let err = server
        .try_connect("a", &session, None)
        .await
        .expect_err("refused");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (401, Some("missing_token"))
    );

    for header in ["Basic abc", "Bearer", "Bearer   ", "right"] {
        let mut req = server
            .url("a", &session)
            .into_client_request()
            .expect("req");
        req.headers_mut()
            .insert("authorization", HeaderValue::from_static(header));
        let err = connect_request(req).await.expect_err("refused");
        assert_eq!(err.0, 401, "{header:?}");
    }

    let err = server
        .try_connect("a", &session, Some("wrong"))
        .await
        .expect_err("refused");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (403, Some("invalid_token"))
    );
    // A wrong token must not extend the key's life.
    assert!(redis.ttl(&format!("session:{session}:auth")).await <= 60);

    let absent = unique("absent");
    let err = server
        .try_connect("a", &absent, Some("x"))
        .await
        .expect_err("refused");
    assert_eq!(err.0, 403);

    let expiring = unique("exp");
    redis.set_token(&expiring, "tok", 1).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let err = server
        .try_connect("a", &expiring, Some("tok"))
        .await
        .expect_err("refused");
    assert_eq!(err.0, 403);

    assert_eq!(
        server
            .metric("wsproxy_auth_failures_total{reason=\"missing_token\"}")
            .await,
        5.0
    );
    assert_eq!(
        server
            .metric("wsproxy_auth_failures_total{reason=\"invalid_token\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn token_in_query_parameter_works_for_browsers() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "q-token", 60).await;
    let url = format!("{}?access_token=q-token", server.url("a", &session));
    let req = url.into_client_request().expect("req");
    assert!(connect_request(req).await.is_ok());
    let url = format!("{}?access_token=nope", server.url("a", &session));
    let err = connect_request(url.into_client_request().expect("req"))
        .await
        .expect_err("refused");
    assert_eq!(err.0, 403);
}

#[tokio::test]
async fn successful_connect_resets_ttl_to_grace_and_allows_reconnect() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.auth_grace_period = Duration::from_secs(500);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, "tok", 5).await;
    let mut ws = server.connect(&session, "tok").await;
    let ttl = redis.ttl(&format!("session:{session}:auth")).await;
    assert!((490..=500).contains(&ttl), "ttl {ttl}");
    ws.close(None).await.expect("close");
    // Same token again, within the grace period.
    let _ws = server.connect(&session, "tok").await;
}

#[tokio::test]
async fn down_messages_arrive_in_publish_order() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;
    // Published right after the 101: the subscription is already confirmed.
    let mut c = redis.conn().await;
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.cmd("PUBLISH")
            .arg(format!("session:{session}:down"))
            .arg(format!("{{\"n\":{i}}}"))
            .ignore();
    }
    let _: () = pipe.query_async(&mut c).await.expect("pipeline");
    for i in 0..500 {
        assert_eq!(next_text(&mut ws).await, format!("{{\"n\":{i}}}"));
    }
    server
        .wait_metric("wsproxy_messages_down_total", 500.0)
        .await;
}

#[tokio::test]
async fn up_messages_are_published_in_order_byte_for_byte() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let mut ws = server.connect(&session, "tok").await;
    let sent: Vec<String> = (0..300)
        .map(|i| format!("{{ \"type\": \"ping\",  \"counter\": {i}, \"s\": \"é\" }}"))
        .collect();
    for m in &sent {
        send_text(&mut ws, m).await;
    }
    send_text(&mut ws, "[1, 2]").await;
    send_text(&mut ws, "\"just a string\"").await;
    let mut stream = sub.on_message();
    for m in &sent {
        assert_eq!(&next_published(&mut stream).await, m);
    }
    assert_eq!(next_published(&mut stream).await, "[1, 2]");
    assert_eq!(next_published(&mut stream).await, "\"just a string\"");
}

#[tokio::test]
async fn invalid_json_gets_an_error_and_publishes_nothing() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let mut ws = server.connect(&session, "tok").await;

    send_text(&mut ws, "{not json").await;
    let err: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"], "invalid_json");
    assert!(
        err["message"].as_str().expect("message").contains("line 1"),
        "{err}"
    );

    ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send binary");
    let err: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
    assert_eq!(err["error"], "binary_not_supported");

    // Still open, and the first thing published is the valid message.
    send_text(&mut ws, "{\"ok\":true}").await;
    let mut stream = sub.on_message();
    assert_eq!(next_published(&mut stream).await, "{\"ok\":true}");
    assert_eq!(
        server
            .metric("wsproxy_invalid_messages_total{reason=\"invalid_json\"}")
            .await,
        1.0
    );
    assert_eq!(
        server
            .metric("wsproxy_invalid_messages_total{reason=\"binary\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn two_connections_of_a_session_both_receive_and_other_sessions_none() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let (s1, s2) = (unique("s"), unique("s"));
    redis.set_token(&s1, "t1", 60).await;
    redis.set_token(&s2, "t2", 60).await;
    let mut a = server.connect(&s1, "t1").await;
    let mut b = server.connect(&s1, "t1").await;
    let mut other = server.connect(&s2, "t2").await;
    // One Redis subscription serves both connections of s1 (the third
    // channel is the process's wsproxy:control).
    server.wait_metric("wsproxy_broker_channels", 3.0).await;
    assert_eq!(server.metric("wsproxy_broker_channels").await, 3.0);
    for i in 0..50 {
        assert_eq!(
            redis
                .publish(&format!("session:{s1}:down"), &format!("{i}"))
                .await,
            1
        );
    }
    for i in 0..50 {
        assert_eq!(next_text(&mut a).await, i.to_string());
        assert_eq!(next_text(&mut b).await, i.to_string());
    }
    assert_silent(&mut other, Duration::from_millis(300)).await;
    // Closing one keeps the channel for the other; closing both drops it.
    a.close(None).await.expect("close");
    redis.publish(&format!("session:{s1}:down"), "after").await;
    assert_eq!(next_text(&mut b).await, "after");
    b.close(None).await.expect("close");
    drop((a, b));
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric("wsproxy_broker_channels").await != 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "channel not released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn client_pings_are_answered() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;
    ws.send(Message::Ping("hi".into())).await.expect("ping");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(p.as_ref(), b"hi"),
        other => panic!("expected pong, got {other:?}"),
    }
}

#[tokio::test]
async fn client_that_never_answers_pings_is_closed_1011() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.ping_interval = Duration::from_secs(1);
        c.ping_timeout = Duration::from_secs(1);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    // A raw socket that completes the handshake and then never reads, so
    // nothing answers the server's pings.
    let mut raw = raw_handshake(&server, &session, "tok").await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let frames = read_frames_until_eof(&mut raw).await;
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "server pinged: {frames:?}"
    );
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 1011);
    assert_eq!(
        server
            .metric("wsproxy_disconnects_total{reason=\"heartbeat_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn oversized_message_closes_1009() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| c.max_message_bytes = 1024).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;
    let big = format!("\"{}\"", "x".repeat(2000));
    send_text(&mut ws, &big).await;
    assert_eq!(close_code(&mut ws).await, 1009);
}

#[tokio::test]
async fn client_that_never_reads_is_cut_off_without_slowing_others() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| c.outbound_queue = 8).await;
    let (slow, fast) = (unique("slow"), unique("fast"));
    redis.set_token(&slow, "tok", 60).await;
    redis.set_token(&fast, "tok", 60).await;
    let _raw = raw_handshake(&server, &slow, "tok").await; // never read
    let mut ws = server.connect(&fast, "tok").await;
    // Enough data to fill the slow client's socket buffers and its queue.
    let chunk = format!("\"{}\"", "y".repeat(64 * 1024));
    let mut c = redis.conn().await;
    for i in 0..200 {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("session:{slow}:down"))
            .arg(&chunk)
            .query_async(&mut c)
            .await
            .expect("publish");
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("session:{fast}:down"))
            .arg(i.to_string())
            .query_async(&mut c)
            .await
            .expect("publish");
    }
    for i in 0..200 {
        assert_eq!(next_text(&mut ws).await, i.to_string());
    }
    server
        .wait_metric("wsproxy_disconnects_total{reason=\"slow_consumer\"}", 1.0)
        .await;
    // The fast one is still served.
    redis
        .publish(&format!("session:{fast}:down"), "still here")
        .await;
    assert_eq!(next_text(&mut ws).await, "still here");
}

#[tokio::test]
async fn shutdown_flushes_and_closes_with_1001() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;
    for i in 0..20 {
        redis
            .publish(&format!("session:{session}:down"), &i.to_string())
            .await;
    }
    // Let the broker hand them over, then shut down while the client has
    // not read anything yet.
    server
        .wait_metric("wsproxy_messages_down_total", 20.0)
        .await;
    let addr = server.addr;
    let stopped = tokio::spawn(server.stop());
    for i in 0..20 {
        assert_eq!(next_text(&mut ws).await, i.to_string());
    }
    assert_eq!(close_code(&mut ws).await, 1001);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("run returned promptly")
        .expect("no panic");
    // The listener is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn redis_restart_keeps_clients_connected_and_recovers() {
    let mut redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;

    redis.kill();
    // /ready goes 503 while Redis is away.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = http_get(server.addr, "/ready").await.expect("GET /ready");
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never went 503"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client is still connected; its message is refused out loud.
    send_text(&mut ws, "{\"lost\":false}").await;
    let err: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
    assert_eq!(err["error"], "publish_failed");

    redis.restart().await;
    server.wait_ready().await;
    assert!(server.metric("wsproxy_redis_reconnects_total").await >= 1.0);
    // Down: the channel was resubscribed.
    assert_eq!(
        redis
            .publish(&format!("session:{session}:down"), "back")
            .await,
        1
    );
    assert_eq!(next_text(&mut ws).await, "back");
    // Up: publishing works again (the command connection reconnects on use).
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let mut stream = sub.on_message();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        send_text(&mut ws, "{\"again\":1}").await;
        let got = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
        if let Ok(Some(msg)) = got {
            assert_eq!(msg.get_payload::<String>().expect("utf8"), "{\"again\":1}");
            break;
        }
        // The first attempt after the restart may still fail; it says so.
        let reply = next_text(&mut ws).await;
        assert!(reply.contains("publish_failed"), "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never recovered"
        );
    }
}

/// How often Redis answered `NOSCRIPT` since it started (`INFO errorstats`).
async fn noscript_errors(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(&mut redis.conn().await)
        .await
        .expect("INFO errorstats");
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_NOSCRIPT:count="))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Whether `wsproxy:events` holds a disconnect event of `session`.
async fn disconnect_recorded(redis: &Redis, session: &str) -> bool {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("wsproxy:events")
        .arg("-")
        .arg("+")
        .query_async(&mut redis.conn().await)
        .await
        .expect("XRANGE wsproxy:events");
    entries
        .iter()
        .flat_map(|(_, fields)| fields)
        .any(|(_, event)| event.contains("\"type\":\"disconnect\"") && event.contains(session))
}

/// The token check's script (and, with lifecycle tracking on, its
/// scripts) are in Redis's script cache before the first client comes, and
/// again after a Redis restart without persistence: no connect gets
/// `NOSCRIPT` and a second round trip. Production defaults otherwise
/// (30 s heartbeat, the shipped timeouts).
#[tokio::test]
async fn first_connects_find_their_scripts_loaded_even_after_a_restart() {
    let mut redis = Redis::start().await;
    let plain = Server::start(&redis.url()).await;
    let tracked = Server::start_with(&redis.url(), |c| {
        c.lifecycle.events = true;
        c.lifecycle.presence = true;
    })
    .await;
    for round in 0..2 {
        plain.wait_ready().await;
        tracked.wait_ready().await;
        // A tracked process's first heartbeat may race the loading at its
        // start; connects are what is counted here.
        let before = noscript_errors(&redis).await;
        for (name, server) in [("plain", &plain), ("tracked", &tracked)] {
            let session = unique("script");
            redis.set_token(&session, "tok", 60).await;
            let ws = server.connect(&session, "tok").await;
            drop(ws);
            if name == "tracked" {
                // The disconnect's script runs after the close, in the
                // background: wait for its event.
                let deadline = tokio::time::Instant::now() + WAIT;
                while !disconnect_recorded(&redis, &session).await {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no disconnect event"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            assert_eq!(
                noscript_errors(&redis).await,
                before,
                "round {round}: a connect to the {name} server found its script missing"
            );
        }
        if round == 0 {
            let before = [
                plain.metric("wsproxy_redis_reconnects_total").await,
                tracked.metric("wsproxy_redis_reconnects_total").await,
            ];
            redis.restart().await;
            for (server, before) in [&plain, &tracked].into_iter().zip(before) {
                let deadline = tokio::time::Instant::now() + WAIT;
                while server.metric("wsproxy_redis_reconnects_total").await <= before {
                    assert!(tokio::time::Instant::now() < deadline, "no reconnection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

#[tokio::test]
async fn idle_pubsub_connection_survives_its_keepalive() {
    // The broker pings Redis after 5 s without subscription changes; the
    // reply in subscribed mode is not a plain PONG and must not be taken
    // for a dead connection (a reconnect would lose messages).
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;
    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert_eq!(
        redis
            .publish(&format!("session:{session}:down"), "still")
            .await,
        1
    );
    assert_eq!(next_text(&mut ws).await, "still");
    assert_eq!(server.metric("wsproxy_redis_reconnects_total").await, 0.0);
}

#[tokio::test]
async fn two_instances_on_one_redis_both_deliver_a_session() {
    let redis = Redis::start().await;
    let one = Server::start(&redis.url()).await;
    let two = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut a = one.connect(&session, "tok").await;
    let mut b = two.connect(&session, "tok").await;
    for i in 0..100 {
        // One subscriber per process, not per connection.
        assert_eq!(
            redis
                .publish(&format!("session:{session}:down"), &i.to_string())
                .await,
            2
        );
    }
    for i in 0..100 {
        assert_eq!(next_text(&mut a).await, i.to_string());
        assert_eq!(next_text(&mut b).await, i.to_string());
    }
}

#[tokio::test]
async fn health_ready_metrics_and_unknown_paths() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    assert_eq!(
        http_get(server.addr, "/health").await.expect("health"),
        (200, "{\"status\":\"healthy\"}".to_owned())
    );
    assert_eq!(
        http_get(server.addr, "/ready").await.expect("ready"),
        (200, "{\"status\":\"ready\"}".to_owned())
    );
    let metrics = server.metrics().await;
    for name in [
        "wsproxy_connections_active",
        "wsproxy_messages_down_total",
        "wsproxy_messages_up_total",
        "wsproxy_redis_reconnects_total",
        "wsproxy_redis_connected 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let (status, body) = http_get(server.addr, "/nope").await.expect("404");
    assert_eq!(status, 404);
    assert!(body.contains("not_found"), "{body}");
    // A plain GET on the session path is not a WebSocket upgrade.
    let (status, body) = http_get(server.addr, "/a/ws/s").await.expect("not ws");
    assert!(status == 400 || status == 426, "{status}");
    assert!(body.contains("not_a_websocket"), "{body}");
}

// --- raw-socket helpers for clients that misbehave on purpose ---

/// Completes a WebSocket handshake by hand and returns the raw socket.
async fn raw_handshake(server: &Server, session: &str, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let req = format!(
        "GET /agent/ws/{session} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // Read the response head byte by byte so no frame data is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("read head");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads server frames (unmasked) until EOF: (opcode, payload).
async fn read_frames_until_eof(s: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await;
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 2 <= raw.len() {
        let op = raw[i] & 0x0f;
        let mut len = (raw[i + 1] & 0x7f) as usize;
        i += 2;
        if len == 126 {
            len = u16::from_be_bytes([raw[i], raw[i + 1]]) as usize;
            i += 2;
        } else if len == 127 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i..i + 8]);
            len = u64::from_be_bytes(b) as usize;
            i += 8;
        }
        if i + len > raw.len() {
            break;
        }
        frames.push((op, raw[i..i + len].to_vec()));
        i += len;
    }
    frames
}

// --- issue 11: hardening ---

/// A masked client frame: `first` is FIN/RSV/opcode, `payload` any bytes.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut f = vec![first];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The code of the first close frame among server frames, if any.
fn close_code_in(frames: &[(u8, Vec<u8>)]) -> Option<u16> {
    frames
        .iter()
        .find(|(op, _)| *op == 8)
        .and_then(|(_, p)| p.get(..2))
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Defect 9: a client that breaks the protocol gets a close frame saying
/// so (1002, or 1007 for text that is not UTF-8) before the connection
/// ends, not a bare TCP close.
#[tokio::test]
async fn protocol_errors_get_a_close_frame_with_1002_or_1007() {
    use tokio::io::AsyncWriteExt;
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 600).await;
    let close = |p: &[u8]| client_frame(0x88, p);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", vec![0x81, 0x02, b'{', b'}'], 1002),
        ("reserved bits", client_frame(0xC1, b"{}"), 1002),
        ("reserved opcode", client_frame(0x83, b""), 1002),
        ("ping over 125 bytes", client_frame(0x89, &[0u8; 126]), 1002),
        ("fragmented ping", client_frame(0x09, b"x"), 1002),
        ("continuation with no start", client_frame(0x80, b"x"), 1002),
        (
            "data frame inside a fragmented message",
            [client_frame(0x01, b"[1"), client_frame(0x81, b"2]")].concat(),
            1002,
        ),
        ("invalid UTF-8", client_frame(0x81, &[0xff, 0xfe]), 1007),
        (
            "invalid UTF-8 split across fragments",
            [
                client_frame(0x01, &[b'"', 0xe2]),
                client_frame(0x80, &[0x28, b'"']),
            ]
            .concat(),
            1007,
        ),
        ("a 1-byte close payload", close(&[0x03]), 1002),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw_handshake(&server, &session, "tok").await;
        s.write_all(&bytes).await.expect("write");
        let frames = read_frames_until_eof(&mut s).await;
        assert_eq!(
            close_code_in(&frames),
            Some(want),
            "{what}: frames {frames:?}"
        );
    }
    // A close reason that is not UTF-8: a close frame with 1002 or 1007.
    let mut s = raw_handshake(&server, &session, "tok").await;
    s.write_all(&close(&[0x03, 0xe8, 0xff, 0xfe]))
        .await
        .expect("write");
    let frames = read_frames_until_eof(&mut s).await;
    assert!(
        matches!(close_code_in(&frames), Some(1002 | 1007)),
        "{frames:?}"
    );
    server
        .wait_metric("wsproxy_disconnects_total{reason=\"protocol_error\"}", 7.0)
        .await;
}

/// Defect 3: a down message larger than the client's message limit plus
/// the write buffer was dropped and took every connection of the session
/// with it (1006). The backend's messages are delivered whatever their size.
#[tokio::test]
async fn large_down_messages_reach_every_connection_of_the_session() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 600).await;
    let mut a = server.connect(&session, "tok").await;
    let mut b = server.connect(&session, "tok").await;
    let big = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
    assert_eq!(
        redis
            .publish(&format!("session:{session}:down"), &big)
            .await,
        1
    );
    for ws in [&mut a, &mut b] {
        assert_eq!(next_text(ws).await.len(), big.len());
    }
    // Both stay open.
    redis
        .publish(&format!("session:{session}:down"), "\"after\"")
        .await;
    assert_eq!(next_text(&mut a).await, "\"after\"");
    assert_eq!(next_text(&mut b).await, "\"after\"");
}

/// Defect 10: a session key that is a hash (or list, set) holds no token:
/// 403, not 503 "Redis unavailable".
#[tokio::test]
async fn a_token_key_of_another_type_is_an_invalid_token() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let mut c = redis.conn().await;
    for (session, cmd) in [("h1", "HSET"), ("l1", "RPUSH"), ("s1", "SADD")] {
        let session = unique(session);
        let mut command = redis::cmd(cmd);
        command.arg(format!("session:{session}:auth"));
        if cmd == "HSET" {
            command.arg("f");
        }
        let _: i64 = command.arg("v").query_async(&mut c).await.expect(cmd);
        let err = server
            .try_connect("a", &session, Some("v"))
            .await
            .expect_err("refused");
        assert_eq!(
            (err.0, err.1["error"].as_str()),
            (403, Some("invalid_token")),
            "{cmd}"
        );
    }
}

/// Defects 11 and 12 on the session endpoint: keys that are not 16 bytes
/// of base64 get 400, other sites' pages 403 (before the token is looked
/// at), and configured origins pass.
#[tokio::test]
async fn bad_websocket_keys_and_foreign_origins_are_refused() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.ws_origins =
            wsproxy::origin::AllowedOrigins::parse(["https://app.example"]).expect("valid");
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, "tok", 600).await;
    let upgrade = |key: &str, extra: &str| {
        format!(
            "GET /a/ws/{session} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nAuthorization: Bearer tok\r\n{extra}\r\n"
        )
    };
    for key in ["!!", "", "AAAAAAAAAAA=", "dGhlIHNhbXBsZSBub25jZQ"] {
        let (status, body) = http_request(server.addr, &upgrade(key, ""))
            .await
            .expect("answer");
        assert_eq!(status, 400, "{key:?}: {body}");
        assert!(body.contains("invalid_websocket_key"), "{body}");
    }
    let good = "dGhlIHNhbXBsZSBub25jZQ==";
    let (status, body) = http_request(
        server.addr,
        &upgrade(good, "Origin: https://evil.example\r\n"),
    )
    .await
    .expect("answer");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin_not_allowed"), "{body}");
    assert_eq!(
        http_status(
            server.addr,
            &upgrade(good, "Origin: https://app.example\r\n")
        )
        .await,
        101
    );
    assert_eq!(http_status(server.addr, &upgrade(good, "")).await, 101);
}

/// A session connection's log lines name what each field holds: the agent
/// as `agent_id`, the client's address as `remote` (not a `peer` that
/// could be either).
#[tokio::test]
async fn connection_log_lines_name_the_agent_and_the_client_address() {
    let (logs, _guard) = LogCapture::start();
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut ws = server.connect(&session, "tok").await;
    ws.close(None).await.expect("close");
    while ws.next().await.is_some() {}
    server.wait_metric("wsproxy_connections_active", 0.0).await;
    let logged = logs.text();
    let line = |needle: &str| {
        logged
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} line in:\n{logged}"))
            .to_owned()
    };
    let opened = line("connection opened");
    assert!(opened.contains("endpoint=\"session\""), "{opened}");
    assert!(
        opened.contains(&format!("session_id={session}")),
        "{opened}"
    );
    assert!(opened.contains("agent_id=agent-1"), "{opened}");
    assert!(opened.contains("remote=127.0.0.1:"), "{opened}");
    assert!(!opened.contains("peer="), "{opened}");
    let closed = line("connection closed");
    assert!(closed.contains("agent_id=agent-1"), "{closed}");
    assert!(line("wsproxy listening").contains("addr=127.0.0.1:"));
}
