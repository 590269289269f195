//! The broker's side of the wire: where its subscriptions live, the
//! connection while it is up, and how one is made.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;

use super::{CONNECT_TIMEOUT, Shared, dispatch};

/// Where the broker's subscriptions live.
#[derive(Debug)]
pub(super) enum Target {
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
pub(super) enum Link {
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
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
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
    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
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
    pub(super) async fn ping(&mut self) -> redis::RedisResult<()> {
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
/// their subscribers as the reader's do.
///
/// Pushes come in order, and on a connection a subscription's confirmation
/// comes before its first message, so a channel whose subscription was
/// interrupted is lost here, at once, before anything published after the
/// gap can reach a gapless outbox that would take it for continuity:
///
/// - a dropped node connection: every channel (the push does not say
///   which node; a healthy shard's reliable clients resume too);
/// - a confirmation this broker did not ask for: the redis crate subscribed
///   the channel again by itself, on a new connection (a node reconnected,
///   the slot map changed, its connections were remade from the seeds,
///   possibly without a drop being pushed);
/// - Redis taking back a subscription (its slot moved: resharding, a
///   failover).
///
/// The control loop then subscribes those channels again where their slot
/// is now, on the same connection.
fn on_push(shared: &Shared, push: redis::PushInfo) {
    use redis::{PushKind, Value};
    let channel = || match push.data.first() {
        Some(Value::BulkString(c)) => std::str::from_utf8(c).ok(),
        _ => None,
    };
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
            let mut state = shared.lock();
            for ch in state.channels.values_mut() {
                ch.lose();
            }
            // What was in flight on it will not be confirmed.
            state.subscribing.clear();
            drop(state);
            shared.resync.store(true, Ordering::SeqCst);
            shared.changed();
        }
        PushKind::SSubscribe => {
            let Some(channel) = channel() else { return };
            let mut state = shared.lock();
            // One of ours (the control loop counted it before sending).
            if let Some(n) = state.subscribing.get_mut(channel) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.subscribing.remove(channel);
                }
                return;
            }
            // The redis crate's own: the channel's subscription is new.
            let Some(ch) = state.channels.get_mut(channel) else {
                return;
            };
            if ch.confirmed {
                ch.lose();
                state.moved.push(channel.to_owned());
                drop(state);
                tracing::warn!(
                    channel,
                    "the redis crate subscribed a channel again by itself"
                );
                shared.changed();
            }
        }
        PushKind::SUnsubscribe => {
            let Some(channel) = channel() else { return };
            let mut state = shared.lock();
            // One of ours (the control loop counted it before sending).
            if let Some(n) = state.unsubscribing.get_mut(channel) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.unsubscribing.remove(channel);
                }
                return;
            }
            // Redis' own: the channel's slot moved. Any channel still
            // wanted, live or on its way (a confirmation still to come
            // would be for the old place).
            let Some(ch) = state.channels.get_mut(channel) else {
                return;
            };
            ch.lose();
            state.moved.push(channel.to_owned());
            drop(state);
            tracing::warn!(channel, "redis moved a sharded subscription away");
            shared.changed();
        }
        _ => {}
    }
}

/// One connection attempt: the link and the task whose end means the
/// connection is lost, or why there is none; `redis` names where it went
/// (host:port, never a URL, which may hold a password).
pub(super) async fn connect(
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
