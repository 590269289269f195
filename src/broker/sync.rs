//! The broker task for one server (or a cluster's nodes with classic
//! pub/sub): connect, make Redis' subscriptions match the wanted set (one
//! round trip each way for any number of changes), notice a connection
//! that broke, reconnect. Sharded pub/sub has its own (`super::shards`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::link::{Link, connect};
use super::{
    BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT, KEEPALIVE, Shared, confirm, connection_lost,
};

/// The broker task: connect, serve until the connection breaks, reconnect.
pub(super) async fn run(
    clients: Vec<redis::Client>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut ever_connected = false;
    let mut attempt = 0;
    loop {
        let connecting = connect(&clients, attempt, &shared);
        let (redis, connected) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connecting => r,
        };
        let (link, reader) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                attempt += 1;
                tracing::warn!(%redis, error = %e, retry_in = ?backoff, "redis pub/sub connect failed");
                shared.link_failed(&redis, format!("connect failed: {e}"));
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
        shared.link_up(&redis);
        let stopped = serve(link, reader, &shared, &shutdown).await;
        shared.connected.store(false, Ordering::SeqCst);
        shared.metrics.redis_connected.set(0);
        shared.metrics.broker_channels.set(0);
        if stopped {
            return;
        }
        attempt += 1;
        tracing::warn!(%redis, "redis pub/sub connection lost; reconnecting");
        shared.link_failed(&redis, "connection lost".into());
        // Straight back (it answered a moment ago).
        backoff = BACKOFF_MIN;
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
    // (The names are the channel map's own, shared.)
    let mut active: HashSet<Arc<str>> = HashSet::new();
    let mut first_sync = true;
    // The keepalive runs on a deadline of its own, not on a quiet spell:
    // wake-ups that need no round trip (a second connection to a session
    // already subscribed) would otherwise put it off for ever, and a
    // Redis that died without a FIN or RST would go unnoticed.
    let mut ping_at = tokio::time::Instant::now() + KEEPALIVE;
    let result = loop {
        if tokio::time::Instant::now() >= ping_at {
            ping_at = tokio::time::Instant::now() + KEEPALIVE;
            let ping = tokio::time::timeout(CONNECT_TIMEOUT, link.ping()).await;
            if !matches!(ping, Ok(Ok(_))) {
                tracing::warn!("redis pub/sub keepalive ping failed");
                break false;
            }
        }
        // Apply everything wanted so far in one round trip each way.
        let (add, remove, already) = plan(shared, first_sync, &active);
        if add.is_empty() && remove.is_empty() && !already.is_empty() {
            confirm(shared, &already);
        }
        let applied = async {
            if !add.is_empty() {
                link.subscribe(&add).await?;
            }
            if !remove.is_empty() {
                link.unsubscribe(&remove).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, applied).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis subscribe/unsubscribe failed");
                break false;
            }
            Err(_) => {
                tracing::warn!("redis subscribe/unsubscribe timed out");
                break false;
            }
        }
        confirm(shared, &add);
        confirm(shared, &already);
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
            _ = tokio::time::sleep_until(ping_at) => {}
        }
    };
    reader.abort();
    connection_lost(shared);
    result
}

/// Channel names, the channel map's own.
type Names = Vec<Arc<str>>;

/// What to tell Redis now: channels to subscribe, to unsubscribe, and
/// those re-wanted while Redis still had them (confirmed at once). With
/// `first_sync` (a fresh connection, which has nothing), every live
/// channel; otherwise what changed since the last look.
fn plan(shared: &Shared, first_sync: bool, active: &HashSet<Arc<str>>) -> (Names, Names, Names) {
    let mut state = shared.lock();
    let mut add = Vec::new();
    let mut remove = Vec::new();
    let mut already = Vec::new();
    if first_sync {
        state.dirty.clear();
        add.extend(state.channels.keys().cloned());
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
}
