//! A Redis Cluster master dies under traffic, at realistic node timeouts
//! (3000 ms here; Redis's default of 15000 in the ignored test that CI
//! runs as a step of its own): what each class of session sees.
//!
//! On each of the three masters live two plain sessions and one reliable
//! session; a backend publishes to every one every 10 ms. The master of
//! one shard is killed (SIGKILL, once its replica has caught up); its
//! replica is promoted; the killed node is started again and rejoins as a
//! replica; traffic is observed for 30 s after that. Then:
//!
//! - plain sessions on the healthy shards lose nothing, and stay open;
//! - reliable sessions on the healthy shards are never closed;
//! - the failed shard's reliable session is closed with 1013, resumes,
//!   and gets what was accepted, in order, once;
//! - the failed shard's plain sessions lose only what was accepted
//!   between the kill and the promotion plus 0.5 s (counted, printed);
//! - no session gets a message twice;
//! - `/ready` answers 503 after the kill and 200 again once the failed
//!   shard's channels are back;
//! - wsproxy holds one pub/sub connection per master with channels and
//!   none on a replica (the rejoined node included), and once every
//!   client has left no shard channel is subscribed anywhere.

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

struct Sessions {
    /// `(session, master, reliable, process)`.
    list: Vec<(String, u16, bool, usize)>,
}

/// Which master is killed.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// The master of `wsproxy:processes`, where the processes register.
    Registrations,
    /// The master of the control stream.
    Control,
    /// A master with neither: sessions only.
    SessionsOnly,
}

