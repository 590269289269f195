//! The benchmark scenarios. Each runs against one [`Target`] and returns a
//! [`Report`]; `compare` in main.rs runs the same scenario against wsproxy
//! and a peer in one invocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{self, ClusterBackend};
use crate::net::{self, HttpConn, Sources, Ws};
use crate::stats::{self, Report, histogram, message, now_us};

/// A system under test that bridges "channels" to WebSocket subscribers.
#[derive(Debug, Clone)]
pub enum Target {
    /// wsproxy's session bridge: tokens and publishing through Redis.
    Wsproxy {
        /// e.g. ws://127.0.0.1:8080
        ws: String,
        /// The Redis wsproxy uses.
        redis: String,
    },
    /// nchan (nginx) with its Redis backend: publish by HTTP POST.
    Nchan {
        /// e.g. http://127.0.0.1:8091
        http: String,
    },
    /// wsproxy's topic pub/sub hub (`/ws`, anonymous clients allowed): each
    /// "channel" is a topic of session `bench`; messages are published on
    /// its Redis channel `pubsub:bench:{topic}`.
    Hub {
        /// e.g. ws://127.0.0.1:8080
        ws: String,
        /// The Redis wsproxy uses.
        redis: String,
        /// Anonymous clients are apart from token holders (the server has
        /// JWT_SECRET): the channel is `pubsub:anon:bench:{topic}`.
        apart: bool,
    },
    /// wsproxy's session bridge in reliable mode (`wsproxy.v1`, needs
    /// RELIABLE_SESSIONS=true): messages go out with `FCALL
    /// wsproxy_publish`, into history and live.
    Reliable {
        /// e.g. ws://127.0.0.1:8080
        ws: String,
        /// The Redis wsproxy uses.
        redis: String,
        /// Messages a publish call (`--per-call`): 1 is `wsproxy_publish`,
        /// more is `wsproxy_publish_batch` of consecutive messages of one
        /// session.
        per_call: usize,
    },
    /// wsproxy's session bridge on a Redis Cluster (`REDIS_CLUSTER_NODES`):
    /// tokens with `SETEX session:{<id>}:auth`, messages with `SPUBLISH
    /// session:{<id>}:down` (or `PUBLISH`, classic), one pipeline per
    /// master (see [`crate::cluster`]).
    WsproxyCluster {
        /// e.g. ws://127.0.0.1:8080
        ws: String,
        /// Seed URLs of the cluster.
        nodes: Vec<String>,
        pubsub: cluster::PubSub,
    },
    /// Any WebSocket URL (a proxy route, an echo server): connect and idle only.
    Url {
        /// Reported name.
        name: String,
        /// e.g. ws://127.0.0.1:8090/echo
        url: String,
    },
}

impl Target {
    pub fn name(&self) -> String {
        match self {
            Target::Wsproxy { .. } => "wsproxy".into(),
            Target::Nchan { .. } => "nchan".into(),
            Target::Hub { .. } => "wsproxy-hub".into(),
            Target::Reliable { per_call: 1, .. } => "wsproxy-reliable".into(),
            Target::Reliable { per_call, .. } => format!("wsproxy-reliable-x{per_call}"),
            Target::WsproxyCluster { pubsub, .. } => match pubsub {
                cluster::PubSub::Sharded => "wsproxy-cluster".into(),
                cluster::PubSub::Classic => "wsproxy-cluster-classic".into(),
            },
            Target::Url { name, .. } => name.clone(),
        }
    }

    fn sub_url(&self, channel: &str) -> String {
        match self {
            Target::Wsproxy { ws, .. }
            | Target::Reliable { ws, .. }
            | Target::WsproxyCluster { ws, .. } => {
                format!("{ws}/bench/ws/{channel}")
            }
            Target::Nchan { http } => {
                format!("{}/sub/{channel}", http.replacen("http://", "ws://", 1))
            }
            Target::Hub { ws, .. } => format!("{ws}/ws"),
            Target::Url { url, .. } => url.clone(),
        }
    }

    /// The Redis channel a publisher uses for `channel` (Redis-backed targets).
    fn redis_channel(&self, channel: &str) -> String {
        match self {
            Target::Hub { apart: false, .. } => format!("pubsub:bench:{channel}"),
            Target::Hub { apart: true, .. } => format!("pubsub:anon:bench:{channel}"),
            Target::Reliable { .. } => format!("session:{channel}:history"),
            Target::WsproxyCluster { .. } => cluster::down_channel(channel),
            _ => format!("session:{channel}:down"),
        }
    }

