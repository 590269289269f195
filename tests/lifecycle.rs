//! Backends without sockets: lifecycle events, presence, crash-safe
//! disconnects and control, against a private redis-server with wsproxy
//! in-process (and, for a SIGKILL, as a child process).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use redis::AsyncCommands;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsproxy::config::Config;

const TOKEN: &str = "lifecycle-token";

#[path = "lifecycle/faults.rs"]
mod faults;

fn tracked(c: &mut Config) {
    c.lifecycle.events = true;
    c.lifecycle.presence = true;
    c.lifecycle.heartbeat = Duration::from_secs(1);
}

/// Every event in `wsproxy:events`, oldest first.
async fn events(redis: &Redis) -> Vec<serde_json::Value> {
    let mut c = redis.conn().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("wsproxy:events")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE wsproxy:events");
    entries
        .into_iter()
        .map(|(_, fields)| {
            let (name, raw) = fields.into_iter().next().expect("one field");
            assert_eq!(name, "event");
            serde_json::from_str(&raw).expect("events are JSON")
        })
        .collect()
}

/// Waits until `wsproxy:events` holds at least `n` events matching `pick`.
async fn wait_events(
    redis: &Redis,
    n: usize,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let found: Vec<_> = events(redis).await.into_iter().filter(&pick).collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{} matching events, wanted {n}: {found:?}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn presence(redis: &Redis, session: &str) -> HashMap<String, serde_json::Value> {
    let mut c = redis.conn().await;
    let raw: HashMap<String, String> = c
        .hgetall(format!("session:{session}:presence"))
        .await
        .expect("HGETALL presence");
    raw.into_iter()
        .map(|(k, v)| {
            (
                k,
                serde_json::from_str(&v).expect("presence entries are JSON"),
            )
        })
        .collect()
}

async fn wait_presence(redis: &Redis, session: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    while presence(redis, session).await.len() != n {
        assert!(
            Instant::now() < deadline,
            "presence of {session} never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects to `session` with a user agent and a query string.
async fn connect_with(server: &Server, session: &str, query: &str) -> Ws {
    let mut req = format!("{}{query}", server.url("agent-7", session))
        .into_client_request()
        .expect("request");
    let headers = req.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    headers.insert("user-agent", HeaderValue::from_static("lifecycle-test/1.0"));
    connect_request(req).await.expect("upgrade")
}

#[tokio::test]
async fn connect_and_disconnect_events_carry_the_documented_fields() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        tracked(c);
        c.lifecycle.query_params = vec!["lang".into()];
        c.lifecycle.session_channel = true;
    })
    .await;
    let session = unique("ev");
    redis.set_token(&session, TOKEN, 60).await;
    let mut channel = redis.subscribe(&format!("session:{session}:events")).await;

    let mut ws = connect_with(&server, &session, "?lang=fr&secret=x&access_token=no").await;
    let connect = wait_events(&redis, 1, |e| e["type"] == "connect").await;
    let connect = &connect[0];
    for field in [
        "session_id",
        "agent_id",
        "connection_id",
        "process",
        "time",
        "remote",
    ] {
        assert!(!connect[field].is_null(), "{field} missing: {connect}");
    }
    assert_eq!(connect["session_id"], session.as_str());
    assert_eq!(connect["agent_id"], "agent-7");
    assert_eq!(connect["reliable"], false);
    assert_eq!(connect["user_agent"], "lifecycle-test/1.0");
    assert_eq!(connect["query"], serde_json::json!({"lang": "fr"}));
    let id = connect["connection_id"].as_str().expect("string id");
    assert!(id.starts_with(connect["process"].as_str().expect("process")));

    // One message each way, then the client closes with its own code.
    send_text(&mut ws, r#"{"hello":1}"#).await;
    send_text(&mut ws, r#"{"hello":2}"#).await;
    redis
        .publish(&format!("session:{session}:down"), r#"{"x":1}"#)
        .await;
    next_text(&mut ws).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4321),
        reason: "done".into(),
    }))
    .await
    .expect("close");
    let gone = wait_events(&redis, 1, |e| e["type"] == "disconnect").await;
    let gone = &gone[0];
    assert_eq!(gone["connection_id"], id);
    assert_eq!(gone["code"], 4321);
    assert_eq!(gone["reason"], "client");
    assert_eq!(gone["messages_in"], 2);
    assert_eq!(gone["messages_out"], 1);
    assert!(gone["duration_ms"].as_u64().is_some(), "{gone}");
    assert!(gone["time"].as_u64() >= connect["time"].as_u64());
    assert_eq!(events(&redis).await.len(), 2, "exactly one event each");

    // The same two events on the session's channel, in order.
    use futures_util::StreamExt;
    let mut on_channel = channel.on_message();
    for want in ["connect", "disconnect"] {
        let msg = tokio::time::timeout(WAIT, on_channel.next())
            .await
            .expect("an event on the channel")
            .expect("message");
        let payload: String = msg.get_payload().expect("payload");
        let event: serde_json::Value = serde_json::from_str(&payload).expect("json");
        assert_eq!(event["type"], want);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_reliable_resume_is_a_resume_event_and_shutdown_is_a_disconnect() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        tracked(c);
        c.reliable.enabled = true;
    })
    .await;
    let session = unique("rs");
    redis.set_token(&session, TOKEN, 60).await;
    let mut c = redis.conn().await;
    let mut offsets = Vec::new();
    for i in 0..3 {
        let offset: String = redis::cmd("FCALL")
            .arg("wsproxy_publish")
            .arg(1)
            .arg(format!("session:{session}:history"))
            .arg(format!("{{\"n\":{i}}}"))
            .query_async(&mut c)
            .await
            .expect("FCALL wsproxy_publish");
        offsets.push(offset);
    }
    let epoch: String = c
        .hget(format!("session:{session}:epoch"), "epoch")
        .await
        .expect("epoch");
    let mut req = format!(
        "{}?epoch={epoch}&offset={}",
        server.url("agent-7", &session),
        offsets[0]
    )
    .into_client_request()
    .expect("request");
    let headers = req.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("h"),
    );
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wsproxy.v1"),
    );
    let _ws = connect_request(req).await.expect("upgrade");
    let resume = wait_events(&redis, 1, |e| e["type"] == "resume").await;
    assert_eq!(resume[0]["reliable"], true);
    assert_eq!(resume[0]["resumed"], true);
    assert_eq!(resume[0]["replayed"], 2);
    assert!(resume[0]["query"].as_object().is_some_and(|q| q.is_empty()));
    // A resume that cannot be honoured says why.
    let mut req = format!("{}?epoch=1&offset=1-0", server.url("agent-7", &session))
        .into_client_request()
        .expect("request");
    let headers = req.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("h"),
    );
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wsproxy.v1"),
    );
    let _failed = connect_request(req).await.expect("upgrade");
    let failed = wait_events(&redis, 2, |e| e["type"] == "resume").await;
    assert_eq!(
        (failed[1]["resumed"].as_bool(), failed[1]["reason"].as_str()),
        (Some(false), Some("epoch_changed")),
        "{}",
        failed[1]
    );

    server.stop().await;
    let id = resume[0]["connection_id"].clone();
    let gone = wait_events(&redis, 1, |e| {
        e["type"] == "disconnect" && e["connection_id"] == id
    })
    .await;
    assert_eq!(gone[0]["reason"], "shutdown");
    assert_eq!(gone[0]["code"], 1001);
    assert_eq!(gone[0]["messages_out"], 3, "the welcome and two replayed");
}

