//! Sharded pub/sub on a Redis Cluster over connections the broker owns.
//!
//! The broker keeps its own map of which master serves which slots (from
//! `CLUSTER SHARDS`), one RESP3 connection per master that holds one of
//! its channels (opened and named `wsproxy-pubsub` by wsproxy, never on a
//! replica), and its own table of where each channel is subscribed. Every
//! push names its connection, so trouble is scoped exactly:
//!
//! - a connection that drops loses the channels subscribed on it, and only
//!   those: their gapless (reliable) subscribers end at once, they are
//!   subscribed again wherever their slots live now, and the broker reports
//!   not ready until they are back; the other masters' subscriptions never
//!   stop;
//! - Redis taking a subscription back (`sunsubscribe` push: its slot moved,
//!   or its master became a replica) loses that channel only, which is
//!   subscribed again on its slot's new master;
//! - a `MOVED`, `ASK`, `CLUSTERDOWN`, `TRYAGAIN` or `LOADING` answer, or a
//!   master that cannot be reached, refreshes the map and retries (every
//!   [`RETRY_MAX`] at most while a failover is under way);
//! - a connection with no channel left is closed: nothing stays subscribed
//!   after its last subscriber leaves.
//!
//! Each `SSUBSCRIBE`/`SUNSUBSCRIBE` names one channel, and its answer is
//! checked to be the confirmation of that channel: the redis crate takes a
//! confirmation-like push Redis sends by itself (a moved slot's
//! `sunsubscribe`) for the answer of the oldest request in flight, so an
//! answer that does not match is not taken for a confirmation (the channel
//! is tried again; Redis ignores a repeat).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::{PushKind, Value};
use tokio_util::sync::CancellationToken;

use super::{CONNECT_TIMEOUT, KEEPALIVE, Shared, State, confirm, dispatch};
use crate::cluster::{Seeds, Topology, in_motion, slot_of, split_addr, text};

/// Shortest and longest pause before trying again what failed (a channel
/// whose master is failing over): the longest bounds how late, after the
/// promotion, the subscriptions of a failed shard are back.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(400);
/// How often the slot map is read again while all is well.
const REFRESH: Duration = Duration::from_secs(30);
/// The name of the broker's connections (`CLIENT LIST` shows it).
const CONNECTION_NAME: &str = "wsproxy-pubsub";

/// One master's pub/sub connection.
struct Node {
    conn: redis::aio::MultiplexedConnection,
    /// Set by the connection's push handler when it dropped.
    dropped: Arc<AtomicBool>,
    /// Set, under the state lock, when the broker forgets the connection
    /// (dropped, failed, or idle): a `sunsubscribe` push it handles later
    /// is about a subscription already gone, not one placed since on a
    /// new connection to the same master, and is ignored.
    forgotten: Arc<AtomicBool>,
}

/// Forgets the connection to `addr`, if there is one: marks it forgotten
/// and drops the counts of its unsubscriptions (they will not be
/// confirmed), both under the state lock `state` (its push handler reads
/// them under it).
fn forget_node(nodes: &mut HashMap<Arc<str>, Node>, state: &mut State, addr: &Arc<str>) {
    if let Some(node) = nodes.remove(addr) {
        node.forgotten.store(true, Ordering::SeqCst);
    }
    state.unsubscribing.retain(|(node, _), _| node != addr);
}