/// Three wsproxy processes: 0 and 1 with lifecycle events and presence
/// (heartbeat 1 s, the dead-after time its default), 2 without.
async fn failover(node_timeout_ms: u64, kill: Victim) {
    let (logs, _guard) = LogCapture::start();
    let mut cluster = Cluster::start_with_node_timeout(node_timeout_ms).await;
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

    let masters = cluster.master_ports().await;
    assert_eq!(masters.len(), 3, "three masters");
    let registrations = cluster.master_of("wsproxy:processes").await;
    let control = cluster.master_of("{wsproxy:control}:log").await;
    let victim = match kill {
        Victim::Registrations => registrations,
        Victim::Control => control,
        Victim::SessionsOnly => *masters
            .iter()
            .find(|m| **m != registrations && **m != control)
            .expect("a master with sessions only"),
    };
    println!("killing {victim} ({kill:?}; registrations on {registrations}, control on {control})");
    let replica = *cluster
        .replicas_of(victim)
        .await
        .first()
        .expect("the victim has a replica");
    let mut sessions = Sessions { list: Vec::new() };
    for &master in &masters {
        // A plain session on every process, a reliable one on a tracked one.
        for (reliable, process) in [(false, 0), (false, 1), (false, 2), (true, 1)] {
            let s = session_on(&cluster, master).await;
            cluster.set_token(&s, TOKEN, 600).await;
            sessions.list.push((s, master, reliable, process));
        }
    }

    let stop_reading = CancellationToken::new();
    let stop_publishing = CancellationToken::new();
    let mut readers_plain = HashMap::new();
    let mut readers_reliable = HashMap::new();
    for (s, _, reliable, process) in &sessions.list {
        let addr = servers[*process].addr;
        if *reliable {
            let handle = read_reliable(addr, s.clone(), stop_reading.clone());
            readers_reliable.insert(s.clone(), handle);
        } else {
            let ws = connect(addr, s, "", false).await.expect("plain connect");
            readers_plain.insert(s.clone(), read_plain(ws, stop_reading.clone()));
        }
    }
    // Every reliable client is in before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop_ready = CancellationToken::new();
    let ready: Vec<_> = servers
        .iter()
        .map(|server| watch_ready(server, stop_ready.clone()))
        .collect();
    let mut publishers = HashMap::new();
    for (s, _, reliable, _) in &sessions.list {
        publishers.insert(
            s.clone(),
            publish(&cluster, s, *reliable, stop_publishing.clone()),
        );
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.wait_replicated(victim).await;
    // Sessions on healthy shards, to be admitted during the outage.
    let healthy = *masters
        .iter()
        .find(|m| **m != victim)
        .expect("a healthy master");
    let mut newcomers = Vec::new();
    for _ in &servers {
        let s = session_on(&cluster, healthy).await;
        cluster.set_token(&s, TOKEN, 600).await;
        newcomers.push(s);
    }
    let killed_at = Instant::now();
    cluster.kill(victim);
    // While the shard is down, a client of a healthy shard is admitted
    // (its token check, its subscription) without waiting for the
    // failover, on every process. With lifecycle tracking its
    // registration writes what lives on the dead shard (the events
    // stream, say) in the background after one failed try: the redis
    // crate's cluster client takes about 1.3 s to fail it (its issues
    // #2085, #2092), hence 3 s here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, (server, s)) in servers.iter().zip(&newcomers).enumerate() {
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
    let whole_at = Instant::now();
    println!(
        "the cluster was whole again {:?} after the kill",
        whole_at - killed_at
    );

    // The rejoined node is a replica and holds none of wsproxy's channels.
    tokio::time::sleep(OBSERVE).await;
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
    // One pub/sub connection per master and process, none on a replica.
    for &port in &cluster.ports.clone() {
        let named = cluster
            .clients_named(port, "wsproxy-pubsub")
            .await
            .expect("every node answers");
        // One per process on a master (each has sessions on every one).
        let expected = usize::from(cluster.is_master(port).await) * servers.len();
        assert_eq!(named, expected, "wsproxy's pub/sub connections on {port}");
    }

    stop_publishing.cancel();
    let mut accepted = HashMap::new();
    for (s, handle) in publishers {
        accepted.insert(s, handle.await.expect("publisher"));
    }
    // What was accepted last has time to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_reading.cancel();
    stop_ready.cancel();
    let mut seen = HashMap::new();
    for (s, handle) in readers_plain {
        seen.insert(s, handle.await.expect("reader"));
    }
    for (s, handle) in readers_reliable {
        seen.insert(s, handle.await.expect("reader"));
    }
    let mut ready_seen = Vec::new();
    for watcher in ready {
        ready_seen.push(watcher.await.expect("ready watcher"));
    }

    let mut report = Vec::new();
    for (s, master, reliable, _) in &sessions.list {
        let failed = *master == victim;
        let got = &seen[s];
        let sent = &accepted[s];
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
            (false, false) => {
                assert!(
                    got.closes.is_empty(),
                    "{s} (healthy shard) was closed: {:?}\n{}",
                    got.closes,
                    logs.text()
                );
                assert!(
                    lost.is_empty(),
                    "{s} (healthy shard) lost {} messages: {:?}",
                    lost.len(),
                    lost.iter().map(|(n, _, _)| n).collect::<Vec<_>>()
                );
            }
            (false, true) => {
                assert!(
                    got.closes.is_empty(),
                    "reliable {s} (healthy shard) was closed: {:?}\n{}",
                    got.closes,
                    logs.text()
                );
                assert!(
                    lost.is_empty(),
                    "reliable {s} (healthy shard) lost {}",
                    lost.len()
                );
            }
            (true, true) => {
                assert!(
                    got.closes.contains(&1013),
                    "reliable {s} on the failed shard: closed with 1013, got {:?}",
                    got.closes
                );
                // Acknowledged before the kill but never replicated is
                // Redis's loss; anything acknowledged after it is owed.
                let owed: Vec<u64> = lost
                    .iter()
                    .filter(|(_, at, _)| *at > killed_at)
                    .map(|(n, _, _)| *n)
                    .collect();
                assert!(
                    owed.is_empty(),
                    "reliable {s}: lost accepted messages {owed:?}"
                );
            }
            (true, false) => {
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
        }
    }
    for line in &report {
        println!("{line}");
    }

    // /ready, on every process: 503 after the kill (each has channels on
    // the failed shard), 200 again soon after the promotion, and at the end.
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

    // Control works after the failover, on every process.
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

    // Every client gone: no session's channel stays subscribed anywhere
    // (the processes' own control channel stays while they run), and once
    // they have stopped, nothing at all.
    drop(seen);
    wait_no_channels(&cluster, true).await;
    for server in servers {
        server.stop().await;
    }
    wait_no_channels(&cluster, false).await;

    // Lifecycle: every connection of the tracked processes has one
    // connect (or resume) event and exactly one disconnect, none of them
    // `process_lost` (no live process was reaped), and presence is empty.
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
    for (s, ..) in &sessions.list {
        let n: usize = redis::cmd("HLEN")
            .arg(format!("session:{{{s}}}:presence"))
            .query_async(&mut c)
            .await
            .expect("HLEN");
        assert_eq!(n, 0, "presence of {s} after every client left");
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
    failover(3000, Victim::Registrations).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_streams_master_fails_over_at_a_3000_ms_node_timeout() {
    failover(3000, Victim::Control).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_only_master_fails_over_at_a_3000_ms_node_timeout() {
    failover(3000, Victim::SessionsOnly).await;
}

/// Redis's default node timeout: about 15 s before the replica takes
/// over. Long (over a minute); CI runs it as a step of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "over a minute; run with --ignored (CI does, as its own step)"]
async fn a_master_failover_at_the_default_15000_ms_node_timeout_touches_only_its_shard() {
    failover(15_000, Victim::Registrations).await;
}
