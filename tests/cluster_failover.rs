//! A Redis Cluster master dies under traffic, at realistic node timeouts
//! (3000 ms here; Redis's default of 15000 in the ignored test that CI
//! runs as a step of its own): what each class of session sees.
//!
//! Before wsproxy starts, the slots of the events stream and of the
//! control channel (and its stream) are moved to the master of the
//! process registrations: that master, the one killed, holds every key
//! wsproxy writes outside a session's slot, so one kill fails each of them
//! over (the registrations, the control stream, the events stream), where
//! three kills in three clusters did before.
//!
//! Three wsproxy processes (two tracking lifecycle); on each of the three
//! masters live three plain sessions and one reliable session; a backend
//! publishes to every one every 10 ms. The master is killed (SIGKILL,
//! once its replica has caught up); its replica is promoted; the killed
//! node is started again and rejoins as a replica; traffic is observed for
//! 30 s after that. Then:
//!
//! - clients of a healthy shard are admitted during the outage, on every
//!   process, within 3 s;
//! - plain sessions on the healthy shards lose nothing, and stay open;
//! - reliable sessions on the healthy shards are never closed;
//! - the failed shard's reliable session is closed with 1013, resumes,
//!   and gets what was accepted, in order, once;
//! - the failed shard's plain sessions lose only what was accepted
//!   between the kill and the promotion plus 0.5 s (counted, printed, with
//!   how many of them `SPUBLISH` said reached no receiver);
//! - no session gets a message twice;
//! - `/ready` answers 503 after the kill and 200 again once the failed
//!   shard's channels are back;
//! - wsproxy holds one pub/sub connection per master with channels and
//!   none on a replica (the rejoined node included);
//! - control works after the failover, on every process;
//! - once every client has left no shard channel is subscribed anywhere;
//! - lifecycle: every connection has one connect and one disconnect
//!   event, none `process_lost`, and presence is empty.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::Cluster;
use common::*;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;
use wsproxy::config::{ClusterPubSub, Config};

const TOKEN: &str = "failover-token";
/// How long traffic is observed once the cluster is whole again.
const OBSERVE: Duration = Duration::from_secs(30);
/// What the failed shard's plain sessions may lose after the promotion.
const AFTER_PROMOTION: Duration = Duration::from_millis(500);

fn request(
    server: SocketAddr,
    session: &str,
    query: &str,
    reliable: bool,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let url = format!("ws://{server}/agent-1/ws/{session}{query}");
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    if reliable {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("wsproxy.v1"),
        );
    }
    req
}

/// Connects, bounded: a handshake that never ends is a failure.
async fn connect(
    server: SocketAddr,
    session: &str,
    query: &str,
    reliable: bool,
) -> Result<Ws, String> {
    let req = request(server, session, query, reliable);
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the handshake did not end within the wait".into()),
    }
}

/// What one session's client saw.
#[derive(Debug, Default)]
struct Seen {
    /// Every `n` received, in arrival order.
    ns: Vec<u64>,
    /// Close codes received (a reliable client resumes after each).
    closes: Vec<u16>,
    /// When each close came.
    closed_at: Vec<Instant>,
}

/// Reads a plain session until `stop`.
fn read_plain(mut ws: Ws, stop: CancellationToken) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = ws.next() => next,
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    seen.ns.push(v["n"].as_u64().expect("n"));
                }
                Some(Ok(Message::Close(frame))) => {
                    seen.closes.push(frame.map_or(1005, |f| u16::from(f.code)));
                    seen.closed_at.push(Instant::now());
                    break;
                }
                Some(Ok(_)) => {}
                _ => {
                    seen.closes.push(1006);
                    seen.closed_at.push(Instant::now());
                    break;
                }
            }
        }
        seen
    })
}

