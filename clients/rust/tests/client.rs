//! wsproxy-client against a real wsproxy: a private `redis-server` per test
//! on a free port, the server in-process on 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wsproxy::config::{Config, JwtConfig};
use wsproxy_client::{ConnectionState, Error, Message, ReconnectPolicy, WsClient, now_rfc3339};

/// How long a test waits for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);

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
            if redis.ping().await {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on port {port} did not come up");
    }

    async fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"+PONG\r\n"
        )
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !matches!(http_get(self.addr, "/ready").await, Ok(200)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "wsproxy did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn auth_url(&self) -> String {
        format!("http://{}/auth/token", self.addr)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("run returned within the grace period")
            .expect("no panic")
            .expect("run ok");
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

/// Anonymous pub/sub allowed, quick shutdown.
fn anonymous_config(redis: &Redis) -> Config {
    let mut config = Config::for_redis(redis.url());
    config.pubsub.allow_anonymous = true;
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

/// Routes a topic's messages (`"*"`: all) into a channel.
fn collect(client: &WsClient, topic: &str) -> mpsc::Receiver<Message> {
    let (tx, rx) = mpsc::channel(100);
    client.on_message(topic, move |m| {
        let _ = tx.try_send(m);
    });
    rx
}

async fn next(rx: &mut mpsc::Receiver<Message>) -> Message {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a message within the wait")
        .expect("handler alive")
}

/// Polls until the client reaches `state`.
async fn wait_state(client: &WsClient, state: ConnectionState) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.connection_state() != state {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?}, wanted {state:?}",
            client.connection_state()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn assert_nothing(rx: &mut mpsc::Receiver<Message>, quiet: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(quiet, rx.recv()).await {
        panic!("unexpected message {m}");
    }
}

/// A users file with one user, and a JWT config with the given TTL.
struct Users {
    path: PathBuf,
}

impl Users {
    fn new(user: &str, password: &str) -> Users {
        let hash = wsproxy::auth::users::hash_password(password).expect("hash");
        let path = std::env::temp_dir().join(format!("{}.users", unique("wsproxy-client")));
        std::fs::write(&path, format!("# test users\n{user}:{hash}\n")).expect("write users");
        Users { path }
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn auth_config(redis: &Redis, users: &Users, ttl: Duration) -> Config {
    let mut config = Config::for_redis(redis.url());
    config.shutdown_grace_period = Duration::from_secs(1);
    config.users_file = Some(users.path.clone());
    config.jwt = Some(JwtConfig {
        secret: b"0123456789abcdef0123456789abcdef-test".to_vec(),
        issuer: "wsproxy".into(),
        audience: "wsproxy".into(),
        ttl,
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connect_uses_session_named_after_the_client() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let name = unique("Client");

    let client = WsClient::connect(&name, &server.ws_url())
        .await
        .expect("connect");
    assert_eq!(client.name(), name);
    assert_eq!(client.session_id(), format!("session-{name}"));
    assert_eq!(client.connection_state(), ConnectionState::Connected);
    assert!(!client.is_authenticated());
    assert_eq!(client.get_token(), None);
    assert!(!client.refresh_token_if_needed().await.expect("no-op"));
    client.ping().await.expect("pong");

    // Its own publish comes back to it: same session, subscribed topic.
    let mut rx = collect(&client, "Echo");
    client
        .subscribe(&name, "Echo", "no-payload")
        .await
        .expect("subscribe");
    client
        .publish(&name, "Echo", "hello", "")
        .await
        .expect("publish");
    let m = next(&mut rx).await;
    assert_eq!(m.payload_str(), Some("hello"));
    assert_eq!(m.publisher_name, name);
    assert_eq!(m.session_id, client.session_id());
    assert!(humantime::parse_rfc3339(&m.timestamp).is_ok(), "{m}");

    client.close().await.expect("close");
    assert_eq!(client.connection_state(), ConnectionState::Closed);
    assert!(matches!(
        client.publish(&name, "Echo", "late", "").await,
        Err(Error::Closed)
    ));
    client.close().await.expect("closing twice is fine");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connect_is_refused_unless_allowed() {
    let redis = Redis::start().await;
    let mut config = Config::for_redis(redis.url());
    config.shutdown_grace_period = Duration::from_secs(1);
    let server = Server::start(config).await;
    match WsClient::connect("Client1", &server.ws_url()).await {
        Err(Error::Rejected { status, code, .. }) => {
            assert_eq!(status, 401);
            assert_eq!(code.as_deref(), Some("missing_token"));
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // Invalid arguments never reach the server.
    assert!(matches!(
        WsClient::connect_with_session("Client1", "bad session", &server.ws_url()).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        WsClient::connect("Client1", "wss://127.0.0.1:1/ws").await,
        Err(Error::InvalidUrl { .. })
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_publish_between_two_clients() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let session = unique("session");
    let url = server.ws_url();

    let subscriber = WsClient::connect_with_session("Client1", &session, &url)
        .await
        .expect("connect 1");
    let publisher = WsClient::connect_with_session("Client2", &session, &url)
        .await
        .expect("connect 2");
    let outsider = WsClient::connect_with_session("Client3", &unique("other"), &url)
        .await
        .expect("connect 3");

    let mut got = collect(&subscriber, "NetworkConnectedEvent");
    let mut outsider_got = collect(&outsider, "*");
    subscriber
        .subscribe("Client1", "NetworkConnectedEvent", "no-payload")
        .await
        .expect("subscribe");
    outsider
        .subscribe("Client3", "NetworkConnectedEvent", "no-payload")
        .await
        .expect("subscribe in another session");
    assert_eq!(subscriber.subscriptions(), vec!["NetworkConnectedEvent"]);

    // The subscription is live once confirmed: no sleep needed.
    let stamp = now_rfc3339();
    publisher
        .publish(
            "Client2",
            "NetworkConnectedEvent",
            "Network connected",
            &stamp,
        )
        .await
        .expect("publish");
    let m = next(&mut got).await;
    assert_eq!(
        m,
        Message {
            publisher_name: "Client2".into(),
            publisher_sub: None,
            topic: "NetworkConnectedEvent".into(),
            payload: "Network connected".into(),
            timestamp: stamp.clone(),
            session_id: session.clone(),
        }
    );
    assert_eq!(
        m.to_string(),
        format!("NetworkConnectedEvent [{session}] from Client2 at {stamp}: Network connected")
    );

    // Structured payloads arrive as JSON values.
    let payload = serde_json::json!({ "ssid": "lab", "rssi": -41, "tags": ["a", "b"] });
    publisher
        .publish("Client2", "NetworkConnectedEvent", &payload, "")
        .await
        .expect("publish json");
    let m = next(&mut got).await;
    assert_eq!(m.payload, payload);

    // Session isolation.
    assert_nothing(&mut outsider_got, Duration::from_millis(300)).await;

    for c in [subscriber, publisher, outsider] {
        c.close().await.expect("close");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_message_dispatches_by_topic() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let session = unique("session");
    let client = WsClient::connect_with_session("Client1", &session, &server.ws_url())
        .await
        .expect("connect");

    let mut customers = collect(&client, "DetectCustomerEvent");
    let mut network = collect(&client, "NetworkConnectedEvent");
    let mut all = collect(&client, "*");
    let mut second_network = collect(&client, "NetworkConnectedEvent");
    let removed = client.on_message("DetectCustomerEvent", |m| {
        panic!("removed handler called with {m}")
    });
    assert!(client.remove_handler(removed));
    assert!(!client.remove_handler(removed));
    // A panicking handler does not stop the others.
    client.on_message("DetectCustomerEvent", |_| panic!("handler bug"));

    for topic in ["DetectCustomerEvent", "NetworkConnectedEvent"] {
        client
            .subscribe("Client1", topic, "no-payload")
            .await
            .expect("subscribe");
    }
    client
        .publish("Client1", "DetectCustomerEvent", "customer 1", "")
        .await
        .expect("publish");
    client
        .publish("Client1", "NetworkConnectedEvent", "network up", "")
        .await
        .expect("publish");
    client
        .publish("Client1", "DetectCustomerEvent", "customer 2", "")
        .await
        .expect("publish");

    assert_eq!(next(&mut customers).await.payload_str(), Some("customer 1"));
    assert_eq!(next(&mut customers).await.payload_str(), Some("customer 2"));
    assert_eq!(next(&mut network).await.payload_str(), Some("network up"));
    assert_eq!(
        next(&mut second_network).await.payload_str(),
        Some("network up")
    );
    let mut everything = Vec::new();
    for _ in 0..3 {
        everything.push(next(&mut all).await.payload_str().map(str::to_owned));
    }
    everything.sort();
    assert_eq!(
        everything,
        [Some("customer 1"), Some("customer 2"), Some("network up")].map(|s| s.map(str::to_owned))
    );
    assert_nothing(&mut customers, Duration::from_millis(200)).await;
    assert_nothing(&mut network, Duration::from_millis(10)).await;

    client.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let session = unique("session");
    let url = server.ws_url();
    let a = WsClient::connect_with_session("A", &session, &url)
        .await
        .expect("connect a");
    let b = WsClient::connect_with_session("B", &session, &url)
        .await
        .expect("connect b");
    let mut got = collect(&a, "Alerts");
    a.subscribe("A", "Alerts", "").await.expect("subscribe");
    b.publish("B", "Alerts", "one", "").await.expect("publish");
    assert_eq!(next(&mut got).await.payload_str(), Some("one"));

    a.unsubscribe("Alerts").await.expect("unsubscribe");
    assert!(a.subscriptions().is_empty());
    b.publish("B", "Alerts", "two", "").await.expect("publish");
    assert_nothing(&mut got, Duration::from_millis(500)).await;

    // Subscribing again works, and unsubscribing an unknown topic is fine.
    a.subscribe("A", "Alerts", "")
        .await
        .expect("subscribe again");
    b.publish("B", "Alerts", "three", "")
        .await
        .expect("publish");
    assert_eq!(next(&mut got).await.payload_str(), Some("three"));
    a.unsubscribe("NeverSubscribed").await.expect("no-op");

    a.close().await.expect("close");
    b.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_reach_the_caller_and_on_error() {
    let redis = Redis::start().await;
    let mut config = anonymous_config(&redis);
    config.pubsub.max_subscriptions = 1;
    config.pubsub.max_payload_bytes = 16;
    let server = Server::start(config).await;
    let client = WsClient::connect_with_session("Client1", &unique("s"), &server.ws_url())
        .await
        .expect("connect");
    let (tx, mut errors) = mpsc::channel(10);
    client.on_error(move |e| {
        let _ = tx.try_send(e.to_string());
    });

    client.subscribe("Client1", "One", "").await.expect("first");
    match client.subscribe("Client1", "Two", "").await {
        Err(Error::Server(e)) => {
            assert_eq!(e.code, "too_many_subscriptions");
            assert_eq!(e.command, "subscribe");
        }
        other => panic!("expected too_many_subscriptions, got {other:?}"),
    }
    assert_eq!(client.subscriptions(), vec!["One"]);
    let reported = tokio::time::timeout(WAIT, errors.recv())
        .await
        .expect("reported")
        .expect("open");
    assert!(reported.contains("too_many_subscriptions"), "{reported}");

    // Refused publishes have no reply of their own: on_error gets them.
    client
        .publish("Client1", "One", "x".repeat(100), "")
        .await
        .expect("written");
    let reported = tokio::time::timeout(WAIT, errors.recv())
        .await
        .expect("reported")
        .expect("open");
    assert!(reported.contains("payload_too_large"), "{reported}");

    // Invalid topics are caught before sending.
    assert!(matches!(
        client.subscribe("Client1", "a|b", "").await,
        Err(Error::InvalidArgument { what: "topic", .. })
    ));
    // The connection is still fine.
    client.ping().await.expect("pong");
    client.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_auth_gets_a_token_and_joins_its_session() {
    let redis = Redis::start().await;
    let users = Users::new("alice", "s3cret-pass");
    let server = Server::start(auth_config(&redis, &users, Duration::from_secs(3600))).await;
    let session = unique("session");

    let a = WsClient::connect_with_auth(
        "Client1",
        &server.ws_url(),
        &server.auth_url(),
        "alice",
        "s3cret-pass",
        Some(&session),
    )
    .await
    .expect("connect with auth");
    assert!(a.is_authenticated());
    assert_eq!(a.session_id(), session);
    let token = a.get_token().expect("a token");
    assert_eq!(token.split('.').count(), 3);
    let left = a
        .token_expires_at()
        .expect("exp")
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(left > Duration::from_secs(3500), "{left:?}");
    assert!(!a.refresh_token_if_needed().await.expect("still valid"));
    assert_eq!(a.get_token(), Some(token));

    // Without a session: the server's default, session-{username}.
    let b = WsClient::connect_with_auth(
        "Client2",
        &server.ws_url(),
        &server.auth_url(),
        "alice",
        "s3cret-pass",
        None,
    )
    .await
    .expect("connect with the default session");
    assert_eq!(b.session_id(), "session-alice");

    // Authenticated pub/sub.
    let c = WsClient::connect_with_auth(
        "Client3",
        &server.ws_url(),
        &server.auth_url(),
        "alice",
        "s3cret-pass",
        Some(&session),
    )
    .await
    .expect("third client");
    let mut got = collect(&a, "Orders");
    a.subscribe("Client1", "Orders", "")
        .await
        .expect("subscribe");
    c.publish("Client3", "Orders", "order 1", &now_rfc3339())
        .await
        .expect("publish");
    let m = next(&mut got).await;
    assert_eq!(m.publisher_name, "Client3");
    assert_eq!(m.session_id, session);

    // Wrong password / unknown user.
    match WsClient::connect_with_auth(
        "Client4",
        &server.ws_url(),
        &server.auth_url(),
        "alice",
        "wrong",
        None,
    )
    .await
    {
        Err(e @ Error::Auth { status: 401, .. }) => {
            assert!(e.is_auth_failure());
            assert!(e.to_string().contains("invalid_credentials"), "{e}");
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // Anonymous clients are refused by this server.
    assert!(matches!(
        WsClient::connect("Client5", &server.ws_url()).await,
        Err(Error::Rejected { status: 401, .. })
    ));

    for client in [a, b, c] {
        client.close().await.expect("close");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_errors_when_the_server_issues_no_tokens() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    match WsClient::connect_with_auth(
        "Client1",
        &server.ws_url(),
        &server.auth_url(),
        "alice",
        "pw",
        None,
    )
    .await
    {
        Err(Error::Auth { status, code, .. }) => {
            assert_eq!(status, 503);
            assert_eq!(code, "auth_not_configured");
        }
        other => panic!("expected 503 auth_not_configured, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_server_restart_and_restores_subscriptions() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let addr = server.addr;
    let session = unique("session");
    let url = server.ws_url();
    let fast = ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        max_attempts: None,
    };
    let subscriber = WsClient::builder("Client1", &url)
        .session(&session)
        .reconnect(fast.clone())
        .connect()
        .await
        .expect("connect 1");
    let publisher = WsClient::builder("Client2", &url)
        .session(&session)
        .reconnect(fast)
        .connect()
        .await
        .expect("connect 2");
    let (tx, mut lost) = mpsc::channel(100);
    subscriber.on_error(move |e| {
        let _ = tx.try_send(e.to_string());
    });
    let mut got = collect(&subscriber, "*");
    for topic in ["Alpha", "Beta"] {
        subscriber
            .subscribe("Client1", topic, "")
            .await
            .expect("subscribe");
    }
    publisher
        .publish("Client2", "Alpha", "before", "")
        .await
        .expect("publish");
    assert_eq!(next(&mut got).await.payload_str(), Some("before"));

    server.stop().await;
    let reason = tokio::time::timeout(WAIT, lost.recv())
        .await
        .expect("the loss is reported")
        .expect("open");
    assert!(reason.contains("1001"), "{reason}");
    assert_eq!(subscriber.connection_state(), ConnectionState::Reconnecting);
    // Nothing can be delivered now; a ping says so.
    assert!(matches!(subscriber.ping().await, Err(Error::NotConnected)));
    // Let a few reconnection attempts fail.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let server = Server::start_on(anonymous_config(&redis), listener).await;
    subscriber
        .wait_connected(WAIT)
        .await
        .expect("subscriber back");
    publisher
        .wait_connected(WAIT)
        .await
        .expect("publisher back");
    let mut topics = subscriber.subscriptions();
    topics.sort();
    assert_eq!(topics, ["Alpha", "Beta"]);

    for (topic, text) in [("Alpha", "after-a"), ("Beta", "after-b")] {
        publisher
            .publish("Client2", topic, text, "")
            .await
            .expect("publish after restart");
        let m = next(&mut got).await;
        assert_eq!((m.topic.as_str(), m.payload_str()), (topic, Some(text)));
    }
    subscriber.close().await.expect("close");
    publisher.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_while_reconnecting_are_sent_afterwards() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let addr = server.addr;
    let session = unique("session");
    let url = server.ws_url();
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_attempts: None,
    };
    let subscriber = WsClient::builder("Client1", &url)
        .session(&session)
        .reconnect(policy.clone())
        .connect()
        .await
        .expect("connect 1");
    let publisher = WsClient::builder("Client2", &url)
        .session(&session)
        .reconnect(policy)
        .connect()
        .await
        .expect("connect 2");
    let mut got = collect(&subscriber, "Queue");
    subscriber
        .subscribe("Client1", "Queue", "")
        .await
        .expect("subscribe");

    server.stop().await;
    wait_state(&publisher, ConnectionState::Reconnecting).await;
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let pending = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish("Client2", "Queue", "queued", "").await })
    };
    let server = Server::start_on(anonymous_config(&redis), listener).await;
    subscriber.wait_connected(WAIT).await.expect("back");
    // The publisher may reconnect first; then the message went to nobody.
    // Either way the call succeeded once the connection was back.
    pending
        .await
        .expect("no panic")
        .expect("sent after reconnecting");
    publisher.wait_connected(WAIT).await.expect("back");
    publisher
        .publish("Client2", "Queue", "fresh", "")
        .await
        .expect("publish");
    loop {
        let m = next(&mut got).await;
        if m.payload_str() == Some("fresh") {
            break;
        }
        assert_eq!(m.payload_str(), Some("queued"));
    }
    subscriber.close().await.expect("close");
    publisher.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reconnects_closes() {
    let redis = Redis::start().await;
    let server = Server::start(anonymous_config(&redis)).await;
    let client = WsClient::builder("Client1", server.ws_url())
        .reconnect(ReconnectPolicy::never())
        .connect()
        .await
        .expect("connect");
    server.stop().await;
    wait_state(&client, ConnectionState::Closed).await;
    assert!(matches!(
        client.wait_connected(WAIT).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        client.subscribe("Client1", "T", "").await,
        Err(Error::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_renewed_and_the_subscription_survives() {
    let redis = Redis::start().await;
    let users = Users::new("bob", "pw-bob");
    // A 6 s token: the client renews it at half-life (the 60 s margin
    // would otherwise be longer than the token), reconnects with it and
    // subscribes again, before the server closes the old connection.
    let server = Server::start(auth_config(&redis, &users, Duration::from_secs(6))).await;
    let session = unique("session");
    let connect = |name: &'static str| {
        WsClient::builder(name, server.ws_url())
            .credentials(server.auth_url(), "bob", "pw-bob")
            .session(&session)
            .reconnect(ReconnectPolicy {
                initial_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(500),
                max_attempts: None,
            })
            .connect()
    };
    let subscriber = connect("Client1").await.expect("connect 1");
    let publisher = connect("Client2").await.expect("connect 2");
    let mut got = collect(&subscriber, "Ticks");
    subscriber
        .subscribe("Client1", "Ticks", "")
        .await
        .expect("subscribe");
    let first = subscriber.get_token().expect("token");

    // Within 60 s of expiry: refresh_token_if_needed fetches a new one.
    assert!(subscriber.refresh_token_if_needed().await.expect("refresh"));
    let second = subscriber.get_token().expect("token");
    assert!(subscriber.is_authenticated());

    tokio::time::sleep(Duration::from_secs(9)).await;
    let third = subscriber.get_token().expect("token");
    assert!(first != third && second != third, "the token was renewed");
    subscriber.wait_connected(WAIT).await.expect("connected");
    publisher.wait_connected(WAIT).await.expect("connected");
    publisher
        .publish("Client2", "Ticks", "still here", "")
        .await
        .expect("publish");
    let m = tokio::time::timeout(WAIT, async {
        loop {
            let m = next(&mut got).await;
            if m.payload_str() == Some("still here") {
                return m;
            }
        }
    })
    .await
    .expect("delivered after renewal");
    assert_eq!(m.session_id, session);
    subscriber.close().await.expect("close");
    publisher.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_for_an_expired_token_comes_back_with_a_new_one() {
    let redis = Redis::start().await;
    let users = Users::new("carol", "pw-carol");
    // A 2 s token: the server closes the connection (1008 "token expired")
    // before the client's own renewal would (it waits at least 5 s).
    let server = Server::start(auth_config(&redis, &users, Duration::from_secs(2))).await;
    let client = WsClient::builder("Client1", server.ws_url())
        .credentials(server.auth_url(), "carol", "pw-carol")
        .reconnect(ReconnectPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_attempts: None,
        })
        .connect()
        .await
        .expect("connect");
    assert_eq!(client.session_id(), "session-carol");
    let (tx, mut errors) = mpsc::channel(100);
    client.on_error(move |e| {
        let _ = tx.try_send(e.to_string());
    });
    let mut got = collect(&client, "Ticks");
    client
        .subscribe("Client1", "Ticks", "")
        .await
        .expect("subscribe");
    let first = client.get_token().expect("token");

    let closed = tokio::time::timeout(WAIT, errors.recv())
        .await
        .expect("the close is reported")
        .expect("open");
    assert!(
        closed.contains("1008") && closed.contains("token expired"),
        "{closed}"
    );
    client.wait_connected(WAIT).await.expect("back");
    assert_ne!(
        client.get_token(),
        Some(first),
        "reconnected with a new token"
    );
    // Publish to itself on the new connection (retrying across the next
    // expiry, which may come at any moment with 2 s tokens).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        client.wait_connected(WAIT).await.expect("connected");
        client
            .publish("Client1", "Ticks", "tick", "")
            .await
            .expect("publish");
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), got.recv()).await {
            assert_eq!(m.payload_str(), Some("tick"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no delivery");
    }
    client.close().await.expect("close");
    server.stop().await;
}
