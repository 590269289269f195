//! Reliable sessions (`wsproxy.v1`) end to end: history and resume, the
//! explicit failures, durable client messages, against a private
//! redis-server with wsproxy in-process.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsproxy::config::Config;

const TOKEN: &str = "reliable-token";

fn reliable(c: &mut Config) {
    c.reliable.enabled = true;
}

async fn server(redis: &Redis, tweak: impl FnOnce(&mut Config)) -> Server {
    let server = Server::start_with(&redis.url(), |c| {
        reliable(c);
        tweak(c);
    })
    .await;
    // /ready waits for the Redis library too.
    server.wait_ready().await;
    server
}

/// A reliable connection: the socket, its welcome, and whether wsproxy
/// selected the subprotocol.
async fn connect(
    server: &Server,
    session: &str,
    resume: Option<(&str, &str)>,
) -> (Ws, serde_json::Value) {
    let (ws, selected) = connect_offering(server, session, resume).await;
    assert!(selected, "wsproxy.v1 was not selected");
    let mut ws = ws;
    let welcome: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

async fn connect_offering(
    server: &Server,
    session: &str,
    resume: Option<(&str, &str)>,
) -> (Ws, bool) {
    let query = resume.map(|(epoch, offset)| format!("?epoch={epoch}&offset={offset}"));
    let req = request(server, session, query.as_deref().unwrap_or(""));
    let (ws, response) = within(
        WAIT,
        "the reliable session's handshake",
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("upgrade");
    let selected = response
        .headers()
        .get("sec-websocket-protocol")
        .is_some_and(|v| v == "wsproxy.v1");
    (ws, selected)
}

/// An upgrade request for `session` with the token, offering wsproxy.v1.
fn request(
    server: &Server,
    session: &str,
    query: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let url = format!("{}{query}", server.url("agent-1", session));
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wsproxy.v1"),
    );
    req
}

/// `FCALL wsproxy_publish`: the message's offset.
async fn publish(redis: &Redis, session: &str, payload: &str) -> String {
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

/// Publishes `{"n": i}` for every `i` of `range`, in a task of its own,
/// while the test goes on.
async fn publish_meanwhile(
    redis: &Redis,
    session: &str,
    range: std::ops::RangeInclusive<u64>,
) -> tokio::task::JoinHandle<()> {
    let mut c = redis.conn().await;
    let key = format!("session:{session}:history");
    tokio::spawn(async move {
        for i in range {
            let _: String = redis::cmd("FCALL")
                .arg("wsproxy_publish")
                .arg(1)
                .arg(&key)
                .arg(n(i))
                .query_async(&mut c)
                .await
                .expect("FCALL");
        }
    })
}

async fn next_json(ws: &mut Ws) -> serde_json::Value {
    serde_json::from_str(&next_text(ws).await).expect("json frame")
}

/// Reads enveloped messages until the one with `{"n": last}`; returns the
/// `n`s in the order they came and the last offset.
async fn numbers_until(ws: &mut Ws, last: u64) -> (Vec<u64>, String) {
    let mut seen = Vec::new();
    let mut offset = String::new();
    while seen.last() != Some(&last) {
        let m = next_json(ws).await;
        assert_eq!(m["type"], "message", "{m}");
        seen.push(m["data"]["n"].as_u64().expect("n"));
        offset = m["offset"].as_str().expect("offset").to_owned();
    }
    (seen, offset)
}

fn n(i: u64) -> String {
    format!(r#"{{"n":{i}}}"#)
}

#[tokio::test]
async fn a_client_that_reconnects_gets_exactly_what_it_missed_while_more_is_published() {
    let redis = Redis::start().await;
    // Room for all 1,303: no trimming may race the resume.
    let server = server(&redis, |c| c.reliable.history_max_len = 5000).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;

    let (mut ws, welcome) = connect(&server, &session, None).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(welcome["offset"], "0-0", "{welcome}");
    assert!(welcome.get("resumed").is_none(), "a fresh join: {welcome}");
    for i in 1..=3 {
        publish(&redis, &session, &n(i)).await;
    }
    let (got, last) = numbers_until(&mut ws, 3).await;
    assert_eq!(got, vec![1, 2, 3]);
    ws.close(None).await.expect("close");
    drop(ws);

    // 1,000 published while the client is away.
    for i in 4..=1003 {
        publish(&redis, &session, &n(i)).await;
    }
    // ... and 300 more while it resumes.
    let publisher = publish_meanwhile(&redis, &session, 1004..=1303).await;
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &last))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(welcome["epoch"], epoch.as_str());
    assert!(
        welcome["replayed"].as_u64().is_some_and(|r| r >= 1000),
        "{welcome}"
    );
    let (got, _) = numbers_until(&mut ws, 1303).await;
    within(WAIT, "the publisher's end", publisher)
        .await
        .expect("publisher");
    let expected: Vec<u64> = (4..=1303).collect();
    assert_eq!(got.len(), expected.len(), "lost or duplicated");
    assert_eq!(got, expected, "out of order, lost or duplicated");
    assert_silent(&mut ws, Duration::from_millis(200)).await;
    assert!(server.metric("wsproxy_reliable_replayed_total").await >= 1000.0);
}

#[tokio::test]
async fn plain_clients_get_replayable_messages_as_they_are_and_plain_mode_is_unchanged() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let mut plain = server.connect(&session, TOKEN).await;
    let (mut reliable, _) = connect(&server, &session, None).await;

    let offset = publish(&redis, &session, r#"{"hello":1}"#).await;
    assert_eq!(next_text(&mut plain).await, r#"{"hello":1}"#);
    assert_eq!(
        next_text(&mut reliable).await,
        format!(r#"{{"type":"message","offset":"{offset}","data":{{"hello":1}}}}"#)
    );
    // A plain PUBLISH is not replayable and reaches plain connections only.
    redis
        .publish(&format!("session:{session}:down"), "plain text")
        .await;
    assert_eq!(next_text(&mut plain).await, "plain text");
    assert_silent(&mut reliable, Duration::from_millis(200)).await;
    // A plain client's messages are published as before.
    let mut up = redis.subscribe(&format!("session:{session}:up")).await;
    let mut up = up.on_message();
    send_text(&mut plain, r#"{"up":1}"#).await;
    assert_eq!(next_published(&mut up).await, r#"{"up":1}"#);

    // The library refuses what reliable clients could not parse.
    let mut c = redis.conn().await;
    let err = redis::cmd("FCALL")
        .arg("wsproxy_publish")
        .arg(1)
        .arg(format!("session:{session}:history"))
        .arg("not json")
        .query_async::<String>(&mut c)
        .await
        .expect_err("not JSON");
    assert!(err.to_string().contains("must be JSON"), "{err}");
    // Not even what Redis' own JSON decoder would let through by default.
    for lax in [r#"{"a":NaN}"#, "Infinity", "[0x10]"] {
        let err = redis::cmd("FCALL")
            .arg("wsproxy_publish")
            .arg(1)
            .arg(format!("session:{session}:history"))
            .arg(lax)
            .query_async::<String>(&mut c)
            .await
            .expect_err("not JSON");
        assert!(err.to_string().contains("must be JSON"), "{lax}: {err}");
    }
    let err = redis::cmd("FCALL")
        .arg("wsproxy_publish")
        .arg(1)
        .arg("other:key")
        .arg("{}")
        .query_async::<String>(&mut c)
        .await
        .expect_err("not a history key");
    assert!(err.to_string().contains("session:<id>:history"), "{err}");
}

/// Asking for wsproxy.v1 where reliable sessions are off is refused before
/// the token is checked: a 101 selecting no protocol would fail the
/// handshake in browsers, and a plain session is not what was asked for.
#[tokio::test]
async fn with_reliable_sessions_off_asking_for_them_is_refused() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (status, body) = connect_request(request(&server, &session, ""))
        .await
        .expect_err("refused");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("reliable_sessions_off")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("RELIABLE_SESSIONS")),
        "{body}"
    );
    // The token was not used: its TTL is still the one the backend set.
    assert!(redis.ttl(&format!("session:{session}:auth")).await <= 60);
    // Issue 22, defect 7: the same refusal without any token (it was 401
    // missing_token), so the client learns the server lacks the feature.
    let mut req = request(&server, &session, "");
    req.headers_mut().remove("authorization");
    let (status, body) = connect_request(req).await.expect_err("refused");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("reliable_sessions_off")),
        "{body}"
    );
    // Without the subprotocol, the same session is plain as ever.
    let mut ws = server.connect(&session, TOKEN).await;
    redis
        .publish(&format!("session:{session}:down"), "raw")
        .await;
    assert_eq!(next_text(&mut ws).await, "raw");
}

