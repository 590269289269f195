//! The broker task: connect, make Redis' subscriptions match the wanted
//! set (one round trip each way for any number of changes), notice a
//! connection that broke or a shard whose connection changed, reconnect.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::link::{Link, Target, connect};
use super::nodes::Nodes;
use super::{
    BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT, KEEPALIVE, RESYNC_LIMIT, Shared, confirm,
    connection_lost, lose,
};

/// The broker task: connect, serve until the connection breaks, reconnect.
pub(super) async fn run(target: Target, shared: Arc<Shared>, shutdown: CancellationToken) {
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

/// Sharded mode: attempts in a row without any answer (each bounded by
/// `CONNECT_TIMEOUT`) after which the connection counts as wedged and a
/// new one is made from the seeds.
const SILENT_LIMIT: u32 = 3;

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
    // Sharded mode: the masters' connection ids as last seen (see
    // `super::nodes`). The first look is taken before anything is
    // subscribed, so that any later change shows.
    let mut nodes = Nodes::default();
    // Sharded mode: channels interrupted on their shard, to subscribe again
    // (not yet confirmed on the current connections).
    let mut interrupted: HashSet<String> = HashSet::new();
    // Sharded mode: since when subscribing fails, and the pause before the
    // next try on the same connection.
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut retry = BACKOFF_MIN;
    // Sharded mode: attempts in a row that got no answer at all. The redis
    // crate's cluster connection can wedge for good while it recovers
    // (see `crate::redis_conn::ClusterConn`): then a new one is made
    // instead of waiting out `RESYNC_LIMIT`.
    let mut silent = 0u32;
    let result = loop {
        if matches!(link, Link::Sharded(_)) {
            // While anything is missing (a fresh connection, a shard
            // failing over), look before every attempt: the ids are then
            // taken before the subscriptions they must vouch for.
            if !shared.connected.load(Ordering::SeqCst) {
                shared.resync.store(true, Ordering::SeqCst);
            }
            if shared.dropped.swap(false, Ordering::SeqCst) {
                // A node's connection dropped: every live channel is
                // subscribed again at once, where its slot is now (a
                // healthy shard ignores the repeat), so that plain
                // sessions of the affected shard miss as little as they
                // can. Which channels may have missed something is told
                // next, by the look.
                let live: Vec<String> = shared
                    .lock()
                    .channels
                    .iter()
                    .filter(|(_, ch)| ch.confirmed)
                    .map(|(name, _)| name.clone())
                    .collect();
                if !live.is_empty() {
                    let again = tokio::time::timeout(CONNECT_TIMEOUT, link.subscribe(&live));
                    if !matches!(again.await, Ok(Ok(()))) {
                        tracing::debug!("redis cluster: subscribing again at once failed");
                    }
                }
            }
            let trouble = match &mut link {
                Link::Sharded(conn) => shard_trouble(&mut nodes, conn, shared).await,
                Link::Single(_) => Ok(Vec::new()),
            };
            match trouble {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => {
                    // Some subscriptions are gone (a master's connection
                    // changed, a slot moved): what was published meanwhile
                    // is lost to their gapless outboxes, and /ready is
                    // false until they are subscribed again.
                    for channel in &lost {
                        active.remove(channel);
                    }
                    interrupted.extend(lost);
                    shared.connected.store(false, Ordering::SeqCst);
                    shared.metrics.redis_connected.set(0);
                    shared.metrics.redis_reconnects.inc();
                }
                Err(error) => {
                    // Nothing is known to have changed: look again (the
                    // ids then show whatever did), for a while.
                    let error = match error {
                        Some(error) => error.to_string(),
                        None => {
                            silent += 1;
                            "no answer in time".to_owned()
                        }
                    };
                    tracing::warn!(%error, "redis cluster: the slot map could not be read");
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > RESYNC_LIMIT || silent >= SILENT_LIMIT {
                        break false;
                    }
                    shared.resync.store(true, Ordering::SeqCst);
                    if sleep_or_shutdown(retry, shutdown).await {
                        break true;
                    }
                    retry = (retry * 2).min(BACKOFF_MAX / 2);
                    continue;
                }
            }
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
                // channel (after a failed attempt, again: Redis ignores a
                // repeat), and drop what is no longer wanted.
                state.dirty.clear();
                state.unsubscribing.clear();
                interrupted.clear();
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
                        (true, false) => {
                            interrupted.remove(&channel);
                            add.push(channel);
                        }
                        (false, true) => remove.push(channel),
                        (true, true) => already.push(channel),
                        (false, false) => {} // came and went: nothing to tell Redis
                    }
                }
                // Interrupted channels still wanted go back where their
                // slot is now.
                add.extend(
                    interrupted
                        .drain()
                        .filter(|c| state.channels.contains_key(c)),
                );
            }
            (add, remove, already)
        };
        let restoring = !shared.connected.load(Ordering::SeqCst);
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
            Err(_) => {
                silent += 1;
                Some("timed out".to_owned())
            }
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
            if !matches!(link, Link::Sharded(_))
                || since.elapsed() > RESYNC_LIMIT
                || silent >= SILENT_LIMIT
            {
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
        silent = 0;
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
        if first_sync || (restoring && interrupted.is_empty()) {
            // Only now are all live channels back: report ready.
            first_sync = false;
            shared.connected.store(true, Ordering::SeqCst);
            shared.metrics.redis_connected.set(1);
            tracing::info!(channels = active.len(), "redis pub/sub connected");
        }
        {
            let state = shared.lock();
            if !state.dirty.is_empty() || !state.moved.is_empty() {
                continue; // More changes arrived meanwhile.
            }
        }

        tokio::select! {
            _ = shutdown.cancelled() => break true,
            _ = &mut reader => break false,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(KEEPALIVE) => match &mut link {
                // On a cluster, the keepalive is the look at every
                // master's connection (a failure there interrupts that
                // shard alone).
                Link::Sharded(_) => shared.resync.store(true, Ordering::SeqCst),
                Link::Single(_) => {
                    let ping = tokio::time::timeout(CONNECT_TIMEOUT, link.ping()).await;
                    if !matches!(ping, Ok(Ok(_))) {
                        tracing::warn!("redis pub/sub keepalive ping failed");
                        break false;
                    }
                }
            },
        }
    };
    reader.abort();
    connection_lost(shared);
    result
}

