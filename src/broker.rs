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
//! On a Redis Cluster ([`Broker::start_sharded`]) sharded subscriptions
//! are kept by a task of their own (`shards`): one connection per master,
//! opened by the broker, with its own map of the slots and of where each
//! channel is subscribed, so a dropped connection or a moved slot loses
//! exactly the channels it held, and nothing else.

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
mod shards;
mod sync;

use self::link::Target;
pub use self::outbox::{CloseOrder, Outbox, Outgoing};
use self::sync::run;

/// How long one connection attempt to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First and largest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
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

/// One channel with local subscribers. Small, as the map holds one per
/// idle session connection: the subscribers waiting for a confirmation
/// are kept apart ([`State::waiting`]), for the moment they wait.
#[derive(Debug, Default)]
struct Channel {
    /// Local subscribers, keyed by subscription id (usually one: the
    /// vector is allocated for exactly one, and grows as any other).
    subs: Vec<(u64, Arc<Outbox>)>,
    /// Redis has confirmed the subscription on the current connection.
    confirmed: bool,
}

impl Channel {
    /// Its subscription stopped: gapless subscribers end if it was live
    /// (they may have missed something), and it waits for a confirmation.
    fn lose(&mut self) {
        if self.confirmed {
            for (_, outbox) in &self.subs {
                outbox.lose();
            }
        }
        self.confirmed = false;
    }
}

#[derive(Debug, Default)]
struct State {
    /// Channel name -> its local subscribers. The name is shared (one
    /// allocation) with the subscriptions' guards, `dirty` and the control
    /// loop's set of what Redis has.
    channels: HashMap<Arc<str>, Channel>,
    /// Subscribers waiting for their channel's confirmation, by channel;
    /// an entry lives from the first subscriber until Redis confirms (or
    /// the channel goes).
    waiting: HashMap<Arc<str>, Vec<oneshot::Sender<()>>>,
    /// Channels that gained their first or lost their last subscriber since
    /// the control loop last looked, so a sync costs O(changes), not
    /// O(channels).
    dirty: HashSet<Arc<str>>,
    next_id: u64,
    /// Sharded mode: `SUNSUBSCRIBE`s sent whose push has not come back, per
    /// master and channel, so that ours are told from those Redis sends by
    /// itself.
    unsubscribing: HashMap<(Arc<str>, String), u32>,
    /// Sharded mode: subscriptions Redis took back by itself (a
    /// `sunsubscribe` push: the slot moved), with the master they were on,
    /// for the broker task to lose and subscribe again.
    moved: Vec<(Arc<str>, String)>,
    /// Sessions with a channel here, kept as channels come and go so that
    /// the status page does not walk the map under the lock the reader
    /// needs (see [`State::count`]).
    sessions: usize,
    /// Topic channels here.
    topics: usize,
    /// Where [`State::count`] writes the names it looks up (kept, so a
    /// connect allocates none).
    scratch: String,
}

impl State {
    /// Counts a channel that gained its first local subscriber (`true`,
    /// called once it is in `channels`) or lost its last (`false`, once
    /// it is out). A session counts while any of its channels is here: it
    /// is counted in or out when no other channel of it is (a look-up per
    /// name, instead of a map of sessions, which cost every idle
    /// connection about 80 bytes).
    fn count(&mut self, channel: &str, added: bool) {
        use crate::keys::{ChannelKind, channel_kind};
        match channel_kind(channel) {
            ChannelKind::Session(id) if self.has_other_channel(channel, id) => {}
            ChannelKind::Session(_) if added => self.sessions += 1,
            ChannelKind::Session(_) => self.sessions = self.sessions.saturating_sub(1),
            ChannelKind::Topic if added => self.topics += 1,
            ChannelKind::Topic => self.topics = self.topics.saturating_sub(1),
            ChannelKind::Other => {}
        }
    }

    /// Whether a channel of session `id` other than `channel` is here.
    /// `id` is spelled as the names spell it (a hash tag on a cluster), so
    /// the standalone names around it are the deployment's own.
    fn has_other_channel(&mut self, channel: &str, id: &str) -> bool {
        let mut other = std::mem::take(&mut self.scratch);
        let found = crate::keys::SESSION_CHANNELS.iter().any(|suffix| {
            crate::keys::write_session_name(&mut other, id, suffix);
            other != channel && self.channels.contains_key(other.as_str())
        });
        self.scratch = other;
        found
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the control loop when `state.dirty` gained something.
    wake: Notify,
    connected: AtomicBool,
    metrics: Arc<Metrics>,
    /// What the status page shows of the connection.
    link: Mutex<LinkStatus>,
}

/// The pub/sub connection as the status page shows it (see
/// [`Broker::link_status`]).
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// True while the connection is up and subscribed.
    pub connected: bool,
    /// The server of the last connection or attempt (`host:port`, or the
    /// cluster's seeds in sharded mode).
    pub server: String,
    /// When the last connection was made, in milliseconds since the Unix
    /// epoch.
    pub connected_at_unix_ms: Option<u64>,
    /// The last failure (a failed attempt, a lost connection), and when.
    pub last_error: Option<(String, u64)>,
}