#[tokio::test]
async fn trimmed_expired_and_unknown_positions_are_told_not_skipped() {
    let redis = Redis::start().await;
    let server = server(&redis, |c| {
        c.reliable.history_max_len = 10;
        c.reliable.history_ttl = Duration::from_secs(1);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (ws, welcome) = connect(&server, &session, None).await;
    drop(ws);
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let first = publish(&redis, &session, &n(1)).await;
    let mut offsets = vec![first.clone()];
    for i in 2..=500 {
        offsets.push(publish(&redis, &session, &n(i)).await);
    }
    // The history is bounded: HISTORY_MAX_LEN, plus at most a batch.
    let len: usize = redis::cmd("XLEN")
        .arg(format!("session:{session}:history"))
        .query_async(&mut redis.conn().await)
        .await
        .expect("XLEN");
    assert!((10..=110).contains(&len), "{len} entries kept");
    // What is still kept resumes as usual.
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &offsets[494]))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(
        numbers_until(&mut ws, 500).await.0,
        vec![496, 497, 498, 499, 500]
    );
    drop(ws);
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &first))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("trimmed")),
        "{welcome}"
    );
    // It goes on live from the welcome's offset.
    publish(&redis, &session, &n(501)).await;
    assert_eq!(next_json(&mut ws).await["data"]["n"], 501);
    drop(ws);

    let (_, welcome) = connect(&server, &session, Some((&epoch, "99999999999999-0"))).await;
    assert_eq!(welcome["reason"], "unknown_offset", "{welcome}");
    let (_, welcome) = connect(&server, &session, Some((&epoch, "garbage"))).await;
    assert_eq!(welcome["reason"], "unknown_offset", "{welcome}");

    // Past HISTORY_TTL_SECS without a publish or a connect, the history is
    // gone, and with it the epoch.
    let last = publish(&redis, &session, &n(502)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, welcome) = connect(&server, &session, Some((&epoch, &last))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("epoch_changed")),
        "{welcome}"
    );
    assert_ne!(welcome["epoch"], epoch.as_str());
    // The history alone deleted (or evicted) while its epoch lives: the
    // position cannot be told, and what comes next is a new epoch, never
    // a continuation that would hide the lost messages.
    let (_, welcome) = connect(&server, &session, None).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let before = publish(&redis, &session, &n(600)).await;
    publish(&redis, &session, &n(601)).await;
    let mut c = redis.conn().await;
    redis::cmd("DEL")
        .arg(format!("session:{session}:history"))
        .query_async::<()>(&mut c)
        .await
        .expect("DEL history");
    let (_, welcome) = connect(&server, &session, Some((&epoch, &before))).await;
    assert_eq!(welcome["reason"], "expired", "{welcome}");
    publish(&redis, &session, &n(602)).await;
    let (_, welcome) = connect(&server, &session, Some((&epoch, &before))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("epoch_changed")),
        "a resume across the lost history must fail, not replay 602 alone: {welcome}"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"wsproxy_resume_failures_total{reason="trimmed"} 1"#),
        "{metrics}"
    );

    // Half a position is a bad request, and so is an empty half (issue 22,
    // defect 5: `?epoch=&offset=<valid>` was taken as a fresh join).
    for query in [
        format!("?epoch={epoch}"),
        format!("?epoch=&offset={before}"),
        format!("?epoch={epoch}&offset="),
        format!("?offset={before}"),
    ] {
        let req = request(&server, &session, &query);
        let (status, body) = connect_request(req).await.expect_err("refused");
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_query")),
            "{query}: {body}"
        );
    }
    // Both halves empty are neither: a fresh join.
    let (_, welcome) = connect(&server, &session, Some(("", ""))).await;
    assert!(welcome.get("resumed").is_none(), "{welcome}");
}