/// Sharded mode: the channels interrupted since the last look, already
/// lost to their gapless outboxes and no longer confirmed: those Redis took
/// back (their slot moved), and, after a node's connection dropped or at
/// the keepalive, those on the slots of every master whose connection
/// changed (see [`super::nodes`]). An error when no node tells the slot
/// map: `None` when nothing answered in time.
async fn shard_trouble(
    nodes: &mut Nodes,
    conn: &mut redis::cluster_async::ClusterConnection,
    shared: &Shared,
) -> Result<Vec<String>, Option<redis::RedisError>> {
    let mut lost = Vec::new();
    if shared.resync.swap(false, Ordering::SeqCst) {
        // On failure the flag stays up (set again by the caller), and the
        // moved channels stay in the state for the next look.
        let changed = match tokio::time::timeout(CONNECT_TIMEOUT, nodes.check(conn)).await {
            Ok(changed) => changed.map_err(Some)?,
            Err(_) => return Err(None),
        };
        if !changed.is_empty() {
            let state = shared.lock();
            lost.extend(
                state
                    .channels
                    .iter()
                    .filter(|(name, ch)| ch.confirmed && changed.touches(name))
                    .map(|(name, _)| name.clone()),
            );
        }
    }
    lost.append(&mut shared.lock().moved);
    if !lost.is_empty() {
        tracing::warn!(
            channels = lost.len(),
            "redis cluster: subscriptions interrupted on their shard; subscribing them again"
        );
        lose(shared, &lost);
    }
    Ok(lost)
}