/// Channels held, by what they are for (see [`Broker::channel_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCounts {
    /// Every channel with a local subscriber.
    pub channels: usize,
    /// Sessions with at least one channel.
    pub sessions: usize,
    /// Topic channels.
    pub topics: usize,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Shared {
    fn link(&self) -> MutexGuard<'_, LinkStatus> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection was made to `server`.
    fn link_up(&self, server: &str) {
        let mut link = self.link();
        server.clone_into(&mut link.server);
        link.connected_at_unix_ms = Some(unix_ms());
    }

    /// An attempt to `server` failed, or its connection was lost.
    fn link_failed(&self, server: &str, error: String) {
        let mut link = self.link();
        server.clone_into(&mut link.server);
        link.last_error = Some((error, unix_ms()));
    }

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
    /// The map's key (the same allocation).
    channel: Arc<str>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let now_empty = match state.channels.get_mut(&*self.channel) {
            Some(ch) => {
                ch.subs.retain(|(id, _)| *id != self.id);
                ch.subs.is_empty()
            }
            None => false,
        };
        if now_empty {
            state.channels.remove(&*self.channel);
            state.waiting.remove(&*self.channel);
            state.count(&self.channel, false);
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
            metrics,
            link: Mutex::new(LinkStatus::default()),
        });
        let task = match target {
            Target::Servers(clients) => tokio::spawn(run(clients, shared.clone(), shutdown)),
            Target::Sharded(nodes, tls) => tokio::spawn(shards::run(
                crate::cluster::Seeds::new(&nodes, tls),
                shared.clone(),
                shutdown,
            )),
        };
        (Self { shared }, task)
    }

    /// True while the shared pub/sub connection is established.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// The pub/sub connection's state, for the status page.
    pub fn link_status(&self) -> LinkStatus {
        let mut status = self.shared.link().clone();
        status.connected = self.is_connected();
        status
    }

    /// Counts the channels held by what they are for (kept as channels
    /// come and go: no walk of the map).
    pub fn channel_counts(&self) -> ChannelCounts {
        let state = self.shared.lock();
        ChannelCounts {
            channels: state.channels.len(),
            sessions: state.sessions,
            topics: state.topics,
        }
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
            let (name, first, live) = match state.channels.get_key_value(channel) {
                Some((name, ch)) => (name.clone(), false, ch.confirmed),
                None => {
                    let name: Arc<str> = Arc::from(channel);
                    let mut ch = Channel::default();
                    // Room for exactly this one (a push would make four).
                    ch.subs.reserve_exact(1);
                    state.channels.insert(name.clone(), ch);
                    (name, true, false)
                }
            };
            if let Some(ch) = state.channels.get_mut(channel) {
                ch.subs.push((id, outbox));
            }
            // Joining a channel Redis already delivers needs no round trip;
            // otherwise wait for the control loop's confirmation, which
            // wakes exactly the waiters of this channel.
            let confirmed = if live {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                state.waiting.entry(name.clone()).or_default().push(tx);
                Some(rx)
            };
            if first {
                state.dirty.insert(name.clone());
                state.count(channel, true);
            }
            drop(state);
            if first {
                self.shared.changed();
            }
            let subscription = Subscription {
                shared: self.shared.clone(),
                channel: name,
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

/// After the connection ended: nothing is subscribed on the next one until
/// it says so. The gapless subscribers of a channel that was live end:
/// whatever Redis publishes until the next connection has resubscribed is
/// lost to this process. (Those still waiting for a confirmation lose
/// nothing: they read history after it.)
fn connection_lost(shared: &Shared) {
    for ch in shared.lock().channels.values_mut() {
        ch.lose();
    }
}

/// Marks `channels` as live in Redis and wakes their waiting subscribers.
fn confirm<C: AsRef<str>>(shared: &Shared, channels: &[C]) {
    if channels.is_empty() {
        return;
    }
    let mut state = shared.lock();
    for name in channels {
        let name = name.as_ref();
        if let Some(ch) = state.channels.get_mut(name) {
            ch.confirmed = true;
            for waiter in state.waiting.remove(name).unwrap_or_default() {
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
            metrics: Arc::new(Metrics::new()),
            link: Mutex::new(LinkStatus::default()),
        })
    }

    #[test]
    fn sessions_and_topics_are_counted_as_their_channels_come_and_go() {
        for k in [
            crate::keys::Keys::Standalone,
            crate::keys::Keys::ClusterSharded,
        ] {
            let mut state = State::default();
            // As the broker does: in the map before it is counted in, out
            // of it before it is counted out.
            let add = |state: &mut State, channel: &str| {
                state.channels.insert(channel.into(), Channel::default());
                state.count(channel, true);
            };
            let remove = |state: &mut State, channel: &str| {
                state.channels.remove(channel);
                state.count(channel, false);
            };
            add(&mut state, &k.session_down("a"));
            add(&mut state, &k.session_live("a"));
            add(&mut state, &k.session_down("b"));
            add(&mut state, &k.topic("a", "news"));
            add(&mut state, crate::keys::CONTROL);
            assert_eq!((state.sessions, state.topics), (2, 1));
            remove(&mut state, &k.session_down("a"));
            assert_eq!(state.sessions, 2, "a still has its live channel");
            add(&mut state, &k.session_events("b"));
            assert_eq!(state.sessions, 2, "b was counted already");
            remove(&mut state, &k.session_live("a"));
            remove(&mut state, &k.session_down("b"));
            assert_eq!(state.sessions, 1, "b still has its events channel");
            remove(&mut state, &k.topic("a", "news"));
            remove(&mut state, &k.topic("a", "news"));
            assert_eq!((state.sessions, state.topics), (1, 0));
            remove(&mut state, &k.session_events("b"));
            assert_eq!(state.sessions, 0);
        }
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
                },
            );
            state.channels.insert(
                "new".into(),
                Channel {
                    subs: vec![(3, waiting.clone())],
                    confirmed: false,
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
            },
        );
        shared.lock().channels.insert(
            "t".into(),
            Channel {
                subs: vec![(3, other.clone())],
                confirmed: true,
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