/// Deletes a key, as a user or an eviction may.
async fn del(redis: &Redis, key: &str) {
    redis::cmd("DEL")
        .arg(key)
        .query_async::<()>(&mut redis.conn().await)
        .await
        .expect("DEL");
}

/// A client whose welcome said `0-0` (nothing published yet) leaves; the
/// backend publishes; the history alone is then deleted (or evicted)
/// while its epoch lives. Its resume from `0-0` must fail with `expired`:
/// it was `resumed:true, replayed:0`, and the messages were lost without
/// a word. Resuming from `0-0` while nothing was ever published is still
/// a resume with nothing to replay.
#[tokio::test]
async fn a_resume_from_0_0_after_the_history_was_lost_is_expired_not_an_empty_replay() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let history = format!("session:{session}:history");
    let (ws, welcome) = connect(&server, &session, None).await;
    drop(ws);
    assert_eq!(welcome["offset"], "0-0", "{welcome}");
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let (ws, welcome) = connect(&server, &session, Some((&epoch, "0-0"))).await;
    drop(ws);
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["replayed"].as_u64()),
        (Some(true), Some(0)),
        "nothing was published: nothing missed: {welcome}"
    );
    for i in 1..=3 {
        publish(&redis, &session, &n(i)).await;
    }
    del(&redis, &history).await;
    let (ws, welcome) = connect(&server, &session, Some((&epoch, "0-0"))).await;
    drop(ws);
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("expired")),
        "1..3 were lost: {welcome}"
    );
    // The next publish starts a new epoch: the old one's `0-0` is
    // `epoch_changed`, not a replay of 4 alone.
    publish(&redis, &session, &n(4)).await;
    let (ws, welcome) = connect(&server, &session, Some((&epoch, "0-0"))).await;
    drop(ws);
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("epoch_changed")),
        "{welcome}"
    );

    // The epoch lost alone (evicted) is made again by a join while the
    // history holds messages: that epoch had a history too, and `0-0`
    // under it once the history is gone is `expired` as well.
    del(&redis, &format!("session:{session}:epoch")).await;
    let (ws, welcome) = connect(&server, &session, None).await;
    drop(ws);
    assert_ne!(welcome["offset"], "0-0", "{welcome}");
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, "0-0"))).await;
    assert_eq!(welcome["replayed"], 1, "{welcome}");
    assert_eq!(next_json(&mut ws).await["data"]["n"], 4);
    drop(ws);
    del(&redis, &history).await;
    let (_, welcome) = connect(&server, &session, Some((&epoch, "0-0"))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("expired")),
        "{welcome}"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"wsproxy_resume_failures_total{reason="expired"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_redis_restart_without_persistence_fails_the_resume_and_with_it_resumes() {
    for persistent in [false, true] {
        let mut redis = if persistent {
            Redis::start_persistent().await
        } else {
            Redis::start().await
        };
        let server = server(&redis, |_| {}).await;
        let session = unique("s");
        redis.set_token(&session, TOKEN, 600).await;
        let (ws, welcome) = connect(&server, &session, None).await;
        drop(ws);
        let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
        let seen = publish(&redis, &session, &n(1)).await;
        publish(&redis, &session, &n(2)).await;

        redis.restart().await;
        if !persistent {
            // The token went with everything else.
            redis.set_token(&session, TOKEN, 600).await;
        }
        // wsproxy loads its library again once it is back.
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut c = redis.conn().await;
        loop {
            let r = redis::cmd("FCALL")
                .arg("wsproxy_publish")
                .arg(1)
                .arg(format!("session:{session}:history"))
                .arg(n(3))
                .query_async::<String>(&mut c)
                .await;
            if r.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "library never reloaded: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.wait_ready().await;
        let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &seen))).await;
        if persistent {
            assert_eq!(welcome["resumed"], true, "{welcome}");
            let (got, _) = numbers_until(&mut ws, 3).await;
            assert_eq!(got, vec![2, 3]);
        } else {
            assert_eq!(
                (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
                (Some(false), Some("epoch_changed")),
                "{welcome}"
            );
        }
    }
}

