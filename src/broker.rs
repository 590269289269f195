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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

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

/// A connection's bounded outbound queue, filled by the broker's reader and
/// drained by the connection's task.
///
/// It is a `VecDeque` behind a short std mutex plus a [`Notify`], rather
/// than a tokio mpsc channel, because it must be small while idle: an
/// empty `VecDeque` allocates nothing, where a bounded mpsc channel
/// allocates a block of 32 slots (about 1.5 KiB) up front. The reader never
/// waits on it: a push into a full queue marks the connection slow instead.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    capacity: usize,
    /// Its connection must not miss a message: it ends when the pub/sub
    /// connection drops.
    gapless: bool,
}

#[derive(Debug, Default)]
struct OutboxState {
    queue: VecDeque<Message>,
    /// Set when a push found the queue full: the client is not keeping up.
    slow: bool,
    /// Set (gapless outboxes only) when the pub/sub connection dropped
    /// after the outbox's channel was live: what is queued came before the
    /// gap, nothing after it is taken.
    lost: bool,
    /// Set when something (a backend, through the control channel) ordered
    /// the connection closed: what is queued goes out first, nothing more
    /// is taken. Boxed: an idle connection pays one pointer.
    close: Option<Box<CloseOrder>>,
}

/// An order to close a connection with this code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseOrder {
    /// The close code the client gets.
    pub code: u16,
    /// The close reason (at most 123 bytes).
    pub reason: String,
}

/// What a connection gets from its outbox.
#[derive(Debug)]
pub enum Outgoing {
    /// The next message, in publish order.
    Message(Message),
    /// The queue overflowed; the connection must be closed (1008).
    Slow,
    /// A gapless outbox's messages stopped: the pub/sub connection dropped,
    /// and what Redis published until it was back is missing. Everything
    /// queued before has been handed out; the connection must be closed
    /// (1013) so that its client resumes.
    Lost,
    /// The connection was ordered closed ([`Outbox::order_close`]); what was
    /// queued before has been handed out.
    Close(Box<CloseOrder>),
}

impl Outbox {
    /// An empty outbox holding at most `capacity` messages.
    pub fn new(capacity: usize) -> Arc<Self> {
        Self::with(capacity, false)
    }

    /// An outbox for a connection that must not miss a message: when the
    /// pub/sub connection drops, it takes nothing more and, once drained,
    /// gives [`Outgoing::Lost`].
    pub fn gapless(capacity: usize) -> Arc<Self> {
        Self::with(capacity, true)
    }

