//! The broker: one shared Redis pub/sub connection for the whole process.
//!
//! Every WebSocket that wants the messages of a channel registers a
//! [`Outbox`] (its bounded outbound queue) with [`Broker::subscribe`] and
//! gets back a [`Subscription`] guard. The broker keeps, per channel, the list
//! of local subscribers; Redis is told `SUBSCRIBE` when a channel gains its
//! first local subscriber and `UNSUBSCRIBE` when it loses its last one, so a
//! thousand connections on one session cost one Redis subscription.
//!
//! Two tasks share the connection while it is up:
//! - the **reader** takes each message off the connection and hands it to the
//!   queues of the channel's subscribers with `try_send`. It never waits for a
//!   client: a full queue marks that subscriber slow (its connection closes
//!   with 1008) and the message goes on to everyone else;
//! - the **control loop** makes Redis' subscriptions match the wanted set. Any
//!   number of changes that arrive while it is busy are folded into one
//!   `SUBSCRIBE a b c` / `UNSUBSCRIBE x y` round trip.
//!
//! A subscriber waits (bounded) until the control loop has confirmed its
//! channel, so once `subscribe` returns, nothing published afterwards is
//! missed. If the connection drops, the broker reconnects with exponential
//! backoff and resubscribes every channel that still has subscribers; open
//! WebSockets are untouched meanwhile, except those that must not miss a
//! message ([`Outbox::gapless`], reliable sessions): what Redis published
//! between the drop and the resubscription never reaches this process, so
//! those end ([`Outgoing::Lost`]) and their clients resume from history.
//!
//! On a Redis Cluster ([`Broker::start_sharded`]) the same loop drives
//! sharded subscriptions: the connection is a RESP3 cluster connection of
//! the broker's own (one connection per node, never per channel or per
//! WebSocket), each batch becomes one `SSUBSCRIBE` per slot, all sent at
//! once, and messages arrive as pushes. A node connection that drops, or a
//! subscription Redis takes back (its slot moved), makes the control loop
//! subscribe every channel again on the same connection, where its slot
//! is now (Redis ignores a repeat, so the healthy shards' subscriptions
//! never stop); gapless outboxes end and `/ready` is false until it is
//! done. While a shard fails over, that is retried; only after
//! `RESYNC_LIMIT`, or when the keepalive ping fails, is a new connection
//! built from the seeds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

mod link;
mod outbox;

use self::link::{Link, Target, connect};
pub use self::outbox::{CloseOrder, Outbox, Outgoing};

/// How long one connection attempt to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First and largest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a sharded connection may go on failing to subscribe (a cluster
/// failing over) before the broker starts a new one from the seeds.
const RESYNC_LIMIT: Duration = Duration::from_secs(20);
/// The control loop pings Redis this often while idle, so a connection that
/// died silently (no FIN/RST) is noticed.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Errors a subscriber can see.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Redis did not confirm the subscription in time (it is down or slow).
    #[error("Redis did not confirm the subscription within {0:?}")]
    Timeout(Duration),
    /// The broker has shut down.
    #[error("the broker is shut down")]
    Closed,
}

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Redis answered with an error, or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the limit.
    #[error("Redis did not answer in time")]
    Timeout,
}

/// `PUBLISH channel payload` (`SPUBLISH` with sharded pub/sub on a
/// cluster, see [`crate::keys::Keys::publish_command`]) on the shared
/// command connection, waiting at
/// most `limit` for Redis to accept it; the number of subscribers that got
/// it. What the bridge (client messages) and topic pub/sub publish goes
/// through here; receiving is the [`Broker`]'s.
pub async fn publish<C: redis::aio::ConnectionLike>(
    redis: &mut C,
    keys: crate::keys::Keys,
    channel: &str,
    payload: &[u8],
    limit: Duration,
) -> Result<i64, PublishError> {
    let mut cmd = redis::cmd(keys.publish_command());
    cmd.arg(channel).arg(payload);
    let publish = cmd.query_async::<i64>(redis);
    match tokio::time::timeout(limit, publish).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(PublishError::Timeout),
    }
}