/// Issue 22, defect 8: after a Redis restart without persistence, `/ready`
/// answered 200 for up to 0.2 s before the `wsproxy` library was loaded
/// again (backends' `FCALL wsproxy_publish` failed with "Function not
/// found" meanwhile). Every 200 must now find the library in Redis.
#[tokio::test]
async fn ready_waits_for_the_library_after_a_restart_without_persistence() {
    let mut redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    server.wait_ready().await;
    for round in 0..3 {
        redis.restart().await;
        let mut c = redis.conn().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut not_ready = 0;
        loop {
            let (status, body) = http_get(server.addr, "/ready").await.expect("GET /ready");
            if status == 200 {
                let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
                    .arg("LIST")
                    .arg("LIBRARYNAME")
                    .arg("wsproxy")
                    .query_async(&mut c)
                    .await
                    .expect("FUNCTION LIST");
                assert!(
                    !libraries.is_empty(),
                    "round {round}: /ready said 200 ({body}) after {not_ready} 503s, while the wsproxy library was not loaded"
                );
                break;
            }
            not_ready += 1;
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready again: {body}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[tokio::test]
async fn a_reliable_connection_open_while_redis_restarts_is_closed_to_resume_not_left_with_a_gap() {
    // What is published after Redis is back but before wsproxy has
    // subscribed again never reaches wsproxy's pub/sub connection. A plain
    // session loses it (documented); a reliable one must not: the
    // connection is closed with 1013 and the client resumes from history.
    let mut redis = Redis::start_persistent().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let (mut ws, welcome) = connect(&server, &session, None).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    publish(&redis, &session, &n(1)).await;
    let (got, last) = numbers_until(&mut ws, 1).await;
    assert_eq!(got, vec![1]);

    redis.restart().await;
    // At once: wsproxy's broker is most likely still waiting to reconnect.
    publish(&redis, &session, &n(2)).await;
    assert_eq!(close_code(&mut ws).await, 1013);

    server.wait_ready().await;
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &last))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    publish(&redis, &session, &n(3)).await;
    let (got, _) = numbers_until(&mut ws, 3).await;
    assert_eq!(got, vec![2, 3], "lost, duplicated or out of order");
    server
        .wait_metric("wsproxy_disconnects_total{reason=\"pubsub_lost\"}", 1.0)
        .await;
}

/// A client message in reliable mode: the frame and the ack wsproxy sends.
async fn send_message(ws: &mut Ws, id: &str, data: &str) -> serde_json::Value {
    ws.send(Message::text(format!(
        r#"{{"type":"message","id":"{id}","data":{data}}}"#
    )))
    .await
    .expect("send");
    next_json(ws).await
}

async fn stream_entries(redis: &Redis, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut c = redis.conn().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE");
    entries
}

#[tokio::test]
async fn client_messages_are_acknowledged_once_stored_and_a_resend_is_stored_once() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let (mut ws, _) = connect(&server, &session, None).await;

    let ack = send_message(&mut ws, "m-1", r#"{"text":"hi"}"#).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("m-1")),
        "{ack}"
    );
    let offset = ack["offset"].as_str().expect("offset").to_owned();
    assert!(ack.get("duplicate").is_none());
    let entries = stream_entries(&redis, "wsproxy:up:0").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, offset);
    let fields: std::collections::HashMap<_, _> = entries[0].1.iter().cloned().collect();
    assert_eq!(fields["session"], session);
    assert_eq!(fields["agent"], "agent-1");
    assert_eq!(fields["id"], "m-1");
    assert_eq!(fields["data"], r#"{"text":"hi"}"#);

    // Resent after a reconnect: acknowledged with the first copy's offset,
    // not stored again.
    drop(ws);
    let (mut ws, _) = connect(&server, &session, None).await;
    let again = send_message(&mut ws, "m-1", r#"{"text":"hi"}"#).await;
    assert_eq!(
        (again["offset"].as_str(), again["duplicate"].as_bool()),
        (Some(offset.as_str()), Some(true)),
        "{again}"
    );
    assert_eq!(stream_entries(&redis, "wsproxy:up:0").await.len(), 1);
    // The same id with other data is not a resend: refused, not stored,
    // and never reported as stored.
    let conflict = send_message(&mut ws, "m-1", r#"{"text":"other"}"#).await;
    assert_eq!(
        (conflict["error"].as_str(), conflict["id"].as_str()),
        (Some("id_conflict"), Some("m-1")),
        "{conflict}"
    );
    assert_eq!(stream_entries(&redis, "wsproxy:up:0").await.len(), 1);

    // Not the documented shape: refused, nothing stored.
    for bad in [
        r#"{"text":"no envelope"}"#,
        r#"{"type":"message","id":"a:b","data":1}"#,
        r#"{"type":"message","id":"x"}"#,
        "not json",
    ] {
        send_text(&mut ws, bad).await;
        let r = next_json(&mut ws).await;
        assert_eq!(r["error"], "invalid_message", "{bad}: {r}");
    }
    assert_eq!(stream_entries(&redis, "wsproxy:up:0").await.len(), 1);

    // Redis refuses the store (its library deleted, as a FUNCTION FLUSH
    // would): an error naming the id, never an ack. (Killing Redis would
    // close the connection with 1013 first, see below.)
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("wsproxy")
        .query_async(&mut redis.conn().await)
        .await
        .expect("FUNCTION DELETE");
    let r = send_message(&mut ws, "m-2", "2").await;
    assert_eq!(
        (r["type"].as_str(), r["error"].as_str(), r["id"].as_str()),
        (Some("error"), Some("not_stored"), Some("m-2")),
        "{r}"
    );
    assert_eq!(server.metric("wsproxy_reliable_acks_total").await, 1.0);
    assert_eq!(
        server.metric("wsproxy_reliable_duplicates_total").await,
        1.0
    );
    assert_eq!(
        server.metric("wsproxy_reliable_store_failures_total").await,
        1.0
    );
    // ... and wsproxy puts its library back: the next message is stored.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = send_message(&mut ws, "m-3", "3").await;
        if r["type"] == "ack" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reloaded: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker recipe the README documents: a consumer group on
/// `wsproxy:up:{n}`; a worker that dies holding messages has them claimed
/// by another (XAUTOCLAIM), and none is lost or handled twice.
#[tokio::test]
async fn a_crashed_workers_messages_are_claimed_by_another() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let mut c = redis.conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("wsproxy:up:0")
        .arg("workers")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .expect("XGROUP CREATE");
    let (mut ws, _) = connect(&server, &session, None).await;
    for i in 0..20 {
        let ack = send_message(&mut ws, &format!("m-{i}"), &i.to_string()).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }

    type Read = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;
    let read = |consumer: &'static str, count: usize| {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg("workers")
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg("wsproxy:up:0")
            .arg(">");
        cmd
    };
    let data = |entries: &[(String, Vec<(String, String)>)]| -> Vec<(String, String)> {
        entries
            .iter()
            .map(|(id, fields)| {
                let data = fields
                    .iter()
                    .find(|(k, _)| k == "data")
                    .map(|(_, v)| v.clone())
                    .expect("data field");
                (id.clone(), data)
            })
            .collect()
    };
    // Worker A takes 8 and dies before acknowledging them.
    let a: Read = read("a", 8).query_async(&mut c).await.expect("read a");
    assert_eq!(a[0].1.len(), 8);
    // Worker B takes and acknowledges the rest...
    let b: Read = read("b", 100).query_async(&mut c).await.expect("read b");
    let mut handled = data(&b[0].1);
    for (id, _) in &handled {
        let _: i64 = redis::cmd("XACK")
            .arg("wsproxy:up:0")
            .arg("workers")
            .arg(id)
            .query_async(&mut c)
            .await
            .expect("XACK");
    }
    // ... then claims what A left once it has been idle long enough.
    tokio::time::sleep(Duration::from_millis(150)).await;
    type Entries = Vec<(String, Vec<(String, String)>)>;
    let (_, claimed, _): (String, Entries, Vec<String>) = redis::cmd("XAUTOCLAIM")
        .arg("wsproxy:up:0")
        .arg("workers")
        .arg("b")
        .arg(100)
        .arg("0-0")
        .query_async(&mut c)
        .await
        .expect("XAUTOCLAIM");
    assert_eq!(claimed.len(), 8, "A's messages go to B");
    handled.extend(data(&claimed));
    let mut values: Vec<u64> = handled
        .iter()
        .map(|(_, d)| d.parse().expect("number"))
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..20).collect::<Vec<u64>>(), "none lost or twice");
}

