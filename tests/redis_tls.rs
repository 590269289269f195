//! TLS to Redis (`rediss://`): a private redis-server that speaks TLS only
//! (`--port 0`), with a CA, server and client certificates made here; wsproxy
//! in-process must use TLS for both its command connection (token check, up
//! messages) and its pub/sub connection (down messages).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pki::Pki;
use common::*;
use wsproxy::config::{Config, RedisTlsConfig};

/// A redis-server listening with TLS only, on a free loopback port.
struct TlsRedis {
    port: u16,
    child: Child,
    pki: Pki,
}

impl TlsRedis {
    /// `auth_clients`: Redis's `tls-auth-clients` (a client certificate
    /// required or not).
    async fn start(auth_clients: bool) -> TlsRedis {
        // The test's own clients (and wsproxy's) use rustls with the
        // process's default provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = Pki::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .expect("addr")
            .port();
        let path = |name| pki.path(name).display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &path("server.pem")])
            .args(["--tls-key-file", &path("server.key")])
            .args(["--tls-ca-cert-file", &path("ca.pem")])
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (Debian: apt-get install redis-server)");
        let redis = TlsRedis { port, child, pki };
        for _ in 0..200 {
            if let Ok(mut c) = redis.client().get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server with TLS on port {port} did not come up (built without TLS?)");
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// The test's own client: trusts the CA, presents the client
    /// certificate (Redis ignores it unless it asks for one).
    fn client(&self) -> redis::Client {
        redis::Client::build_with_tls(self.url(), self.pki.certificates()).expect("tls client")
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the TLS redis")
    }

    async fn set_token(&self, session: &str, token: &str) {
        let _: () = redis::cmd("SETEX")
            .arg(format!("session:{session}:auth"))
            .arg(60)
            .arg(token)
            .query_async(&mut self.conn().await)
            .await
            .expect("SETEX");
    }

    async fn publish(&self, channel: &str, payload: &str) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.conn().await)
            .await
            .expect("PUBLISH")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// wsproxy on `redis` with the given TLS files, without waiting for it to
/// be ready.
async fn start(redis: &TlsRedis, tls: RedisTlsConfig) -> Server {
    let mut config = Config::for_redis(redis.url());
    config.redis_tls = tls;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(wsproxy::run(config, listener, shutdown.clone()));
    Server {
        addr,
        shutdown,
        task,
    }
}

/// A full session over TLS: the token check, a down message through the
/// pub/sub connection, an up message through the command connection.
async fn round_trip(redis: &TlsRedis, server: &Server) {
    let session = unique("tls");
    redis.set_token(&session, "right").await;
    let err = server
        .try_connect("a", &session, Some("wrong"))
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (403, Some("invalid_token"))
    );
    let mut ws = server.connect(&session, "right").await;
    assert_eq!(
        redis
            .publish(&format!("session:{session}:down"), r#"{"n":1}"#)
            .await,
        1,
        "wsproxy's pub/sub connection is subscribed"
    );
    assert_eq!(next_text(&mut ws).await, r#"{"n":1}"#);
    let mut up = redis
        .client()
        .get_async_pubsub()
        .await
        .expect("pubsub connect");
    up.subscribe(format!("session:{session}:up"))
        .await
        .expect("SUBSCRIBE");
    send_text(&mut ws, r#"{"up":true}"#).await;
    assert_eq!(next_published(&mut up.on_message()).await, r#"{"up":true}"#);
}

/// Asserts `/ready` stays 503 for `quiet`.
async fn stays_unready(server: &Server, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while tokio::time::Instant::now() < deadline {
        let (status, body) = http_get(server.addr, "/ready").await.expect("GET /ready");
        assert_eq!(status, 503, "ready without a usable TLS connection: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_session_round_trip_over_tls() {
    let redis = TlsRedis::start(false).await;
    let server = start(&redis, redis.pki.config(false)).await;
    server.wait_ready().await;
    round_trip(&redis, &server).await;
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let redis = TlsRedis::start(true).await;
    let without = start(&redis, redis.pki.config(false)).await;
    stays_unready(&without, Duration::from_secs(2)).await;
    without.stop().await;
    let server = start(&redis, redis.pki.config(true)).await;
    server.wait_ready().await;
    round_trip(&redis, &server).await;
    server.stop().await;
}

/// Redis's certificate is checked: trusting another CA (and the system's
/// roots) instead of the one that signed it, wsproxy never connects.
#[tokio::test]
async fn a_redis_certificate_from_an_unknown_ca_is_refused() {
    let redis = TlsRedis::start(false).await;
    let other = Pki::new();
    let server = start(&redis, other.config(false)).await;
    stays_unready(&server, Duration::from_secs(2)).await;
    server.stop().await;
}
