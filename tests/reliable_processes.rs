//! Reliable sessions (`wsproxy.v1`) across two real wsproxy processes on one
//! private Redis, one of which is SIGKILLed mid-stream (issue 13: "connections
//! of one session on different wsproxy processes all resume correctly; a
//! wsproxy process killed with SIGKILL loses nothing that was acknowledged or
//! published to history").
//!
//! In-process servers (tests/reliable.rs) cannot be killed like this:
//! aborting one leaves its connections' tasks running. Here both are child
//! processes of the built binary, and [`Wsproxy`] kills them on drop, on
//! failure too.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const TOKEN: &str = "processes-token";
/// Sessions, each with [`CLIENTS`] connections: even-numbered clients start
/// on A, odd-numbered ones on B.
const SESSIONS: usize = 3;
const CLIENTS: usize = 3;
/// Down messages `{"n":1..=DOWN}` per session, one round (a message to every
/// session) every [`PUBLISH_EVERY`].
const DOWN: u64 = 600;
const PUBLISH_EVERY: Duration = Duration::from_millis(4);
/// A is frozen and killed once this many rounds are published.
const KILL_AFTER: u64 = DOWN / 3;
/// Up messages per client (more when the burst runs past them), one every
/// [`SEND_EVERY`], at most [`WINDOW`] unacknowledged.
const UP: u64 = 200;
const SEND_EVERY: Duration = Duration::from_millis(8);
const WINDOW: usize = 4;
/// What each client on A sends just before A is frozen: never
/// acknowledged by A.
const BURST: u64 = 3;
/// How long Redis holds every command (CLIENT PAUSE) around the freeze.
const PAUSE: Duration = Duration::from_millis(300);
/// How long the clients may take, all told.
const RUN_LIMIT: Duration = Duration::from_secs(12);
// HISTORY_MAX_LEN is left at its default (1000): nothing is trimmed, so
// every resume must succeed.
const _: () = assert!(DOWN < 1000);

/// The configuration variables that would change the defaults (the list
/// in .ci/run), and the log filter.
const CONFIG_VARS: &[&str] = &[
    "HOST",
    "PORT",
    "REDIS_URL",
    "AUTH_TIMEOUT_SECS",
    "AUTH_GRACE_PERIOD_SECS",
    "WS_PING_INTERVAL_SECS",
    "WS_PING_TIMEOUT_SECS",
    "SHUTDOWN_GRACE_PERIOD_SECS",
    "WS_MAX_MESSAGE_BYTES",
    "WS_OUTBOUND_QUEUE",
    "MAX_CONNECTIONS",
    "LOG_FORMAT",
    "PUBSUB_ALLOW_ANONYMOUS",
    "PUBSUB_MAX_SUBSCRIPTIONS",
    "PUBSUB_MAX_PAYLOAD_BYTES",
    "JWT_SECRET",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "JWT_TTL_SECS",
    "USERS_FILE",
    "CORS_ALLOWED_ORIGINS",
    "ROUTES_FILE",
    "UPSTREAM_CA_FILE",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "WORKERS",
    "WS_ALLOWED_ORIGINS",
    "METRICS_TOKEN",
    "WS_TEST_ECHO",
    "RELIABLE_SESSIONS",
    "HISTORY_MAX_LEN",
    "HISTORY_TTL_SECS",
    "UP_STREAM_SHARDS",
    "UP_STREAM_MAX_LEN",
    "UP_DEDUPE_SECS",
    "RUST_LOG",
];