/// Issue 13, point 5: connections of one session on two wsproxy instances
/// each get every message, and a client whose connection to one drops
/// resumes on the other with nothing lost or repeated, while the backend
/// keeps publishing. (In-process, aborting a server does not kill its
/// connections' tasks: a real SIGKILL of one of two wsproxy processes is
/// tests/reliable_processes.rs', and of the only one the chaos test's in
/// .ci/run.)
#[tokio::test]
async fn a_client_resumes_on_another_instance_with_nothing_lost() {
    let redis = Redis::start().await;
    let a = server(&redis, |c| c.reliable.history_max_len = 5000).await;
    let b = server(&redis, |c| c.reliable.history_max_len = 5000).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 600).await;
    let (mut on_a, welcome) = connect(&a, &session, None).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let (mut on_b, _) = connect(&b, &session, None).await;
    for i in 1..=50 {
        publish(&redis, &session, &n(i)).await;
    }
    let (got_a, last_a) = numbers_until(&mut on_a, 50).await;
    let (got_b, _) = numbers_until(&mut on_b, 50).await;
    assert_eq!(got_a, (1..=50).collect::<Vec<_>>());
    assert_eq!(got_b, got_a, "both processes deliver the same messages");

    // The connection to A drops without a close frame, and A stops.
    drop(on_a);
    a.task.abort();
    let publisher = publish_meanwhile(&redis, &session, 51..=400).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (mut resumed, welcome) = connect(&b, &session, Some((&epoch, &last_a))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    let (got, _) = numbers_until(&mut resumed, 400).await;
    within(WAIT, "the publisher's end", publisher)
        .await
        .expect("publisher");
    assert_eq!(
        got,
        (51..=400).collect::<Vec<_>>(),
        "lost, repeated or out of order"
    );
    // The connection that stayed on B saw them all too.
    let (still, _) = numbers_until(&mut on_b, 400).await;
    assert_eq!(still, (51..=400).collect::<Vec<_>>());
}

/// `FCALL wsproxy_publish` of raw bytes: the offset, or Redis' error text.
async fn try_publish(redis: &Redis, session: &str, payload: &[u8]) -> Result<String, String> {
    let mut c = redis.conn().await;
    redis::cmd("FCALL")
        .arg("wsproxy_publish")
        .arg(1)
        .arg(format!("session:{session}:history"))
        .arg(payload)
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())
}

/// Appends `payload` to the history as it is, past `wsproxy_publish`'s
/// checks: an entry an older wsproxy (or anyone with `XADD`) stored.
async fn store_raw(redis: &Redis, session: &str, payload: &[u8]) -> String {
    let mut c = redis.conn().await;
    redis::cmd("XADD")
        .arg(format!("session:{session}:history"))
        .arg("*")
        .arg("d")
        .arg(payload)
        .query_async(&mut c)
        .await
        .expect("XADD")
}