/// Reads a reliable session until `stop`, resuming from its last offset
/// after every close, as a client does.
fn read_reliable(
    server: SocketAddr,
    session: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut position: Option<(String, String)> = None;
        'connect: while !stop.is_cancelled() {
            let query = match &position {
                Some((epoch, offset)) => format!("?epoch={epoch}&offset={offset}"),
                None => String::new(),
            };
            let Ok(mut ws) = connect(server, &session, &query, true).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break 'connect,
                    next = tokio::time::timeout(WAIT, ws.next()) => next,
                };
                match next {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                        match v["type"].as_str() {
                            Some("welcome") => {
                                if position.is_none() {
                                    let epoch = v["epoch"].as_str().expect("epoch").to_owned();
                                    position = Some((epoch, "0-0".into()));
                                } else {
                                    assert_eq!(v["resumed"], true, "a resume: {v}");
                                }
                            }
                            Some("message") => {
                                seen.ns.push(v["data"]["n"].as_u64().expect("n"));
                                if let Some((_, offset)) = position.as_mut() {
                                    v["offset"].as_str().expect("offset").clone_into(offset);
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        seen.closes.push(frame.map_or(1005, |f| u16::from(f.code)));
                        seen.closed_at.push(Instant::now());
                        continue 'connect;
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => {
                        seen.closes.push(1006);
                        seen.closed_at.push(Instant::now());
                        continue 'connect;
                    }
                }
            }
        }
        seen
    })
}