    /// Makes the channels usable: tokens in Redis for wsproxy, nothing
    /// for nchan (its subscribers need no credentials).
    pub(crate) async fn prepare(&self, channels: &[String]) -> anyhow::Result<()> {
        if let Target::Wsproxy { redis, .. } | Target::Reliable { redis, .. } = self {
            let mut c = redis_conn(redis).await?;
            for chunk in channels.chunks(1000) {
                let mut pipe = redis::pipe();
                for ch in chunk {
                    pipe.cmd("SETEX")
                        .arg(format!("session:{ch}:auth"))
                        .arg(600)
                        .arg(token_for(ch))
                        .ignore();
                }
                let _: () = pipe.query_async(&mut c).await?;
            }
        }
        if let Target::WsproxyCluster { nodes, .. } = self {
            let backend = ClusterBackend::connect(nodes).await?;
            for chunk in channels.chunks(1000) {
                let mut pipes = backend.pipelines();
                for ch in chunk {
                    let key = cluster::auth_key(ch);
                    pipes[backend.master_of(&key)]
                        .cmd("SETEX")
                        .arg(key)
                        .arg(600)
                        .arg(token_for(ch));
                }
                let failed = backend.send(pipes).await;
                if failed > 0 {
                    bail!("{failed} of {} SETEX on the cluster failed", chunk.len());
                }
            }
        }
        Ok(())
    }

    fn token(&self, channel: &str) -> Option<String> {
        matches!(
            self,
            Target::Wsproxy { .. } | Target::Reliable { .. } | Target::WsproxyCluster { .. }
        )
        .then(|| token_for(channel))
    }