/// One channel with local subscribers.
#[derive(Debug, Default)]
struct Channel {
    /// Local subscribers, keyed by subscription id.
    subs: Vec<(u64, Arc<Outbox>)>,
    /// Redis has confirmed the subscription on the current connection.
    confirmed: bool,
    /// Subscribers waiting for that confirmation.
    waiters: Vec<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
struct State {
    /// Channel name -> its local subscribers.
    channels: HashMap<String, Channel>,
    /// Channels that gained their first or lost their last subscriber since
    /// the control loop last looked, so a sync costs O(changes), not
    /// O(channels).
    dirty: HashSet<String>,
    next_id: u64,
    /// Sharded mode: `SUNSUBSCRIBE`s sent whose push has not come back, per
    /// channel, so that ours are told from those Redis sends by itself.
    unsubscribing: HashMap<String, u32>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the control loop when `state.dirty` gained something.
    wake: Notify,
    connected: AtomicBool,
    /// Sharded mode: a node's connection dropped or Redis took a
    /// subscription back; the control loop subscribes everything again on
    /// the same connection (the other shards' subscriptions never stopped).
    resync: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every
        // mutation is a single insert/remove), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the control loop: `state.dirty` has something to apply.
    fn changed(&self) {
        self.wake.notify_one();
    }
}

/// Handle to the broker; cheap to clone.
#[derive(Debug, Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

/// Keeps a subscriber registered; dropping it unsubscribes (and tells Redis
/// if it was the channel's last local subscriber).
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    channel: String,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let now_empty = match state.channels.get_mut(&self.channel) {
            Some(ch) => {
                ch.subs.retain(|(id, _)| *id != self.id);
                ch.subs.is_empty()
            }
            None => false,
        };
        if now_empty {
            state.channels.remove(&self.channel);
            state.dirty.insert(self.channel.clone());
            drop(state);
            self.shared.changed();
        }
    }
}

impl Broker {
    /// Starts the broker's background task on the current runtime. It runs
    /// until `shutdown` is cancelled; the returned handle ends with it.
    pub fn start(
        client: redis::Client,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::start_any(vec![client], metrics, shutdown)
    }

    /// As [`Broker::start`], with several servers that deliver the same
    /// messages (the nodes of a Redis Cluster with classic pub/sub, where
    /// every node gets every `PUBLISH`): the one connection goes to the
    /// first that answers, and after a failure to the next in turn.
    pub fn start_any(
        clients: Vec<redis::Client>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::start_on(Target::Servers(clients), metrics, shutdown)
    }

    /// As [`Broker::start`], on a Redis Cluster with sharded pub/sub,
    /// reached through `nodes` (seed URLs): each channel is subscribed
    /// (`SSUBSCRIBE`) on its slot's shard, over one connection per node,
    /// and resubscribed where its slot is now whenever a node's connection
    /// drops or Redis moves a subscription away.
    pub fn start_sharded(
        nodes: Vec<String>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::start_on(Target::Sharded(nodes), metrics, shutdown)
    }