/// The next frame, whatever it is (pings skipped), with a timeout.
async fn next_frame(ws: &mut Ws) -> Message {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(m))) => return m,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn messages_that_are_not_utf8_are_refused_and_live_clients_get_only_enveloped_text() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (mut ws, _) = connect(&server, &session, None).await;

    for bad in [
        &b"\"\xff\xfe\""[..],
        b"\"\xc0\xaf\"",                     // overlong '/'
        b"\"\xed\xa0\x80\"",                 // a surrogate
        b"\"\xf4\x90\x80\x80\"",             // past U+10FFFF
        b"\"\xe2\x82\"",                     // cut short
        b"{\"a\":\"\x80\"}",                 // a lone continuation byte
        b"\"\xe9\x80\x9f\xe3\x81\x84\x80\"", // a run of good ones, then a bad one
        b"\"\xc3\xa9\xff\"",
    ] {
        let err = try_publish(&redis, &session, bad)
            .await
            .expect_err("refused");
        assert!(
            err.contains("wsproxy_publish: the message must be valid UTF-8"),
            "{:?}: {err}",
            String::from_utf8_lossy(bad)
        );
    }
    // Nothing of them reached the history or the live channel.
    let len: usize = redis::cmd("XLEN")
        .arg(format!("session:{session}:history"))
        .query_async(&mut redis.conn().await)
        .await
        .expect("XLEN");
    assert_eq!(len, 0);
    // Bytes published on the live channel by other means never reach a
    // reliable client as a binary frame.
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("session:{session}:live"))
        .arg(&b"\xff\xfe"[..])
        .query_async(&mut redis.conn().await)
        .await
        .expect("PUBLISH");
    // Nor does text without an offset (no envelope of wsproxy_publish).
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("session:{session}:live"))
        .arg(r#"{"type":"message","data":"no offset"}"#)
        .query_async(&mut redis.conn().await)
        .await
        .expect("PUBLISH");
    // UTF-8 in all its lengths still goes through, and arrives as text.
    let good = "{\"t\":\"a\u{e9}\u{20ac}\u{1f600}\u{10ffff}\"}";
    try_publish(&redis, &session, good.as_bytes())
        .await
        .expect("valid UTF-8 is taken");
    match next_frame(&mut ws).await {
        Message::Text(t) => {
            let m: serde_json::Value = serde_json::from_str(&t).expect("json");
            assert_eq!(m["data"]["t"], "a\u{e9}\u{20ac}\u{1f600}\u{10ffff}");
        }
        other => panic!("a reliable client got {other:?}"),
    }

    // wsproxy_up, called directly, refuses it too.
    let mut c = redis.conn().await;
    let err = redis::cmd("FCALL")
        .arg("wsproxy_up")
        .arg(2)
        .arg("wsproxy:up:0")
        .arg("wsproxy:seen:x")
        .arg(&session)
        .arg("agent-1")
        .arg("m-1")
        .arg(&b"\"\xff\""[..])
        .arg(1000)
        .arg(60)
        .query_async::<redis::Value>(&mut c)
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .contains("wsproxy_up: the message must be valid UTF-8"),
        "{err}"
    );
}

#[tokio::test]
async fn an_entry_that_cannot_be_replayed_fails_the_resume_explicitly_not_with_503() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (ws, welcome) = connect(&server, &session, None).await;
    drop(ws);
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let before = publish(&redis, &session, &n(1)).await;
    // What an older wsproxy took: not UTF-8, and a raw control character.
    store_raw(&redis, &session, b"\"\xff\xfe\"").await;
    store_raw(&redis, &session, b"\"a\x01b\"").await;
    let mut last = publish(&redis, &session, &n(2)).await;

    for next in [3, 4] {
        let req = request(
            &server,
            &session,
            &format!("?epoch={epoch}&offset={before}"),
        );
        let mut ws = match connect_request(req).await {
            Ok(ws) => ws,
            Err((status, body)) => panic!("the resume was refused: {status} {body}"),
        };
        let welcome = next_json(&mut ws).await;
        assert_eq!(
            (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
            (Some(false), Some("unreplayable")),
            "{welcome}"
        );
        // It goes on from the welcome's offset, and nothing of the history
        // came.
        assert_eq!(welcome["offset"], last.as_str(), "{welcome}");
        let offset = publish(&redis, &session, &n(next)).await;
        assert_eq!(next_json(&mut ws).await["data"]["n"], next);
        if next == 3 {
            last = offset;
        }
    }
    assert_eq!(
        server
            .metric(r#"wsproxy_resume_failures_total{reason="unreplayable"}"#)
            .await,
        2.0
    );
    // From past the bad entries, the resume works.
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &last))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(numbers_until(&mut ws, 4).await.0, vec![4]);
}

#[tokio::test]
async fn raw_control_characters_in_strings_are_refused_and_json_whitespace_is_not() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (mut ws, _) = connect(&server, &session, None).await;

    for bad in [
        &b"\"a\x01b\""[..],
        b"\"\x00\"",
        b"{\"a\":\"x\ny\"}",
        b"[\"tab\there\"]",
        b"\"cr\r\"",
        b"{\"k\x1f\":1}",
        b"\"\\\"\x02\"",
        b"\"\\\\\"\x1b",
        b"[\"\\\\\", \"x\ty\"]",
    ] {
        let err = try_publish(&redis, &session, bad)
            .await
            .expect_err("refused");
        assert!(
            err.contains("wsproxy_publish: the message must be JSON")
                && err.contains("control character"),
            "{:?}: {err}",
            String::from_utf8_lossy(bad)
        );
    }
    // Whitespace between tokens, escapes and quotes inside strings are
    // JSON; every one reaches the client as JSON a strict parser takes.
    let fine = [
        "{\n  \"a\": [1,\t2],\r\n  \"b\": \"x\\ny\\u0001\\\"\\\\\"\n}\n",
        "\"\\\\\"",
        "[\"\\\"\", \"\\\\\", \"\\t\"]",
        "[\"a\",\n \"b\u{901f}\u{3044}\u{e9}\"]",
    ];
    for (i, good) in fine.iter().enumerate() {
        try_publish(&redis, &session, good.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{good:?} refused: {e}"));
        let m = next_json(&mut ws).await;
        let data: serde_json::Value = serde_json::from_str(good).expect("valid");
        assert_eq!(m["data"], data, "message {i}");
    }
    // Client messages: serde_json refuses them before wsproxy_up is called.
    let reply = send_message(&mut ws, "m-1", "\"a\u{1}b\"").await;
    assert_eq!(reply["error"], "invalid_message", "{reply}");
}

