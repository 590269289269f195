//! The status page: what this process holds, as JSON (`GET
//! /status.json`, for scripts) and as a small HTML page (`GET /status`)
//! that reads the JSON every few seconds.
//!
//! The data is gathered here, when asked, from what the lower layers keep
//! anyway: the metrics' gauges, the broker's channel counts and link state,
//! the proxy's route table, the ring of recent closes
//! ([`crate::close::Recent`]) and the lifecycle's last heartbeat. Nothing
//! is collected per message. It sits beside [`crate::http`] (it reads the
//! proxy, which the context below cannot hold).
//!
//! The HTML page holds no data and is served to anyone; the JSON needs
//! `METRICS_TOKEN` when one is set (checked by the router, as for
//! `/metrics`). The page takes the token from its URL's fragment
//! (`/status#token=...`, which browsers never send to a server) or from an
//! input, and sends it as a bearer header, so it never reaches a log.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::context::App;
use crate::keys::Keys;
use crate::upstream::Upstream;

/// The page itself: inline CSS and JS, no external asset, no build step.
pub const PAGE: &str = include_str!("status.html");

/// How long the status asks Redis (a `PING`, or `CLUSTER NODES`).
const REDIS_WAIT: Duration = Duration::from_secs(1);

/// Everything `/status.json` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// This process.
    pub process: Process,
    /// Open client connections, by job, then by transport.
    pub connections: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Sessions with at least one connection here.
    pub sessions: usize,
    /// Topics with at least one subscriber here.
    pub topics: usize,
    /// Redis, as this process sees it.
    pub redis: Redis,
    /// The proxy's routes (empty without `ROUTES_FILE`).
    pub routes: Vec<Route>,
    /// The last connections that closed.
    pub closes: Closes,
    /// The lifecycle heartbeat (`LIFECYCLE_EVENTS` or `PRESENCE`).
    pub heartbeat: Heartbeat,
}

/// This process.
#[derive(Debug, Serialize)]
pub struct Process {
    /// Its id, as lifecycle events and presence name it.
    pub id: String,
    /// wsproxy's version.
    pub version: &'static str,
    /// True once shutdown has begun.
    pub draining: bool,
    /// The time of this answer, in milliseconds since the Unix epoch.
    pub now_unix_ms: u64,
}

/// Redis, as this process sees it.
#[derive(Debug, Serialize)]
pub struct Redis {
    /// `standalone`, `cluster_classic` or `cluster_sharded`.
    pub mode: &'static str,
    /// Standalone: the server, answering a `PING` on the command
    /// connection. Cluster: each node as `CLUSTER NODES` tells it.
    pub shards: Vec<Shard>,
    /// The process's one pub/sub connection.
    pub pubsub: PubSub,
}

/// One Redis server or cluster node.
#[derive(Debug, Serialize, PartialEq)]
pub struct Shard {
    /// `host:port` (standalone: the server of the pub/sub connection,
    /// which the command connection shares).
    pub node: String,
    /// `master` or `replica` (standalone: `master`).
    pub role: &'static str,
    /// Standalone: it answered the `PING`. Cluster: its link is up and no
    /// node flags it as failing.
    pub connected: bool,
    /// The slots it serves (cluster masters), as Redis lists them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<String>,
    /// Redis' flags for it (cluster), or the error (standalone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How long the `PING` took (standalone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// The pub/sub connection.
#[derive(Debug, Serialize)]
pub struct PubSub {
    /// Up and subscribed.
    pub connected: bool,
    /// Its server (sharded: the seeds).
    pub server: String,
    /// Channels subscribed.
    pub channels: usize,
    /// Reconnections since start.
    pub reconnects: u64,
    /// When the connection was made.
    pub connected_at_unix_ms: Option<u64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at_unix_ms: Option<u64>,
}

/// A proxy route.
#[derive(Debug, Serialize)]
pub struct Route {
    /// Its `external_path`.
    pub path: String,
    /// Connections open through it.
    pub open: usize,
    /// Whether its backends are health-checked.
    pub health_checked: bool,
    /// Its backends, in file order.
    pub backends: Vec<Backend>,
}

/// A route's backend (by name, never by address, as on `/metrics`).
#[derive(Debug, Serialize)]
pub struct Backend {
    /// The routes file's `name`, or its position.
    pub name: String,
    /// Its last health check passed (true without checks).
    pub healthy: bool,
    /// Its circuit breaker keeps new connections away.
    pub circuit_open: bool,
    /// Connections open to it.
    pub open: usize,
}

/// The last closes.
#[derive(Debug, Serialize)]
pub struct Closes {
    /// Newest first.
    pub recent: Vec<Closed>,
    /// The same closes, counted by job, reason and code, most first.
    pub counts: Vec<CloseCount>,
}

/// One close.
#[derive(Debug, Serialize)]
pub struct Closed {
    /// When.
    pub at_unix_ms: u64,
    /// `sessions`, `topics` or `proxy`.
    pub job: &'static str,
    /// Why (the `reason` label of `wsproxy_disconnects_total`; for the
    /// proxy, a broken limit, `shutdown`, or `ended`).
    pub reason: &'static str,
    /// The close code, when known.
    pub code: Option<u16>,
}

/// How many of the recent closes had this job, reason and code.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CloseCount {
    /// The job.
    pub job: &'static str,
    /// The reason.
    pub reason: &'static str,
    /// The code.
    pub code: Option<u16>,
    /// How many.
    pub count: usize,
}

