//! The status page (issue 26, item 3): `GET /status` (the HTML shell) and
//! `GET /status.json` (what it shows), behind `METRICS_TOKEN` when set.

mod common;

use common::proxy::{echo_backend, file, open, route, routes_file};
use common::*;
use serde_json::Value;

const TOKEN: &str = "status-token-0123456789";

async fn status_json(server: &Server, token: Option<&str>) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let (status, body) = http_request(
        server.addr,
        &format!("GET /status.json HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n"),
    )
    .await
    .expect("GET /status.json");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// The JSON names what the process holds: connections by job and
/// transport, sessions and topics, the Redis link, routes with their
/// backends' health and breaker, the last closes, the heartbeat.
#[tokio::test]
async fn status_json_shows_connections_redis_routes_closes_and_heartbeat() {
    let redis = Redis::start().await;
    let backend = echo_backend("b").await;
    let path = routes_file(file(vec![route("/echo", "/", &[(backend.port, 1)])]));
    let server = Server::start_with(&redis.url(), move |c| {
        c.routes_file = Some(path);
        c.lifecycle.events = true;
        c.lifecycle.heartbeat = std::time::Duration::from_secs(1);
    })
    .await;

    redis.set_token("s-1", "tok-1", 60).await;
    let mut a = server.connect("s-1", "tok-1").await;
    let _b = server.connect("s-1", "tok-1").await;
    let _c = common::sse::SseClient::open(
        server.addr,
        "/agent-1/sse/s-1",
        &["Authorization: Bearer tok-1"],
    )
    .await
    .expect("an event stream");
    let proxied = open(&server, "/echo").await.expect("proxied");

    // The heartbeat beats once at start; the page shows when.
    let deadline = tokio::time::Instant::now() + WAIT;
    let json = loop {
        let (status, json) = status_json(&server, None).await;
        assert_eq!(status, 200, "{json}");
        if json["heartbeat"]["last_beat_unix_ms"].as_u64().is_some()
            && json["connections"]["proxy"]["websocket"] == 1
        {
            break json;
        }
        assert!(tokio::time::Instant::now() < deadline, "{json}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(json["connections"]["sessions"]["websocket"], 2, "{json}");
    assert_eq!(json["connections"]["sessions"]["sse"], 1, "{json}");
    assert_eq!(json["connections"]["topics"]["websocket"], 0, "{json}");
    assert_eq!(
        json["sessions"], 1,
        "one session, three connections: {json}"
    );
    assert_eq!(json["topics"], 0, "{json}");
    assert_eq!(json["heartbeat"]["enabled"], true, "{json}");
    assert_eq!(json["heartbeat"]["interval_secs"], 1, "{json}");
    let process = json["process"]["id"].as_str().expect("a process id");
    assert_eq!(json["heartbeat"]["process"], process, "{json}");

    let shards = json["redis"]["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 1, "standalone: one entry: {json}");
    assert_eq!(shards[0]["connected"], true, "{json}");
    assert_eq!(
        shards[0]["node"],
        format!("127.0.0.1:{}", redis.port),
        "{json}"
    );
    assert_eq!(json["redis"]["mode"], "standalone", "{json}");
    assert_eq!(json["redis"]["pubsub"]["connected"], true, "{json}");
    assert!(
        json["redis"]["pubsub"]["channels"].as_u64() >= Some(1),
        "{json}"
    );

    let routes = json["routes"].as_array().expect("routes");
    assert_eq!(routes.len(), 1, "{json}");
    assert_eq!(routes[0]["path"], "/echo", "{json}");
    assert_eq!(routes[0]["open"], 1, "{json}");
    let backends = routes[0]["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 1, "{json}");
    assert_eq!(backends[0]["name"], backend.port.to_string(), "{json}");
    assert_eq!(backends[0]["healthy"], true, "{json}");
    assert_eq!(backends[0]["circuit_open"], false, "{json}");
    assert_eq!(backends[0]["open"], 1, "{json}");

    // A close shows up in the recent closes, with its code, and in the
    // counts.
    a.close(None).await.expect("close");
    drop(a);
    let deadline = tokio::time::Instant::now() + WAIT;
    let json = loop {
        let (_, json) = status_json(&server, None).await;
        if json["closes"]["recent"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break json;
        }
        assert!(tokio::time::Instant::now() < deadline, "{json}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let last = &json["closes"]["recent"][0];
    assert_eq!(last["job"], "sessions", "{json}");
    assert_eq!(last["reason"], "client", "{json}");
    assert_eq!(last["code"], 1005, "a close frame without a code: {json}");
    assert!(last["at_unix_ms"].as_u64().is_some(), "{json}");
    let counts = json["closes"]["counts"].as_array().expect("counts");
    assert!(
        counts
            .iter()
            .any(|c| c["job"] == "sessions" && c["reason"] == "client" && c["count"] == 1),
        "{json}"
    );
    assert_eq!(json["connections"]["sessions"]["websocket"], 1, "{json}");

    // A proxied connection's end is there too (the tunnel reads no close
    // frame: no code).
    drop(proxied);
    let deadline = tokio::time::Instant::now() + WAIT;
    let json = loop {
        let (_, json) = status_json(&server, None).await;
        // The close is recorded and the route's count drops in two steps
        // of the tunnel's end: wait for both.
        if json["closes"]["recent"][0]["job"] == "proxy"
            && json["connections"]["proxy"]["websocket"] == 0
        {
            break json;
        }
        assert!(tokio::time::Instant::now() < deadline, "{json}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(json["closes"]["recent"][0]["reason"], "ended", "{json}");
    assert_eq!(json["closes"]["recent"][0]["code"], Value::Null, "{json}");
    assert_eq!(json["connections"]["proxy"]["websocket"], 0, "{json}");
    server.stop().await;
}

/// With `METRICS_TOKEN` set, the JSON takes the same bearer token as
/// `/metrics` and refuses anything else with its JSON body; the HTML
/// shell holds no data and asks for the token itself.
#[tokio::test]
async fn status_json_needs_the_metrics_token_when_one_is_set() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        c.metrics_token = Some(wsproxy::config::Secret::new(TOKEN));
    })
    .await;
    for token in [None, Some("wrong-token-0123456789")] {
        let (status, json) = status_json(&server, token).await;
        assert_eq!(status, 401, "{json}");
        assert_eq!(json["error"], "metrics_token_required", "{json}");
    }
    let (status, json) = status_json(&server, Some(TOKEN)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["redis"]["pubsub"]["connected"], true, "{json}");

    let (status, html) = http_get(server.addr, "/status").await.expect("GET /status");
    assert_eq!(status, 200);
    assert!(html.contains("<title>wsproxy status</title>"), "{html}");
    assert!(
        html.contains("fetch(\"status.json\""),
        "the page reads the JSON"
    );
    assert!(!html.contains(TOKEN));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    server.stop().await;
}

/// On a Redis Cluster the status lists each node as `CLUSTER NODES` tells
/// it (three masters with their slots, three replicas), and counts
/// sessions by id although their channel names carry hash tags.
#[tokio::test]
async fn on_a_cluster_each_node_is_listed_with_its_role_and_slots() {
    let cluster = common::cluster::Cluster::start().await;
    let mut config = wsproxy::config::Config::for_cluster(cluster.urls());
    if let Some(c) = config.redis_cluster.as_mut() {
        c.pubsub = wsproxy::config::ClusterPubSub::Sharded;
    }
    let server = Server::start_config(config).await;
    cluster.set_token("s-1", "tok-1", 60).await;
    let _ws = server.connect("s-1", "tok-1").await;
    let (status, json) = status_json(&server, None).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["redis"]["mode"], "cluster_sharded", "{json}");
    assert_eq!(json["sessions"], 1, "{json}");
    let shards = json["redis"]["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 6, "{json}");
    let masters: Vec<_> = shards.iter().filter(|s| s["role"] == "master").collect();
    assert_eq!(masters.len(), 3, "{json}");
    assert!(shards.iter().all(|s| s["connected"] == true), "{json}");
    assert!(
        masters
            .iter()
            .all(|m| m["slots"].as_array().is_some_and(|s| !s.is_empty())),
        "{json}"
    );
    server.stop().await;
}