/// Redis' cjson takes a decimal point without a digit on both sides;
/// JSON (and every client's parser) does not, so such a message would be
/// delivered live as text no client can read and make every resume from
/// before it fail as unreplayable.
#[tokio::test]
async fn numbers_without_a_digit_on_both_sides_of_the_point_are_refused() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (mut ws, _) = connect(&server, &session, None).await;

    for bad in [
        "-.5",
        "[1.]",
        "{\"a\":1.e5}",
        "1.",
        "[-.0]",
        "{\"p\":-5.}",
        "[\"\\\\\", 1.]",
        "[\".\", -.5]",
    ] {
        let err = try_publish(&redis, &session, bad.as_bytes())
            .await
            .expect_err("refused");
        assert!(
            err.contains("wsproxy_publish: the message must be JSON")
                && err.contains("decimal point"),
            "{bad}: {err}"
        );
    }
    let err = publish_batch(&redis, &session, &[n(1), "[2.]".to_string()])
        .await
        .expect_err("refused");
    assert!(err.contains("message 2: the message must be JSON"), "{err}");
    // Points in strings, and numbers with digits on both sides, are JSON.
    for good in [
        "\"1. -.5\"",
        "[1.5,\"x.\"]",
        "{\"a.\":-0.5e-3}",
        "\"a\\\".1.\"",
        "{\"t\":\"Hi. 3. ok\",\"n\":[0.5,-1.25E+3]}",
    ] {
        try_publish(&redis, &session, good.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{good} refused: {e}"));
        let m = next_json(&mut ws).await;
        let data: serde_json::Value = serde_json::from_str(good).expect("valid");
        assert_eq!(m["data"], data, "{good}");
    }
}

#[tokio::test]
async fn an_offset_of_another_history_is_unknown_even_between_two_of_this_ones() {
    let redis = Redis::start().await;
    let server = server(&redis, |c| c.reliable.history_max_len = 10).await;
    let (a, b) = (unique("a"), unique("b"));
    redis.set_token(&a, TOKEN, 60).await;
    let (ws, welcome) = connect(&server, &a, None).await;
    drop(ws);
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    // Alternately, a few milliseconds apart, so that B's offsets fall
    // between A's rather than on them.
    let (mut of_a, mut of_b) = (Vec::new(), Vec::new());
    for i in 1..=4 {
        of_a.push(publish(&redis, &a, &n(i)).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
        of_b.push(publish(&redis, &b, &n(100 + i)).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let key = |o: &String| wsproxy::session::history::parse_offset(o).expect("offset");
    let between = of_b[1].clone();
    assert!(key(&of_a[1]) < key(&between) && key(&between) < key(&of_a[2]));
    assert!(!of_a.contains(&between));

    let (_, welcome) = connect(&server, &a, Some((&epoch, &between))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["reason"].as_str()),
        (Some(false), Some("unknown_offset")),
        "{welcome}"
    );
    // One of A's own, the fresh history's "0-0", and the last one resume.
    for (from, expect) in [
        (&of_a[1], vec![3, 4]),
        (&"0-0".to_owned(), vec![1, 2, 3, 4]),
    ] {
        let (mut ws, welcome) = connect(&server, &a, Some((&epoch, from))).await;
        assert_eq!(welcome["resumed"], true, "{from}: {welcome}");
        assert_eq!(numbers_until(&mut ws, 4).await.0, expect, "from {from}");
    }
    let (mut ws, welcome) = connect(&server, &a, Some((&epoch, &of_a[3]))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["replayed"].as_u64()),
        (Some(true), Some(0)),
        "{welcome}"
    );
    assert_silent(&mut ws, Duration::from_millis(100)).await;

    // The newest trimmed offset is one the history gave out: its entry is
    // gone, and everything after it is still there.
    let c = unique("c");
    redis.set_token(&c, TOKEN, 60).await;
    let (ws, welcome) = connect(&server, &c, None).await;
    drop(ws);
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let mut offsets = Vec::new();
    for i in 1..=111 {
        offsets.push(publish(&redis, &c, &n(i)).await);
    }
    let trimmed: String = redis::cmd("HGET")
        .arg(format!("session:{c}:epoch"))
        .arg("trimmed")
        .query_async(&mut redis.conn().await)
        .await
        .expect("HGET");
    assert_eq!(trimmed, offsets[100]);
    let (mut ws, welcome) = connect(&server, &c, Some((&epoch, &trimmed))).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    assert_eq!(
        numbers_until(&mut ws, 111).await.0,
        (102..=111).collect::<Vec<_>>()
    );
    let (_, welcome) = connect(&server, &c, Some((&epoch, &offsets[99]))).await;
    assert_eq!(welcome["reason"], "trimmed", "{welcome}");
}

/// `FCALL wsproxy_publish_batch`: the offsets, or Redis' error text.
async fn publish_batch(
    redis: &Redis,
    session: &str,
    payloads: &[String],
) -> Result<Vec<String>, String> {
    let mut c = redis.conn().await;
    redis::cmd("FCALL")
        .arg("wsproxy_publish_batch")
        .arg(1)
        .arg(format!("session:{session}:history"))
        .arg(payloads)
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())
}