/// The broker task in sharded mode: keeps every wanted channel subscribed
/// on its slot's master until `shutdown`.
pub(super) async fn run(seeds: Seeds, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut shards = Shards {
        seeds,
        topology: None,
        stale: true,
        refreshed_at: tokio::time::Instant::now(),
        nodes: HashMap::new(),
        placed: HashMap::new(),
        pending: HashSet::new(),
        retry: RETRY_MIN,
        ever_ready: false,
    };
    shared.link_up(&format!("cluster of {} seed nodes", shards.seeds.count()));
    // The keepalive runs on a deadline of its own, not on a quiet spell:
    // wake-ups for other shards' channels (sessions coming and going every
    // few seconds) would otherwise put it off for ever, and a master that
    // died without a FIN or RST would hold its channels, plain and
    // reliable, silent and never ended.
    let mut ping_at = tokio::time::Instant::now() + KEEPALIVE;
    loop {
        let trouble = shards.step(&shared).await;
        let retry_at = if trouble {
            let pause = shards.retry;
            shards.retry = (shards.retry * 2).min(RETRY_MAX);
            Some(tokio::time::Instant::now() + pause)
        } else {
            shards.retry = RETRY_MIN;
            None
        };
        if tokio::time::Instant::now() >= ping_at {
            ping_at = tokio::time::Instant::now() + KEEPALIVE;
            if shards.keepalive(&shared).await {
                continue; // a connection was dropped: subscribe its channels again
            }
        }
        {
            let state = shared.lock();
            if !state.dirty.is_empty() || !state.moved.is_empty() {
                continue; // more arrived meanwhile
            }
        }
        let until = retry_at.map_or(ping_at, |at| at.min(ping_at));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
    shared.connected.store(false, Ordering::SeqCst);
    shared.metrics.redis_connected.set(0);
}

struct Shards {
    seeds: Seeds,
    topology: Option<Topology>,
    /// The map must be read again before it is trusted.
    stale: bool,
    refreshed_at: tokio::time::Instant,
    nodes: HashMap<Arc<str>, Node>,
    /// Channel -> the master whose connection has it subscribed.
    placed: HashMap<String, Arc<str>>,
    /// Wanted channels not subscribed anywhere yet.
    pending: HashSet<String>,
    retry: Duration,
    ever_ready: bool,
}

/// What one `SSUBSCRIBE`/`SUNSUBSCRIBE` came to.
enum Outcome {
    /// Confirmed for this channel.
    Done,
    /// Redis sent the channel elsewhere, or the cluster is not settled:
    /// read the map again, then retry.
    Redirected(String),
    /// The connection failed or did not answer.
    Failed(String),
    /// An answer that was not this channel's confirmation: retry.
    Unclear,
}

impl Shards {
    /// One round: take in what changed, make Redis match it. True if
    /// something is still missing (to retry soon).
    async fn step(&mut self, shared: &Arc<Shared>) -> bool {
        self.take_losses(shared);
        let remove = self.take_changes(shared);
        self.unsubscribe(shared, remove).await;
        self.take_losses(shared);
        if !self.pending.is_empty() || self.refreshed_at.elapsed() > REFRESH {
            if self.stale || self.topology.is_none() || self.refreshed_at.elapsed() > REFRESH {
                self.refresh(shared).await;
            }
            self.subscribe(shared).await;
            self.take_losses(shared);
        }
        self.close_idle(shared);
        // Forget what nobody wants any more.
        {
            let state = shared.lock();
            self.pending
                .retain(|c| state.channels.contains_key(c.as_str()));
        }
        let ready = self.pending.is_empty();
        if ready != shared.connected.load(Ordering::SeqCst) {
            if ready {
                tracing::info!(
                    channels = self.placed.len(),
                    masters = self.nodes.len(),
                    "redis pub/sub connected"
                );
            }
            shared.connected.store(ready, Ordering::SeqCst);
            shared.metrics.redis_connected.set(i64::from(ready));
        }
        if ready {
            self.ever_ready = true;
        }
        shared
            .metrics
            .broker_channels
            .set(i64::try_from(self.placed.len()).unwrap_or(i64::MAX));
        !ready
    }

    /// Connections that dropped, and subscriptions Redis took back: their
    /// channels are lost (gapless subscribers end) and pending again.
    fn take_losses(&mut self, shared: &Shared) {
        let dropped: Vec<Arc<str>> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.dropped.load(Ordering::SeqCst))
            .map(|(a, _)| a.clone())
            .collect();
        for addr in &dropped {
            tracing::warn!(node = %addr, "a redis cluster master's pub/sub connection dropped");
            shared.link_failed(addr, "connection lost".into());
            shared.metrics.redis_reconnects.inc();
            self.drop_node(shared, addr);
        }
        let moved = std::mem::take(&mut shared.lock().moved);
        let mut state = shared.lock();
        for (addr, channel) in moved {
            if self.placed.get(&channel) != Some(&addr) {
                continue; // not where it is subscribed now: old news
            }
            tracing::warn!(channel, node = %addr, "redis moved a sharded subscription away");
            self.placed.remove(&channel);
            self.stale = true;
            if let Some(ch) = state.channels.get_mut(channel.as_str()) {
                ch.lose();
                self.pending.insert(channel);
            }
        }
    }

    /// Forgets the connection to `addr`: its channels are lost and pending.
    fn drop_node(&mut self, shared: &Shared, addr: &Arc<str>) {
        self.stale = true;
        let mut state = shared.lock();
        forget_node(&mut self.nodes, &mut state, addr);
        self.placed.retain(|channel, node| {
            if node != addr {
                return true;
            }
            if let Some(ch) = state.channels.get_mut(channel.as_str()) {
                ch.lose();
                self.pending.insert(channel.clone());
            }
            false
        });
    }

    /// Channels that gained their first or lost their last subscriber:
    /// the new ones become pending; those to unsubscribe are returned.
    fn take_changes(&mut self, shared: &Shared) -> Vec<(String, Arc<str>)> {
        let mut state = shared.lock();
        let dirty = std::mem::take(&mut state.dirty);
        let mut remove = Vec::new();
        let mut already = Vec::new();
        for channel in dirty {
            // This task keeps names of its own (they are placed per master).
            let channel = channel.to_string();
            let wanted = state.channels.contains_key(channel.as_str());
            match (wanted, self.placed.get(&channel)) {
                (true, None) => {
                    self.pending.insert(channel);
                }
                (false, Some(node)) => remove.push((channel, node.clone())),
                // Wanted again while Redis still has it.
                (true, Some(_)) => already.push(channel),
                (false, None) => {
                    self.pending.remove(&channel);
                }
            }
        }
        drop(state);
        confirm(shared, &already);
        remove
    }

    async fn unsubscribe(&mut self, shared: &Shared, remove: Vec<(String, Arc<str>)>) {
        if remove.is_empty() {
            return;
        }
        let mut calls = Vec::new();
        {
            let mut state = shared.lock();
            for (channel, addr) in remove {
                self.placed.remove(&channel);
                let Some(node) = self.nodes.get(&addr) else {
                    continue;
                };
                *state
                    .unsubscribing
                    .entry((addr.clone(), channel.clone()))
                    .or_default() += 1;
                let conn = node.conn.clone();
                calls.push(async move {
                    let outcome = ask(conn, "SUNSUBSCRIBE", PushKind::SUnsubscribe, &channel).await;
                    (addr, channel, outcome)
                });
            }
        }
        for (addr, channel, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Outcome::Done | Outcome::Unclear | Outcome::Redirected(_) => {}
                // Its subscription may be left on a live connection:
                // closing that connection is the only sure way to end it.
                Outcome::Failed(error) => {
                    tracing::warn!(channel, node = %addr, %error, "redis sunsubscribe failed; closing that connection");
                    self.drop_node(shared, &addr);
                }
            }
        }
    }

    /// Subscribes every pending channel on its slot's master.
    async fn subscribe(&mut self, shared: &Arc<Shared>) {
        let Some(topology) = self.topology.clone() else {
            return;
        };
        let wanted: Vec<String> = {
            let state = shared.lock();
            self.pending
                .iter()
                .filter(|c| state.channels.contains_key(c.as_str()))
                .cloned()
                .collect()
        };
        let mut by_node: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for channel in wanted {
            let slot = slot_of(&channel);
            match topology.owner(slot) {
                Some(node) => by_node.entry(node.clone()).or_default().push(channel),
                // No healthy master serves the slot (yet).
                None => self.stale = true,
            }
        }
        let mut calls = Vec::new();
        for (addr, channels) in by_node {
            if !self.nodes.contains_key(&addr) {
                match self.connect(shared, &addr).await {
                    Ok(node) => {
                        self.nodes.insert(addr.clone(), node);
                    }
                    Err(error) => {
                        tracing::warn!(node = %addr, %error, "redis cluster master unreachable for pub/sub");
                        shared.link_failed(&addr, format!("connect failed: {error}"));
                        self.stale = true;
                        continue;
                    }
                }
            }
            let Some(node) = self.nodes.get(&addr) else {
                continue;
            };
            for channel in channels {
                let conn = node.conn.clone();
                let addr = addr.clone();
                calls.push(async move {
                    let outcome = ask(conn, "SSUBSCRIBE", PushKind::SSubscribe, &channel).await;
                    (addr, channel, outcome)
                });
            }
        }
        let mut done = Vec::new();
        let mut failed: HashSet<Arc<str>> = HashSet::new();
        for (addr, channel, outcome) in futures_util::future::join_all(calls).await {
            match outcome {
                Outcome::Done => done.push((addr, channel)),
                Outcome::Redirected(error) => {
                    tracing::debug!(channel, node = %addr, %error, "redis ssubscribe redirected");
                    self.stale = true;
                }
                Outcome::Unclear => {}
                Outcome::Failed(error) => {
                    if failed.insert(addr.clone()) {
                        tracing::warn!(node = %addr, %error, "redis ssubscribe failed");
                    }
                }
            }
        }
        // A connection that failed (or did not answer) is closed: what it
        // had is lost, whatever it may still hold goes with it.
        for addr in &failed {
            self.drop_node(shared, addr);
        }
        let mut confirmed = Vec::new();
        for (addr, channel) in done {
            let alive = self
                .nodes
                .get(&addr)
                .is_some_and(|n| !n.dropped.load(Ordering::SeqCst));
            if !alive {
                continue; // pending still; its connection is gone
            }
            self.pending.remove(&channel);
            self.placed.insert(channel.clone(), addr);
            confirmed.push(channel);
        }
        // Confirmed after the placement: a drop seen from now on loses
        // them (the next round's `take_losses`).
        confirm(shared, &confirmed);
    }

    /// Opens the pub/sub connection to the master at `addr`.
    async fn connect(&self, shared: &Arc<Shared>, addr: &Arc<str>) -> Result<Node, String> {
        let (host, port) = split_addr(addr).ok_or_else(|| format!("bad node address {addr}"))?;
        let client = self
            .seeds
            .client(host, port, redis::ProtocolVersion::RESP3)
            .map_err(|e| e.to_string())?;
        let dropped = Arc::new(AtomicBool::new(false));
        let forgotten = Arc::new(AtomicBool::new(false));
        // The pushes are handled, in order, by a task of their own, not in
        // the connection's task as it reads them: a burst read at once (a
        // backend pipelining 500 messages to one session) was dispatched
        // without a pause, past the outbox's bound, and its client cut as
        // a slow consumer though it read at once. A task that takes them
        // from a channel yields every 128 (tokio's budget), so the
        // connections drain in between, as on a standalone Redis. The
        // channel empties at dispatch speed; the task ends when the
        // connection has dropped (its sender with it) and all is handled.
        let (pushes, mut queue) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        {
            let shared = shared.clone();
            let addr = addr.clone();
            let (dropped, forgotten) = (dropped.clone(), forgotten.clone());
            tokio::spawn(async move {
                while let Some(push) = queue.recv().await {
                    on_push(&shared, &addr, (&dropped, &forgotten), push);
                }
            });
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_push_sender(pushes)
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let connecting = client.get_multiplexed_async_connection_with_config(&config);
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let mut setname = redis::cmd("CLIENT");
        setname.arg("SETNAME").arg(CONNECTION_NAME);
        let named = setname.query_async::<()>(&mut conn);
        match tokio::time::timeout(CONNECT_TIMEOUT, named).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        }
        tracing::debug!(node = %addr, "redis cluster pub/sub connection opened");
        Ok(Node {
            conn,
            dropped,
            forgotten,
        })
    }

    /// Reads the slot map from a master it knows, else from a seed.
    async fn refresh(&mut self, shared: &Shared) {
        let Some((topology, complete)) = self
            .seeds
            .read_topology(self.topology.as_ref(), CONNECT_TIMEOUT)
            .await
        else {
            shared.link_failed("cluster", "no node answered CLUSTER SHARDS".into());
            return;
        };
        if self.topology.as_ref() != Some(&topology) {
            tracing::info!(
                masters = topology.masters().len(),
                complete,
                "redis cluster slot map read"
            );
        }
        self.topology = Some(topology);
        self.refreshed_at = tokio::time::Instant::now();
        self.stale = !complete;
    }

    /// Closes the connections that hold no channel and have none coming.
    fn close_idle(&mut self, shared: &Shared) {
        let mut used: HashSet<&Arc<str>> = self.placed.values().collect();
        if let Some(t) = &self.topology {
            for channel in &self.pending {
                let slot = slot_of(channel);
                if let Some(n) = t.owner(slot) {
                    used.insert(n);
                }
            }
        }
        let idle: Vec<Arc<str>> = self
            .nodes
            .keys()
            .filter(|a| !used.contains(a))
            .cloned()
            .collect();
        if idle.is_empty() {
            return;
        }
        let mut state = shared.lock();
        for addr in idle {
            forget_node(&mut self.nodes, &mut state, &addr);
        }
    }

    /// Pings every connection; one that does not answer is closed (its
    /// channels are lost and subscribed again). True if one was closed.
    async fn keepalive(&mut self, shared: &Shared) -> bool {
        let pings = self.nodes.iter().map(|(addr, node)| {
            let mut conn = node.conn.clone();
            let addr = addr.clone();
            async move {
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<Value>(&mut conn);
                let ok = matches!(tokio::time::timeout(CONNECT_TIMEOUT, ping).await, Ok(Ok(_)));
                (addr, ok)
            }
        });
        let mut dropped = false;
        for (addr, ok) in futures_util::future::join_all(pings).await {
            if !ok {
                tracing::warn!(node = %addr, "redis pub/sub keepalive ping failed");
                self.drop_node(shared, &addr);
                dropped = true;
            }
        }
        dropped
    }
}