/// A wsproxy child process with reliable sessions on; SIGKILLed on drop.
struct Wsproxy {
    name: &'static str,
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Wsproxy {
    fn spawn(name: &'static str, redis: &Redis) -> Wsproxy {
        let port = free_port();
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{}-{name}.log", unique("wsproxy")));
        let out = std::fs::File::create(&log).expect("create the wsproxy log");
        let err = out.try_clone().expect("clone the log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsproxy"));
        // Where no .env file can interfere.
        cmd.current_dir(std::env::temp_dir());
        for var in CONFIG_VARS {
            cmd.env_remove(var);
        }
        let child = cmd
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("REDIS_URL", redis.url())
            .env("RELIABLE_SESSIONS", "true")
            .env("WS_ALLOWED_ORIGINS", "*")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the wsproxy binary");
        Wsproxy {
            name,
            child,
            port,
            log,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Waits until `/ready` answers 200 (Redis reachable, library loaded).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(self.addr(), "/ready").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("wsproxy {} exited at start-up: {status}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "wsproxy {} was not ready within {WAIT:?} (log: {})",
                self.name,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGSTOP: the process holds still (its sockets stay open, the kernel
    /// keeps taking bytes for it) until it is killed.
    fn freeze(&self) {
        let status = Command::new("kill")
            .arg("-STOP")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -STOP");
        assert!(status.success(), "kill -STOP {}: {status}", self.child.id());
    }

    /// SIGKILL (what `Child::kill` sends on Unix), and reaps it.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL wsproxy");
        self.child.wait().expect("reap wsproxy");
    }
}

impl Drop for Wsproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- last lines of wsproxy {} ({}):",
                self.name,
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A reliable connection to `port`, resuming from `resume` when given: the
/// socket and its welcome.
async fn connect(
    port: u16,
    session: &str,
    agent: &str,
    resume: Option<(&str, &str)>,
) -> (Ws, serde_json::Value) {
    let query = resume
        .map(|(epoch, offset)| format!("?epoch={epoch}&offset={offset}"))
        .unwrap_or_default();
    let mut req = format!("ws://127.0.0.1:{port}/{agent}/ws/{session}{query}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wsproxy.v1"),
    );
    let (mut ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("the upgrade answered in time")
        .expect("upgrade");
    assert!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .is_some_and(|v| v == "wsproxy.v1"),
        "wsproxy.v1 was not selected"
    );
    let welcome: serde_json::Value =
        serde_json::from_str(&next_text(&mut ws).await).expect("json welcome");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// What one client saw and did.
#[derive(Default)]
struct Log {
    name: String,
    started_on_a: bool,
    session: String,
    /// The `n` of every down message, in the order received.
    got: Vec<u64>,
    /// The id of every up message, in the order first sent, with its `k`.
    sent: Vec<(String, u64)>,
    /// id -> (acknowledged offset, `"duplicate":true`).
    acks: HashMap<String, (String, bool)>,
    /// Up messages sent again after the reconnect.
    resent: usize,
    /// The welcomes of its resumes.
    resumes: Vec<serde_json::Value>,
    /// What went wrong, when something did.
    failure: Option<String>,
}

struct ClientSpec {
    name: String,
    session: String,
    agent: String,
    on_a: bool,
    b_port: u16,
    burst: watch::Receiver<bool>,
    burst_sent: mpsc::Sender<()>,
    deadline: Instant,
}

fn up_frame(id: &str, k: u64) -> Message {
    Message::text(format!(
        r#"{{"type":"message","id":"{id}","data":{{"k":{k}}}}}"#
    ))
}

/// One reliable client: reads down messages, sends numbered up messages
/// (at most [`WINDOW`] unacknowledged) and, when its connection to A
/// ends, resumes on B from the last offset it saw and resends what was not
/// acknowledged, with the same ids. Returns once it has `{"n":DOWN}` and
/// every message it sent is acknowledged.
async fn run_client(mut ws: Ws, epoch: String, mut last: String, spec: ClientSpec) -> Log {
    let ClientSpec {
        name,
        session,
        agent,
        mut on_a,
        b_port,
        mut burst,
        burst_sent,
        deadline,
    } = spec;
    let mut log = Log {
        name: name.clone(),
        started_on_a: on_a,
        session: session.clone(),
        ..Log::default()
    };
    let mut next_k = 1u64;
    let mut pending: Vec<(String, u64)> = Vec::new();
    let mut burst_done = false;
    let mut tick = tokio::time::interval(SEND_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if log.got.last() == Some(&DOWN) && next_k > UP && pending.is_empty() {
            break;
        }
        let mut dropped = false;
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let m: serde_json::Value = match serde_json::from_str(text.as_str()) {
                        Ok(m) => m,
                        Err(e) => { log.failure = Some(format!("not JSON ({e}): {text}")); break; }
                    };
                    match m["type"].as_str() {
                        Some("message") => {
                            let (Some(n), Some(offset)) = (m["data"]["n"].as_u64(), m["offset"].as_str()) else {
                                log.failure = Some(format!("a message without n or offset: {m}"));
                                break;
                            };
                            log.got.push(n);
                            last = offset.to_owned();
                        }
                        Some("ack") => {
                            let id = m["id"].as_str().unwrap_or_default();
                            let Some(at) = pending.iter().position(|(p, _)| p == id) else {
                                log.failure = Some(format!("an ack for nothing pending: {m}"));
                                break;
                            };
                            pending.remove(at);
                            let offset = m["offset"].as_str().unwrap_or_default().to_owned();
                            let duplicate = m["duplicate"] == true;
                            if log.acks.insert(id.to_owned(), (offset, duplicate)).is_some() {
                                log.failure = Some(format!("acknowledged twice: {m}"));
                                break;
                            }
                        }
                        _ => { log.failure = Some(format!("unexpected frame: {m}")); break; }
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => dropped = true,
                Some(Ok(_)) => {}
            },
            _ = tick.tick(), if next_k <= UP && pending.len() < WINDOW => {
                let (id, k) = (format!("{agent}-{next_k}"), next_k);
                next_k += 1;
                pending.push((id.clone(), k));
                log.sent.push((id.clone(), k));
                dropped = ws.send(up_frame(&id, k)).await.is_err();
            }
            changed = burst.changed(), if on_a && !burst_done => {
                burst_done = true;
                if changed.is_ok() {
                    // Redis is paused and A about to be frozen: none of
                    // these can be acknowledged by A.
                    for _ in 0..BURST {
                        let id = format!("{agent}-{next_k}");
                        pending.push((id.clone(), next_k));
                        log.sent.push((id.clone(), next_k));
                        if ws.send(up_frame(&id, next_k)).await.is_err() {
                            dropped = true;
                        }
                        next_k += 1;
                    }
                    let _ = burst_sent.send(()).await;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                log.failure = Some(format!(
                    "not done after {RUN_LIMIT:?}: last n {:?}, {} pending", log.got.last(), pending.len()
                ));
                break;
            }
        }
        if !dropped {
            continue;
        }
        if !on_a {
            log.failure = Some("its connection to B (never killed) ended".into());
            break;
        }
        // A is gone: resume on B from the last offset seen, then resend
        // what A did not acknowledge, with the same ids.
        on_a = false;
        let (resumed, welcome) = connect(b_port, &session, &agent, Some((&epoch, &last))).await;
        ws = resumed;
        if welcome["resumed"] != true || welcome["epoch"] != epoch.as_str() {
            log.failure = Some(format!("the resume on B failed: {welcome}"));
            break;
        }
        log.resumes.push(welcome);
        for (id, k) in &pending {
            log.resent += 1;
            if ws.send(up_frame(id, *k)).await.is_err() {
                log.failure = Some("could not resend to B".into());
                break;
            }
        }
        if log.failure.is_some() {
            break;
        }
    }
    let _ = ws.close(None).await;
    log
}

/// Publishes `{"n":round}` to every session, one round every
/// [`PUBLISH_EVERY`], counting the rounds done in `rounds`.
async fn publish_rounds(
    mut c: redis::aio::MultiplexedConnection,
    sessions: Vec<String>,
    rounds: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for round in 1..=DOWN {
        tick.tick().await;
        for session in &sessions {
            let _: String = redis::cmd("FCALL")
                .arg("wsproxy_publish")
                .arg(1)
                .arg(format!("session:{session}:history"))
                .arg(format!(r#"{{"n":{round}}}"#))
                .query_async(&mut c)
                .await
                .expect("FCALL wsproxy_publish");
        }
        rounds.store(round, Ordering::SeqCst);
    }
}

/// What is wrong with a down sequence that should be `1..=DOWN`.
fn describe_down(got: &[u64]) -> String {
    let mut count = vec![0u32; DOWN as usize + 1];
    let mut out_of_order = 0;
    let mut prev = 0;
    for &n in got {
        if let Some(c) = count.get_mut(n as usize) {
            *c += 1;
        }
        if n < prev {
            out_of_order += 1;
        }
        prev = n;
    }
    let missing: Vec<u64> = (1..=DOWN).filter(|&n| count[n as usize] == 0).collect();
    let twice: Vec<u64> = (1..=DOWN).filter(|&n| count[n as usize] > 1).collect();
    format!(
        "{} received; missing {:?}; more than once {:?}; {out_of_order} out of order",
        got.len(),
        &missing[..missing.len().min(20)],
        &twice[..twice.len().min(20)]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_process_loses_nothing_acknowledged_or_published() {
    let started = Instant::now();
    let redis = Redis::start().await;
    let mut a = Wsproxy::spawn("a", &redis);
    let mut b = Wsproxy::spawn("b", &redis);
    a.wait_ready().await;
    b.wait_ready().await;
    let sessions: Vec<String> = (0..SESSIONS).map(|_| unique("s")).collect();
    for session in &sessions {
        redis.set_token(session, TOKEN, 600).await;
    }

    // Every client connects before anything is published, so each must
    // get every message from 1.
    let (burst_go, burst_go_rx) = watch::channel(false);
    let (burst_sent_tx, mut burst_rx) = mpsc::channel(SESSIONS * CLIENTS);
    let deadline = Instant::now() + RUN_LIMIT;
    let mut clients = Vec::new();
    let mut on_a_count = 0;
    for (s, session) in sessions.iter().enumerate() {
        let mut session_epoch: Option<String> = None;
        for c in 0..CLIENTS {
            let on_a = c % 2 == 0;
            on_a_count += usize::from(on_a);
            let agent = format!("s{s}c{c}");
            let port = if on_a { a.port } else { b.port };
            let (ws, welcome) = connect(port, session, &agent, None).await;
            let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
            let last = welcome["offset"].as_str().expect("offset").to_owned();
            // Both processes see the one history.
            let first = session_epoch.get_or_insert_with(|| epoch.clone());
            assert_eq!(*first, epoch, "one session, one epoch on A and B");
            let spec = ClientSpec {
                name: format!("{agent} (started on {})", if on_a { "A" } else { "B" }),
                session: session.clone(),
                agent,
                on_a,
                b_port: b.port,
                burst: burst_go_rx.clone(),
                burst_sent: burst_sent_tx.clone(),
                deadline,
            };
            clients.push(tokio::spawn(run_client(ws, epoch, last, spec)));
        }
    }
    drop(burst_sent_tx);

    let rounds = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish_rounds(
        redis.conn().await,
        sessions.clone(),
        rounds.clone(),
    ));

    // Mid-stream, with every kind of up message in flight on A:
    // - Redis holds all commands for a moment (CLIENT PAUSE); every client
    //   on A sends a burst, and A forwards the first message it has not
    //   stored of each connection (its handler is sequential) into Redis'
    //   input, where it waits;
    // - A is frozen (SIGSTOP): the rest of each burst stays unread;
    // - Redis goes on: it stores the forwarded messages, whose acks A
    //   never sends, and publishing resumes: A holds what it receives and
    //   delivers nothing;
    // - A is SIGKILLed.
    let kill_deadline = Instant::now() + WAIT;
    while rounds.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(Instant::now() < kill_deadline, "publishing stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = redis.conn().await;
    let paused = Instant::now();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(PAUSE.as_millis() as u64)
        .arg("ALL")
        .query_async(&mut c)
        .await
        .expect("CLIENT PAUSE");
    burst_go.send(true).expect("clients listening");
    for _ in 0..on_a_count {
        tokio::time::timeout(WAIT, burst_rx.recv())
            .await
            .expect("every client on A sent its burst")
            .expect("burst channel open");
    }
    // Time for A to read the first of each burst and send it to Redis.
    tokio::time::sleep(PAUSE / 2).await;
    a.freeze();
    tokio::time::sleep_until(paused + PAUSE + Duration::from_millis(150)).await;
    let killed_at = rounds.load(Ordering::SeqCst);
    a.kill();

    within(RUN_LIMIT + WAIT, "the publisher's end", publisher)
        .await
        .expect("publisher");
    let mut logs = Vec::new();
    for client in clients {
        // Each ends by its deadline (RUN_LIMIT from the start) or sooner.
        logs.push(
            within(RUN_LIMIT + WAIT, "a client's end", client)
                .await
                .expect("client task"),
        );
    }

    // Down: every message published reached every client exactly once
    // and in order, across the kill and the resume.
    let expected: Vec<u64> = (1..=DOWN).collect();
    for log in &logs {
        assert!(log.failure.is_none(), "{}: {:?}", log.name, log.failure);
        assert!(
            log.got == expected,
            "{}: {}",
            log.name,
            describe_down(&log.got)
        );
    }

    // Up: every message sent (acknowledged by A, stored by A without the
    // ack getting out, or never reaching Redis) was resent until
    // acknowledged, and is in wsproxy:up:0 exactly once, at the offset its
    // ack named, in the client's order.
    let mut c = redis.conn().await;
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("wsproxy:up:0")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE wsproxy:up:0");
    let mut stored: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
    let mut order: HashMap<(String, String), Vec<u64>> = HashMap::new();
    for (entry, fields) in &entries {
        let (session, id, data) = (&fields["session"], &fields["id"], &fields["data"]);
        stored
            .entry((session.clone(), id.clone()))
            .or_default()
            .push((entry.clone(), data.clone()));
        let agent = &fields["agent"];
        let k: serde_json::Value = serde_json::from_str(data).expect("stored JSON");
        order
            .entry((session.clone(), agent.clone()))
            .or_default()
            .push(k["k"].as_u64().expect("k"));
    }
    let mut total_sent = 0;
    let (mut resent, mut duplicates) = (0, 0);
    for log in &logs {
        total_sent += log.sent.len();
        resent += log.resent;
        for (id, k) in &log.sent {
            let (offset, duplicate) = log
                .acks
                .get(id)
                .unwrap_or_else(|| panic!("{}: {id} never acknowledged", log.name));
            duplicates += usize::from(*duplicate);
            let copies = stored
                .get(&(log.session.clone(), id.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert_eq!(
                copies.len(),
                1,
                "{}: {id} stored {} times (acked at {offset}): {copies:?}",
                log.name,
                copies.len()
            );
            assert_eq!(
                &copies[0].0, offset,
                "{}: {id}'s ack named another entry",
                log.name
            );
            assert_eq!(copies[0].1, format!(r#"{{"k":{k}}}"#), "{}: {id}", log.name);
        }
        let agent = log
            .sent
            .first()
            .map(|(id, _)| id.rsplit_once('-').expect("id").0);
        if let Some(agent) = agent {
            let ks = &order[&(log.session.clone(), agent.to_owned())];
            assert!(
                ks.windows(2).all(|w| w[0] < w[1]),
                "{}: stored out of order: {ks:?}",
                log.name
            );
        }
        if log.started_on_a {
            assert_eq!(log.resumes.len(), 1, "{}: resumed once on B", log.name);
            assert!(
                log.resent >= BURST as usize,
                "{}: resent {} (at least the burst A never acknowledged)",
                log.name,
                log.resent
            );
            // The message A forwarded to the paused Redis was stored, its
            // ack lost with A: the resend is acknowledged as a duplicate.
            assert!(
                log.acks.values().any(|(_, duplicate)| *duplicate),
                "{}: no resend was already stored (did A forward one before the freeze?)",
                log.name
            );
        } else {
            assert!(log.resumes.is_empty(), "{}: never dropped", log.name);
        }
    }
    assert_eq!(entries.len(), total_sent, "entries nobody sent");

    eprintln!(
        "{} clients on {SESSIONS} sessions, {DOWN} down messages each; A SIGKILLed after \
         round {killed_at}; {total_sent} up messages stored once each, {resent} resent to B \
         ({duplicates} of them already stored by A); {:.1} s",
        logs.len(),
        started.elapsed().as_secs_f64()
    );
}