#[tokio::test]
async fn presence_counts_connections_across_processes_and_forgets_closed_ones() {
    let redis = Redis::start().await;
    let a = Server::start_with(&redis.url(), tracked).await;
    let b = Server::start_with(&redis.url(), tracked).await;
    let session = unique("pr");
    redis.set_token(&session, TOKEN, 60).await;
    let mut on_a = a.connect(&session, TOKEN).await;
    let _on_a2 = a.connect(&session, TOKEN).await;
    let _on_b = b.connect(&session, TOKEN).await;
    wait_presence(&redis, &session, 3).await;
    let entries = presence(&redis, &session).await;
    let processes: std::collections::HashSet<_> =
        entries.values().map(|e| e["process"].clone()).collect();
    assert_eq!(processes.len(), 2, "two processes: {entries:?}");
    for (field, entry) in &entries {
        assert_eq!(entry["connection_id"], field.as_str());
        assert_eq!(entry["agent_id"], "agent-1");
        assert!(entry["since"].as_u64().is_some());
    }
    on_a.close(None).await.expect("close");
    wait_presence(&redis, &session, 2).await;
    a.stop().await;
    wait_presence(&redis, &session, 1).await;
    b.stop().await;
    wait_presence(&redis, &session, 0).await;
}

#[tokio::test]
async fn a_backend_disconnect_closes_the_session_everywhere_with_its_code() {
    let redis = Redis::start().await;
    let a = Server::start_with(&redis.url(), |c| c.reliable.enabled = true).await;
    let b = Server::start_with(&redis.url(), |c| c.reliable.enabled = true).await;
    let (session, other) = (unique("ctl"), unique("keep"));
    redis.set_token(&session, TOKEN, 60).await;
    redis.set_token(&other, TOKEN, 60).await;
    let mut closed = vec![
        a.connect(&session, TOKEN).await,
        a.connect(&session, TOKEN).await,
        b.connect(&session, TOKEN).await,
    ];
    let mut reliable_req = a.url("agent-1", &session).into_client_request().expect("r");
    reliable_req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("h"),
    );
    reliable_req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wsproxy.v1"),
    );
    let mut reliable = connect_request(reliable_req).await.expect("reliable");
    next_text(&mut reliable).await; // the welcome
    closed.push(reliable);
    let mut kept = b.connect(&other, TOKEN).await;
    // The control subscription is made at start-up; wait for it.
    for s in [&a, &b] {
        s.wait_metric("wsproxy_broker_channels", 3.0).await;
    }

    // Malformed commands first: nothing changes.
    let malformed = [
        "not json",
        r#"{"type":"disconnect"}"#,
        r#"{"type":"disconnect","session_id":"a:b"}"#,
        r#"{"type":"shutdown","session_id":"x"}"#,
        r#"{"type":"disconnect","session_id":"x","code":1006}"#,
    ];
    for m in malformed {
        redis.publish("wsproxy:control", m).await;
    }
    for s in [&a, &b] {
        s.wait_metric(
            "wsproxy_control_messages_total{reason=\"malformed\"}",
            malformed.len() as f64,
        )
        .await;
    }
    for ws in closed.iter_mut() {
        assert_silent(ws, Duration::from_millis(100)).await;
    }

    // A message, then the disconnect: the message arrives first.
    redis
        .publish(&format!("session:{session}:down"), r#"{"last":true}"#)
        .await;
    // The documented command refuses what is not a JSON object, and any
    // other key, at once.
    let mut c = redis.conn().await;
    for (key, command) in [
        ("wsproxy:control:log", "not json"),
        ("wsproxy:control:log", "[1]"),
        (
            "wsproxy:control",
            r#"{"type":"disconnect","session_id":"x"}"#,
        ),
    ] {
        let refused: redis::RedisResult<String> = redis::cmd("FCALL")
            .arg("wsproxy_control")
            .arg(1)
            .arg(key)
            .arg(command)
            .query_async(&mut c)
            .await;
        assert!(refused.is_err(), "{key} {command}: {refused:?}");
    }
    let started = Instant::now();
    let _: String = redis::cmd("FCALL")
        .arg("wsproxy_control")
        .arg(1)
        .arg("wsproxy:control:log")
        .arg(format!(
            r#"{{"type":"disconnect","session_id":"{session}","code":4001,"reason":"revoked"}}"#
        ))
        .query_async(&mut c)
        .await
        .expect("FCALL wsproxy_control");
    for (i, ws) in closed.iter_mut().enumerate() {
        if i < 3 {
            assert_eq!(next_text(ws).await, r#"{"last":true}"#);
        }
        let (code, reason) = close_frame(ws).await;
        assert_eq!((code, reason.as_str()), (4001, "revoked"), "connection {i}");
    }
    println!(
        "4 connections on 2 processes closed in {:?}",
        started.elapsed()
    );
    // Counted once each close handshake is over.
    drop(closed);
    let by_backend = "wsproxy_disconnects_total{reason=\"backend\"}";
    a.wait_metric(by_backend, 3.0).await;
    b.wait_metric(by_backend, 1.0).await;
    assert_eq!(a.metric(by_backend).await + b.metric(by_backend).await, 4.0);
    // The other session is untouched.
    redis
        .publish(&format!("session:{other}:down"), r#"{"still":"here"}"#)
        .await;
    assert_eq!(next_text(&mut kept).await, r#"{"still":"here"}"#);
    a.stop().await;
    b.stop().await;
}

/// The close code and reason the server sent.
async fn close_frame(ws: &mut Ws) -> (u16, String) {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (f.code.into(), f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket error before the close frame: {e}"),
        }
    }
}

#[tokio::test]
async fn a_process_whose_heartbeat_lapsed_has_its_clients_register_again() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), tracked).await;
    let session = unique("lapse");
    redis.set_token(&session, TOKEN, 60).await;
    let mut ws = server.connect(&session, TOKEN).await;
    wait_presence(&redis, &session, 1).await;
    // What a Redis restart without persistence, or a reaper, leaves.
    let mut c = redis.conn().await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .expect("FLUSHALL");
    let (code, _) = close_frame(&mut ws).await;
    assert_eq!(code, 1013);
    server
        .wait_metric("wsproxy_lifecycle_lapses_total", 1.0)
        .await;
    server.stop().await;
}

