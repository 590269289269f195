//! How fast a client's messages are taken (`WS_CLIENT_MESSAGE_RATE`,
//! `WS_CLIENT_MESSAGE_BURST`), at the production defaults: a flood is
//! slowed, never refused, deliveries go on meanwhile, and a session's
//! connections and POSTs share one budget.

mod common;

use std::time::{Duration, Instant};

use common::sse::request;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Messages the test sends back to back: the default burst (200) and two
/// seconds more at the default rate (100 a second).
const SENT: usize = 400;

#[tokio::test]
async fn a_client_past_its_burst_is_read_at_the_rate_and_loses_nothing() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let ws = server.connect(&session, "tok").await;
    let (mut tx, mut rx) = ws.split();
    // Small frames: all of them fit in the socket buffers at once, so the
    // client is as fast as it can be.
    for i in 0..SENT {
        within(
            WAIT,
            "sending",
            tx.feed(Message::text(format!("{{\"n\":{i}}}"))),
        )
        .await
        .expect("send");
    }
    within(WAIT, "flushing", tx.flush()).await.expect("flush");

    let mut published = sub.on_message();
    let first = next_published(&mut published).await;
    let started = Instant::now();
    assert_eq!(first, r#"{"n":0}"#);
    for i in 1..=250 {
        assert_eq!(
            next_published(&mut published).await,
            format!("{{\"n\":{i}}}")
        );
    }
    // Past the burst, the client's reads are held; what the backend sends
    // still reaches it at once.
    redis
        .publish(&format!("session:{session}:down"), r#"{"down":1}"#)
        .await;
    let down = within(WAIT, "the down message", rx.next()).await;
    let delivered = Instant::now();
    assert!(
        matches!(&down, Some(Ok(Message::Text(t))) if t.as_str() == r#"{"down":1}"#),
        "{down:?}"
    );
    for i in 251..SENT {
        assert_eq!(
            next_published(&mut published).await,
            format!("{{\"n\":{i}}}")
        );
    }
    let finished = Instant::now();
    assert!(
        delivered < finished,
        "the down message waited for the held client messages"
    );
    // 200 messages past the burst at 100 a second: about 2 s. Only a lower
    // bound is checked: a slow machine makes it longer, never shorter.
    let took = finished - started;
    assert!(
        took >= Duration::from_millis(1500),
        "{SENT} messages were read in {took:?}: not paced"
    );
    assert!(server.metric("wsproxy_client_reads_held_total").await >= 100.0);
    assert_eq!(
        server.metric("wsproxy_messages_up_total").await,
        SENT as f64
    );
}

#[tokio::test]
async fn a_rate_of_zero_reads_as_fast_as_the_client_sends() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| c.client_pace = None).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let mut ws = server.connect(&session, "tok").await;
    for i in 0..SENT {
        send_text(&mut ws, &format!("{{\"n\":{i}}}")).await;
    }
    let mut published = sub.on_message();
    for i in 0..SENT {
        assert_eq!(
            next_published(&mut published).await,
            format!("{{\"n\":{i}}}")
        );
    }
    assert_eq!(server.metric("wsproxy_client_reads_held_total").await, 0.0);
}

#[tokio::test]
async fn topic_connections_are_paced_too() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.pubsub.allow_anonymous = true;
        c.client_pace = wsproxy::config::Pace::new(100, 5);
    })
    .await;
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("topic connection");
    for _ in 0..20 {
        within(WAIT, "sending", ws.feed(Message::text("ping")))
            .await
            .expect("send");
    }
    within(WAIT, "flushing", ws.flush()).await.expect("flush");
    server
        .wait_metric("wsproxy_client_reads_held_total", 15.0)
        .await;
}

/// Two connections of one session, each within the burst alone, together
/// past it: the second half is read at the session's rate.
#[tokio::test]
async fn a_sessions_connections_share_one_budget() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let mut a = server.connect(&session, "tok").await;
    let mut b = server.connect(&session, "tok").await;
    for (ws, name) in [(&mut a, "a"), (&mut b, "b")] {
        for i in 0..SENT / 2 {
            within(
                WAIT,
                "sending",
                ws.feed(Message::text(format!("{{\"{name}\":{i}}}"))),
            )
            .await
            .expect("send");
        }
        within(WAIT, "flushing", ws.flush()).await.expect("flush");
    }
    let mut published = sub.on_message();
    let _ = next_published(&mut published).await;
    let started = Instant::now();
    let mut seen = 1;
    while seen < SENT {
        let m = next_published(&mut published).await;
        assert!(m.starts_with("{\"a\":") || m.starts_with("{\"b\":"), "{m}");
        seen += 1;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "{SENT} messages over two connections were read in {took:?}: each had a budget of its own"
    );
    assert_eq!(
        server.metric("wsproxy_messages_up_total").await,
        SENT as f64
    );
}