    fn with(capacity: usize, gapless: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OutboxState::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            gapless,
        })
    }

    /// The pub/sub connection dropped: a gapless outbox stops here.
    fn lose(&self) {
        if self.gapless {
            self.lock().lost = true;
            self.notify.notify_one();
        }
    }

    /// Orders the connection closed once what is queued has gone out; the
    /// first order wins. Returns false if one was already given.
    pub fn order_close(&self, order: CloseOrder) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(Box::new(order));
        drop(state);
        self.notify.notify_one();
        true
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `msg`; a full queue marks the outbox slow and drops `msg`.
    /// Returns false if the message was not queued.
    pub fn push(&self, msg: Message) -> bool {
        let mut state = self.lock();
        if state.slow || state.lost || state.close.is_some() {
            return false;
        }
        let queued = if state.queue.len() >= self.capacity {
            state.slow = true;
            false
        } else {
            state.queue.push_back(msg);
            true
        };
        drop(state);
        // One consumer: a stored permit covers a push that happens while
        // the consumer is between checking and waiting.
        self.notify.notify_one();
        queued
    }

    /// Takes a queued message without waiting (used to flush on shutdown).
    pub fn try_pop(&self) -> Option<Message> {
        self.lock().queue.pop_front()
    }

    /// Waits for the next message, or for the outbox to turn slow, or (once
    /// drained) lost.
    ///
    /// # Cancel safety
    /// Cancel safe: a message is only removed in the poll that returns it.
    pub async fn pop(&self) -> Outgoing {
        loop {
            {
                let mut state = self.lock();
                if state.slow {
                    return Outgoing::Slow;
                }
                if let Some(msg) = state.queue.pop_front() {
                    return Outgoing::Message(msg);
                }
                if state.lost {
                    return Outgoing::Lost;
                }
                if let Some(order) = state.close.take() {
                    return Outgoing::Close(order);
                }
            }
            self.notify.notified().await;
        }
    }

    /// Resolves once the outbox has overflowed. Used to abandon a write to
    /// a client that has stopped reading. Cancel safe.
    pub async fn overflowed(&self) {
        loop {
            if self.lock().slow {
                return;
            }
            self.notify.notified().await;
        }
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
    /// drops or Redis moves a subscription away. `tls`: the certificates
    /// for `rediss://` seeds (see [`crate::redis_tls`]), used for every
    /// node.
    pub fn start_sharded(
        nodes: Vec<String>,
        tls: Option<redis::TlsCertificates>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::start_on(Target::Sharded(nodes, tls), metrics, shutdown)
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

/// Where the broker's subscriptions live.
#[derive(Debug)]
enum Target {
    /// Servers that each deliver every message (one Redis, or the nodes of
    /// a cluster with classic pub/sub): one connection, to the first that
    /// answers.
    Servers(Vec<redis::Client>),
    /// A Redis Cluster with sharded pub/sub, reached through these seed
    /// URLs (with these certificates when they are `rediss://`):
    /// `SSUBSCRIBE` on each channel's shard.
    Sharded(Vec<String>, Option<redis::TlsCertificates>),
}

/// The broker's connection while it is up.
enum Link {
    /// One server's pub/sub connection.
    Single(redis::aio::PubSubSink),
    /// A cluster connection speaking RESP3 (one multiplexed connection per
    /// node, subscriptions and pushes on it); the redis crate routes each
    /// `SSUBSCRIBE` to its slot's owner.
    Sharded(redis::cluster_async::ClusterConnection),
}

impl Link {
    /// Subscribes `channels`: one `SUBSCRIBE`, or (sharded) one
    /// `SSUBSCRIBE` per slot (Redis refuses channels of several slots in
    /// one), all sent at once, so pipelined on each shard's connection.
    async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.subscribe(channels).await,
            Self::Sharded(conn) => {
                let calls = by_slot(channels).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(group).await }
                });
                futures_util::future::try_join_all(calls).await.map(|_| ())
            }
        }
    }

    /// Unsubscribes `channels`, as [`Link::subscribe`].
    async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.unsubscribe(channels).await,
            Self::Sharded(conn) => {
                let calls = by_slot(channels).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(group).await }
                });
                futures_util::future::try_join_all(calls).await.map(|_| ())
            }
        }
    }

    /// Asks for any answer: silence or an error is a failure. On a cluster
    /// every master must answer.
    async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            // In subscribed mode Redis answers PING with ["pong", ""],
            // not +PONG: accept any reply.
            Self::Single(sink) => sink.ping::<redis::Value>().await.map(|_| ()),
            Self::Sharded(conn) => redis::cmd("PING")
                .query_async::<redis::Value>(conn)
                .await
                .map(|_| ()),
        }
    }
}

/// `channels` grouped by hash slot.
fn by_slot(channels: &[String]) -> Vec<Vec<String>> {
    let mut groups: HashMap<redis::cluster_routing::Slot, Vec<String>> = HashMap::new();
    for channel in channels {
        groups
            .entry(redis::cluster_routing::Slot::for_key(channel.as_bytes()))
            .or_default()
            .push(channel.clone());
    }
    groups.into_values().collect()
}