    fn start_on(
        target: Target,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            metrics,
        });
        let task = tokio::spawn(run(target, shared.clone(), shutdown));
        (Self { shared }, task)
    }

    /// True while the shared pub/sub connection is established.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Orders every local subscriber of `channel` closed (see
    /// [`Outbox::order_close`]); the number of connections ordered.
    pub fn close_channel(&self, channel: &str, order: &CloseOrder) -> usize {
        let state = self.shared.lock();
        let Some(ch) = state.channels.get(channel) else {
            return 0;
        };
        ch.subs
            .iter()
            .filter(|(_, outbox)| outbox.order_close(order.clone()))
            .count()
    }

    /// Orders closed every local subscriber of the channels `which` picks;
    /// the number of connections ordered.
    pub fn close_where(&self, which: impl Fn(&str) -> bool, order: &CloseOrder) -> usize {
        let state = self.shared.lock();
        state
            .channels
            .iter()
            .filter(|(name, _)| which(name))
            .flat_map(|(_, ch)| ch.subs.iter())
            .filter(|(_, outbox)| outbox.order_close(order.clone()))
            .count()
    }

    /// Number of channels with at least one local subscriber.
    #[cfg(test)]
    fn channel_count(&self) -> usize {
        self.shared.lock().channels.len()
    }

    /// Registers `outbox` for `channel` and waits, at most `wait`, until
    /// Redis has confirmed the subscription. On error nothing stays registered.
    pub async fn subscribe(
        &self,
        channel: &str,
        outbox: Arc<Outbox>,
        wait: Duration,
    ) -> Result<Subscription, BrokerError> {
        let (subscription, confirmed) = {
            let mut state = self.shared.lock();
            state.next_id += 1;
            let id = state.next_id;
            let ch = state.channels.entry(channel.to_owned()).or_default();
            let first = ch.subs.is_empty();
            ch.subs.push((id, outbox));
            // Joining a channel Redis already delivers needs no round trip;
            // otherwise wait for the control loop's confirmation, which
            // wakes exactly the waiters of this channel.
            let confirmed = if ch.confirmed {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                ch.waiters.push(tx);
                Some(rx)
            };
            if first {
                state.dirty.insert(channel.to_owned());
            }
            drop(state);
            if first {
                self.shared.changed();
            }
            let subscription = Subscription {
                shared: self.shared.clone(),
                channel: channel.to_owned(),
                id,
            };
            (subscription, confirmed)
        };
        let Some(confirmed) = confirmed else {
            return Ok(subscription);
        };
        match tokio::time::timeout(wait, confirmed).await {
            Ok(Ok(())) => Ok(subscription),
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => Err(BrokerError::Timeout(wait)),
        }
    }
}

/// Turns a Redis payload into the frame clients get: text when it is UTF-8
/// (the normal case), binary otherwise so no byte is lost.
fn frame_for(payload: &[u8]) -> Message {
    let bytes = Bytes::copy_from_slice(payload);
    match Utf8Bytes::try_from(bytes.clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(bytes),
    }
}

/// Hands one message to every local subscriber of `channel`.
fn dispatch(shared: &Shared, channel: &str, payload: &[u8]) {
    let state = shared.lock();
    let Some(ch) = state.channels.get(channel) else {
        // Unsubscribed a moment ago; Redis' UNSUBSCRIBE is on its way.
        return;
    };
    let frame = frame_for(payload);
    for (_, outbox) in &ch.subs {
        // A full outbox marks its connection slow; the others go on.
        outbox.push(frame.clone());
    }
}