/// Publishes `{"n":k}` to one session every 10 ms until `stop`, each `k`
/// once (a failed publish is not retried: a dying node may have run it);
/// what Redis accepted, with when and (plain sessions) the number of
/// receivers `SPUBLISH` reported.
fn publish(
    cluster: &Cluster,
    session: &str,
    reliable: bool,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<(u64, Instant, i64)>> {
    let urls = cluster.urls();
    let (command, key) = if reliable {
        ("FCALL", format!("session:{{{session}}}:history"))
    } else {
        ("SPUBLISH", format!("session:{{{session}}}:down"))
    };
    tokio::spawn(async move {
        let client = redis::cluster::ClusterClientBuilder::new(urls)
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500))
            .retries(0)
            .build()
            .expect("client");
        let mut conn = client.get_async_connection().await.expect("connect");
        let mut accepted = Vec::new();
        let mut n = 0u64;
        while !stop.is_cancelled() {
            let payload = format!(r#"{{"n":{n}}}"#);
            let mut cmd = redis::cmd(command);
            if reliable {
                cmd.arg("wsproxy_publish").arg(1);
            }
            cmd.arg(&key).arg(&payload);
            let sent = tokio::time::timeout(
                Duration::from_secs(1),
                cmd.query_async::<redis::Value>(&mut conn),
            )
            .await;
            match sent {
                Ok(Ok(redis::Value::ServerError(_))) | Ok(Err(_)) | Err(_) => {
                    if let Ok(Ok(fresh)) =
                        tokio::time::timeout(Duration::from_secs(1), client.get_async_connection())
                            .await
                    {
                        conn = fresh;
                    }
                }
                Ok(Ok(redis::Value::Int(receivers))) => {
                    accepted.push((n, Instant::now(), receivers));
                }
                Ok(Ok(_)) => accepted.push((n, Instant::now(), -1)),
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        accepted
    })
}

/// `/ready`'s answers, polled every 50 ms until `stop`.
fn watch_ready(
    server: &Server,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<(Instant, u16)>> {
    let addr = server.addr;
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.is_cancelled() {
            let status = match tokio::time::timeout(
                Duration::from_secs(2),
                http_get(addr, "/ready"),
            )
            .await
            {
                Ok(Ok((status, _))) => status,
                _ => 0,
            };
            seen.push((Instant::now(), status));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    })
}

/// A session id whose keys live on the master on `port`.
async fn session_on(cluster: &Cluster, port: u16) -> String {
    loop {
        let s = unique("f");
        if cluster.master_of(&format!("{{{s}}}")).await == port {
            return s;
        }
    }
}

/// One session placed for the run.
struct Placed {
    id: String,
    /// The port of the master its keys live on.
    master: u16,
    reliable: bool,
    /// Which wsproxy process its client connects to.
    process: usize,
}

/// When the victim died and when its replica took over.
#[derive(Debug, Clone, Copy)]
struct Outage {
    killed_at: Instant,
    promoted_at: Instant,
}

/// A master failover at `node_timeout_ms`, one kill, checked on every
/// session class, on `/ready`, on the pub/sub connections, on control and
/// on lifecycle.
async fn failover(node_timeout_ms: u64) {
    let (logs, _guard) = LogCapture::start();
    let mut cluster = Cluster::start_with_node_timeout(node_timeout_ms).await;
    let victim = gather_wsproxy_keys(&cluster).await;
    let servers = start_processes(&cluster).await;
    let masters = cluster.master_ports().await;
    assert_eq!(masters.len(), 3, "three masters");
    let sessions = place_sessions(&cluster, &masters).await;
    let traffic = Traffic::start(&cluster, &servers, &sessions).await;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.wait_replicated(victim).await;
    let outage = kill_and_recover(&mut cluster, &servers, victim, node_timeout_ms).await;

    // The rejoined node is a replica and holds none of wsproxy's channels.
    tokio::time::sleep(OBSERVE).await;
    check_pubsub_connections(&cluster, victim, servers.len()).await;
    let observed = traffic.finish().await;
    check_sessions(&sessions, &observed, victim, outage, &logs);
    check_ready(&observed.ready, outage);
    check_control(&cluster, &servers).await;

    // Every client gone: no session's channel stays subscribed anywhere
    // (the processes' own control channel stays while they run), and once
    // they have stopped, nothing at all.
    drop(observed);
    wait_no_channels(&cluster, true).await;
    for server in servers {
        server.stop().await;
    }
    wait_no_channels(&cluster, false).await;
    check_lifecycle(&cluster, &sessions).await;
}

/// Moves the slots of the events stream and of the control channel (with
/// its stream, `{wsproxy:control}:log`) to the master of the process
/// registrations (`wsproxy:processes`), and returns that master: the one
/// kill then takes every key wsproxy itself writes outside a session's
/// slot at once (each of them on a master of its own was a kill of its
/// own, and a cluster of its own, before).
async fn gather_wsproxy_keys(cluster: &Cluster) -> u16 {
    const REGISTRATIONS: &str = "wsproxy:processes";
    const EVENTS: &str = "wsproxy:events";
    const CONTROL: &str = "wsproxy:control";
    let victim = cluster.master_of(REGISTRATIONS).await;
    println!(
        "before: registrations on {victim}, events on {}, control on {}",
        cluster.master_of(EVENTS).await,
        cluster.master_of(CONTROL).await
    );
    for key in [EVENTS, CONTROL] {
        if cluster.master_of(key).await != victim {
            cluster.move_slot_of(key, victim).await;
        }
    }
    let replica = *cluster
        .replicas_of(victim)
        .await
        .first()
        .expect("the victim has a replica");
    // The replica takes over the slots it knows its master to hold:
    // before the kill it must have heard of the moved ones.
    for key in [REGISTRATIONS, EVENTS, CONTROL, "{wsproxy:control}:log"] {
        wait_slot_seen_by(cluster, replica, key, victim).await;
    }
    println!("registrations, events and control all on {victim} (replica {replica})");
    victim
}

/// Waits (at most [`WAIT`]) until the node on `node` names `master` as
/// the master of `key`'s slot.
async fn wait_slot_seen_by(cluster: &Cluster, node: u16, key: &str, master: u16) {
    let slot: i64 = cluster
        .query(node, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
        .await
        .expect("KEYSLOT");
    let deadline = Instant::now() + WAIT;
    loop {
        // Each range: [first slot, last slot, [master ip, port, id], replicas...].
        let ranges: Vec<Vec<redis::Value>> = cluster
            .query(node, redis::cmd("CLUSTER").arg("SLOTS"))
            .await
            .unwrap_or_default();
        let owner = ranges.iter().find_map(|range| match range.as_slice() {
            [
                redis::Value::Int(lo),
                redis::Value::Int(hi),
                redis::Value::Array(m),
                ..,
            ] if (*lo..=*hi).contains(&slot) => match m.get(1) {
                Some(redis::Value::Int(port)) => Some(*port),
                _ => None,
            },
            _ => None,
        });
        if owner == Some(i64::from(master)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} does not see {key}'s slot {slot} on {master} (it says {owner:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three wsproxy processes: 0 and 1 with lifecycle events and presence
/// (heartbeat 1 s, the dead-after time its default), 2 without.
async fn start_processes(cluster: &Cluster) -> Vec<Server> {
    let mut servers = Vec::new();
    for tracked in [true, true, false] {
        let mut config = Config::for_cluster(cluster.urls());
        if let Some(c) = config.redis_cluster.as_mut() {
            c.pubsub = ClusterPubSub::Sharded;
        }
        config.reliable.enabled = true;
        config.reliable.history_max_len = 100_000;
        config.lifecycle.events = tracked;
        config.lifecycle.presence = tracked;
        config.lifecycle.heartbeat = Duration::from_secs(1);
        servers.push(Server::start_config(config).await);
    }
    servers
}

/// On every master, a plain session on every process and a reliable one
/// on a tracked process.
async fn place_sessions(cluster: &Cluster, masters: &[u16]) -> Vec<Placed> {
    let mut sessions = Vec::new();
    for &master in masters {
        for (reliable, process) in [(false, 0), (false, 1), (false, 2), (true, 1)] {
            let id = session_on(cluster, master).await;
            cluster.set_token(&id, TOKEN, 600).await;
            sessions.push(Placed {
                id,
                master,
                reliable,
                process,
            });
        }
    }
    sessions
}

/// What Redis accepted for one session: each `n`, when, and (plain
/// sessions) the number of receivers `SPUBLISH` reported.
type Accepted = Vec<(u64, Instant, i64)>;

/// The clients, the publishers and the `/ready` watchers while they run.
struct Traffic {
    readers: HashMap<String, tokio::task::JoinHandle<Seen>>,
    publishers: HashMap<String, tokio::task::JoinHandle<Accepted>>,
    ready: Vec<tokio::task::JoinHandle<Vec<(Instant, u16)>>>,
    stop_reading: CancellationToken,
    stop_publishing: CancellationToken,
    stop_ready: CancellationToken,
}

/// What the traffic saw, once stopped.
struct Observed {
    /// Per session: what its client received.
    seen: HashMap<String, Seen>,
    /// Per session: what Redis accepted for it.
    accepted: HashMap<String, Accepted>,
    /// Per process: `/ready`'s answers.
    ready: Vec<Vec<(Instant, u16)>>,
}

impl Traffic {
    /// Connects every session's client, then starts publishing to each
    /// and watching `/ready` on every process.
    async fn start(cluster: &Cluster, servers: &[Server], sessions: &[Placed]) -> Traffic {
        let stop_reading = CancellationToken::new();
        let stop_publishing = CancellationToken::new();
        let stop_ready = CancellationToken::new();
        let mut readers = HashMap::new();
        for s in sessions {
            let addr = servers[s.process].addr;
            let handle = if s.reliable {
                read_reliable(addr, s.id.clone(), stop_reading.clone())
            } else {
                let ws = connect(addr, &s.id, "", false)
                    .await
                    .expect("plain connect");
                read_plain(ws, stop_reading.clone())
            };
            readers.insert(s.id.clone(), handle);
        }
        // Every reliable client is in before anything is published.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ready = servers
            .iter()
            .map(|server| watch_ready(server, stop_ready.clone()))
            .collect();
        let publishers = sessions
            .iter()
            .map(|s| {
                let handle = publish(cluster, &s.id, s.reliable, stop_publishing.clone());
                (s.id.clone(), handle)
            })
            .collect();
        Traffic {
            readers,
            publishers,
            ready,
            stop_reading,
            stop_publishing,
            stop_ready,
        }
    }

    /// Stops publishing, gives what was accepted last 1 s to arrive, then
    /// stops the clients and the watchers.
    async fn finish(self) -> Observed {
        self.stop_publishing.cancel();
        let mut accepted = HashMap::new();
        for (s, handle) in self.publishers {
            accepted.insert(s, handle.await.expect("publisher"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.stop_reading.cancel();
        self.stop_ready.cancel();
        let mut seen = HashMap::new();
        for (s, handle) in self.readers {
            seen.insert(s, handle.await.expect("reader"));
        }
        let mut ready = Vec::new();
        for watcher in self.ready {
            ready.push(watcher.await.expect("ready watcher"));
        }
        Observed {
            seen,
            accepted,
            ready,
        }
    }
}

/// Kills `victim` (SIGKILL), checks that clients of a healthy shard are
/// admitted meanwhile, waits for its replica's promotion, starts it again
/// and waits for the cluster to be whole.
async fn kill_and_recover(
    cluster: &mut Cluster,
    servers: &[Server],
    victim: u16,
    node_timeout_ms: u64,
) -> Outage {
    let replica = *cluster
        .replicas_of(victim)
        .await
        .first()
        .expect("the victim has a replica");
    let healthy = *cluster
        .master_ports()
        .await
        .iter()
        .find(|m| **m != victim)
        .expect("a healthy master");
    // Sessions on a healthy shard, to be admitted during the outage.
    let mut newcomers = Vec::new();
    for _ in servers {
        let s = session_on(cluster, healthy).await;
        cluster.set_token(&s, TOKEN, 600).await;
        newcomers.push(s);
    }
    println!("killing {victim} (replica {replica})");
    let killed_at = Instant::now();
    cluster.kill(victim);
    admit_during_outage(servers, &newcomers).await;
    let promoted_at = loop {
        assert!(
            killed_at.elapsed() < Duration::from_millis(node_timeout_ms * 4 + 20_000),
            "the replica on {replica} was not promoted"
        );
        if cluster.is_master(replica).await {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "node timeout {node_timeout_ms} ms: replica promoted {:?} after the kill",
        promoted_at - killed_at
    );
    cluster.restart(victim).await;
    cluster.wait_ok().await;
    println!(
        "the cluster was whole again {:?} after the kill",
        killed_at.elapsed()
    );
    Outage {
        killed_at,
        promoted_at,
    }
}

/// While the shard is down, a client of a healthy shard is admitted (its
/// token check, its subscription) without waiting for the failover, on
/// every process. With lifecycle tracking its registration writes what
/// lives on the dead shard (the events stream, the registrations) in the
/// background after one failed try: the redis crate's cluster client
/// takes about 1.3 s to fail it (its issues #2085, #2092), hence 3 s here.
async fn admit_during_outage(servers: &[Server], newcomers: &[String]) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, (server, s)) in servers.iter().zip(newcomers).enumerate() {
        let asked = Instant::now();
        let mut ws = connect(server.addr, s, "", false)
            .await
            .unwrap_or_else(|e| {
                panic!("process {i}: a healthy shard's client refused during the outage: {e}")
            });
        let took = asked.elapsed();
        println!(
            "process {i}: a healthy shard's client admitted {took:?} into the outage's second second"
        );
        assert!(
            took < Duration::from_secs(3),
            "process {i}: admission to a healthy shard stalled {took:?} while another shard failed over"
        );
        let _ = ws.close(None).await;
    }
}

/// The old master rejoined as a replica with no channel on it, and every
/// process holds one pub/sub connection per master, none on a replica.
async fn check_pubsub_connections(cluster: &Cluster, victim: u16, processes: usize) {
    assert!(
        !cluster.is_master(victim).await,
        "the old master rejoined as a replica"
    );
    let on_rejoined = cluster
        .shard_channels(victim)
        .await
        .expect("the rejoined node answers");
    assert!(
        on_rejoined.is_empty(),
        "channels subscribed on the rejoined replica: {on_rejoined:?}"
    );
    for &port in &cluster.ports {
        let named = cluster
            .clients_named(port, "wsproxy-pubsub")
            .await
            .expect("every node answers");
        // One per process on a master (each has sessions on every one).
        let expected = usize::from(cluster.is_master(port).await) * processes;
        assert_eq!(named, expected, "wsproxy's pub/sub connections on {port}");
    }
}

/// Every session, by its class (healthy or failed shard, plain or
/// reliable): what it may lose and how it may be closed. Prints a line
/// per session, with what the failed shard's plain sessions lost and how
/// many of those `SPUBLISH` said reached no receiver.
fn check_sessions(
    sessions: &[Placed],
    observed: &Observed,
    victim: u16,
    outage: Outage,
    logs: &LogCapture,
) {
    let killed_at = outage.killed_at;
    let mut report = Vec::new();
    for Placed {
        id: s,
        master,
        reliable,
        ..
    } in sessions
    {
        let failed = *master == victim;
        let got = &observed.seen[s];
        let sent = &observed.accepted[s];
        let mut unique_ns = got.ns.clone();
        unique_ns.sort_unstable();
        unique_ns.dedup();
        assert_eq!(
            unique_ns.len(),
            got.ns.len(),
            "{s} (reliable {reliable}, failed shard {failed}) got a message twice"
        );
        if *reliable {
            assert_eq!(unique_ns, got.ns, "{s}: in order");
        }
        let received: std::collections::HashSet<u64> = got.ns.iter().copied().collect();
        let lost: Vec<&(u64, Instant, i64)> = sent
            .iter()
            .filter(|(n, _, _)| !received.contains(n))
            .collect();
        let nobody = lost.iter().filter(|(_, _, r)| *r == 0).count();
        report.push(format!(
            "{s}: reliable {reliable}, failed shard {failed}: {} accepted, {} received, {} lost ({nobody} of them published to no receiver, as SPUBLISH said; accepted {:?} to {:?} after the kill), closes {:?}",
            sent.len(),
            got.ns.len(),
            lost.len(),
            lost.first().map(|(_, at, _)| at.saturating_duration_since(killed_at)),
            lost.last().map(|(_, at, _)| at.saturating_duration_since(killed_at)),
            got.closes
        ));
        match (failed, reliable) {
            (false, _) => check_healthy(s, *reliable, got, &lost, logs),
            (true, true) => check_failed_reliable(s, got, &lost, outage),
            (true, false) => check_failed_plain(s, got, &lost, outage),
        }
    }
    for line in &report {
        println!("{line}");
    }
}

/// A session on a healthy shard, plain or reliable, is never closed and
/// loses nothing.
fn check_healthy(
    s: &str,
    reliable: bool,
    got: &Seen,
    lost: &[&(u64, Instant, i64)],
    logs: &LogCapture,
) {
    let kind = if reliable { "reliable" } else { "plain" };
    assert!(
        got.closes.is_empty(),
        "{kind} {s} (healthy shard) was closed: {:?}\n{}",
        got.closes,
        logs.text()
    );
    assert!(
        lost.is_empty(),
        "{kind} {s} (healthy shard) lost {} messages: {:?}",
        lost.len(),
        lost.iter().map(|(n, _, _)| n).collect::<Vec<_>>()
    );
}

/// The failed shard's reliable session is closed with 1013 and, resumed,
/// gets everything acknowledged after the kill. (Acknowledged before the
/// kill but never replicated is Redis's loss.)
fn check_failed_reliable(s: &str, got: &Seen, lost: &[&(u64, Instant, i64)], outage: Outage) {
    assert!(
        got.closes.contains(&1013),
        "reliable {s} on the failed shard: closed with 1013, got {:?}",
        got.closes
    );
    let owed: Vec<u64> = lost
        .iter()
        .filter(|(_, at, _)| *at > outage.killed_at)
        .map(|(n, _, _)| *n)
        .collect();
    assert!(
        owed.is_empty(),
        "reliable {s}: lost accepted messages {owed:?}"
    );
}

/// The failed shard's plain session stays open and loses only what was
/// accepted between the kill and the promotion (+ [`AFTER_PROMOTION`]).
fn check_failed_plain(s: &str, got: &Seen, lost: &[&(u64, Instant, i64)], outage: Outage) {
    let Outage {
        killed_at,
        promoted_at,
    } = outage;
    assert!(
        got.closes.is_empty(),
        "plain {s} on the failed shard was closed: {:?}",
        got.closes
    );
    let outside: Vec<(u64, Duration)> = lost
        .iter()
        .filter(|(_, at, _)| *at < killed_at || *at > promoted_at + AFTER_PROMOTION)
        .map(|(n, at, _)| (*n, at.saturating_duration_since(killed_at)))
        .collect();
    assert!(
        outside.is_empty(),
        "plain {s} on the failed shard lost messages accepted outside the kill-to-promotion (+{AFTER_PROMOTION:?}) window: {outside:?} (promoted {:?} after the kill)",
        promoted_at - killed_at
    );
}

/// `/ready`, on every process: 503 after the kill (each has channels on
/// the failed shard), 200 again within 2 s of the promotion, and at the end.
fn check_ready(ready_seen: &[Vec<(Instant, u16)>], outage: Outage) {
    let Outage {
        killed_at,
        promoted_at,
    } = outage;
    for (i, ready) in ready_seen.iter().enumerate() {
        let not_ready: Vec<Duration> = ready
            .iter()
            .filter(|(at, status)| *status != 200 && *at > killed_at)
            .map(|(at, _)| *at - killed_at)
            .collect();
        println!(
            "process {i}: /ready not 200 from {:?} to {:?} after the kill ({} polls)",
            not_ready.first(),
            not_ready.last(),
            not_ready.len()
        );
        assert!(
            !not_ready.is_empty(),
            "process {i}: /ready never said 503 after the kill"
        );
        assert_eq!(
            ready.last().map(|(_, s)| *s),
            Some(200),
            "process {i}: /ready at the end"
        );
        let late: Vec<Duration> = ready
            .iter()
            .filter(|(at, s)| *at > promoted_at + Duration::from_secs(2) && *s != 200)
            .map(|(at, _)| *at - killed_at)
            .collect();
        assert!(
            late.is_empty(),
            "process {i}: /ready said 503 more than 2 s after the promotion: {late:?}"
        );
    }
}

/// Control works after the failover, on every process: a disconnect
/// appended with `wsproxy_control` closes a fresh client with its code.
async fn check_control(cluster: &Cluster, servers: &[Server]) {
    for (i, server) in servers.iter().enumerate() {
        let s = unique("ctl");
        cluster.set_token(&s, TOKEN, 600).await;
        let mut ws = connect(server.addr, &s, "", false).await.expect("connect");
        let mut c = cluster.conn().await;
        let _: String = redis::cmd("FCALL")
            .arg("wsproxy_control")
            .arg(1)
            .arg("{wsproxy:control}:log")
            .arg(format!(
                r#"{{"type":"disconnect","session_id":"{s}","code":4001,"reason":"revoked"}}"#
            ))
            .query_async(&mut c)
            .await
            .expect("FCALL wsproxy_control");
        assert_eq!(
            close_code(&mut ws).await,
            4001,
            "process {i}: control after the failover"
        );
    }
}

/// Lifecycle, once every process has stopped: every connection of the
/// tracked processes has one connect (or resume) event and exactly one
/// disconnect, none of them `process_lost` (no live process was reaped),
/// and presence is empty.
async fn check_lifecycle(cluster: &Cluster, sessions: &[Placed]) {
    let mut c = cluster.conn().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("wsproxy:events")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .expect("XRANGE wsproxy:events");
    let mut per_connection: HashMap<String, (u32, u32)> = HashMap::new();
    let mut lost = 0;
    for (_, fields) in &entries {
        let Some((_, event)) = fields.iter().find(|(k, _)| k == "event") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(event).expect("an event is JSON");
        let id = v["connection_id"]
            .as_str()
            .expect("connection_id")
            .to_owned();
        let counts = per_connection.entry(id).or_default();
        match v["type"].as_str() {
            Some("connect" | "resume") => counts.0 += 1,
            Some("disconnect") => {
                counts.1 += 1;
                if v["reason"] == "process_lost" {
                    lost += 1;
                }
            }
            _ => {}
        }
    }
    let odd: Vec<_> = per_connection
        .iter()
        .filter(|(_, c)| **c != (1, 1))
        .collect();
    println!(
        "lifecycle: {} connections, {} events",
        per_connection.len(),
        entries.len()
    );
    assert!(
        !per_connection.is_empty(),
        "the tracked processes wrote events"
    );
    assert!(
        odd.is_empty(),
        "connections without exactly one connect and one disconnect: {odd:?}"
    );
    assert_eq!(
        lost, 0,
        "process_lost disconnects: a live process was reaped"
    );
    for s in sessions {
        let n: usize = redis::cmd("HLEN")
            .arg(format!("session:{{{}}}:presence", s.id))
            .query_async(&mut c)
            .await
            .expect("HLEN");
        assert_eq!(n, 0, "presence of {} after every client left", s.id);
    }
}

/// Waits until no node has a shard channel subscribed (`sessions_only`:
/// no `session:` channel); panics after the wait, naming what is left.
async fn wait_no_channels(cluster: &Cluster, sessions_only: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut left = Vec::new();
        for &port in &cluster.ports {
            let channels = cluster.shard_channels(port).await.unwrap_or_default();
            left.extend(
                channels
                    .into_iter()
                    .filter(|c| !sessions_only || c.starts_with("session:")),
            );
        }
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shard channels left (sessions only: {sessions_only}) after every client closed: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_at_a_3000_ms_node_timeout_touches_only_its_shard() {
    failover(3000).await;
}

/// Redis's default node timeout: about 15 s before the replica takes
/// over. Long (over a minute); CI runs it as a step of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "over a minute; run with --ignored (CI does, as its own step)"]
async fn a_master_failover_at_the_default_15000_ms_node_timeout_touches_only_its_shard() {
    failover(15_000).await;
}