/// A wsproxy child process; SIGKILLed on drop.
struct Child {
    process: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

async fn spawn_wsproxy(redis: &Redis) -> Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let process = std::process::Command::new(env!("CARGO_BIN_EXE_wsproxy"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("REDIS_URL", redis.url())
        .env("LIFECYCLE_EVENTS", "true")
        .env("PRESENCE", "true")
        .env("PROCESS_HEARTBEAT_SECS", "1")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start wsproxy");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + WAIT;
    while !matches!(http_get(addr, "/ready").await, Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the child wsproxy never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Child { process, addr }
}

#[tokio::test]
async fn a_sigkilled_process_gets_exactly_one_disconnect_per_connection_from_a_survivor() {
    const N: usize = 100;
    let redis = Redis::start().await;
    let survivor = Server::start_with(&redis.url(), tracked).await;
    let mut doomed = spawn_wsproxy(&redis).await;
    let session = unique("kill");
    redis.set_token(&session, TOKEN, 60).await;
    let url = format!("ws://{}/agent-1/ws/{session}", doomed.addr);
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut req = url.as_str().into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("h"),
        );
        clients.push(connect_request(req).await.expect("upgrade"));
    }
    let _on_survivor = survivor.connect(&session, TOKEN).await;
    wait_presence(&redis, &session, N + 1).await;
    let connects = wait_events(&redis, N + 1, |e| e["type"] == "connect").await;
    let mut process = None;
    for e in &connects {
        if e["process"] != connects[N]["process"] {
            process = Some(e["process"].clone());
        }
    }
    let process = process.expect("the killed process's id");

    doomed.process.kill().expect("SIGKILL");
    doomed.process.wait().expect("reaped");
    let killed = Instant::now();
    let lost = wait_events(&redis, N, |e| {
        e["type"] == "disconnect" && e["process"] == process
    })
    .await;
    let took = killed.elapsed();
    wait_presence(&redis, &session, 1).await;
    // A few more beats: nothing is reaped twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lost_after: Vec<_> = events(&redis)
        .await
        .into_iter()
        .filter(|e| e["type"] == "disconnect")
        .collect();
    assert_eq!(lost_after.len(), N, "exactly one disconnect per connection");
    let ids: std::collections::HashSet<_> = lost_after
        .iter()
        .map(|e| e["connection_id"].clone())
        .collect();
    assert_eq!(ids.len(), N);
    for e in &lost {
        assert_eq!(e["reason"], "process_lost");
        assert_eq!(e["code"], 1006);
        assert!(e["messages_in"].is_null());
        assert_eq!(e["session_id"], session.as_str());
    }
    assert_eq!(
        survivor.metric("wsproxy_reaped_connections_total").await,
        N as f64
    );
    println!("{N} disconnect events {took:?} after the SIGKILL (heartbeat 1 s)");
    // The dead process is forgotten.
    let mut c = redis.conn().await;
    let left: Vec<String> = c.zrange("wsproxy:processes", 0, -1).await.expect("ZRANGE");
    assert_eq!(left.len(), 1, "{left:?}");
    drop(clients);
    survivor.stop().await;
}

#[tokio::test]
async fn a_dead_process_with_twenty_thousand_connections_is_reaped_completely() {
    const N: usize = 20_000;
    let redis = Redis::start().await;
    // What a process leaves behind when it dies holding N connections:
    // its registrations, presence entries and an old heartbeat score.
    let mut c = redis.conn().await;
    let dead = "deadbeef0001";
    let session = unique("many");
    let long_ago = 1_000_000u64;
    let mut pipe = redis::pipe();
    for i in 0..N {
        let id = format!("{dead}:{i}");
        let registration = serde_json::json!({
            "session_id": session, "agent_id": "a", "since": long_ago,
            "presence": format!("session:{session}:presence"), "events": true,
        });
        pipe.hset(
            format!("wsproxy:process:{dead}:connections"),
            &id,
            registration.to_string(),
        )
        .ignore();
        pipe.hset(format!("session:{session}:presence"), &id, "{}")
            .ignore();
    }
    pipe.zadd("wsproxy:processes", dead, long_ago).ignore();
    pipe.query_async::<()>(&mut c).await.expect("fill");
    let survivor = Server::start_with(&redis.url(), tracked).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: usize = c
            .hlen(format!("session:{session}:presence"))
            .await
            .expect("HLEN");
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} presence entries never reaped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events: usize = redis::cmd("XLEN")
        .arg("wsproxy:events")
        .query_async(&mut c)
        .await
        .expect("XLEN");
    assert_eq!(events, N, "one process_lost disconnect per connection");
    let processes: Vec<String> = c.zrange("wsproxy:processes", 0, -1).await.expect("ZRANGE");
    assert!(!processes.iter().any(|p| p == dead), "{processes:?}");
    assert_eq!(
        survivor.metric("wsproxy_reaped_connections_total").await,
        N as f64
    );
    survivor.stop().await;
}

