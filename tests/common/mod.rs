//! Helpers shared by the integration tests: a private `redis-server` per
//! test on a free port, wsproxy in-process on 127.0.0.1:0, WebSocket and
//! plain-HTTP clients.
#![allow(dead_code)] // each test file uses a different subset

pub mod cluster;
pub mod pki;
pub mod proxy;
pub mod sse;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use wsproxy::config::Config;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// A private redis-server on a free port; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// Where an append-only file is kept, for a Redis that persists.
    aof_dir: Option<std::path::PathBuf>,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

impl Redis {
    pub async fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            child: None,
            aof_dir: None,
        };
        redis.spawn().await;
        redis
    }

    /// A Redis with `appendonly yes` (fsync always): what it acknowledged
    /// survives a kill and restart.
    pub async fn start_persistent() -> Redis {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("redis-aof"));
        std::fs::create_dir_all(&dir).expect("aof dir");
        let mut redis = Redis {
            port: free_port(),
            child: None,
            aof_dir: Some(dir),
        };
        redis.spawn().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        match &self.aof_dir {
            None => args.extend(["--appendonly".into(), "no".into()]),
            Some(dir) => args.extend([
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--dir".into(),
                dir.display().to_string(),
            ]),
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("valid url");
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    /// Kills the server (SIGKILL: connections drop without goodbye).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    pub async fn set_token(&self, session: &str, token: &str, ttl: u64) {
        let mut c = self.conn().await;
        let _: () = redis::cmd("SETEX")
            .arg(format!("session:{session}:auth"))
            .arg(ttl)
            .arg(token)
            .query_async(&mut c)
            .await
            .expect("SETEX");
    }

    pub async fn ttl(&self, key: &str) -> i64 {
        let mut c = self.conn().await;
        redis::cmd("TTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("TTL")
    }

    /// PUBLISH; returns the number of receivers.
    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let mut c = self.conn().await;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut c)
            .await
            .expect("PUBLISH")
    }

    /// Subscribes and returns the message payloads as a stream.
    pub async fn subscribe(&self, channel: &str) -> redis::aio::PubSub {
        let mut p = redis::Client::open(self.url())
            .expect("valid url")
            .get_async_pubsub()
            .await
            .expect("pubsub connect");
        p.subscribe(channel).await.expect("SUBSCRIBE");
        p
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.aof_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// wsproxy running in-process.
pub struct Server {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), wsproxy::server::ServerError>>,
}

impl Server {
    pub async fn start(redis_url: &str) -> Server {
        Self::start_with(redis_url, |_| {}).await
    }

    pub async fn start_with(redis_url: &str, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::for_redis(redis_url);
        tweak(&mut config);
        Self::start_config(config).await
    }

    /// wsproxy with exactly this configuration, once ready.
    pub async fn start_config(config: Config) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
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

    /// Waits until /ready answers 200.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/ready").await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "wsproxy did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, agent: &str, session: &str) -> String {
        format!("ws://{}/{agent}/ws/{session}", self.addr)
    }

    /// Connects with a bearer header; panics if refused.
    pub async fn connect(&self, session: &str, token: &str) -> Ws {
        match self.try_connect("agent-1", session, Some(token)).await {
            Ok(ws) => ws,
            Err((status, body)) => panic!("connect refused: {status} {body}"),
        }
    }

    /// Connects; on refusal returns the HTTP status and JSON body.
    pub async fn try_connect(
        &self,
        agent: &str,
        session: &str,
        token: Option<&str>,
    ) -> Result<Ws, (u16, serde_json::Value)> {
        let mut req = self
            .url(agent, session)
            .into_client_request()
            .expect("valid request");
        if let Some(token) = token {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
            );
        }
        connect_request(req).await
    }

    /// Prometheus text from /metrics.
    pub async fn metrics(&self) -> String {
        http_get(self.addr, "/metrics")
            .await
            .expect("GET /metrics")
            .1
    }

    /// Value of one metric line (exact name with labels), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Waits until a metric reaches at least `value`.
    pub async fn wait_metric(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(name).await;
            if now >= value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} stayed at {now}, wanted {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cancels and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("run returned within the grace period")
            .expect("no panic")
            .expect("run ok");
    }
}