    /// Waits until the target delivers to `expected[i]` subscribers on
    /// `channels[i]`. wsproxy confirms its subscription before the 101, so
    /// there is nothing to wait for; nchan's Redis-backed subscriptions
    /// become active a moment after the handshake, and publishing earlier
    /// loses messages, so we poll its channel info.
    pub(crate) async fn wait_active(
        &self,
        channels: &[String],
        expected: usize,
    ) -> anyhow::Result<()> {
        let Target::Nchan { http } = self else {
            return Ok(());
        };
        let mut conn = HttpConn::open(http).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        for ch in channels {
            loop {
                let (status, body) = conn
                    .request("GET", &format!("/pub/{ch}"), "text/json", Bytes::new())
                    .await?;
                let subscribers = if status == 200 {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["subscribers"].as_u64())
                        .unwrap_or(0)
                } else {
                    0
                };
                if subscribers as usize >= expected {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "nchan channel {ch} has {subscribers} of {expected} subscribers after 60 s"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The count can run slightly ahead of the Redis subscription being
        // live (peers/README.md); a short pause removes the last losses.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }
}

pub(crate) fn token_for(channel: &str) -> String {
    format!("bench-token-{channel}")
}

/// A Redis client with Nagle's algorithm off (the redis crate leaves it
/// on, which adds delayed-ACK stalls to pipelined publishing).
pub(crate) fn redis_client(url: &str) -> anyhow::Result<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    Ok(redis::Client::open(info.set_tcp_settings(tcp))?)
}

pub(crate) async fn redis_conn(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    redis_client(url)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to Redis at {url}"))
}

/// Channel names unique to this run.
pub fn channels(prefix: &str, n: usize) -> Vec<String> {
    let run = std::process::id() as u64 * 1_000_000 + (now_us() % 1_000_000);
    (0..n).map(|i| format!("{prefix}{run}-{i}")).collect()
}

/// Opens one client per entry of `channels` (several may repeat), at most
/// `concurrency` handshakes in flight. Returns the sockets in order, the
/// number of failures, handshake latencies and the elapsed time.
pub async fn open_clients(
    target: &Target,
    sources: &Arc<Sources>,
    channels: &[String],
    concurrency: usize,
) -> (Vec<Ws>, u64, Histogram<u64>, Duration, Option<String>) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(channels.len());
    for ch in channels {
        let url = target.sub_url(ch);
        let token = target.token(ch);
        let sources = sources.clone();
        let permits = permits.clone();
        let subscribe =
            matches!(target, Target::Hub { .. }).then(|| format!("subscribe:{ch}|bench"));
        let reliable = matches!(target, Target::Reliable { .. });
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let t0 = now_us();
            let protocol = reliable.then_some(RELIABLE_PROTOCOL);
            let mut r = net::connect_with(&sources, &url, token.as_deref(), protocol).await;
            if let (Ok(ws), Some(cmd)) = (r.as_mut(), subscribe) {
                // A hub client is ready once its subscription is confirmed.
                if let Err(e) = hub_subscribe(ws, cmd).await {
                    r = Err(e);
                }
            }
            if let (Ok(ws), true) = (r.as_mut(), reliable) {
                // A reliable client is ready with its welcome.
                if let Err(e) = welcome(ws).await {
                    r = Err(e);
                }
            }
            (r, now_us() - t0)
        }));
    }
    let mut sockets = Vec::with_capacity(channels.len());
    let mut errors = 0;
    let mut first_error = None;
    let mut h = histogram();
    for t in tasks {
        match t.await {
            Ok((Ok(ws), took)) => {
                let _ = h.record(took.max(1));
                sockets.push(ws);
            }
            Ok((Err(e), _)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (sockets, errors, h, started.elapsed(), first_error)
}

/// The subprotocol of reliable sessions.
pub(crate) const RELIABLE_PROTOCOL: &str = "wsproxy.v1";

/// Reads a reliable connection's welcome: its epoch and offset.
pub(crate) async fn welcome(ws: &mut Ws) -> anyhow::Result<(String, String)> {
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("no welcome")?;
    let Some(Ok(Message::Text(t))) = first else {
        bail!("expected a welcome, got {first:?}");
    };
    let v: serde_json::Value = serde_json::from_str(t.as_str())?;
    match (
        v["type"].as_str(),
        v["epoch"].as_str(),
        v["offset"].as_str(),
    ) {
        (Some("welcome"), Some(e), Some(o)) => Ok((e.to_owned(), o.to_owned())),
        _ => bail!("expected a welcome, got {t}"),
    }
}

/// Sends a hub `subscribe:` command and waits for its confirmation.
pub(crate) async fn hub_subscribe(ws: &mut Ws, command: String) -> anyhow::Result<()> {
    ws.send(Message::text(command)).await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("no reply to subscribe")?;
    match reply {
        Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => Ok(()),
        other => bail!("subscribe refused: {other:?}"),
    }
}

/// `connect`: N clients connect (and authenticate, for wsproxy).
pub async fn connect(
    target: &Target,
    sources: &Arc<Sources>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Report> {
    net::check_fd_budget(n)?;
    let chans = channels("c", n);
    target.prepare(&chans).await?;
    let (sockets, errors, h, took, first_error) =
        open_clients(target, sources, &chans, concurrency).await;
    let delivered = sockets.len() as u64;
    close_all(sockets).await;
    Ok(Report {
        scenario: "connect".into(),
        target: target.name(),
        connections: n,
        sent: n as u64,
        delivered,
        errors,
        seconds: took.as_secs_f64(),
        rate: delivered as f64 / took.as_secs_f64(),
        note: first_error.unwrap_or_default(),
        ..Report::default()
    }
    .with_latency(&h))
}

/// `idle`: hold N connections and report the target's RSS growth per
/// connection, read from /proc/PID/status before and after.
pub async fn idle(
    target: &Target,
    sources: &Arc<Sources>,
    n: usize,
    pids: &[u32],
    concurrency: usize,
) -> anyhow::Result<Report> {
    if pids.is_empty() {
        bail!("idle needs the target's process ids (--pids)");
    }
    net::check_fd_budget(n)?;
    let chans = channels("i", n);
    target.prepare(&chans).await?;
    // Warm up: the first connections pay for one-off allocations (buffers,
    // thread-local caches) that are not a per-connection cost.
    let warm = channels("w", 50.min(n));
    target.prepare(&warm).await?;
    let (warm_sockets, _, _, _, _) = open_clients(target, sources, &warm, concurrency).await;
    target.wait_active(&warm, 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = net::rss_kib(pids)?;
    let (sockets, errors, _, took, first_error) =
        open_clients(target, sources, &chans, concurrency).await;
    target.wait_active(&chans, 1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = net::rss_kib(pids)?;
    let held = sockets.len();
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / held.max(1) as f64;
    close_all(sockets).await;
    close_all(warm_sockets).await;
    Ok(Report {
        scenario: "idle".into(),
        target: target.name(),
        connections: n,
        sent: n as u64,
        delivered: held as u64,
        errors,
        seconds: took.as_secs_f64(),
        rate: held as f64 / took.as_secs_f64(),
        rss_per_conn: Some(per_conn),
        note: match first_error {
            Some(e) => e,
            None => format!("rss {before} KiB -> {after} KiB"),
        },
        ..Report::default()
    })
}

/// What one receiving client saw.
pub(crate) struct Received {
    pub(crate) count: u64,
    pub(crate) hist: Histogram<u64>,
    pub(crate) last_us: u64,
    /// The client's socket, still open: closing it is left to the caller,
    /// after any measurement of the server (a close costs the server too).
    pub(crate) socket: Option<Ws>,
}

/// Reads from `ws` until `expected` messages arrived or `stop` fires.
/// When `per_seq` is given, also keeps the largest latency per sequence
/// number (the "last subscriber" latency for fan-out).
fn receive(
    mut ws: Ws,
    expected: u64,
    stop: Arc<tokio::sync::Notify>,
    per_seq: Option<Arc<Vec<AtomicU64>>>,
) -> tokio::task::JoinHandle<Received> {
    // Allocated here, before publishing starts: a histogram is tens of KiB
    // to zero, and a thousand of them allocated lazily would stall the
    // first milliseconds of the measurement.
    let mut got = Received {
        count: 0,
        hist: histogram(),
        last_us: 0,
        socket: None,
    };
    tokio::spawn(async move {
        let stopped = stop.notified();
        tokio::pin!(stopped);
        while got.count < expected {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = &mut stopped => break,
            };
            let data = match msg {
                Some(Ok(Message::Text(t))) => Bytes::from(t),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(_)) => continue,
                _ => break,
            };
            let now = now_us();
            got.count += 1;
            got.last_us = now;
            if let Some(sent) = stats::sent_at(&data) {
                let lat = now.saturating_sub(sent).max(1);
                let _ = got.hist.record(lat);
                if let (Some(per_seq), Some(seq)) = (&per_seq, seq_of(&data))
                    && let Some(slot) = per_seq.get(seq as usize)
                {
                    slot.fetch_max(lat, Ordering::Relaxed);
                }
            }
        }
        got.socket = Some(ws);
        got
    })
}

pub(crate) fn seq_of(msg: &[u8]) -> Option<u64> {
    let start = msg.windows(4).position(|w| w == b"\"s\":")? + 4;
    let mut v: u64 = 0;
    let mut any = false;
    for d in msg[start..].iter().take_while(|b| b.is_ascii_digit()) {
        v = v * 10 + u64::from(d - b'0');
        any = true;
    }
    any.then_some(v)
}

/// Publishes `m` messages, message `i` on `channels[i % len]`, at `rate`
/// messages/s (0 = flat out). Each message carries the time it was handed
/// to the target; how far the publisher fell behind its schedule is
/// returned too (the last field, microseconds), so a target that slows the
/// publisher cannot hide it: it shows up as publisher lag and as a lower
/// delivered rate. Returns (first send time, published, errors, max lag,
/// a note: on a cluster, how many messages went to each master).
pub(crate) async fn publish(
    target: &Target,
    channels: &[String],
    m: u64,
    rate: f64,
) -> anyhow::Result<Published> {
    // Connect before the clock starts: connecting is not publishing.
    let mut redis_connection = match target {
        Target::Wsproxy { redis, .. }
        | Target::Hub { redis, .. }
        | Target::Reliable { redis, .. } => Some(redis_conn(redis).await?),
        _ => None,
    };
    let mut cluster_backend = match target {
        Target::WsproxyCluster { nodes, .. } => Some(ClusterBackend::connect(nodes).await?),
        _ => None,
    };
    let per_call = match target {
        Target::Reliable { per_call, .. } => Some((*per_call).max(1) as u64),
        _ => None,
    };
    let mut nchan_connections = Vec::new();
    if let Target::Nchan { http } = target {
        for _ in 0..16 {
            nchan_connections.push(HttpConn::open(http).await?);
        }
    }
    let t0 = now_us();
    let due = move |i: u64| -> u64 {
        if rate > 0.0 {
            t0 + (i as f64 * 1e6 / rate) as u64
        } else {
            0
        }
    };
    match target {
        Target::Wsproxy { .. } | Target::Hub { .. } | Target::Reliable { .. } => {
            let Some(c) = redis_connection.take() else {
                bail!("no Redis connection");
            };
            let names: Vec<String> = channels.iter().map(|ch| target.redis_channel(ch)).collect();
            publish_redis(c, &names, per_call, (m, rate, t0), due).await
        }
        Target::WsproxyCluster { pubsub, .. } => {
            let Some(backend) = cluster_backend.take() else {
                bail!("no cluster connection");
            };
            let names: Vec<String> = channels.iter().map(|ch| target.redis_channel(ch)).collect();
            publish_cluster(&backend, &names, pubsub.command(), (m, rate, t0), due).await
        }
        Target::Url { .. } => bail!("a plain URL target has no way to publish"),
        Target::Nchan { .. } => {
            publish_nchan(nchan_connections, channels, (m, rate, t0), due).await
        }
    }
}

/// What a publisher returns: (first send time, published, errors, max lag,
/// a note).
type Published = (u64, u64, u64, u64, String);

/// [`publish`] to one Redis: `PUBLISH` to `names` in pipelines, or `FCALL
/// wsproxy_publish` (`per_call` 1) or `wsproxy_publish_batch` (runs of
/// `per_call` to a session) on a reliable target.
async fn publish_redis(
    mut c: redis::aio::MultiplexedConnection,
    names: &[String],
    per_call: Option<u64>,
    (m, rate, t0): (u64, f64, u64),
    due: impl Fn(u64) -> u64,
) -> anyhow::Result<Published> {
    let mut i = 0u64;
    let mut errors = 0;
    let mut lag = 0;
    while i < m {
        let now = now_us();
        let mut pipe = redis::pipe();
        let mut batch = 0;
        while i < m && batch < 512 && due(i) <= now {
            let t = now;
            if rate > 0.0 {
                lag = u64::max(lag, now - due(i));
            }
            match per_call {
                None => {
                    let name = &names[(i as usize) % names.len()];
                    pipe.cmd("PUBLISH").arg(name).arg(message(t, i)).ignore();
                    i += 1;
                    batch += 1;
                }
                Some(1) => {
                    let name = &names[(i as usize) % names.len()];
                    pipe.cmd("FCALL")
                        .arg("wsproxy_publish")
                        .arg(1)
                        .arg(name)
                        .arg(message(t, i))
                        .ignore();
                    i += 1;
                    batch += 1;
                }
                Some(k) => {
                    // The rest of session (i / k)'s run of k, all
                    // due by now (at a rate, a run is sent as soon
                    // as its first message is due).
                    let name = &names[((i / k) as usize) % names.len()];
                    let end = u64::min(m, (i / k + 1) * k);
                    let mut call = redis::cmd("FCALL");
                    call.arg("wsproxy_publish_batch").arg(1).arg(name);
                    while i < end {
                        call.arg(message(t, i));
                        i += 1;
                        batch += 1;
                    }
                    pipe.add_command(call).ignore();
                }
            }
        }
        if batch == 0 {
            let wait = due(i).saturating_sub(now_us());
            tokio::time::sleep(Duration::from_micros(wait)).await;
            continue;
        }
        if pipe.query_async::<()>(&mut c).await.is_err() {
            errors += batch;
        }
    }
    Ok((t0, m - errors, errors, lag, String::new()))
}

/// [`publish`] to a Redis Cluster: one pipeline per master, with
/// `command` (`SPUBLISH` or `PUBLISH`).
async fn publish_cluster(
    backend: &ClusterBackend,
    names: &[String],
    command: &str,
    (m, rate, t0): (u64, f64, u64),
    due: impl Fn(u64) -> u64,
) -> anyhow::Result<Published> {
    let owners: Vec<usize> = names.iter().map(|n| backend.master_of(n)).collect();
    let mut per_master = vec![0u64; backend.masters.len()];
    let mut i = 0u64;
    let mut errors = 0;
    let mut lag = 0;
    while i < m {
        let now = now_us();
        // One pipeline per master, sent at once: what one pipeline
        // is for a single Redis.
        let mut pipes = backend.pipelines();
        let mut batch = 0;
        while i < m && batch < 512 && due(i) <= now {
            if rate > 0.0 {
                lag = u64::max(lag, now - due(i));
            }
            let k = (i as usize) % names.len();
            pipes[owners[k]]
                .cmd(command)
                .arg(&names[k])
                .arg(message(now, i));
            per_master[owners[k]] += 1;
            i += 1;
            batch += 1;
        }
        if batch == 0 {
            let wait = due(i).saturating_sub(now_us());
            tokio::time::sleep(Duration::from_micros(wait)).await;
            continue;
        }
        errors += backend.send(pipes).await;
    }
    let spread = backend
        .masters
        .iter()
        .zip(&per_master)
        .map(|(addr, n)| format!("{addr} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((
        t0,
        m - errors,
        errors,
        lag,
        format!("{command} per master: {spread}"),
    ))
}

/// [`publish`] to nchan: HTTP POSTs over the keep-alive `connections`,
/// each a worker taking the next message.
async fn publish_nchan(
    connections: Vec<HttpConn>,
    channels: &[String],
    (m, rate, t0): (u64, f64, u64),
    due: impl Fn(u64) -> u64 + Copy + Send + 'static,
) -> anyhow::Result<Published> {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let lag = Arc::new(AtomicU64::new(0));
    let channels: Arc<Vec<String>> = Arc::new(channels.to_vec());
    let mut workers = Vec::new();
    // Keep-alive connections, as a real publisher would use.
    for mut conn in connections {
        let (next, errors, channels, lag) =
            (next.clone(), errors.clone(), channels.clone(), lag.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= m {
                    break;
                }
                let at = due(i);
                let now = now_us();
                if at > now {
                    tokio::time::sleep(Duration::from_micros(at - now)).await;
                }
                let t = now_us();
                if rate > 0.0 {
                    lag.fetch_max(t.saturating_sub(at), Ordering::Relaxed);
                }
                let path = format!("/pub/{}", channels[(i as usize) % channels.len()]);
                match conn
                    .request("POST", &path, "text/json", Bytes::from(message(t, i)))
                    .await
                {
                    Ok((status, _)) if status < 300 => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let errors = errors.load(Ordering::Relaxed);
    Ok((
        t0,
        m - errors,
        errors,
        lag.load(Ordering::Relaxed),
        String::new(),
    ))
}

/// The publisher's worst lateness against its schedule, for fixed rates.
fn lag_note(rate: f64, lag_us: u64) -> String {
    if rate > 0.0 {
        format!("publisher lag max {}", stats::us(lag_us))
    } else {
        String::new()
    }
}

/// Waits for the receivers; gives up on stragglers once nothing has
/// arrived for a while. Returns the count, the latencies, the time of the
/// last arrival and the receivers' sockets, open (see [`close_all`]).
pub(crate) async fn collect(
    receivers: Vec<tokio::task::JoinHandle<Received>>,
    stop: Arc<tokio::sync::Notify>,
    grace: Duration,
) -> (u64, Histogram<u64>, u64, Vec<Ws>) {
    let all = futures_util::future::join_all(receivers);
    tokio::pin!(all);
    let results = match tokio::time::timeout(grace, &mut all).await {
        Ok(r) => r,
        Err(_) => {
            stop.notify_waiters();
            all.await
        }
    };
    let mut count = 0;
    let mut hist = histogram();
    let mut last = 0;
    let mut sockets = Vec::new();
    for r in results.into_iter().flatten() {
        count += r.count;
        let _ = hist.add(&r.hist);
        last = last.max(r.last_us);
        sockets.extend(r.socket);
    }
    (count, hist, last, sockets)
}

/// How many of M messages session `j` of N gets from [`publish`]: runs of
/// `per_call` (1 but for a batching reliable target) round robin.
fn expected(target: &Target, m: u64, n: usize, j: usize) -> u64 {
    let k = match target {
        Target::Reliable { per_call, .. } => (*per_call).max(1) as u64,
        _ => 1,
    };
    let (n, j) = (n.max(1) as u64, j as u64);
    let (runs, rest) = (m / k, m % k);
    let mine = runs / n + u64::from(j < runs % n);
    k * mine + if runs % n == j { rest } else { 0 }
}

/// `down`: N sessions, one client each; M messages round robin at `rate`
/// (the load: N, M, rate). With `pids`, also the CPU time those processes
/// spent per delivered message, from the first publish until the last
/// message arrived (or the receivers gave up).
pub async fn down(
    target: &Target,
    sources: &Arc<Sources>,
    (n, m, rate): (usize, u64, f64),
    concurrency: usize,
    pids: &[u32],
) -> anyhow::Result<Report> {
    net::check_fd_budget(n)?;
    let chans = channels("d", n);
    target.prepare(&chans).await?;
    let (sockets, errors, _, _, first_error) =
        open_clients(target, sources, &chans, concurrency).await;
    if let Some(e) = first_error {
        bail!("{errors} of {n} clients failed to connect: {e}");
    }
    target.wait_active(&chans, 1).await?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let receivers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| receive(ws, expected(target, m, n, i), stop.clone(), None))
        .collect();
    let cpu_before = net::cpu_us(pids)?;
    let (t0, published, pub_errors, lag, spread) = publish(target, &chans, m, rate).await?;
    let expected_end = Duration::from_secs_f64(if rate > 0.0 { m as f64 / rate } else { 0.0 });
    let (count, hist, last, sockets) =
        collect(receivers, stop, expected_end + Duration::from_secs(10)).await;
    let cpu = net::cpu_us(pids)?.saturating_sub(cpu_before);
    close_all(sockets).await;
    let seconds = (last.saturating_sub(t0)) as f64 / 1e6;
    Ok(Report {
        cpu_us_per_op: (!pids.is_empty() && count > 0).then(|| cpu as f64 / count as f64),
        scenario: "down".into(),
        target: target.name(),
        connections: n,
        sent: published,
        delivered: count,
        errors: pub_errors,
        seconds,
        rate: count as f64 / seconds.max(1e-9),
        offered: rate,
        note: [lag_note(rate, lag), spread]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        ..Report::default()
    }
    .with_latency(&hist))
}

/// `fanout`: one channel, N subscribers, M messages; deliveries/s and the
/// latency of the last subscriber to get each message.
pub async fn fanout(
    target: &Target,
    sources: &Arc<Sources>,
    n: usize,
    m: u64,
    rate: f64,
    concurrency: usize,
) -> anyhow::Result<Report> {
    net::check_fd_budget(n)?;
    let chan = channels("f", 1);
    target.prepare(&chan).await?;
    let subs: Vec<String> = std::iter::repeat_n(chan[0].clone(), n).collect();
    let (sockets, errors, _, _, first_error) =
        open_clients(target, sources, &subs, concurrency).await;
    if let Some(e) = first_error {
        bail!("{errors} of {n} clients failed to connect: {e}");
    }
    target.wait_active(&chan, n).await?;
    let per_seq: Arc<Vec<AtomicU64>> = Arc::new((0..m).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(tokio::sync::Notify::new());
    let receivers: Vec<_> = sockets
        .into_iter()
        .map(|ws| receive(ws, m, stop.clone(), Some(per_seq.clone())))
        .collect();
    let (t0, published, pub_errors, lag, spread) = publish(target, &chan, m, rate).await?;
    let expected_end = Duration::from_secs_f64(if rate > 0.0 { m as f64 / rate } else { 0.0 });
    let (count, _all, last, sockets) =
        collect(receivers, stop, expected_end + Duration::from_secs(10)).await;
    close_all(sockets).await;
    let mut last_sub = histogram();
    for slot in per_seq.iter() {
        let v = slot.load(Ordering::Relaxed);
        if v > 0 {
            let _ = last_sub.record(v);
        }
    }
    let seconds = (last.saturating_sub(t0)) as f64 / 1e6;
    Ok(Report {
        scenario: "fanout".into(),
        target: target.name(),
        connections: n,
        sent: published * n as u64,
        delivered: count,
        errors: pub_errors,
        seconds,
        rate: count as f64 / seconds.max(1e-9),
        offered: rate,
        note: std::iter::once("latency = last subscriber per message".to_owned())
            .chain([lag_note(rate, lag), spread])
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        ..Report::default()
    }
    .with_latency(&last_sub))
}

/// `up`: N wsproxy clients each send M messages; a Redis subscriber counts
/// what arrives on the up channels.
pub async fn up(
    ws_base: &str,
    redis_url: &str,
    sources: &Arc<Sources>,
    n: usize,
    m: u64,
    concurrency: usize,
) -> anyhow::Result<Report> {
    net::check_fd_budget(n)?;
    let target = Target::Wsproxy {
        ws: ws_base.to_owned(),
        redis: redis_url.to_owned(),
    };
    let chans = channels("u", n);
    target.prepare(&chans).await?;
    let total = n as u64 * m;
    // One pattern subscription sees every client's messages.
    let prefix = chans[0].rsplit_once('-').map_or("u", |(p, _)| p).to_owned();
    let mut pubsub = redis_client(redis_url)?.get_async_pubsub().await?;
    pubsub.psubscribe(format!("session:{prefix}-*:up")).await?;
    let counter = tokio::spawn(async move {
        let mut stream = pubsub.on_message();
        let mut got = 0u64;
        let mut h = histogram();
        let mut last = 0;
        while got < total {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(msg)) => {
                    got += 1;
                    last = now_us();
                    stats::record(&mut h, msg.get_payload_bytes());
                }
                _ => break,
            }
        }
        (got, h, last)
    });
    let (sockets, errors, _, _, first_error) =
        open_clients(&target, sources, &chans, concurrency).await;
    if let Some(e) = first_error {
        bail!("{errors} of {n} clients failed to connect: {e}");
    }
    let t0 = now_us();
    let seq = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let seq = seq.clone();
            tokio::spawn(async move {
                let mut failed = 0u64;
                for _ in 0..m {
                    let s = seq.fetch_add(1, Ordering::Relaxed);
                    if ws.feed(Message::text(message(now_us(), s))).await.is_err() {
                        failed += 1;
                    }
                    if s.is_multiple_of(16) {
                        let _ = ws.flush().await;
                    }
                }
                let _ = ws.flush().await;
                // Keep the socket open until the counter is done.
                (ws, failed)
            })
        })
        .collect();
    let mut send_errors = 0;
    let mut keep = Vec::new();
    for s in senders {
        if let Ok((ws, failed)) = s.await {
            send_errors += failed;
            keep.push(ws);
        }
    }
    let (got, h, last) = counter.await?;
    close_all(keep).await;
    let seconds = last.saturating_sub(t0) as f64 / 1e6;
    Ok(Report {
        scenario: "up".into(),
        target: "wsproxy".into(),
        connections: n,
        sent: total,
        delivered: got,
        errors: send_errors,
        seconds,
        rate: got as f64 / seconds.max(1e-9),
        ..Report::default()
    }
    .with_latency(&h))
}

/// `echo`: N clients each make M request/response round trips through `url`.
pub async fn echo(
    name: &str,
    url: &str,
    sources: &Arc<Sources>,
    n: usize,
    m: u64,
    concurrency: usize,
    pids: &[u32],
) -> anyhow::Result<Report> {
    net::check_fd_budget(n)?;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut clients = Vec::new();
    for _ in 0..n {
        let (url, sources, permits) = (url.to_owned(), sources.clone(), permits.clone());
        clients.push(tokio::spawn(async move {
            let _p = permits.acquire_owned().await;
            net::connect(&sources, &url, None).await
        }));
    }
    let mut sockets = Vec::new();
    for c in clients {
        sockets.push(c.await??);
    }
    let cpu_before = net::cpu_us(pids)?;
    let t0 = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut h = histogram();
                let mut done = 0u64;
                for i in 0..m {
                    let t = now_us();
                    if ws.send(Message::text(message(t, i))).await.is_err() {
                        break;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                            let _ = h.record((now_us() - t).max(1));
                            done += 1;
                        }
                        _ => break,
                    }
                }
                let _ = ws.close(None).await;
                (done, h)
            })
        })
        .collect();
    let mut done = 0;
    let mut hist = histogram();
    for t in tasks {
        let (d, h) = t.await?;
        done += d;
        let _ = hist.add(&h);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = net::cpu_us(pids)?.saturating_sub(cpu_before);
    Ok(Report {
        cpu_us_per_op: (!pids.is_empty() && done > 0).then(|| cpu as f64 / done as f64),
        scenario: "echo".into(),
        target: name.into(),
        connections: n,
        sent: n as u64 * m,
        delivered: done,
        seconds,
        rate: done as f64 / seconds,
        note: "latency = round trip".into(),
        ..Report::default()
    }
    .with_latency(&hist))
}