#[tokio::test]
async fn a_disconnect_during_a_redis_restart_is_recorded_once_redis_is_back() {
    let mut redis = Redis::start_persistent().await;
    // A heartbeat long enough that the restart is no lapse.
    let server = Server::start_with(&redis.url(), |c| {
        tracked(c);
        c.lifecycle.heartbeat = Duration::from_secs(10);
    })
    .await;
    let session = unique("retry");
    redis.set_token(&session, TOKEN, 60).await;
    let mut ws = server.connect(&session, TOKEN).await;
    wait_presence(&redis, &session, 1).await;
    redis.kill();
    ws.close(None).await.expect("close");
    drop(ws);
    server
        .wait_metric("wsproxy_lifecycle_failures_total", 1.0)
        .await;
    redis.restart().await;
    wait_presence(&redis, &session, 0).await;
    let gone = wait_events(&redis, 1, |e| e["type"] == "disconnect").await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["reason"], "client");
    server.stop().await;
}

/// A TCP proxy in front of Redis that holds back Redis's replies on
/// command connections by `delay` (pub/sub connections, told by their
/// `SUBSCRIBE`, go straight through). Its address, for wsproxy's
/// `REDIS_URL`.
async fn slow_replies_proxy(redis_port: u16, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else {
                continue;
            };
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            let pubsub = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = pubsub.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = client_rd.read(&mut buf).await {
                    let chunk = &buf[..n];
                    if chunk
                        .windows(9)
                        .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                    {
                        seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    if server_wr.write_all(chunk).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = server_rd.read(&mut buf).await {
                    if !pubsub.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(delay).await;
                    }
                    if client_wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}")
}

/// A backend revokes a token and disconnects its session while a client's
/// admission has read that token but not yet subscribed (the token check's
/// reply is held back 300 ms; the disconnect is published 100 ms into
/// it): the connection is closed with the disconnect's code all the same,
/// instead of outliving the revocation.
#[tokio::test]
async fn a_disconnect_during_an_admission_closes_that_connection_too() {
    let redis = Redis::start().await;
    let port = redis
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let url = slow_replies_proxy(port, Duration::from_millis(300)).await;
    let server = Server::start_with(&url, |c| c.auth_timeout = Duration::from_secs(10)).await;
    server.wait_metric("wsproxy_broker_channels", 1.0).await;
    // One admission first, so the token check's script is loaded (a first
    // EVALSHA would cost a NOSCRIPT round trip more).
    let warm = unique("warm");
    redis.set_token(&warm, TOKEN, 60).await;
    drop(server.connect(&warm, TOKEN).await);
    let session = unique("race");
    redis.set_token(&session, TOKEN, 60).await;
    let admission = tokio::spawn({
        let url = server.url("agent-1", &session);
        async move {
            let mut req = url.into_client_request().expect("request");
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
            );
            connect_request(req).await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // What the README and the Python library do: DEL and FCALL
    // wsproxy_control in one MULTI/EXEC, straight to Redis.
    let mut c = redis.conn().await;
    let _: () = redis::pipe()
        .atomic()
        .del(format!("session:{session}:auth"))
        .ignore()
        .cmd("FCALL")
        .arg("wsproxy_control")
        .arg(1)
        .arg("wsproxy:control:log")
        .arg(format!(
            r#"{{"type":"disconnect","session_id":"{session}","code":4001,"reason":"revoked"}}"#
        ))
        .ignore()
        .query_async(&mut c)
        .await
        .expect("MULTI DEL FCALL EXEC");
    let mut ws = admission
        .await
        .expect("admission task")
        .expect("admitted: its token was read before the revocation");
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "revoked"));
    server.stop().await;
}
