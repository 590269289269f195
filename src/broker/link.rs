//! The broker's side of the wire: where its subscriptions live, the
//! connection while it is up, and how one is made.

use std::sync::Arc;

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
    /// `SSUBSCRIBE` on each channel's master, over connections of the
    /// broker's own (`super::shards`).
    Sharded(Vec<String>, Option<redis::TlsCertificates>),
}

/// The broker's connection while it is up: one server's pub/sub
/// connection (sharded mode has its own, see `super::shards`).
pub(super) struct Link(redis::aio::PubSubSink);

impl Link {
    /// Subscribes `channels` with one `SUBSCRIBE`.
    pub(super) async fn subscribe(&mut self, channels: &[Arc<str>]) -> redis::RedisResult<()> {
        self.0.subscribe(names(channels)).await
    }

    /// Unsubscribes `channels`, as [`Link::subscribe`].
    pub(super) async fn unsubscribe(&mut self, channels: &[Arc<str>]) -> redis::RedisResult<()> {
        self.0.unsubscribe(names(channels)).await
    }

    /// Asks for any answer: silence or an error is a failure.
    pub(super) async fn ping(&mut self) -> redis::RedisResult<()> {
        // In subscribed mode Redis answers PING with ["pong", ""], not
        // +PONG: accept any reply.
        self.0.ping::<redis::Value>().await.map(|_| ())
    }
}

/// The names as the client library takes them.
fn names(channels: &[Arc<str>]) -> Vec<&str> {
    channels.iter().map(|c| &**c).collect()
}

/// One connection attempt: the link and the task whose end means the
/// connection is lost, or why there is none; `redis` names where it went
/// (host:port, never a URL, which may hold a password).
pub(super) async fn connect(
    clients: &[redis::Client],
    attempt: usize,
    shared: &Arc<Shared>,
) -> (String, Result<(Link, tokio::task::JoinHandle<()>), String>) {
    let Some(client) = clients.get(attempt % clients.len().max(1)) else {
        return (String::new(), Err("no Redis server is configured".into()));
    };
    let redis = client.get_connection_info().addr().to_string();
    let pubsub = match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
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
    (redis, Ok((Link(sink), reader)))
}