/// A session's POSTs wait their turn; one whose turn is further away than
/// AUTH_TIMEOUT_SECS is answered 429, and nothing else is lost.
#[tokio::test]
async fn posts_wait_their_turn_and_past_auth_timeout_get_429() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.client_pace = wsproxy::config::Pace::new(10, 2);
        c.auth_timeout = Duration::from_secs(1);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let path = format!("/agent/sse/{session}");
    let posts = (0..20).map(|i| {
        let path = path.clone();
        let addr = server.addr;
        tokio::spawn(async move {
            let body = format!("{{\"n\":{i}}}");
            let req = format!(
                "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer tok\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            request(addr, &req).await
        })
    });
    let mut ok = 0;
    let mut limited = 0;
    for answer in futures_util::future::join_all(posts).await {
        let (status, head, body) = answer.expect("the post's task");
        match status {
            200 => ok += 1,
            429 => {
                let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
                assert_eq!(body["error"], "rate_limited", "{body}");
                // When a retry would get a turn within the wait: whole
                // seconds, at least one.
                assert!(
                    head.lines()
                        .any(|l| l.eq_ignore_ascii_case("retry-after: 1")),
                    "{head}"
                );
                limited += 1;
            }
            other => panic!("status {other}: {body}"),
        }
    }
    // Two at once, then one every 100 ms for at most a second: about 12.
    assert!((2..=13).contains(&ok), "{ok} published, {limited} refused");
    assert!(limited >= 7, "{ok} published, {limited} refused");
    let mut published = sub.on_message();
    for _ in 0..ok {
        next_published(&mut published).await;
    }
    assert_eq!(server.metric("wsproxy_messages_up_total").await, ok as f64);
    assert_eq!(
        server
            .metric("wsproxy_session_posts_total{outcome=\"rate_limited\"}")
            .await,
        limited as f64
    );
}

#[tokio::test]
async fn a_held_client_is_not_cut_for_a_pong_that_waits_behind_its_messages() {
    // Reads held for longer than the ping timeout (one message each half
    // second, pings every half second, half a second to answer): the
    // client answers every ping at once, but its pongs sit in the socket
    // behind the messages it sent first.
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.ping_interval = Duration::from_millis(500);
        c.ping_timeout = Duration::from_millis(500);
        c.client_pace = wsproxy::config::Pace::new(2, 1);
    })
    .await;
    let session = unique("s");
    redis.set_token(&session, "tok", 60).await;
    let mut sub = redis.subscribe(&format!("session:{session}:up")).await;
    let ws = server.connect(&session, "tok").await;
    let (mut tx, mut rx) = ws.split();
    const HELD: usize = 8;
    for i in 0..HELD {
        within(
            WAIT,
            "sending",
            tx.feed(Message::text(format!("{{\"n\":{i}}}"))),
        )
        .await
        .expect("send");
    }
    within(WAIT, "flushing", tx.flush()).await.expect("flush");
    // Reading is what answers pings (tungstenite queues the pong and
    // sends it with the next read).
    let (texts, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(frame) = rx.next().await {
            match frame {
                Ok(Message::Text(t)) => {
                    let _ = texts.send(Ok(t.to_string()));
                }
                Ok(Message::Close(close)) => {
                    let _ = texts.send(Err(close.map(|c| u16::from(c.code))));
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let mut published = sub.on_message();
    for i in 0..HELD {
        assert_eq!(
            next_published(&mut published).await,
            format!("{{\"n\":{i}}}")
        );
    }
    // About 3.5 s of held reads, seven ping timeouts: still open.
    redis
        .publish(&format!("session:{session}:down"), r#"{"down":1}"#)
        .await;
    let down = within(WAIT, "the down message", received.recv()).await;
    assert_eq!(down, Some(Ok(r#"{"down":1}"#.to_string())));
    assert_eq!(
        server
            .metric("wsproxy_disconnects_total{reason=\"heartbeat_timeout\"}")
            .await,
        0.0
    );
    reader.abort();
}
