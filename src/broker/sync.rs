//! The broker task: connect, make Redis' subscriptions match the wanted
//! set (one round trip each way for any number of changes), notice a
//! connection that broke or a shard whose connection changed, reconnect.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::link::{Link, Target, connect};
use super::{
    BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT, KEEPALIVE, RESYNC_LIMIT, Shared, confirm,
    connection_lost,
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
        shared.link_failed(&redis, "connection lost".into());
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
    // Sharded mode: channels whose subscription was interrupted (already
    // lost to their gapless outboxes), to subscribe again.
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
        if matches!(link, Link::Sharded(_)) && shard_trouble(shared, &mut active, &mut interrupted)
        {
            first_sync = true;
        }
        // Apply everything wanted so far in one round trip each way.
        let (add, remove, already) = plan(shared, first_sync, &active, &mut interrupted);
        let restoring = !shared.connected.load(Ordering::SeqCst);
        if add.is_empty() && remove.is_empty() && !already.is_empty() {
            confirm(shared, &already);
        }
        let applied = async {
            if !add.is_empty() {
                if matches!(link, Link::Sharded(_)) {
                    let mut state = shared.lock();
                    for channel in &add {
                        *state.subscribing.entry(channel.clone()).or_default() += 1;
                    }
                }
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
            // everything is applied again. Its confirmations still to come
            // are no longer counted as ours: one that comes counts as the
            // crate's, which loses its channel (a resume too many, never a
            // gap hidden).
            shared.lock().subscribing.clear();
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

/// What to tell Redis now: channels to subscribe, to unsubscribe, and
/// those re-wanted while Redis still had them (confirmed at once). With
/// `first_sync`, everything (a fresh connection, or after a failed
/// attempt); otherwise what changed since the last look, and the
/// interrupted channels still wanted.
fn plan(
    shared: &Shared,
    first_sync: bool,
    active: &HashSet<String>,
    interrupted: &mut HashSet<String>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
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
        // A live channel with gapless subscribers is never
        // subscribed again while it stays live: a confirmation of
        // ours could then be mistaken for the redis crate's own
        // (see `on_push`) and hide a gap.
        add.extend(
            state
                .channels
                .iter()
                .filter(|(_, ch)| !(ch.confirmed && ch.has_gapless()))
                .map(|(name, _)| name.clone()),
        );
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
}

/// Sharded mode: what the pushes reported since the last look (see
/// `link::on_push`). Channels interrupted on their own go to
/// `interrupted` (and leave `active`); true if a node's connection
/// dropped, so that everything is subscribed again.
fn shard_trouble(
    shared: &Shared,
    active: &mut HashSet<String>,
    interrupted: &mut HashSet<String>,
) -> bool {
    let dropped = shared.resync.swap(false, Ordering::SeqCst);
    if dropped {
        // A node's connection dropped: its channels' gapless
        // outboxes were lost at once, by the push (`on_push`), and
        // every channel is subscribed again where its slot is now
        // (a healthy shard ignores the repeat); /ready is false
        // until that is done.
        // Lost again here: a subscription confirmed since the push
        // (it was in flight) may have been on the dropped node.
        connection_lost(shared);
        shared.connected.store(false, Ordering::SeqCst);
        shared.metrics.redis_connected.set(0);
        shared.metrics.redis_reconnects.inc();
    }
    // Channels Redis took back (their slot moved), or the redis
    // crate subscribed again by itself: lost by the push already,
    // to subscribe again.
    let moved = {
        let mut state = shared.lock();
        let moved = std::mem::take(&mut state.moved);
        // Lost again here: one confirmed since the push (it was in
        // flight) was confirmed where it no longer is.
        for channel in &moved {
            if let Some(ch) = state.channels.get_mut(channel) {
                ch.lose();
            }
        }
        moved
    };
    if !moved.is_empty() {
        tracing::warn!(
            channels = moved.len(),
            "redis cluster: subscriptions interrupted; subscribing them again"
        );
        for channel in &moved {
            active.remove(channel);
        }
        interrupted.extend(moved);
        shared.connected.store(false, Ordering::SeqCst);
        shared.metrics.redis_connected.set(0);
    }
    dropped
}