pub(crate) async fn close_all(sockets: Vec<Ws>) {
    let closes = sockets.into_iter().map(|mut ws| async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    });
    futures_util::future::join_all(closes).await;
}

/// A WebSocket echo server for the `echo` scenario's backend.
pub async fn echo_server(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("echo server on ws://127.0.0.1:{port}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
            // Close the TCP connection as a server should, without a
            // reset: send FIN, then read what the client still sends until
            // it closes too (at most 2 s). Dropping the socket with bytes
            // unread (a ping after the client's close, Autobahn 7.1.6)
            // makes the kernel answer with a reset, which can discard the
            // close frame still on its way to the client.
            let stream = ws.get_mut();
            let _ = stream.shutdown().await;
            let mut rest = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

/// `resume`: N times in turn, a reliable client joins its session, leaves,
/// misses M messages (`FCALL wsproxy_publish`), and reconnects naming the
/// last offset it saw. Latency: from the start of the reconnect (TCP
/// connect and upgrade included) to the last replayed message. Every
/// replayed message must arrive, in order.
pub async fn resume(
    ws_base: &str,
    redis: &str,
    sources: &Arc<Sources>,
    n: usize,
    m: u64,
) -> anyhow::Result<Report> {
    let target = Target::Reliable {
        ws: ws_base.to_owned(),
        redis: redis.to_owned(),
        per_call: 1,
    };
    let chans = channels("r", n);
    target.prepare(&chans).await?;
    let mut c = redis_conn(redis).await?;
    let mut hist = histogram();
    let (mut delivered, mut errors) = (0u64, 0u64);
    let mut note = String::new();
    let started = Instant::now();
    for ch in &chans {
        let url = target.sub_url(ch);
        let token = token_for(ch);
        let mut ws =
            net::connect_with(sources, &url, Some(&token), Some(RELIABLE_PROTOCOL)).await?;
        let (epoch, offset) = welcome(&mut ws).await?;
        let _ = ws.close(None).await;
        drop(ws);
        let key = target.redis_channel(ch);
        for chunk in (0..m).collect::<Vec<_>>().chunks(500) {
            let mut pipe = redis::pipe();
            for &i in chunk {
                pipe.cmd("FCALL")
                    .arg("wsproxy_publish")
                    .arg(1)
                    .arg(&key)
                    .arg(message(now_us(), i))
                    .ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        let t0 = now_us();
        let resume_url = format!("{url}?epoch={epoch}&offset={offset}");
        let mut ws =
            net::connect_with(sources, &resume_url, Some(&token), Some(RELIABLE_PROTOCOL)).await?;
        let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no welcome on resume")?;
        if !matches!(&first, Some(Ok(Message::Text(t))) if t.contains("\"resumed\":true")) {
            errors += 1;
            if note.is_empty() {
                note = format!("resume refused: {first:?}");
            }
            continue;
        }
        let mut next = 0u64;
        while next < m {
            let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("replay stalled")?;
            let Some(Ok(Message::Text(t))) = msg else {
                bail!("replay ended early: {msg:?}");
            };
            match seq_of(t.as_bytes()) {
                Some(s) if s == next => next += 1,
                other => bail!("replay out of order: expected {next}, got {other:?}"),
            }
        }
        let _ = hist.record(now_us().saturating_sub(t0).max(1));
        delivered += m;
        let _ = ws.close(None).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        scenario: "resume".into(),
        target: target.name(),
        connections: n,
        sent: m * n as u64,
        delivered,
        errors,
        seconds,
        rate: delivered as f64 / seconds.max(1e-9),
        note: if note.is_empty() {
            format!("{m} missed messages per resume; latency: reconnect to last replayed")
        } else {
            note
        },
        ..Report::default()
    }
    .with_latency(&hist))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_is_expected_by_exactly_one_session() {
        for (k, m, n) in [
            (1, 100_000, 1000),
            (16, 100_000, 1000),
            (7, 1003, 10),
            (5, 3, 4),
        ] {
            let target = Target::Reliable {
                ws: String::new(),
                redis: String::new(),
                per_call: k,
            };
            let mut by_session = vec![0u64; n];
            for i in 0..m {
                by_session[((i / k as u64) % n as u64) as usize] += 1;
            }
            let got: Vec<u64> = (0..n).map(|j| expected(&target, m, n, j)).collect();
            assert_eq!(got, by_session, "k {k} m {m} n {n}");
        }
    }
}