/// The lifecycle heartbeat.
#[derive(Debug, Serialize)]
pub struct Heartbeat {
    /// On with `LIFECYCLE_EVENTS` or `PRESENCE`.
    pub enabled: bool,
    /// The process id it beats for.
    pub process: String,
    /// `PROCESS_HEARTBEAT_SECS`.
    pub interval_secs: u64,
    /// When Redis last took a beat.
    pub last_beat_unix_ms: Option<u64>,
    /// When a beat last failed.
    pub last_failure_unix_ms: Option<u64>,
}

/// Gathers the status now.
pub async fn collect(app: &App, upstream: Option<&Upstream>) -> Status {
    let routes: Vec<Route> = upstream
        .map(|u| u.route_states())
        .unwrap_or_default()
        .iter()
        .map(|state| Route {
            path: state.route.external_path.clone(),
            open: state.open.load(Ordering::Relaxed),
            health_checked: state.route.health_check.is_some(),
            backends: state
                .backends
                .iter()
                .map(|b| Backend {
                    name: b.backend.name.clone(),
                    healthy: b.healthy.load(Ordering::Relaxed),
                    circuit_open: b.circuit_open(),
                    open: b.open.load(Ordering::Relaxed),
                })
                .collect(),
        })
        .collect();
    let gauge = |g: &prometheus_client::metrics::gauge::Gauge| u64::try_from(g.get()).unwrap_or(0);
    let proxied: usize = routes.iter().map(|r| r.open).sum();
    let transport = |n: u64| BTreeMap::from([("websocket", n)]);
    let connections = BTreeMap::from([
        (
            "sessions",
            BTreeMap::from([
                ("websocket", gauge(&app.metrics.connections_active)),
                ("sse", gauge(&app.metrics.sse_connections_active)),
            ]),
        ),
        (
            "topics",
            transport(gauge(&app.metrics.pubsub_connections_active)),
        ),
        ("proxy", transport(u64::try_from(proxied).unwrap_or(0))),
    ]);
    let counts = app.broker.channel_counts();
    let link = app.broker.link_status();
    let keys = app.config.keys();
    let (last_beat, last_failure) = app.lifecycle.last_beats();
    Status {
        process: Process {
            id: app.lifecycle.process().to_owned(),
            version: env!("CARGO_PKG_VERSION"),
            draining: app.draining.has_begun(),
            now_unix_ms: unix_ms(),
        },
        connections,
        sessions: counts.sessions,
        topics: counts.topics,
        redis: Redis {
            mode: match keys {
                Keys::Standalone => "standalone",
                Keys::ClusterClassic => "cluster_classic",
                Keys::ClusterSharded => "cluster_sharded",
            },
            shards: shards(app, keys, &link.server).await,
            pubsub: PubSub {
                connected: link.connected,
                server: link.server,
                channels: counts.channels,
                reconnects: app.metrics.redis_reconnects.get(),
                connected_at_unix_ms: link.connected_at_unix_ms,
                last_error_at_unix_ms: link.last_error.as_ref().map(|e| e.1),
                last_error: link.last_error.map(|e| e.0),
            },
        },
        routes,
        closes: closes(&app.closes),
        heartbeat: Heartbeat {
            enabled: app.lifecycle.enabled(),
            process: app.lifecycle.process().to_owned(),
            interval_secs: app.lifecycle.heartbeat_interval().as_secs(),
            last_beat_unix_ms: last_beat,
            last_failure_unix_ms: last_failure,
        },
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The recent closes, and their counts.
fn closes(recent: &crate::close::Recent) -> Closes {
    let recent: Vec<Closed> = recent
        .newest_first()
        .into_iter()
        .map(|c| Closed {
            at_unix_ms: c.at_unix_ms,
            job: c.job,
            reason: c.reason,
            code: c.code,
        })
        .collect();
    let mut by: BTreeMap<(&'static str, &'static str, Option<u16>), usize> = BTreeMap::new();
    for c in &recent {
        *by.entry((c.job, c.reason, c.code)).or_default() += 1;
    }
    let mut counts: Vec<CloseCount> = by
        .into_iter()
        .map(|((job, reason, code), count)| CloseCount {
            job,
            reason,
            code,
            count,
        })
        .collect();
    counts.sort_by_key(|c| std::cmp::Reverse(c.count));
    Closes { recent, counts }
}

/// Redis' servers: standalone, a `PING`; a cluster, `CLUSTER NODES`.
async fn shards(app: &App, keys: Keys, server: &str) -> Vec<Shard> {
    let server = if server.is_empty() { "redis" } else { server };
    let mut redis = app.redis.clone();
    if keys.is_cluster() {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let ask = cmd.query_async::<String>(&mut redis);
        return match tokio::time::timeout(REDIS_WAIT, ask).await {
            Ok(Ok(nodes)) => cluster_nodes(&nodes),
            Ok(Err(e)) => vec![unreachable("cluster", e.to_string())],
            Err(_) => vec![unreachable("cluster", "no answer in 1 s".into())],
        };
    }
    let started = std::time::Instant::now();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut redis);
    match tokio::time::timeout(REDIS_WAIT, ping).await {
        Ok(Ok(_)) => vec![Shard {
            node: server.into(),
            role: "master",
            connected: true,
            slots: Vec::new(),
            detail: None,
            latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
        }],
        Ok(Err(e)) => vec![unreachable(server, e.to_string())],
        Err(_) => vec![unreachable(server, "no answer in 1 s".into())],
    }
}

fn unreachable(node: &str, error: String) -> Shard {
    Shard {
        node: node.into(),
        role: "master",
        connected: false,
        slots: Vec::new(),
        detail: Some(error),
        latency_ms: None,
    }
}

/// The nodes of a `CLUSTER NODES` answer: `<id> <ip:port@cport[,host]>
/// <flags> <master> <ping> <pong> <epoch> <link-state> <slot>...`;
/// masters first.
fn cluster_nodes(text: &str) -> Vec<Shard> {
    let mut shards: Vec<Shard> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (addr, flags, link) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
            let node = addr.split(['@', ',']).next().unwrap_or(addr);
            let failing = flags
                .split(',')
                .any(|f| matches!(f, "fail" | "fail?" | "handshake" | "noaddr"));
            Some(Shard {
                node: node.to_owned(),
                role: if flags.split(',').any(|f| f == "master") {
                    "master"
                } else {
                    "replica"
                },
                connected: *link == "connected" && !failing,
                slots: fields
                    .get(8..)
                    .unwrap_or_default()
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
                detail: Some((*flags).to_owned()),
                latency_ms: None,
            })
        })
        .collect();
    shards.sort_by(|a, b| (a.role, &a.node).cmp(&(b.role, &b.node)));
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lists_each_node_with_its_state() {
        let text = "\
07c3 127.0.0.1:30004@40004 replica e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,redis-2 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master,fail - 0 1426238318243 3 disconnected 10923-16383
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
";
        let shards = cluster_nodes(text);
        let seen: Vec<(&str, &str, bool, usize)> = shards
            .iter()
            .map(|s| (s.node.as_str(), s.role, s.connected, s.slots.len()))
            .collect();
        assert_eq!(
            seen,
            [
                ("127.0.0.1:30001", "master", true, 1),
                ("127.0.0.1:30002", "master", true, 1),
                ("127.0.0.1:30003", "master", false, 1),
                ("127.0.0.1:30004", "replica", true, 0),
            ]
        );
        assert_eq!(shards[0].slots, ["0-5460"]);
        assert!(cluster_nodes("garbage\n\n").is_empty());
    }

    #[test]
    fn closes_are_counted_by_job_reason_and_code() {
        let recent = crate::close::Recent::default();
        recent.record("sessions", "client", Some(1000));
        recent.record("topics", "slow_consumer", Some(1008));
        recent.record("sessions", "client", Some(1000));
        let c = closes(&recent);
        assert_eq!(c.recent.len(), 3);
        assert_eq!(c.recent[0].reason, "client");
        assert_eq!(c.recent[1].reason, "slow_consumer");
        assert_eq!(
            c.counts[0],
            CloseCount {
                job: "sessions",
                reason: "client",
                code: Some(1000),
                count: 2
            }
        );
        assert_eq!(c.counts.len(), 2);
    }
}
