//! The session client against a real wsproxy: a private `redis-server` per
//! test on a free port, wsproxy in-process on 127.0.0.1, and, where a test
//! must break the client's connection, a TCP relay in between that can cut
//! it or hold back one direction.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wsproxy::config::Config;
use wsproxy_client::{
    ConnectionState, Error, Mode, Offset, Payload, ReconnectPolicy, Resume, ResumeFailure, Sent,
    SessionClient, SessionEvent, SessionEvents, SessionMessage,
};

/// How long a test waits for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);

const TOKEN: &str = "session-token";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A private redis-server; killed on drop.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (Debian: apt-get install redis-server)");
        let redis = Redis { port, child };
        for _ in 0..200 {
            if let Ok(client) = redis::Client::open(redis.url())
                && client.get_multiplexed_async_connection().await.is_ok()
            {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on port {port} did not come up");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// What the backend does to let a client in.
    async fn set_token(&self, session: &str, token: &str) {
        let _: () = redis::cmd("SETEX")
            .arg(format!("session:{session}:auth"))
            .arg(600)
            .arg(token)
            .query_async(&mut self.conn().await)
            .await
            .expect("SETEX");
    }

    async fn publish(&self, channel: &str, payload: &[u8]) {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.conn().await)
            .await
            .expect("PUBLISH");
    }

    async fn subscribe(&self, channel: &str) -> redis::aio::PubSub {
        let mut p = redis::Client::open(self.url())
            .expect("valid url")
            .get_async_pubsub()
            .await
            .expect("pubsub connect");
        p.subscribe(channel).await.expect("SUBSCRIBE");
        p
    }

    /// The client ids stored in a client-message stream, oldest first,
    /// with each entry's id and data.
    async fn up_entries(&self, stream: &str) -> Vec<(String, String, String)> {
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let entries: Entries = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn().await)
            .await
            .expect("XRANGE");
        entries
            .into_iter()
            .map(|(entry, fields)| {
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                (entry, field("id"), field("data"))
            })
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `FCALL wsproxy_publish`, the backend's publish in reliable mode: the
/// message's offset.
async fn publish_reliable(
    c: &mut redis::aio::MultiplexedConnection,
    session: &str,
    payload: &str,
) -> Offset {
    let offset: String = redis::cmd("FCALL")
        .arg("wsproxy_publish")
        .arg(1)
        .arg(format!("session:{session}:history"))
        .arg(payload)
        .query_async(c)
        .await
        .expect("FCALL wsproxy_publish");
    offset.parse().expect("an offset")
}

fn n(i: u64) -> String {
    format!(r#"{{"n":{i}}}"#)
}

/// wsproxy running in-process.
struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), wsproxy::server::ServerError>>,
}

impl Server {
    async fn start(config: Config) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(config, listener).await
    }

    async fn start_on(config: Config, listener: TcpListener) -> Server {
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(wsproxy::run(config, listener, shutdown.clone()));
        let server = Server {
            addr,
            shutdown,
            task,
        };
        // Ready means Redis answers and, with reliable sessions on, the
        // wsproxy Redis library is loaded: before that FCALL fails.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !matches!(http_get(addr, "/ready").await, Ok(200)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "wsproxy did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("run returned within the grace period")
            .expect("no panic")
            .expect("run ok");
    }

    /// Stops it and starts it again on the same address.
    async fn restart(self, config: Config) -> Server {
        let addr = self.addr;
        self.stop().await;
        let listener = TcpListener::bind(addr).await.expect("rebind the same port");
        Server::start_on(config, listener).await
    }
}

/// Status of a plain HTTP/1.1 GET.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut raw)).await??;
    String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad response"))
}

fn config(redis: &Redis, reliable: bool) -> Config {
    let mut config = Config::for_redis(redis.url());
    config.reliable.enabled = reliable;
    config.shutdown_grace_period = Duration::from_secs(1);
    config
}

/// A unique id per call, so tests never share sessions.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn fast() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        max_attempts: None,
    }
}

async fn next_event(events: &mut SessionEvents) -> SessionEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event within the wait")
        .expect("the client is open")
}