/// The broker task: connect, serve until the connection breaks, reconnect.
async fn run(target: Target, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut ever_connected = false;
    let mut attempt = 0;
    loop {
        let connecting = connect(&target, attempt, &shared);
        let (redis, connected) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connecting => r,
        };
        let (link, reader) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                attempt += 1;
                tracing::warn!(%redis, error = %e, retry_in = ?backoff, "redis pub/sub connect failed");
                if sleep_or_shutdown(backoff, &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if ever_connected {
            shared.metrics.redis_reconnects.inc();
        }
        ever_connected = true;
        let served_since = tokio::time::Instant::now();
        let stopped = serve(link, reader, &shared, &shutdown).await;
        shared.connected.store(false, Ordering::SeqCst);
        shared.metrics.redis_connected.set(0);
        shared.metrics.broker_channels.set(0);
        if stopped {
            return;
        }
        attempt += 1;
        tracing::warn!(%redis, "redis pub/sub connection lost; reconnecting");
        match target {
            // One server: straight back (it answered a moment ago).
            Target::Servers(_) => backoff = BACKOFF_MIN,
            // A cluster connection that broke soon after it was made (the
            // cluster is still failing over, its slot map not settled)
            // backs off; one that served a while starts over.
            Target::Sharded(_) => {
                if served_since.elapsed() > BACKOFF_MAX * 2 {
                    backoff = BACKOFF_MIN;
                }
                if sleep_or_shutdown(backoff, &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sleeps for `pause`; returns true if shutdown came first.
async fn sleep_or_shutdown(pause: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(pause) => false,
    }
}

/// Serves one established connection; `reader` ends when the connection
/// does. Returns true on shutdown, false when the connection broke.
async fn serve(
    mut link: Link,
    mut reader: tokio::task::JoinHandle<()>,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> bool {
    // What Redis currently has for this connection: nothing, it is new.
    let mut active: HashSet<String> = HashSet::new();
    let mut first_sync = true;
    // Sharded mode: since when subscribing fails, and the pause before the
    // next try on the same connection.
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut retry = BACKOFF_MIN;
    let result = loop {
        if shared.resync.swap(false, Ordering::SeqCst) {
            // Some subscriptions are gone (a node dropped, a slot moved):
            // what was published meanwhile is lost to gapless outboxes, and
            // /ready is false until everything is subscribed again.
            connection_lost(shared);
            shared.connected.store(false, Ordering::SeqCst);
            shared.metrics.redis_connected.set(0);
            shared.metrics.redis_reconnects.inc();
            first_sync = true;
        }
        // Apply everything wanted so far in one round trip each way.
        let (add, remove, already) = {
            let mut state = shared.lock();
            let mut add = Vec::new();
            let mut remove = Vec::new();
            // Channels re-wanted while Redis still had them: confirm at once.
            let mut already = Vec::new();
            if first_sync {
                // A fresh connection has nothing: subscribe every live
                // channel (after a resync, again: Redis ignores a repeat),
                // and drop what is no longer wanted.
                state.dirty.clear();
                state.unsubscribing.clear();
                add.extend(state.channels.keys().cloned());
                remove.extend(
                    active
                        .iter()
                        .filter(|c| !state.channels.contains_key(*c))
                        .cloned(),
                );
            } else {
                let dirty = std::mem::take(&mut state.dirty);
                for channel in dirty {
                    match (
                        state.channels.contains_key(&channel),
                        active.contains(&channel),
                    ) {
                        (true, false) => add.push(channel),
                        (false, true) => remove.push(channel),
                        (true, true) => already.push(channel),
                        (false, false) => {} // came and went: nothing to tell Redis
                    }
                }
            }
            (add, remove, already)
        };
        if add.is_empty() && remove.is_empty() && !already.is_empty() {
            confirm(shared, &already);
        }
        let applied = async {
            if !add.is_empty() {
                link.subscribe(&add).await?;
            }
            if !remove.is_empty() {
                if matches!(link, Link::Sharded(_)) {
                    let mut state = shared.lock();
                    for channel in &remove {
                        *state.unsubscribing.entry(channel.clone()).or_default() += 1;
                    }
                }
                link.unsubscribe(&remove).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        let failure = match tokio::time::timeout(CONNECT_TIMEOUT, applied).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        if let Some(error) = failure {
            if matches!(link, Link::Sharded(_))
                && error.to_ascii_lowercase().contains("unknown command")
            {
                // Redis before 7 has no SSUBSCRIBE: say what to change.
                tracing::error!(%error, "sharded pub/sub needs Redis 7 or newer on every node; upgrade, or set REDIS_CLUSTER_PUBSUB=classic");
            }
            tracing::warn!(%error, "redis subscribe/unsubscribe failed");
            // A cluster still failing over refuses the subscriptions of
            // the shard that lost its master, for seconds: try again on
            // the same connection, whose other shards keep delivering, and
            // start a new one only when that goes on for too long.
            let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
            if !matches!(link, Link::Sharded(_)) || since.elapsed() > RESYNC_LIMIT {
                break false;
            }
            // Channels the failed attempt touched are in an unknown state:
            // everything is applied again.
            first_sync = true;
            shared.connected.store(false, Ordering::SeqCst);
            shared.metrics.redis_connected.set(0);
            if sleep_or_shutdown(retry, shutdown).await {
                break true;
            }
            retry = (retry * 2).min(BACKOFF_MAX / 2);
            continue;
        }
        failing_since = None;
        retry = BACKOFF_MIN;
        confirm(shared, &add);
        confirm(shared, &already);
        if first_sync {
            active.clear();
        }
        active.extend(add);
        for channel in &remove {
            active.remove(channel);
        }
        shared.metrics.broker_channels.set(active.len() as i64);
        if first_sync {
            // Only now are all live channels back: report ready.
            first_sync = false;
            shared.connected.store(true, Ordering::SeqCst);
            shared.metrics.redis_connected.set(1);
            tracing::info!(channels = active.len(), "redis pub/sub connected");
        }
        if !shared.lock().dirty.is_empty() {
            continue; // More changes arrived meanwhile.
        }

        tokio::select! {
            _ = shutdown.cancelled() => break true,
            _ = &mut reader => break false,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(KEEPALIVE) => {
                let ping = tokio::time::timeout(CONNECT_TIMEOUT, link.ping()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    tracing::warn!("redis pub/sub keepalive ping failed");
                    break false;
                }
            }
        }
    };
    reader.abort();
    connection_lost(shared);
    result
}

/// After the connection ended: nothing is subscribed on the next one until
/// it says so. The gapless subscribers of a channel that was live end:
/// whatever Redis publishes until the next connection has resubscribed is
/// lost to this process. (Those still waiting for a confirmation lose
/// nothing: they read history after it.)
fn connection_lost(shared: &Shared) {
    for ch in shared.lock().channels.values_mut() {
        if ch.confirmed {
            for (_, outbox) in &ch.subs {
                outbox.lose();
            }
        }
        ch.confirmed = false;
    }
}

/// Marks `channels` as live in Redis and wakes their waiting subscribers.
fn confirm(shared: &Shared, channels: &[String]) {
    if channels.is_empty() {
        return;
    }
    let mut state = shared.lock();
    for name in channels {
        if let Some(ch) = state.channels.get_mut(name) {
            ch.confirmed = true;
            for waiter in ch.waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_payloads_become_text_and_others_binary() {
        assert!(matches!(frame_for(b"{\"a\":1}"), Message::Text(t) if t.as_str() == "{\"a\":1}"));
        assert!(
            matches!(frame_for(&[0xff, 0x00]), Message::Binary(b) if b.as_ref() == [0xff, 0x00])
        );
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            metrics: Arc::new(Metrics::new()),
        })
    }

    #[tokio::test]
    async fn full_queue_marks_only_that_subscriber_slow() {
        let shared = shared();
        let fast = Outbox::new(8);
        let slow = Outbox::new(1);
        shared.lock().channels.insert(
            "c".into(),
            Channel {
                subs: vec![(1, fast.clone()), (2, slow.clone())],
                confirmed: true,
                waiters: Vec::new(),
            },
        );
        for i in 0..3 {
            dispatch(&shared, "c", format!("{i}").as_bytes());
        }
        assert!(matches!(slow.pop().await, Outgoing::Slow));
        for i in 0..3 {
            match fast.pop().await {
                Outgoing::Message(Message::Text(t)) => assert_eq!(t.as_str(), i.to_string()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(fast.try_pop().is_none());
    }

    #[tokio::test]
    async fn a_lost_connection_ends_gapless_subscribers_after_what_they_had() {
        let shared = shared();
        let plain = Outbox::new(8);
        let gapless = Outbox::gapless(8);
        let waiting = Outbox::gapless(8);
        {
            let mut state = shared.lock();
            state.channels.insert(
                "live".into(),
                Channel {
                    subs: vec![(1, plain.clone()), (2, gapless.clone())],
                    confirmed: true,
                    waiters: Vec::new(),
                },
            );
            state.channels.insert(
                "new".into(),
                Channel {
                    subs: vec![(3, waiting.clone())],
                    confirmed: false,
                    waiters: Vec::new(),
                },
            );
        }
        dispatch(&shared, "live", b"before");
        connection_lost(&shared);
        assert!(shared.lock().channels.values().all(|ch| !ch.confirmed));
        // After the gap: taken by the plain subscriber only.
        dispatch(&shared, "live", b"after");
        for want in ["before", "after"] {
            match plain.pop().await {
                Outgoing::Message(Message::Text(t)) => assert_eq!(t.as_str(), want),
                other => panic!("unexpected {other:?}"),
            }
        }
        match gapless.pop().await {
            Outgoing::Message(Message::Text(t)) => assert_eq!(t.as_str(), "before"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(gapless.pop().await, Outgoing::Lost));
        // One still waiting for its confirmation missed nothing.
        assert!(waiting.push(Message::text("first")));
        assert!(matches!(waiting.pop().await, Outgoing::Message(_)));
    }

    #[tokio::test]
    async fn a_close_order_comes_after_what_was_queued_and_stops_the_queue() {
        let shared = shared();
        let broker = Broker {
            shared: shared.clone(),
        };
        let (a, b, other) = (Outbox::new(8), Outbox::new(8), Outbox::new(8));
        shared.lock().channels.insert(
            "s".into(),
            Channel {
                subs: vec![(1, a.clone()), (2, b.clone())],
                confirmed: true,
                waiters: Vec::new(),
            },
        );
        shared.lock().channels.insert(
            "t".into(),
            Channel {
                subs: vec![(3, other.clone())],
                confirmed: true,
                waiters: Vec::new(),
            },
        );
        dispatch(&shared, "s", b"last words");
        let order = CloseOrder {
            code: 4001,
            reason: "revoked".into(),
        };
        assert_eq!(broker.close_channel("s", &order), 2);
        assert_eq!(broker.close_channel("nobody", &order), 0);
        // A second order changes nothing: the first one wins.
        assert_eq!(broker.close_channel("s", &order), 0);
        dispatch(&shared, "s", b"too late");
        for outbox in [&a, &b] {
            match outbox.pop().await {
                Outgoing::Message(Message::Text(t)) => assert_eq!(t.as_str(), "last words"),
                other => panic!("unexpected {other:?}"),
            }
            match outbox.pop().await {
                Outgoing::Close(o) => assert_eq!(*o, order),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(other.try_pop().is_none());
        assert_eq!(broker.close_where(|c| c == "t", &order), 1);
        assert!(matches!(other.pop().await, Outgoing::Close(_)));
    }

    #[tokio::test]
    async fn dropping_the_last_subscription_removes_the_channel() {
        let shared = shared();
        let broker = Broker {
            shared: shared.clone(),
        };
        let (a, b) = (Outbox::new(1), Outbox::new(1));
        // Nothing confirms in this test (no control loop): the wait times
        // out, and the failed subscription must not stay registered.
        let err = broker
            .subscribe("c", a.clone(), Duration::from_millis(10))
            .await
            .expect_err("no control loop to confirm");
        assert!(matches!(err, BrokerError::Timeout(_)));
        assert_eq!(broker.channel_count(), 0);
        // Confirm by hand while the first waits; later subscribers of the
        // confirmed channel need no round trip; one entry for all.
        let pending = broker.subscribe("c", a.clone(), Duration::from_secs(5));
        let confirmer = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            confirm(&shared, &["c".to_owned()]);
        };
        let (s1, ()) = tokio::join!(pending, confirmer);
        let s1 = s1.expect("confirmed by hand");
        let s2 = broker
            .subscribe("c", b, Duration::from_millis(10))
            .await
            .expect("already confirmed");
        assert_eq!(broker.channel_count(), 1);
        drop(s1);
        assert_eq!(broker.channel_count(), 1);
        drop(s2);
        assert_eq!(broker.channel_count(), 0);
    }
}