/// A reply streamed token by token can be published many messages to a
/// call: each is stored, enveloped and published as if published alone,
/// in order; one that is not fit fails the whole call, and nothing of it
/// is stored or delivered.
#[tokio::test]
async fn a_batch_publish_is_many_publishes_in_one_call_all_or_nothing() {
    let redis = Redis::start().await;
    let server = server(&redis, |c| c.reliable.history_max_len = 5000).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (mut ws, welcome) = connect(&server, &session, None).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let mut plain = server.connect(&session, TOKEN).await;

    let first: Vec<String> = (1..=50).map(n).collect();
    let offsets = publish_batch(&redis, &session, &first)
        .await
        .expect("batch");
    assert_eq!(offsets.len(), 50);
    for (i, offset) in offsets.iter().enumerate() {
        let frame = next_json(&mut ws).await;
        assert_eq!(frame["offset"], offset.as_str(), "{frame}");
        assert_eq!(frame["data"]["n"], i as u64 + 1, "{frame}");
        assert_eq!(next_text(&mut plain).await, first[i]);
    }
    let last = offsets[49].clone();
    drop(ws);

    // Not fit, in the middle: an error naming it, and nothing published.
    let mut bad = (51..=60).map(n).collect::<Vec<_>>();
    bad[4] = "{\"a\":NaN}".into();
    let err = publish_batch(&redis, &session, &bad)
        .await
        .expect_err("refused");
    assert!(
        err.contains("message 5: the message must be JSON")
            && err.contains("nothing was published"),
        "{err}"
    );
    bad[4] = "\"\u{1}\"".into();
    let err = publish_batch(&redis, &session, &bad)
        .await
        .expect_err("refused");
    assert!(
        err.contains("message 5: the message must be JSON: control"),
        "{err}"
    );
    assert_silent(&mut plain, Duration::from_millis(200)).await;
    for wrong in [vec![], vec![n(1); 1001]] {
        let err = publish_batch(&redis, &session, &wrong)
            .await
            .expect_err("refused");
        assert!(
            err.contains("takes one key and 1 to 1000 messages"),
            "{err}"
        );
    }
    let err = publish_batch(&redis, "../x", &first)
        .await
        .expect_err("refused");
    assert!(err.contains("session:<id>:history"), "{err}");

    // A single publish and a batch share one history: the resume after
    // the batch gets exactly what followed it.
    publish(&redis, &session, &n(51)).await;
    let more: Vec<String> = (52..=60).map(n).collect();
    publish_batch(&redis, &session, &more).await.expect("batch");
    let (mut ws, welcome) = connect(&server, &session, Some((&epoch, &last))).await;
    assert_eq!(
        (welcome["resumed"].as_bool(), welcome["replayed"].as_u64()),
        (Some(true), Some(10)),
        "{welcome}"
    );
    assert_eq!(
        numbers_until(&mut ws, 60).await.0,
        (51..=60).collect::<Vec<_>>()
    );
    assert_silent(&mut ws, Duration::from_millis(200)).await;
}

/// How many `PEXPIRE`s Redis has run since it started, a function's own
/// included (`INFO commandstats`).
async fn pexpire_calls(redis: &Redis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis.conn().await)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_pexpire:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("calls"))
}

async fn pttl(redis: &Redis, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut redis.conn().await)
        .await
        .expect("PTTL")
}

/// With the default `HISTORY_TTL_SECS` (600), a session's history and its
/// epoch keep at least that long after every publish, and at most a
/// hundredth more, and expire at the same moment; renewing both takes a
/// write, which runs once per renewal window (6 s here), not once per
/// message.
#[tokio::test]
async fn publishes_keep_the_history_for_its_ttl_and_renew_it_once_a_window() {
    let redis = Redis::start().await;
    let server = server(&redis, |_| {}).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN, 60).await;
    let (mut ws, _) = connect(&server, &session, None).await;
    let (history, epoch) = (
        format!("session:{session}:history"),
        format!("session:{session}:epoch"),
    );
    let ttl: i64 = 600_000;
    // Both keys' TTLs are at least the TTL and at most 1% more, and they
    // expire at the same millisecond.
    let kept = |what: &'static str| {
        let (redis, history, epoch) = (&redis, &history, &epoch);
        async move {
            for key in [history, epoch] {
                let left = pttl(redis, key).await;
                assert!(
                    (ttl - 5_000..=ttl + ttl / 100).contains(&left),
                    "{what}: {key} has {left} ms left"
                );
            }
            assert_eq!(
                expire_time(redis, history).await,
                expire_time(redis, epoch).await,
                "{what}: the two keys expire apart"
            );
        }
    };
    let before = pexpire_calls(&redis).await;
    let started = std::time::Instant::now();
    for i in 1..=200 {
        publish(&redis, &session, &n(i)).await;
    }
    let elapsed = i64::try_from(started.elapsed().as_millis()).expect("ms");
    assert_eq!(numbers_until(&mut ws, 200).await.0.len(), 200);
    kept("after 200 publishes").await;
    let renewals = pexpire_calls(&redis).await - before;
    let windows = 1 + u64::try_from(elapsed / (ttl / 100)).expect("windows");
    assert!(
        renewals <= 2 * windows,
        "{renewals} PEXPIREs for 200 publishes in {elapsed} ms"
    );
    assert!(renewals >= 2, "the first publish renews both keys");

    // Once less than the TTL is left, the next publish renews both.
    let mut c = redis.conn().await;
    for key in [&history, &epoch] {
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(ttl - 10_000)
            .query_async(&mut c)
            .await
            .expect("PEXPIRE");
    }
    publish(&redis, &session, &n(201)).await;
    kept("after a publish with less left").await;

    // A history emptied (not deleted) keeps its longer TTL while the epoch
    // is made again: the publish renews both anyway.
    let _: i64 = redis::cmd("XTRIM")
        .arg(&history)
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut c)
        .await
        .expect("XTRIM");
    publish(&redis, &session, &n(202)).await;
    kept("after a publish into an emptied history").await;
}

async fn expire_time(redis: &Redis, key: &str) -> i64 {
    redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(&mut redis.conn().await)
        .await
        .expect("PEXPIRETIME")
}