/// A RESP3 push from a cluster connection (sharded mode). Messages go to
/// their subscribers as the reader's do. A dropped node connection, or
/// Redis taking back a live subscription (its slot moved: resharding, a
/// failover), asks the control loop to subscribe everything again where
/// the slots are now, on the same connection.
fn on_push(shared: &Shared, push: redis::PushInfo) {
    use redis::{PushKind, Value};
    match push.kind {
        PushKind::Message | PushKind::SMessage => {
            if let [Value::BulkString(channel), Value::BulkString(payload), ..] = &push.data[..]
                && let Ok(channel) = std::str::from_utf8(channel)
            {
                dispatch(shared, channel, payload);
            }
        }
        PushKind::Disconnection => {
            tracing::warn!("a redis cluster node's pub/sub connection dropped");
            shared.resync.store(true, Ordering::SeqCst);
            shared.changed();
        }
        PushKind::SUnsubscribe => {
            let Some(Value::BulkString(channel)) = push.data.first() else {
                return;
            };
            let Ok(channel) = std::str::from_utf8(channel) else {
                return;
            };
            let mut state = shared.lock();
            // One of ours (the control loop counted it before sending).
            if let Some(n) = state.unsubscribing.get_mut(channel) {
                *n -= 1;
                if *n == 0 {
                    state.unsubscribing.remove(channel);
                }
                return;
            }
            // Redis' own: the channel's slot moved. Only a live
            // subscription matters.
            if state.channels.get(channel).is_some_and(|c| c.confirmed) {
                drop(state);
                tracing::warn!(channel, "redis moved a sharded subscription away");
                shared.resync.store(true, Ordering::SeqCst);
                shared.changed();
            }
        }
        _ => {}
    }
}

/// One connection attempt: the link and the task whose end means the
/// connection is lost, or why there is none; `redis` names where it went
/// (host:port, never a URL, which may hold a password).
async fn connect(
    target: &Target,
    attempt: usize,
    shared: &Arc<Shared>,
) -> (String, Result<(Link, tokio::task::JoinHandle<()>), String>) {
    match target {
        Target::Servers(clients) => {
            let Some(client) = clients.get(attempt % clients.len().max(1)) else {
                return (String::new(), Err("no Redis server is configured".into()));
            };
            let redis = client.get_connection_info().addr().to_string();
            let pubsub =
                match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
                    Ok(Ok(pubsub)) => pubsub,
                    Ok(Err(e)) => return (redis, Err(e.to_string())),
                    Err(_) => return (redis, Err("timed out".into())),
                };
            let (sink, mut stream) = pubsub.split();
            let reader_shared = shared.clone();
            let reader = tokio::spawn(async move {
                while let Some(msg) = stream.next().await {
                    dispatch(
                        &reader_shared,
                        msg.get_channel_name(),
                        msg.get_payload_bytes(),
                    );
                }
            });
            (redis, Ok((Link::Single(sink), reader)))
        }
        Target::Sharded(nodes, tls) => {
            let redis = format!("cluster of {} seed nodes", nodes.len());
            let sender = {
                let shared = shared.clone();
                move |push: redis::PushInfo| -> Result<(), std::convert::Infallible> {
                    on_push(&shared, push);
                    Ok(())
                }
            };
            let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
            let mut client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(sender)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(CONNECT_TIMEOUT)
                .retries(2)
                .tcp_settings(tcp);
            if let Some(tls) = tls {
                client = client.certs(tls.clone());
            }
            let client = client.build();
            let client = match client {
                Ok(client) => client,
                Err(e) => return (redis, Err(e.to_string())),
            };
            let conn =
                match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection()).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => return (redis, Err(e.to_string())),
                    Err(_) => return (redis, Err("timed out".into())),
                };
            // Nothing reads: messages arrive through `on_push`. A cluster
            // connection that stops answering fails the keepalive ping.
            let idle = tokio::spawn(std::future::pending::<()>());
            (redis, Ok((Link::Sharded(conn), idle)))
        }
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
            Target::Sharded(..) => {
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