/// Awaits `fut` for at most `limit`; past it, panics saying what did not
/// happen (a test must fail, never hang CI, when a peer stops answering).
pub async fn within<F: std::future::Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
}

/// How long a long test (a failover, a resharding) may take in all, once
/// its cluster is up.
pub const TEST_DEADLINE: Duration = Duration::from_secs(180);

/// Runs a test's body under an overall deadline: past `limit` it panics
/// naming `test`, instead of waiting on whatever await no bound covers.
/// With `logs`, a failure (a panic in the body, or the deadline) prints
/// the captured log first.
pub async fn bounded_test<F: std::future::Future>(
    test: &str,
    limit: Duration,
    logs: Option<&LogCapture>,
    body: F,
) -> F::Output {
    use futures_util::FutureExt;
    let log = || logs.map_or(String::new(), |l| format!("\n--- log ---\n{}", l.text()));
    match tokio::time::timeout(limit, std::panic::AssertUnwindSafe(body).catch_unwind()).await {
        Ok(Ok(out)) => out,
        Ok(Err(panic)) => {
            if logs.is_some() {
                eprintln!("{test} failed{}", log());
            }
            std::panic::resume_unwind(panic)
        }
        Err(_) => panic!("{test} did not finish within {limit:?}{}", log()),
    }
}

/// Performs a WebSocket handshake; on refusal returns status and JSON body.
/// Panics if the handshake does not finish within [`WAIT`].
pub async fn connect_request(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<Ws, (u16, serde_json::Value)> {
    let uri = req.uri().clone();
    match within(
        WAIT,
        &format!("the WebSocket handshake with {uri}"),
        tokio_tungstenite::connect_async(req),
    )
    .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
            });
            Err((status, json))
        }
        Err(e) => panic!("handshake failed unexpectedly: {e}"),
    }
}

/// A minimal HTTP/1.1 GET (no client dependency needed): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends one raw request (with `Connection: close`); returns status and body.
pub async fn http_request(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    s.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sends one raw request and returns the status of the response head,
/// without waiting for the connection to end (a 101 keeps it open).
pub async fn http_status(addr: SocketAddr, request: &str) -> u16 {
    let mut s = within(
        WAIT,
        &format!("a TCP connection to {addr}"),
        TcpStream::connect(addr),
    )
    .await
    .expect("connect");
    within(WAIT, "writing the request", s.write_all(request.as_bytes()))
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before the response head: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line")
}

/// Next text frame (skipping pings/pongs), with a timeout.
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame; returns its code.
pub async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame.code.into(),
            Ok(Some(Ok(Message::Close(None)))) => panic!("close frame without a code"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Asserts no text frame arrives within `quiet`.
pub async fn assert_silent(ws: &mut Ws, quiet: Duration) {
    if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(quiet, ws.next()).await {
        panic!("unexpected message {t}");
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    within(WAIT, "sending a text frame", ws.send(Message::text(text)))
        .await
        .expect("send");
}

/// Next message payload from a Redis subscription, with a timeout.
pub async fn next_published(
    stream: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
) -> String {
    let msg = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a message within the wait")
        .expect("subscription open");
    msg.get_payload::<String>().expect("utf-8 payload")
}

/// A unique id per call, so tests never share sessions.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A minimal HTTP/1.1 POST of a JSON body: status and body.
pub async fn http_post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

/// The text log of what runs on this thread (a current-thread test
/// runtime: the server's tasks too), at INFO and above, without colours.
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Starts capturing until the guard is dropped.
    pub fn start() -> (LogCapture, tracing::subscriber::DefaultGuard) {
        let logs = LogCapture::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