/// Sends `command channel` and tells what the answer means.
async fn ask(
    mut conn: redis::aio::MultiplexedConnection,
    command: &str,
    confirmation: PushKind,
    channel: &str,
) -> Outcome {
    let mut cmd = redis::cmd(command);
    cmd.arg(channel);
    let call = cmd.query_async::<Value>(&mut conn);
    match tokio::time::timeout(CONNECT_TIMEOUT, call).await {
        Err(_) => Outcome::Failed("timed out".into()),
        Ok(Ok(Value::Push { kind, data })) => {
            let same = kind == confirmation && data.first().and_then(text) == Some(channel);
            if same {
                Outcome::Done
            } else {
                Outcome::Unclear
            }
        }
        Ok(Ok(Value::ServerError(e))) => redirect_or_fail(e.into()),
        Ok(Ok(_)) => Outcome::Unclear,
        Ok(Err(e)) => {
            if e.is_io_error() || e.is_unrecoverable_error() || e.is_timeout() {
                Outcome::Failed(e.to_string())
            } else {
                redirect_or_fail(e)
            }
        }
    }
}

/// An error answer: a cluster in motion (read the map again and retry),
/// or anything else (the connection is not trusted).
fn redirect_or_fail(error: redis::RedisError) -> Outcome {
    if in_motion(&error) {
        Outcome::Redirected(error.to_string())
    } else {
        Outcome::Failed(error.to_string())
    }
}

