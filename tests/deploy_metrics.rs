//! The Grafana dashboard (`deploy/grafana/wsproxy.json`) and the
//! Prometheus alert rules (`deploy/prometheus/alerts.yml`) use only metric
//! names a live `/metrics` serves (issue 26, item 4).
//!
//! The names come from the scrape's `# TYPE` lines: a counter `f` is sampled as
//! `f_total`, a histogram as `f_bucket`, `f_sum` and `f_count`, a gauge as
//! `f`. The server runs with the proxy, reliable sessions and lifecycle
//! events on, and serves a session, a proxied connection, a refused
//! proxied connection and a refused topic command first, so that the
//! labelled families (which appear with their first series) are there.

mod common;

use std::collections::BTreeSet;

use common::proxy::{echo_backend, file, open, route, routes_file};
use common::*;

/// Every `wsproxy_...` name in `text`.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("wsproxy_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The sample names a scrape can hold, from its `# TYPE` lines.
fn names_served(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{family}{s}"));
        }
    }
    names
}

fn read(path: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_metrics_that_exist() {
    let redis = Redis::start().await;
    let backend = echo_backend("b").await;
    let dead = free_port();
    // Health-checked, so that wsproxy_upstream_backend_healthy has a series.
    let mut dead_route = route("/dead", "/", &[(dead, 1)]);
    dead_route["health_check"] = serde_json::json!({"interval_ms": 100, "timeout_ms": 100});
    let path = routes_file(file(vec![
        route("/echo", "/", &[(backend.port, 1)]),
        dead_route,
    ]));
    let server = Server::start_with(&redis.url(), move |c| {
        c.routes_file = Some(path);
        c.reliable.enabled = true;
        c.lifecycle.events = true;
        c.pubsub.allow_anonymous = true;
    })
    .await;
    redis.set_token("s-1", "tok-1", 60).await;
    let mut session = server.connect("s-1", "tok-1").await;
    let mut proxied = open(&server, "/echo").await.expect("proxied");
    let _ = next_text(&mut proxied).await;
    // A backend that is down: wsproxy_upstream_failures_total gets a series.
    let (status, _) = open(&server, "/dead").await.expect_err("refused");
    assert_eq!(status, 502);
    // A refused topic command: wsproxy_pubsub_refused_total gets one.
    let mut topics = open(&server, "/ws").await.expect("anonymous /ws");
    send_text(&mut topics, "no-such-command").await;
    let _ = next_text(&mut topics).await;
    session.close(None).await.expect("close");
    server
        .wait_metric("wsproxy_disconnects_total{reason=\"client\"}", 1.0)
        .await;
    let scrape = server.metrics().await;
    let served = names_served(&scrape);
    assert!(served.contains("wsproxy_connections_active"), "{scrape}");
    // The latency histograms saw the two connections.
    assert!(
        scrape.contains("wsproxy_session_attach_duration_seconds_count 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("wsproxy_upstream_connect_duration_seconds_count 1"),
        "{scrape}"
    );

    for file in [
        "deploy/grafana/wsproxy.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = names_used(&read(file));
        assert!(used.len() >= 8, "{file} uses only {used:?}");
        let missing: Vec<_> = used.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics /metrics does not serve: {missing:?}\nserved: {served:?}"
        );
    }
    // The dashboard is JSON Grafana can import.
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/wsproxy.json")).expect("JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));
    server.stop().await;
}

#[test]
fn names_used_finds_metric_names_only() {
    let used = names_used(
        "rate(wsproxy_messages_down_total[5m]) job=\"wsproxy\" alert: WsproxyRedisDown x_wsproxy_no",
    );
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["wsproxy_messages_down_total"]
    );
}
