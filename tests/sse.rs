//! Sessions over HTTP: the event stream (`GET /{agent}/sse/{session}`) and
//! client messages (`POST`), against a private redis-server and wsproxy
//! in-process, with a raw-socket SSE client that parses events as a
//! browser does.

mod common;

use std::time::Duration;

use common::sse::{Event, SseClient, post, request};
use common::*;

const TOKEN: &str = "sse-token";

fn auth() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

fn path(session: &str, query: &str) -> String {
    format!("/agent-1/sse/{session}{query}")
}

/// `FCALL wsproxy_publish`: the message's offset.
async fn publish_reliable(redis: &Redis, session: &str, payload: &str) -> String {
    let mut c = redis.conn().await;
    redis::cmd("FCALL")
        .arg("wsproxy_publish")
        .arg(1)
        .arg(format!("session:{session}:history"))
        .arg(payload)
        .query_async(&mut c)
        .await
        .expect("FCALL wsproxy_publish")
}

/// Waits until a metric is exactly `value`.
async fn wait_metric_eq(server: &Server, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = server.metric(name).await;
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {now}, wanted {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reliable_server(redis: &Redis) -> Server {
    Server::start_with(&redis.url(), |c| c.reliable.enabled = true).await
}

#[tokio::test]
async fn a_plain_stream_carries_each_message_byte_for_byte() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.auth_grace_period = Duration::from_secs(5);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let mut sse = SseClient::open(server.addr, &path(&session, ""), &[&auth()])
        .await
        .expect("stream");
    assert_eq!(
        sse.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(sse.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering").as_deref(), Some("no"));
    // The token's TTL is reset to the grace period, as on a WebSocket.
    let ttl = redis.ttl(&format!("session:{session}:auth")).await;
    assert!((1..=5).contains(&ttl), "ttl {ttl}");
    let messages = [
        r#"{"type":"data","payload":"one"}"#,
        "{\n  \"pretty\": [1,\n 2]\n}",
        "line one\n\nline three\n",
        " leading space",
        "",
    ];
    for m in messages {
        assert_eq!(
            redis.publish(&format!("session:{session}:down"), m).await,
            1
        );
    }
    for m in messages {
        let e = sse.next().await;
        assert_eq!((e.event.as_str(), e.data.as_str()), ("message", m));
    }
    assert_eq!(sse.retry, Some(wsproxy::session::sse::RETRY_MS));
    assert_eq!(server.metric("wsproxy_sse_connections_active").await, 1.0);
    drop(sse);
    wait_metric_eq(&server, "wsproxy_sse_connections_active", 0.0).await;
}

#[tokio::test]
async fn a_stream_is_refused_as_a_websocket_would_be() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let cases: Vec<(String, Vec<String>, u16, &str)> = vec![
        (path(&session, ""), vec![], 401, "missing_token"),
        (
            path(&session, ""),
            vec!["Authorization: Bearer nope".into()],
            403,
            "invalid_token",
        ),
        (
            path(&session, "?access_token=nope"),
            vec![],
            403,
            "invalid_token",
        ),
        ("/agent-1/sse/a:b".into(), vec![auth()], 400, "invalid_id"),
        (
            path(&session, ""),
            vec![auth(), "Origin: https://evil.example".into()],
            403,
            "origin_not_allowed",
        ),
        (
            path(&session, "?reliable=true"),
            vec![auth()],
            400,
            "reliable_sessions_off",
        ),
        // Refused before the token, as for wsproxy.v1 on a WebSocket.
        (
            path(&session, "?reliable=true"),
            vec![],
            400,
            "reliable_sessions_off",
        ),
        (
            path(&session, "?reliable=maybe"),
            vec![auth()],
            400,
            "invalid_query",
        ),
    ];
    for (p, headers, status, code) in cases {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let Err((got, body)) = SseClient::open(server.addr, &p, &headers).await else {
            panic!("{p} {headers:?} was not refused");
        };
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{p} {headers:?}: {body}"
        );
    }
    // ?access_token= for EventSource, which cannot set headers.
    let mut sse = SseClient::open(
        server.addr,
        &path(&session, &format!("?access_token={TOKEN}")),
        &[],
    )
    .await
    .expect("stream");
    redis
        .publish(&format!("session:{session}:down"), "hi")
        .await;
    assert_eq!(sse.next().await.data, "hi");
}

/// `Last-Event-ID: <epoch>:0-0` (a stream that left before anything was
/// published) after the backend published and the history alone was
/// deleted: the welcome says `expired`, never `resumed:true` with nothing.
#[tokio::test]
async fn a_resume_from_0_0_after_the_history_was_lost_is_expired() {
    let redis = Redis::start().await;
    let server = reliable_server(&redis).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let mut sse = SseClient::open(server.addr, &path(&session, "?reliable=true"), &[&auth()])
        .await
        .expect("stream");
    let welcome = sse.next().await;
    let w: serde_json::Value = serde_json::from_str(&welcome.data).expect("json");
    assert_eq!(w["offset"], "0-0", "{w}");
    let epoch = w["epoch"].as_str().expect("epoch").to_owned();
    drop(sse);
    for i in 1..=3 {
        publish_reliable(&redis, &session, &format!(r#"{{"n":{i}}}"#)).await;
    }
    redis::cmd("DEL")
        .arg(format!("session:{session}:history"))
        .query_async::<()>(&mut redis.conn().await)
        .await
        .expect("DEL");
    let header = format!("Last-Event-ID: {epoch}:0-0");
    let mut sse = SseClient::open(
        server.addr,
        &path(&session, "?reliable=true"),
        &[&auth(), &header],
    )
    .await
    .expect("stream");
    let welcome: serde_json::Value = serde_json::from_str(&sse.next().await.data).expect("json");
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("expired")),
        "{welcome}"
    );
}

#[tokio::test]
async fn a_resumable_stream_resumes_with_last_event_id_without_a_gap() {
    let redis = Redis::start().await;
    let server = reliable_server(&redis).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let mut sse = SseClient::open(server.addr, &path(&session, "?reliable=true"), &[&auth()])
        .await
        .expect("stream");
    let welcome = sse.next().await;
    assert_eq!(welcome.event, "welcome");
    let w: serde_json::Value = serde_json::from_str(&welcome.data).expect("json");
    let epoch = w["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(
        welcome.id,
        format!("{epoch}:{}", w["offset"].as_str().expect("offset"))
    );
    let mut offsets = Vec::new();
    for i in 1..=5 {
        offsets
            .push(publish_reliable(&redis, &session, &format!(r#"{{"n":{i},"t":"a\nb"}}"#)).await);
    }
    for (i, offset) in offsets.iter().enumerate() {
        let e = sse.next().await;
        assert_eq!(e.event, "message");
        assert_eq!(e.data, format!(r#"{{"n":{},"t":"a\nb"}}"#, i + 1));
        assert_eq!(e.id, format!("{epoch}:{offset}"));
    }
    let last_seen = sse.last_id.clone();
    drop(sse);
    // Published while the client is away.
    for i in 6..=8 {
        publish_reliable(&redis, &session, &format!(r#"{{"n":{i}}}"#)).await;
    }
    let header = format!("Last-Event-ID: {last_seen}");
    // A stale ?last_event_id= in the URL loses to the header, as it must
    // for a browser's reconnect.
    let stale = format!("?reliable=true&last_event_id={epoch}:{}", offsets[0]);
    let mut sse = SseClient::open(server.addr, &path(&session, &stale), &[&auth(), &header])
        .await
        .expect("resumed stream");
    let event = sse.next().await;
    // Until the replay, the client is where it was: a stream lost right
    // after this welcome resumes from the same position, not past the
    // messages it has not got yet.
    assert_eq!(event.id, last_seen);
    let welcome: serde_json::Value = serde_json::from_str(&event.data).expect("json");
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["replayed"].as_u64()),
        (Some(true), Some(3)),
        "{welcome}"
    );
    for i in 6..=8 {
        assert_eq!(sse.next().await.data, format!(r#"{{"n":{i}}}"#));
    }
    publish_reliable(&redis, &session, r#"{"n":9}"#).await;
    assert_eq!(sse.next().await.data, r#"{"n":9}"#);
    drop(sse);

    // ?last_event_id= alone starts from a stored position.
    let from = format!("?reliable=true&last_event_id={epoch}:{}", offsets[3]);
    let mut sse = SseClient::open(server.addr, &path(&session, &from), &[&auth()])
        .await
        .expect("stream from a stored position");
    let welcome: serde_json::Value = serde_json::from_str(&sse.next().await.data).expect("json");
    assert_eq!(welcome["replayed"], 5, "{welcome}");
    assert_eq!(sse.next().await.data, r#"{"n":5,"t":"a\nb"}"#);
    drop(sse);
    // An empty Last-Event-ID (no browser sends one; a proxy or polyfill
    // may) is no position: the URL's still counts, and is not dropped for
    // a fresh join whose welcome says nothing of the resume asked for.
    let mut sse = SseClient::open(
        server.addr,
        &path(&session, &from),
        &[&auth(), "Last-Event-ID: "],
    )
    .await
    .expect("stream from the URL's position");
    let welcome: serde_json::Value = serde_json::from_str(&sse.next().await.data).expect("json");
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["replayed"].as_u64()),
        (Some(true), Some(5)),
        "{welcome}"
    );

    // A position this history never gave out: an explicit failure.
    let unknown = format!("Last-Event-ID: {epoch}:99999999999999-0");
    let mut sse = SseClient::open(
        server.addr,
        &path(&session, "?reliable=true"),
        &[&auth(), &unknown],
    )
    .await
    .expect("stream");
    let welcome: serde_json::Value = serde_json::from_str(&sse.next().await.data).expect("json");
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("unknown_offset"))
    );
    // Not a position at all: refused.
    let err = SseClient::open(
        server.addr,
        &path(&session, "?reliable=true"),
        &[&auth(), "Last-Event-ID: garbage"],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (400, Some("invalid_query"))
    );
    // A header that is not ASCII: refused too, not ignored (it was, and the
    // client got a fresh stream with a gap it was not told of).
    let err = SseClient::open(
        server.addr,
        &path(&session, "?reliable=true"),
        &[&auth(), "Last-Event-ID: \u{e9}:1-0"],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (400, Some("invalid_query"))
    );
}

#[tokio::test]
async fn posts_are_client_messages_plain_and_reliable() {
    let redis = Redis::start().await;
    let server = reliable_server(&redis).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let mut up = redis.subscribe(&format!("session:{session}:up")).await;
    let mut up = up.on_message();
    let (status, body) = post(
        server.addr,
        &path(&session, ""),
        &[&auth()],
        r#"{"q":"hi"}"#,
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("published")),
        "{body}"
    );
    assert_eq!(next_published(&mut up).await, r#"{"q":"hi"}"#);
    let (status, body) = post(server.addr, &path(&session, ""), &[&auth()], "not json").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_json")),
        "{body}"
    );
    let (status, body) = post(server.addr, &path(&session, ""), &[], "{}").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token")),
        "{body}"
    );
    let (status, body) = post(
        server.addr,
        &path(&session, &format!("?access_token={TOKEN}")),
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Reliable: stored once, the ack is the answer.
    let rel = path(&session, "?reliable=true");
    let m = r#"{"type":"message","id":"m-1","data":{"q":1}}"#;
    let (status, ack) = post(server.addr, &rel, &[&auth()], m).await;
    assert_eq!(
        (status, ack["type"].as_str(), ack["id"].as_str()),
        (200, Some("ack"), Some("m-1")),
        "{ack}"
    );
    let offset = ack["offset"].as_str().expect("offset").to_owned();
    let (status, again) = post(server.addr, &rel, &[&auth()], m).await;
    assert_eq!(
        (
            status,
            again["duplicate"].as_bool(),
            again["offset"].as_str()
        ),
        (200, Some(true), Some(offset.as_str()))
    );
    let (status, conflict) = post(
        server.addr,
        &rel,
        &[&auth()],
        r#"{"type":"message","id":"m-1","data":{"q":2}}"#,
    )
    .await;
    assert_eq!(
        (status, conflict["error"].as_str()),
        (409, Some("id_conflict")),
        "{conflict}"
    );
    let (status, invalid) = post(server.addr, &rel, &[&auth()], r#"{"q":1}"#).await;
    assert_eq!(
        (status, invalid["error"].as_str()),
        (400, Some("invalid_message")),
        "{invalid}"
    );
    let entries: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("wsproxy:up:0")
        .arg("-")
        .arg("+")
        .query_async(&mut redis.conn().await)
        .await
        .expect("XRANGE");
    assert_eq!(entries.len(), 1, "stored once");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"wsproxy_session_posts_total{outcome="duplicate"} 1"#),
        "{metrics}"
    );

    // A body over WS_MAX_MESSAGE_BYTES.
    let big = format!("\"{}\"", "x".repeat((1 << 20) + 1));
    let (status, body) = post(server.addr, &path(&session, ""), &[&auth()], &big).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
}

/// A POST whose body never comes costs its client nothing without a
/// valid token, and no more than AUTH_TIMEOUT_SECS (its default, 5 s)
/// with one: the token is checked before the body is read, a declared
/// length over the limit is refused at once, and a body that stalls is
/// answered 408. Before, the body was read first and with no time limit,
/// so a client with any token string held its connection and its
/// buffer for as long as it liked.
#[tokio::test]
async fn a_post_body_is_read_after_the_token_and_only_for_auth_timeout() {
    let redis = Redis::start().await;
    let config = wsproxy::config::Config::for_redis(redis.url());
    let (limit, timeout) = (config.max_message_bytes, config.auth_timeout);
    let server = Server::start_config(config).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let head = |token: &str, length: usize| {
        format!(
            "POST {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n{{\"q\":",
            path(&session, "")
        )
    };
    let answer = |raw: &str| -> serde_json::Value {
        serde_json::from_str(raw).unwrap_or(serde_json::Value::String(raw.into()))
    };

    // A wrong token: refused without waiting for the 95 bytes still owed.
    let started = std::time::Instant::now();
    let (status, _, body) = request(server.addr, &head("wrong", 100)).await;
    assert_eq!(
        (status, answer(&body)["error"].as_str()),
        (403, Some("invalid_token")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // Over WS_MAX_MESSAGE_BYTES by its declared length: 413 at once,
    // whatever the token.
    let over = limit + 1;
    for token in ["wrong", TOKEN] {
        let (status, _, body) = request(server.addr, &head(token, over)).await;
        assert_eq!(
            (status, answer(&body)["error"].as_str()),
            (413, Some("body_too_large")),
            "{body}"
        );
    }

    // The right token and a body that stalls: 408 after AUTH_TIMEOUT_SECS.
    assert_eq!(timeout, Duration::from_secs(5), "the production default");
    let started = std::time::Instant::now();
    let (status, _, body) = request(server.addr, &head(TOKEN, 100)).await;
    let waited = started.elapsed();
    assert_eq!(
        (status, answer(&body)["error"].as_str()),
        (408, Some("body_timeout")),
        "{body}"
    );
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(4),
        "{waited:?}"
    );

    // A whole body is still taken.
    let (status, body) = post(server.addr, &path(&session, ""), &[&auth()], r#"{"q":1}"#).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("published")),
        "{body}"
    );
}

#[tokio::test]
async fn a_cross_origin_post_passes_its_preflight_when_the_origin_is_allowed() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.ws_origins =
            wsproxy::origin::AllowedOrigins::parse(["https://app.example"]).expect("origins");
    })
    .await;
    let session = unique("s");
    let preflight = |origin: &str| {
        format!(
            "OPTIONS {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n",
            path(&session, "")
        )
    };
    let (status, head, _) = request(server.addr, &preflight("https://app.example")).await;
    let head = head.to_ascii_lowercase();
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization, content-type"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-methods: get, post"),
        "{head}"
    );
    let (status, head, body) = request(server.addr, &preflight("https://evil.example")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "a refused origin is not told it may read: {head}"
    );
    // Nor is a refused POST's answer readable by that page.
    let refused_post = format!(
        "POST {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nOrigin: https://evil.example\r\nContent-Length: 2\r\n\r\n{{}}",
        path(&session, "")
    );
    let (status, head, body) = request(server.addr, &refused_post).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{head}"
    );
    redis.set_token(&session, TOKEN, 600).await;
    let (status, _) = post(
        server.addr,
        &path(&session, ""),
        &[&auth(), "Origin: https://app.example"],
        "{}",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_backend_disconnect_and_a_shutdown_end_the_stream_with_a_close_event() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let mut sse = SseClient::open(server.addr, &path(&session, ""), &[&auth()])
        .await
        .expect("stream");
    server.wait_metric("wsproxy_broker_channels", 2.0).await;
    redis
        .publish(&format!("session:{session}:down"), "before")
        .await;
    redis
        .publish(
            "wsproxy:control",
            &format!(
                r#"{{"type":"disconnect","session_id":"{session}","code":4001,"reason":"revoked"}}"#
            ),
        )
        .await;
    let events = sse.until_end().await;
    assert_eq!(
        events,
        [
            Event {
                event: "message".into(),
                data: "before".into(),
                id: String::new()
            },
            Event {
                event: "close".into(),
                data: r#"{"code":4001,"reason":"revoked"}"#.into(),
                id: String::new()
            },
        ]
    );
    // The token was revoked by the backend too: the reconnect is refused,
    // which ends a browser's EventSource.
    redis.set_token(&session, "other", 600).await;
    let err = SseClient::open(server.addr, &path(&session, ""), &[&auth()])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.0, 403);

    redis.set_token(&session, TOKEN, 600).await;
    let mut sse = SseClient::open(server.addr, &path(&session, ""), &[&auth()])
        .await
        .expect("stream");
    server.shutdown.cancel();
    let events = sse.until_end().await;
    assert_eq!(
        events.last().map(|e| (e.event.as_str(), e.data.as_str())),
        Some(("close", r#"{"code":1001,"reason":"server shutting down"}"#))
    );
}

#[tokio::test]
async fn connect_events_name_the_transport() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.lifecycle.events = true;
        c.lifecycle.presence = true;
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let sse = SseClient::open(server.addr, &path(&session, ""), &[&auth()])
        .await
        .expect("stream");
    let ws = server.connect(&session, TOKEN).await;
    let presence: Vec<String> = redis::cmd("HVALS")
        .arg(format!("session:{session}:presence"))
        .query_async(&mut redis.conn().await)
        .await
        .expect("HVALS");
    let mut transports: Vec<String> = presence
        .iter()
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(p).expect("json")["transport"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    transports.sort();
    assert_eq!(transports, ["sse", "websocket"]);
    drop((sse, ws));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg("wsproxy:events")
            .arg("-")
            .arg("+")
            .query_async(&mut redis.conn().await)
            .await
            .expect("XRANGE");
        let kinds: Vec<serde_json::Value> = events
            .iter()
            .filter_map(|(_, fields)| {
                fields
                    .iter()
                    .find(|(k, _)| k == "event")
                    .map(|(_, v)| serde_json::from_str(v).expect("json"))
            })
            .collect();
        let disconnects = kinds.iter().filter(|e| e["type"] == "disconnect").count();
        if disconnects == 2 {
            let mut connects: Vec<&str> = kinds
                .iter()
                .filter(|e| e["type"] == "connect")
                .filter_map(|e| e["transport"].as_str())
                .collect();
            connects.sort();
            assert_eq!(connects, ["sse", "websocket"], "{kinds:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{kinds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reader_that_stops_is_a_slow_consumer() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.outbound_queue = 4;
        c.ping_timeout = Duration::from_secs(1);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let sse = SseClient::open(server.addr, &path(&session, ""), &[&auth()])
        .await
        .expect("stream");
    // The client reads nothing while far more than the socket buffers
    // hold is published.
    let big = "y".repeat(64 * 1024);
    let mut c = redis.conn().await;
    for _ in 0..200 {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("session:{session}:down"))
            .arg(&big)
            .query_async(&mut c)
            .await
            .expect("PUBLISH");
    }
    wait_metric_eq(&server, "wsproxy_sse_connections_active", 0.0).await;
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"wsproxy_disconnects_total{reason="slow_consumer"} 1"#),
        "{metrics}"
    );
    // The connection itself is closed, not kept for a client that takes
    // nothing.
    let mut sse = sse;
    sse.closed_by_server().await;
}

/// With `TLS_CERT_FILE`, a client that offers `h2` by ALPN gets HTTP/2:
/// two event streams and a POST share one connection (HTTP/1.1 allows a
/// browser six per origin). A WebSocket on the same listener stays on
/// HTTP/1.1.
/// wsproxy over TLS (a self-signed certificate for `localhost`), and
/// what connects to it.
struct TlsServer {
    addr: std::net::SocketAddr,
    roots: rustls::RootCertStore,
    _stop: tokio_util::sync::DropGuard,
}

impl TlsServer {
    async fn start(redis: &Redis, tweak: impl FnOnce(&mut wsproxy::config::Config)) -> TlsServer {
        use rustls_pki_types::pem::PemObject;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let (c, k) = (
            dir.join(format!("{}.crt", unique("h2"))),
            dir.join(format!("{}.key", unique("h2"))),
        );
        std::fs::write(&c, cert.cert.pem()).expect("write cert");
        std::fs::write(&k, cert.signing_key.serialize_pem()).expect("write key");
        let mut config = wsproxy::config::Config::for_redis(redis.url());
        config.tls = Some((c, k));
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(wsproxy::run(config, listener, shutdown.clone()));
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls_pki_types::CertificateDer::pem_slice_iter(cert.cert.pem().as_bytes()) {
            roots.add(der.expect("pem")).expect("add");
        }
        TlsServer {
            addr,
            roots,
            _stop: shutdown.drop_guard(),
        }
    }

    /// A TLS connection offering the protocols `alpn`, once the listener is
    /// up.
    async fn tls(&self, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(tcp) = tokio::net::TcpStream::connect(self.addr).await
                && let Ok(tls) = connector.connect(name.clone(), tcp).await
            {
                return tls;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the TLS listener never came up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An HTTP/2 connection, once wsproxy is ready (the listener answers
    /// before Redis is connected), and its task (ends when it closes).
    async fn h2(
        &self,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        let tls = self.tls(&[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ready = hyper::Request::get("https://localhost/ready")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            if sender.send_request(ready).await.expect("ready").status() == 200 {
                return (sender, conn);
            }
            assert!(tokio::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn over_tls_event_streams_and_posts_share_one_http2_connection() {
    use http_body_util::BodyExt;
    let redis = Redis::start().await;
    let server = TlsServer::start(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let (mut sender, _conn) = server.h2().await;
    let get = |query: &str| {
        hyper::Request::get(format!("https://localhost{}", path(&session, query)))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = sender.send_request(get("")).await.expect("stream");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        // Answered once admitted (subscribed): nothing published after
        // this is missed.
        streams.push(response.into_body());
    }
    redis
        .publish(&format!("session:{session}:down"), "over h2")
        .await;
    for body in &mut streams {
        let mut seen = String::new();
        while !seen.contains("data: over h2\n\n") {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("a frame in time")
                .expect("open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
    let mut up = redis.subscribe(&format!("session:{session}:up")).await;
    let mut up = up.on_message();
    let post = hyper::Request::post(format!("https://localhost{}", path(&session, "")))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"{\"h2\":true}",
        )))
        .expect("request");
    let response = sender.send_request(post).await.expect("post");
    assert_eq!(response.status(), 200);
    assert_eq!(next_published(&mut up).await, r#"{"h2":true}"#);
    // A browser's POST carries `Origin`; over h2 the host is in
    // `:authority` (no `Host` header): the same origin is allowed (it was
    // refused 403 origin_not_allowed), another is not.
    for (origin, status) in [("https://localhost", 200), ("https://evil.example", 403)] {
        let post = hyper::Request::post(format!("https://localhost{}", path(&session, "")))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("origin", origin)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"origin\":true}",
            )))
            .expect("request");
        let response = sender.send_request(post).await.expect("post");
        assert_eq!(response.status(), status, "{origin}");
    }
    assert_eq!(next_published(&mut up).await, r#"{"origin":true}"#);

    // A WebSocket client offers http/1.1 only, and upgrades as ever.
    let tls = server.tls(&[b"http/1.1"]).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("wss://localhost/agent-1/ws/{session}"),
    )
    .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("wss");
    redis
        .publish(&format!("session:{session}:down"), "to all")
        .await;
    let frame = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws))
        .await
        .expect("a frame in time");
    match frame {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
            assert_eq!(t.as_str(), "to all")
        }
        other => panic!("{other:?}"),
    }
}

/// An HTTP/2 connection costs what its streams would as connections: its
/// first open stream rides on the connection's place in
/// `MAX_CONNECTIONS`, each further one takes a place of its own or is
/// refused `503 server_full`. A connection with no stream open for
/// `AUTH_TIMEOUT_SECS` (the default, 5 s) is closed, and so is one that
/// never sends its preface. Before, one connection held up to 256 streams
/// on one place and an idle (or silent) one was kept for ever.
#[tokio::test]
async fn an_http2_connections_streams_count_against_max_connections_and_an_idle_one_closes() {
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    let redis = Redis::start().await;
    let server = TlsServer::start(&redis, |c| c.max_connections = 4).await;
    let idle = wsproxy::config::Config::for_redis(redis.url()).auth_timeout;
    assert_eq!(idle, Duration::from_secs(5), "the production default");
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let (mut sender, conn) = server.h2().await;
    let get = || {
        hyper::Request::get(format!("https://localhost{}", path(&session, "")))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request")
    };
    // Four places: this connection's (its first stream's), the one the
    // listener holds for the next connection, and two for two more streams.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let response = sender.send_request(get()).await.expect("stream");
        assert_eq!(response.status(), 200);
        streams.push(response.into_body());
    }
    let refused = sender.send_request(get()).await.expect("answer");
    assert_eq!(refused.status(), 503);
    let body = refused
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["error"], "server_full", "{body}");

    // A stream that ends gives its place back.
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = sender.send_request(get()).await.expect("stream");
        if response.status() == 200 {
            streams.push(response.into_body());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // All streams ended: the connection is closed AUTH_TIMEOUT_SECS later.
    drop(streams);
    let quiet = tokio::time::Instant::now();
    let ended = tokio::time::timeout(idle + Duration::from_secs(5), conn).await;
    let after = quiet.elapsed();
    assert!(ended.is_ok(), "an idle connection stays open");
    assert!(
        after >= idle - Duration::from_millis(500),
        "closed after {after:?}"
    );

    // One that never sends its preface is closed too.
    let mut silent = server.tls(&[b"h2"]).await;
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read =
        tokio::time::timeout(idle + Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a connection without its preface stays open");
    assert!(
        started.elapsed() >= idle - Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}