/// A push from the connection to the master at `addr`, with the
/// connection's `dropped` and `forgotten` flags (see [`Node`]).
fn on_push(
    shared: &Shared,
    addr: &Arc<str>,
    (dropped, forgotten): (&AtomicBool, &AtomicBool),
    push: redis::PushInfo,
) {
    match push.kind {
        // A forgotten connection's messages, still queued behind its task,
        // would reach subscribers after newer ones from the connection its
        // channels were subscribed on since: dropped. (Its gapless
        // subscribers ended when it was forgotten.)
        PushKind::SMessage | PushKind::Message if forgotten.load(Ordering::SeqCst) => {}
        PushKind::SMessage | PushKind::Message => {
            if let [Value::BulkString(channel), Value::BulkString(payload), ..] = &push.data[..]
                && let Ok(channel) = std::str::from_utf8(channel)
            {
                dispatch(shared, channel, payload);
            }
        }
        PushKind::Disconnection => {
            dropped.store(true, Ordering::SeqCst);
            shared.changed();
        }
        PushKind::SUnsubscribe => {
            let Some(channel) = push.data.first().and_then(text) else {
                return;
            };
            let mut state = shared.lock();
            // Read under the lock the broker forgets connections under:
            // once forgotten, the connection's counts are gone, and its
            // own confirmation would read as Redis taking back a channel
            // subscribed since on this master's new connection.
            if forgotten.load(Ordering::SeqCst) {
                return;
            }
            let key = (addr.clone(), channel.to_owned());
            // One of ours: counted before it was sent.
            if let Some(n) = state.unsubscribing.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.unsubscribing.remove(&key);
                }
                return;
            }
            // Redis' own: the slot moved, or this master became a replica.
            state.moved.push(key);
            drop(state);
            shared.changed();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{LinkStatus, State};
    use crate::metrics::Metrics;

    fn shared() -> Shared {
        Shared {
            state: std::sync::Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            connected: AtomicBool::new(false),
            metrics: Arc::new(Metrics::new()),
            link: std::sync::Mutex::new(LinkStatus::default()),
        }
    }

    fn sunsubscribe(channel: &str) -> redis::PushInfo {
        redis::PushInfo {
            kind: PushKind::SUnsubscribe,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::Int(0),
            ],
        }
    }

    /// What a forgotten connection still had queued would arrive after
    /// what its channels' new connection delivers: it is not dispatched.
    #[test]
    fn a_forgotten_connections_queued_messages_are_not_dispatched() {
        let shared = shared();
        let plain = crate::broker::Outbox::new(8);
        shared.lock().channels.insert(
            "c".into(),
            crate::broker::Channel {
                subs: vec![(1, plain.clone())],
                confirmed: true,
            },
        );
        let addr: Arc<str> = "127.0.0.1:7000".into();
        let (dropped, forgotten) = (AtomicBool::new(false), AtomicBool::new(false));
        let message = |text: &str| redis::PushInfo {
            kind: PushKind::SMessage,
            data: vec![
                Value::BulkString(b"c".to_vec()),
                Value::BulkString(text.as_bytes().to_vec()),
            ],
        };
        on_push(&shared, &addr, (&dropped, &forgotten), message("live"));
        forgotten.store(true, Ordering::SeqCst);
        on_push(&shared, &addr, (&dropped, &forgotten), message("stale"));
        match plain.try_pop() {
            Some(axum::extract::ws::Message::Text(t)) => assert_eq!(t.as_str(), "live"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(plain.try_pop().is_none(), "the forgotten connection's");
    }

    /// Ours are counted and consumed, Redis' own are losses, and those of a
    /// connection the broker has forgotten are neither: the confirmation of
    /// an unsubscription handled after its idle connection was closed must
    /// not cut the same channel subscribed again on a new connection.
    #[test]
    fn a_forgotten_connections_sunsubscribe_is_not_taken_for_a_moved_slot() {
        let shared = shared();
        let addr: Arc<str> = "127.0.0.1:7000".into();
        let (dropped, forgotten) = (AtomicBool::new(false), AtomicBool::new(false));
        shared
            .lock()
            .unsubscribing
            .insert((addr.clone(), "c".into()), 1);
        on_push(&shared, &addr, (&dropped, &forgotten), sunsubscribe("c"));
        assert!(shared.lock().unsubscribing.is_empty(), "ours is consumed");
        assert!(shared.lock().moved.is_empty(), "ours is not a loss");

        on_push(&shared, &addr, (&dropped, &forgotten), sunsubscribe("c"));
        assert_eq!(shared.lock().moved, vec![(addr.clone(), "c".to_owned())]);
        shared.lock().moved.clear();

        // Forgotten (closed idle), with the same channel's unsubscription
        // counted again on a new connection to the same master: the old
        // connection's push touches neither.
        let mut nodes = HashMap::new();
        forget_node(&mut nodes, &mut shared.lock(), &addr);
        forgotten.store(true, Ordering::SeqCst);
        shared
            .lock()
            .unsubscribing
            .insert((addr.clone(), "c".into()), 1);
        on_push(&shared, &addr, (&dropped, &forgotten), sunsubscribe("c"));
        assert!(shared.lock().moved.is_empty(), "a forgotten connection's");
        assert_eq!(shared.lock().unsubscribing.len(), 1, "the new one's count");
    }
}
