//! TLS to a Redis Cluster (`rediss://` seeds in `REDIS_CLUSTER_NODES`): a
//! private 3+3 cluster that speaks TLS only, to clients, between its nodes
//! and for replication, with certificates made here. wsproxy in-process
//! must use TLS, with the CA of `REDIS_CA_FILE` (and the client certificate
//! when the nodes ask for one), on every connection: the cluster command
//! connection (token check, up messages), the broker's sharded connection
//! to every node, or its classic one to a seed (down messages).

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::pki::Pki;
use common::*;
use wsproxy::config::{ClusterPubSub, Config, RedisTlsConfig};

const TOKEN: &str = "cluster-tls-token";

/// wsproxy on the TLS `cluster` with `mode` and these TLS files, not yet
/// ready.
async fn start(cluster: &Cluster, mode: ClusterPubSub, tls: RedisTlsConfig) -> Server {
    let mut config = Config::for_cluster(cluster.urls());
    if let Some(c) = config.redis_cluster.as_mut() {
        c.pubsub = mode;
    }
    config.redis_tls = tls;
    // A refused connection is answered within the test's patience.
    config.auth_timeout = Duration::from_secs(2);
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

/// A backend's subscription to `channel` on the TLS cluster (RESP3
/// pushes): `SSUBSCRIBE` in sharded mode, `SUBSCRIBE` in classic.
struct Subscriber {
    _conn: redis::cluster_async::ClusterConnection,
    rx: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
}

impl Subscriber {
    async fn start(cluster: &Cluster, mode: ClusterPubSub, channel: &str) -> Subscriber {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = cluster
            .client_builder()
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()
            .expect("client");
        let mut conn = client.get_async_connection().await.expect("connect");
        match mode {
            ClusterPubSub::Sharded => conn.ssubscribe(channel).await.expect("SSUBSCRIBE"),
            ClusterPubSub::Classic => conn.subscribe(channel).await.expect("SUBSCRIBE"),
        }
        Subscriber { _conn: conn, rx }
    }

    /// The next message's payload.
    async fn next(&mut self) -> String {
        loop {
            let push = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("a message within the wait")
                .expect("subscription open");
            if matches!(
                push.kind,
                redis::PushKind::Message | redis::PushKind::SMessage
            ) && let Some(redis::Value::BulkString(payload)) = push.data.get(1)
            {
                return String::from_utf8(payload.clone()).expect("utf-8");
            }
        }
    }
}

/// A full session over the TLS cluster, on two sessions whose slots live
/// on different masters (so that more than one node's connection is used):
/// the token check, a down message through the broker, an up message
/// through the command connection.
async fn round_trip(cluster: &Cluster, server: &Server, mode: ClusterPubSub) {
    let mut sessions: Vec<String> = Vec::new();
    let mut masters = Vec::new();
    while sessions.len() < 2 {
        let s = unique("tls");
        let master = cluster.master_of(&format!("session:{{{s}}}:down")).await;
        if !masters.contains(&master) {
            masters.push(master);
            sessions.push(s);
        }
    }
    for s in &sessions {
        cluster.set_token(s, TOKEN, 600).await;
        let refused = server.try_connect("agent-1", s, Some("wrong")).await;
        let refused = refused
            .err()
            .map(|(status, body)| (status, body["error"].clone()));
        assert_eq!(
            refused,
            Some((403, serde_json::json!("invalid_token"))),
            "a wrong token is refused"
        );
        let mut ws = server.connect(s, TOKEN).await;
        let (publish, down) = match mode {
            ClusterPubSub::Sharded => ("SPUBLISH", format!("session:{{{s}}}:down")),
            ClusterPubSub::Classic => ("PUBLISH", format!("session:{{{s}}}:down")),
        };
        let got = cluster
            .publish(publish, &down, &format!(r#"{{"to":"{s}"}}"#))
            .await;
        // Classic PUBLISH counts the receiving node's own subscribers only.
        if mode == ClusterPubSub::Sharded {
            assert!(got >= 1, "{down} has wsproxy's subscription");
        }
        assert_eq!(next_text(&mut ws).await, format!(r#"{{"to":"{s}"}}"#));
        let mut up = Subscriber::start(cluster, mode, &format!("session:{{{s}}}:up")).await;
        send_text(&mut ws, r#"{"up":true}"#).await;
        assert_eq!(up.next().await, r#"{"up":true}"#);
    }
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
async fn sharded_sessions_round_trip_on_a_tls_cluster() {
    let cluster = Cluster::start_tls(false).await;
    let server = start(
        &cluster,
        ClusterPubSub::Sharded,
        cluster.pki().config(false),
    )
    .await;
    server.wait_ready().await;
    round_trip(&cluster, &server, ClusterPubSub::Sharded).await;
    server.stop().await;
}

#[tokio::test]
async fn classic_sessions_round_trip_on_a_tls_cluster() {
    let cluster = Cluster::start_tls(false).await;
    let server = start(
        &cluster,
        ClusterPubSub::Classic,
        cluster.pki().config(false),
    )
    .await;
    server.wait_ready().await;
    round_trip(&cluster, &server, ClusterPubSub::Classic).await;
    server.stop().await;
}

/// `tls-auth-clients yes` on every node: without the client certificate
/// wsproxy never gets ready; with it, sessions work.
#[tokio::test]
async fn a_tls_cluster_that_requires_client_certificates() {
    let cluster = Cluster::start_tls(true).await;
    let without = start(
        &cluster,
        ClusterPubSub::Sharded,
        cluster.pki().config(false),
    )
    .await;
    stays_unready(&without, Duration::from_secs(2)).await;
    without.stop().await;
    let server = start(&cluster, ClusterPubSub::Sharded, cluster.pki().config(true)).await;
    server.wait_ready().await;
    round_trip(&cluster, &server, ClusterPubSub::Sharded).await;
    server.stop().await;
}

/// The nodes' certificates are checked: trusting another CA (and the
/// system's roots) instead of the one that signed them, wsproxy never
/// connects, stays unready, and refuses a WebSocket with the documented
/// 503 `redis_unavailable`.
#[tokio::test]
async fn cluster_certificates_from_an_unknown_ca_are_refused() {
    let cluster = Cluster::start_tls(false).await;
    let other = Pki::new();
    let server = start(&cluster, ClusterPubSub::Sharded, other.config(false)).await;
    stays_unready(&server, Duration::from_secs(2)).await;
    let session = unique("tls");
    cluster.set_token(&session, TOKEN, 600).await;
    let refused = server.try_connect("agent-1", &session, Some(TOKEN)).await;
    let refused = refused
        .err()
        .map(|(status, body)| (status, body["error"].clone()));
    assert_eq!(
        refused,
        Some((503, serde_json::json!("redis_unavailable"))),
        "a WebSocket is refused while the cluster is out of reach"
    );
    server.stop().await;
}