/// Skips failed reconnection attempts (`Error` events).
async fn next_significant(events: &mut SessionEvents) -> SessionEvent {
    loop {
        match next_event(events).await {
            SessionEvent::Error(e) => eprintln!("(reconnection attempt: {e})"),
            other => return other,
        }
    }
}

async fn next_message(events: &mut SessionEvents) -> SessionMessage {
    match next_significant(events).await {
        SessionEvent::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The `n` of a `{"n":...}` message.
fn number(m: &SessionMessage) -> u64 {
    m.json::<serde_json::Value>().expect("json")["n"]
        .as_u64()
        .expect("n")
}

/// A TCP relay in front of wsproxy: it can cut every connection through it,
/// or hold back what flows in one direction (bytes it holds when it cuts
/// are dropped, as a dying network would).
struct Relay {
    addr: SocketAddr,
    /// Bumped to cut the connections open now.
    cut: watch::Sender<u64>,
    /// Client to server held back.
    hold_up: watch::Sender<bool>,
    /// Server to client held back.
    hold_down: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (cut, _) = watch::channel(0u64);
        let (hold_up, _) = watch::channel(false);
        let (hold_down, _) = watch::channel(false);
        let (cut_rx, up_rx, down_rx) =
            (cut.subscribe(), hold_up.subscribe(), hold_down.subscribe());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (cut, up, down) = (cut_rx.clone(), up_rx.clone(), down_rx.clone());
                tokio::spawn(relay_one(client, target, cut, up, down));
            }
        });
        Relay {
            addr,
            cut,
            hold_up,
            hold_down,
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_one(
    client: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<u64>,
    up: watch::Receiver<bool>,
    down: watch::Receiver<bool>,
) {
    let generation = *cut.borrow_and_update();
    let Ok(server) = TcpStream::connect(target).await else {
        return; // wsproxy is down: the client sees the connection close.
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let pumps = futures_util::future::join(
        pump(client_read, server_write, up, cut.clone(), generation),
        pump(server_read, client_write, down, cut.clone(), generation),
    );
    tokio::select! {
        // A cut wins over anything that became ready with it.
        biased;
        _ = cut.changed() => {}
        _ = pumps => {}
    }
    // Dropping both sockets closes them.
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: watch::Receiver<bool>,
    cut: watch::Receiver<u64>,
    generation: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hold.wait_for(|held| !*held).await.is_err() || *cut.borrow() != generation {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mode_carries_the_seeds_frames_both_ways_and_reconnects() {
    let redis = Redis::start().await;
    // Reliable sessions on: a plain client is not affected.
    let server = Server::start(config(&redis, true)).await;
    let relay = Relay::start(server.addr).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;

    // A wrong token is refused, not retried.
    match SessionClient::connect(&server.url(), "agent-1", &session, "wrong", Mode::Plain).await {
        Err(e @ Error::Rejected { status: 403, .. }) => assert!(e.is_auth_failure()),
        other => panic!("expected a 403, got {other:?}"),
    }

    let (client, mut events) = SessionClient::builder(relay.url(), "agent-1", &session, TOKEN)
        .reconnect(fast())
        .connect()
        .await
        .expect("connect");
    assert_eq!(client.mode(), Mode::Plain);
    assert_eq!(client.position(), None);
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { welcome: None }
    ));

    // Down: what the backend publishes, unchanged; not UTF-8 as binary.
    let down = format!("session:{session}:down");
    redis
        .publish(&down, br#"{"type":"data","payload":"Message #1"}"#)
        .await;
    let m = next_message(&mut events).await;
    assert_eq!(
        (m.offset, m.text()),
        (None, Some(r#"{"type":"data","payload":"Message #1"}"#))
    );
    redis.publish(&down, b"not json at all").await;
    assert_eq!(
        next_message(&mut events).await.text(),
        Some("not json at all")
    );
    redis.publish(&down, b"\xff\xfe").await;
    assert_eq!(
        next_message(&mut events).await.payload,
        Payload::Binary(bytes::Bytes::from_static(b"\xff\xfe"))
    );

    // Up: JSON text, published as it is on session:{id}:up.
    let mut up = redis.subscribe(&format!("session:{session}:up")).await;
    let mut up = up.on_message();
    let ping =
        serde_json::json!({"type": "ping", "counter": 1, "timestamp": "2025-01-15T12:00:00Z"});
    assert_eq!(client.send(&ping).await.expect("send"), Sent::Written);
    let published = tokio::time::timeout(WAIT, up.next())
        .await
        .expect("published in time")
        .expect("subscribed");
    let published: String = published.get_payload().expect("utf-8");
    assert_eq!(published, serde_json::to_string(&ping).expect("json"));

    // The backend rotates the token; the client reconnects with the new one.
    let renewed = "renewed-token";
    redis.set_token(&session, renewed).await;
    client.set_token(renewed).expect("a valid token");
    relay.cut();
    assert!(matches!(
        next_significant(&mut events).await,
        SessionEvent::Disconnected(_)
    ));
    assert!(matches!(
        next_significant(&mut events).await,
        SessionEvent::Connected { welcome: None }
    ));
    client.wait_connected(WAIT).await.expect("connected");
    redis.publish(&down, b"after the reconnection").await;
    assert_eq!(
        next_message(&mut events).await.text(),
        Some("after the reconnection")
    );
    client.send(&2).await.expect("send after reconnecting");
    let published = tokio::time::timeout(WAIT, up.next())
        .await
        .expect("published in time")
        .expect("subscribed");
    assert_eq!(published.get_payload::<String>().expect("utf-8"), "2");

    client.close().await.expect("close");
    assert_eq!(client.connection_state(), ConnectionState::Closed);
    assert!(matches!(client.send(&1).await, Err(Error::Closed)));
    drop(up);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_mode_delivers_messages_with_their_offsets_in_order() {
    let redis = Redis::start().await;
    let server = Server::start(config(&redis, true)).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    let mut c = redis.conn().await;
    // Published before the client joins: history it does not get.
    publish_reliable(&mut c, &session, &n(0)).await;

    let (client, mut events) =
        SessionClient::connect(&server.url(), "agent-1", &session, TOKEN, Mode::Reliable)
            .await
            .expect("connect");
    let welcome = match next_event(&mut events).await {
        SessionEvent::Connected {
            welcome: Some(welcome),
        } => welcome,
        other => panic!("expected a welcome, got {other:?}"),
    };
    assert_eq!(welcome.resume, Resume::Fresh);
    assert_eq!(welcome.session_id, session);
    assert!(welcome.offset > Offset::ZERO, "{welcome:?}");
    let position = client.position().expect("a position");
    assert_eq!(
        (position.epoch.as_str(), position.offset),
        (welcome.epoch.as_str(), welcome.offset)
    );

    let mut offsets = Vec::new();
    for i in 1..=50 {
        offsets.push(publish_reliable(&mut c, &session, &n(i)).await);
    }
    // A plain PUBLISH is not part of the history and does not reach it.
    redis
        .publish(&format!("session:{session}:down"), b"plain only")
        .await;
    publish_reliable(&mut c, &session, r#"{"last":true}"#).await;
    for (i, offset) in (1..=50).zip(&offsets) {
        let m = next_message(&mut events).await;
        assert_eq!((number(&m), m.offset), (i, Some(*offset)));
    }
    let last = next_message(&mut events).await;
    assert_eq!(last.text(), Some(r#"{"last":true}"#));
    assert!(last.offset > offsets.last().copied());
    assert_eq!(
        client.position().expect("position").offset,
        last.offset.expect("offset")
    );
    client.close().await.expect("close");
    // The events end with the client.
    let end = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("ends");
    assert!(end.is_none(), "unexpected {end:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_with_no_loss_and_no_duplicate_while_publishing_goes_on() {
    let redis = Redis::start().await;
    let mut server_config = config(&redis, true);
    // Room for everything: this test is about resuming, not trimming.
    server_config.reliable.history_max_len = 100_000;
    let mut server = Server::start(server_config.clone()).await;
    let relay = Relay::start(server.addr).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    let (client, mut events) = SessionClient::builder(relay.url(), "agent-1", &session, TOKEN)
        .reliable()
        .reconnect(fast())
        .connect()
        .await
        .expect("connect");
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { welcome: Some(_) }
    ));

    // The backend publishes without pause until told to stop, and returns
    // every offset in publish order.
    let stop = CancellationToken::new();
    let publisher = {
        let stop = stop.clone();
        let mut c = redis.conn().await;
        let session = session.clone();
        tokio::spawn(async move {
            let mut offsets = Vec::new();
            let mut i = 1;
            while !stop.is_cancelled() {
                offsets.push(publish_reliable(&mut c, &session, &n(i)).await);
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            offsets
        })
    };

    // 1. After 100 messages the client's TCP connection dies; 2. 200
    // messages after it resumed, wsproxy restarts (the client is away for
    // a while); 3. 100 messages after that resume, publishing stops.
    enum Phase {
        Cut { at: usize },
        Restart { at: usize },
        Resumed,
        Stop { at: usize },
        Drain { total: usize },
    }
    let mut phase = Phase::Cut { at: 100 };
    let mut got: Vec<(u64, Offset)> = Vec::new();
    let (mut disconnects, mut resumes, mut replayed) = (0, 0, 0);
    let mut publisher = Some(publisher);
    let published = loop {
        match next_significant(&mut events).await {
            SessionEvent::Message(m) => got.push((number(&m), m.offset.expect("an offset"))),
            SessionEvent::Disconnected(_) => disconnects += 1,
            SessionEvent::Connected { welcome } => {
                match welcome.expect("a welcome").resume {
                    Resume::Resumed { replayed: r } => replayed += r,
                    other => panic!("expected a resume, got {other:?}"),
                }
                resumes += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
        if let Some((_, offset)) = got.last() {
            // Never behind what it delivered.
            assert!(client.position().expect("position").offset >= *offset);
        }
        let seen = got.len();
        phase = match phase {
            Phase::Cut { at } if seen >= at => {
                relay.cut();
                Phase::Restart { at: usize::MAX }
            }
            Phase::Restart { at: usize::MAX } if resumes == 1 => Phase::Restart { at: seen + 200 },
            Phase::Restart { at } if seen >= at => {
                server = server.restart(server_config.clone()).await;
                Phase::Resumed
            }
            Phase::Resumed if resumes == 2 => Phase::Stop { at: seen + 100 },
            Phase::Stop { at } if seen >= at => {
                stop.cancel();
                let publisher = publisher.take().expect("once");
                let total = publisher.await.expect("publisher").len();
                if seen >= total {
                    break total;
                }
                Phase::Drain { total }
            }
            Phase::Drain { total } if seen >= total => break total,
            unchanged => unchanged,
        };
    };
    assert_eq!(got.len(), published, "lost or duplicated");
    assert!(
        disconnects >= 2 && resumes >= 2,
        "{disconnects} disconnects, {resumes} resumes"
    );
    assert!(
        replayed > 0,
        "the restart made the client miss some messages"
    );
    let numbers: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    let expected: Vec<u64> = (1..=published as u64).collect();
    assert_eq!(numbers, expected, "lost, duplicated or out of order");
    let mut c = redis.conn().await;
    // The offsets are the history's, in order.
    let history: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("session:{session}:history"))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE");
    let history: Vec<Offset> = history
        .iter()
        .map(|(id, _)| id.parse().expect("offset"))
        .collect();
    let offsets: Vec<Offset> = got.iter().map(|(_, o)| *o).collect();
    assert_eq!(offsets, history);
    // Nothing more arrives.
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        panic!("unexpected {event:?}");
    }
    client.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_cannot_be_honoured_is_reported_and_delivery_goes_on() {
    let redis = Redis::start().await;
    let mut server_config = config(&redis, true);
    server_config.reliable.history_max_len = 10;
    let server = Server::start(server_config.clone()).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    let (client, mut events) = SessionClient::builder(server.url(), "agent-1", &session, TOKEN)
        .reliable()
        .reconnect(fast())
        .connect()
        .await
        .expect("connect");
    let epoch = match next_event(&mut events).await {
        SessionEvent::Connected {
            welcome: Some(welcome),
        } => welcome.epoch,
        other => panic!("{other:?}"),
    };
    let mut c = redis.conn().await;
    for i in 1..=3 {
        publish_reliable(&mut c, &session, &n(i)).await;
    }
    let mut seen = Offset::ZERO;
    for i in 1..=3 {
        let m = next_message(&mut events).await;
        assert_eq!(number(&m), i);
        seen = m.offset.expect("offset");
    }

    // wsproxy goes away; 500 messages are published meanwhile, more than
    // the history keeps.
    let addr = server.addr;
    server.stop().await;
    match next_significant(&mut events).await {
        SessionEvent::Disconnected(Error::ServerClosed { code: 1001, .. }) => {}
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    assert_eq!(client.connection_state(), ConnectionState::Reconnecting);
    let mut newest = seen;
    for i in 4..=503 {
        newest = publish_reliable(&mut c, &session, &n(i)).await;
    }
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let server = Server::start_on(server_config, listener).await;

    match next_significant(&mut events).await {
        SessionEvent::Connected {
            welcome: Some(welcome),
        } => assert_eq!(welcome.resume, Resume::Failed(ResumeFailure::Trimmed)),
        other => panic!("expected the welcome, got {other:?}"),
    }
    match next_significant(&mut events).await {
        SessionEvent::ResumeFailed(failed) => {
            assert_eq!(failed.reason, ResumeFailure::Trimmed);
            assert_eq!(failed.from.epoch, epoch);
            assert_eq!(failed.from.offset, seen);
            assert_eq!(failed.now.offset, newest);
        }
        other => panic!("expected ResumeFailed, got {other:?}"),
    }
    // It goes on from the welcome's offset: the next message is the next
    // one published, none of the lost ones.
    let next = publish_reliable(&mut c, &session, &n(504)).await;
    let m = next_message(&mut events).await;
    assert_eq!((number(&m), m.offset), (504, Some(next)));
    assert_eq!(client.position().expect("position").offset, next);
    client.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_acknowledged_and_unacknowledged_ones_are_resent_and_stored_once() {
    let redis = Redis::start().await;
    let server = Server::start(config(&redis, true)).await;
    let relay = Relay::start(server.addr).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    let (client, mut events) = SessionClient::builder(relay.url(), "agent-7", &session, TOKEN)
        .reliable()
        .reconnect(fast())
        .max_unacked(5)
        .connect()
        .await
        .expect("connect");
    // The events are read on their own, as an application would.
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            seen.push(format!("{event:?}"));
        }
        seen
    });
    let stream = "wsproxy:up:0";

    let ack = match client.send(&serde_json::json!({"text": "hi"})).await {
        Ok(Sent::Stored(ack)) => ack,
        other => panic!("expected an ack, got {other:?}"),
    };
    assert!(!ack.duplicate);
    assert_eq!(
        redis.up_entries(stream).await,
        vec![(
            ack.offset.to_string(),
            ack.id.clone(),
            r#"{"text":"hi"}"#.to_owned()
        )]
    );
    // The caller's own id; the same id again is acknowledged, not stored.
    let first = client.send_with_id("order-1", &1).await.expect("send");
    let again = client.send_with_id("order-1", &1).await.expect("resend");
    let (first, again) = (first.ack().expect("ack"), again.ack().expect("ack"));
    assert_eq!((first.duplicate, again.duplicate), (false, true));
    assert_eq!(first.offset, again.offset);
    assert!(matches!(
        client.send_with_id("a:b", &1).await,
        Err(Error::InvalidArgument { .. })
    ));

    // Stored, but their acknowledgements are lost: the server's answers
    // are held back.
    let _ = relay.hold_down.send(true);
    let mut lost_acks = Vec::new();
    for i in 0..3 {
        lost_acks.push(
            client
                .enqueue(&serde_json::json!({"a": i}))
                .await
                .expect("queued"),
        );
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis.up_entries(stream).await.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Never reaching the server: the client's frames are held back too.
    let _ = relay.hold_up.send(true);
    let mut never_arrived = Vec::new();
    for i in 0..2 {
        never_arrived.push(
            client
                .enqueue(&serde_json::json!({"b": i}))
                .await
                .expect("queued"),
        );
    }
    assert_eq!(client.unacknowledged(), 5);
    // The window is full: refused at once, nothing sent.
    assert!(matches!(
        client.enqueue(&"one too many").await,
        Err(Error::QueueFull)
    ));
    assert!(matches!(
        client.send(&"one too many").await,
        Err(Error::QueueFull)
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(redis.up_entries(stream).await.len(), 5);

    // The connection dies with all five unanswered.
    relay.cut();
    let _ = relay.hold_up.send(false);
    let _ = relay.hold_down.send(false);
    let mut ids = vec![ack.id.clone(), "order-1".to_owned()];
    for queued in lost_acks {
        ids.push(queued.id().expect("an id").to_owned());
        let sent = tokio::time::timeout(WAIT, queued).await.expect("answered");
        let ack = sent.expect("stored").ack().cloned().expect("ack");
        assert!(ack.duplicate, "stored before, acknowledged now: {ack:?}");
    }
    for queued in never_arrived {
        ids.push(queued.id().expect("an id").to_owned());
        let sent = tokio::time::timeout(WAIT, queued).await.expect("answered");
        let ack = sent.expect("stored").ack().cloned().expect("ack");
        assert!(!ack.duplicate, "stored for the first time: {ack:?}");
    }
    assert_eq!(client.unacknowledged(), 0);
    // Each id once, in the order the messages were given.
    let entries = redis.up_entries(stream).await;
    let stored: Vec<&str> = entries.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(stored, ids);
    let data: Vec<&str> = entries[2..].iter().map(|(_, _, d)| d.as_str()).collect();
    assert_eq!(
        data,
        [
            r#"{"a":0}"#,
            r#"{"a":1}"#,
            r#"{"a":2}"#,
            r#"{"b":0}"#,
            r#"{"b":1}"#
        ]
    );

    client.close().await.expect("close");
    let seen = reader.await.expect("reader");
    assert!(
        seen.iter().any(|e| e.starts_with("Disconnected")),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|e| e.starts_with("Connected")).count(),
        2,
        "{seen:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redis_could_not_take_fails_with_not_stored() {
    let redis = Redis::start().await;
    let mut server_config = config(&redis, true);
    server_config.auth_timeout = Duration::from_secs(2);
    let server = Server::start(server_config).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    let (client, mut events) =
        SessionClient::connect(&server.url(), "agent-1", &session, TOKEN, Mode::Reliable)
            .await
            .expect("connect");
    next_event(&mut events).await;
    // Redis refuses the store while the connection stays up (killing Redis
    // would close every reliable connection with 1013 first): the library
    // is gone until wsproxy loads it again.
    let mut c = redis.conn().await;
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("wsproxy")
        .query_async(&mut c)
        .await
        .expect("FUNCTION DELETE");
    match client
        .send_with_id("m-1", &serde_json::json!({"x": 1}))
        .await
    {
        Err(e @ Error::NotStored { .. }) => {
            assert!(
                matches!(&e, Error::NotStored { id, .. } if id == "m-1"),
                "{e}"
            );
        }
        other => panic!("expected NotStored, got {other:?}"),
    }
    // Answered, so no longer held.
    assert_eq!(client.unacknowledged(), 0);
    client.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_mode_against_a_server_without_it_fails_with_reliable_unavailable() {
    let redis = Redis::start().await;
    let server = Server::start(config(&redis, false)).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    match SessionClient::connect(&server.url(), "agent-1", &session, TOKEN, Mode::Reliable).await {
        Err(e @ Error::ReliableUnavailable) => {
            assert!(e.to_string().contains("RELIABLE_SESSIONS"), "{e}");
        }
        other => panic!("expected ReliableUnavailable, got {other:?}"),
    }
    // The same session in plain mode works.
    let (client, mut events) =
        SessionClient::connect(&server.url(), "agent-1", &session, TOKEN, Mode::Plain)
            .await
            .expect("plain connect");
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Connected { welcome: None }
    ));
    client.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_kept_by_the_application_resumes_a_new_client() {
    let redis = Redis::start().await;
    let server = Server::start(config(&redis, true)).await;
    let session = unique("s");
    redis.set_token(&session, TOKEN).await;
    let mut c = redis.conn().await;
    let (client, mut events) =
        SessionClient::connect(&server.url(), "agent-1", &session, TOKEN, Mode::Reliable)
            .await
            .expect("connect");
    next_event(&mut events).await;
    publish_reliable(&mut c, &session, &n(1)).await;
    next_message(&mut events).await;
    let kept = serde_json::to_string(&client.position().expect("position")).expect("json");
    client.close().await.expect("close");

    for i in 2..=4 {
        publish_reliable(&mut c, &session, &n(i)).await;
    }
    let position = serde_json::from_str(&kept).expect("a position");
    let (client, mut events) = SessionClient::builder(server.url(), "agent-1", &session, TOKEN)
        .reliable()
        .resume_from(position)
        .connect()
        .await
        .expect("connect");
    match next_event(&mut events).await {
        SessionEvent::Connected {
            welcome: Some(welcome),
        } => assert_eq!(welcome.resume, Resume::Resumed { replayed: 3 }),
        other => panic!("{other:?}"),
    }
    for i in 2..=4 {
        assert_eq!(number(&next_message(&mut events).await), i);
    }
    client.close().await.expect("close");

    // A position from nowhere: reported, never silently skipped.
    let bogus = wsproxy_client::Position {
        epoch: "1".into(),
        offset: Offset::new(1, 0),
    };
    let (client, mut events) = SessionClient::builder(server.url(), "agent-1", &session, TOKEN)
        .reliable()
        .resume_from(bogus.clone())
        .connect()
        .await
        .expect("connect");
    next_event(&mut events).await;
    match next_event(&mut events).await {
        SessionEvent::ResumeFailed(failed) => {
            assert_eq!(
                (failed.reason, failed.from),
                (ResumeFailure::EpochChanged, bogus)
            );
        }
        other => panic!("{other:?}"),
    }
    client.close().await.expect("close");
    server.stop().await;
}

/// A backend's `disconnect` through `wsproxy_control` closes the session's
/// connections with its code 4001: the client must not come back, in
/// either mode, even though the token (not revoked here) would let it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_close_code_ends_the_session_without_reconnecting() {
    let redis = Redis::start().await;
    let server = Server::start(config(&redis, true)).await;
    for reliable in [false, true] {
        let session = unique("s");
        redis.set_token(&session, TOKEN).await;
        let builder =
            SessionClient::builder(server.url(), "agent-1", &session, TOKEN).reconnect(fast());
        let builder = if reliable {
            builder.reliable()
        } else {
            builder
        };
        let (client, mut events) = builder.connect().await.expect("connect");
        assert!(matches!(
            next_event(&mut events).await,
            SessionEvent::Connected { .. }
        ));

        let command = serde_json::json!({
            "type": "disconnect", "session_id": session, "code": 4001, "reason": "revoked",
        });
        let _: String = redis::cmd("FCALL")
            .arg("wsproxy_control")
            .arg(1)
            .arg("wsproxy:control:log")
            .arg(command.to_string())
            .query_async(&mut redis.conn().await)
            .await
            .expect("FCALL wsproxy_control");

        match next_significant(&mut events).await {
            SessionEvent::Disconnected(Error::SessionEnded { code, reason }) => {
                assert_eq!(
                    (code, reason.as_str()),
                    (4001, "revoked"),
                    "reliable {reliable}"
                );
            }
            other => panic!("reliable {reliable}: expected the session to end, got {other:?}"),
        }
        // That was the last event: no reconnection follows.
        let next = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("the events end");
        assert!(next.is_none(), "reliable {reliable}: then {next:?}");
        assert_eq!(client.connection_state(), ConnectionState::Closed);
        assert!(matches!(client.send(&1).await, Err(Error::Closed)));
    }
    server.stop().await;
}
