//! Lifecycle on a Redis Cluster, where a connection's keys are in
//! different slots: a registration is written one command at a time (and
//! finished later in the background when a shard fails over mid-way); a
//! removal first moves the connection to its process's closing hash (in
//! the process's slot), then removes its presence entry and writes its
//! event once, and deletes it from the closing hash last. A removal that
//! fails leaves it there, where this process's heartbeat, or a reaper once
//! this process is gone, takes it again (`reap.rs`).

use super::*;

/// What a registration on a cluster writes, step by step (four commands
/// in different slots), and how many steps are done: a registration whose
/// step failed (its shard was failing over) goes on from there later,
/// in the background ([`Lifecycle::finish_later`]).
#[derive(Debug)]
pub struct ClusterSteps {
    pub(super) id: String,
    pub(super) registration: Vec<u8>,
    /// The presence hash and entry, with `PRESENCE`.
    pub(super) presence: Option<(String, Vec<u8>)>,
    /// The connect event, with `LIFECYCLE_EVENTS`.
    pub(super) event: Option<Vec<u8>>,
    /// The session's events channel, with `EVENTS_SESSION_CHANNEL`.
    pub(super) channel: Option<String>,
    pub(super) now: u64,
    /// Steps done: the registration, the process's entry, presence, the
    /// event.
    pub(super) done: u8,
}

/// A registration that did not finish: why, and on a cluster what is left
/// to write.
#[derive(Debug)]
pub struct Unfinished {
    pub error: LifecycleError,
    pub rest: Option<ClusterSteps>,
}

impl From<LifecycleError> for Unfinished {
    fn from(error: LifecycleError) -> Self {
        Self { error, rest: None }
    }
}

impl Lifecycle {
    /// A registration on a Redis Cluster, whose keys are in different
    /// slots: one command each, not one atomic script. The process's record
    /// goes first, so that a reaper always finds what has an event; a
    /// process that dies between two steps leaves a disconnect without its
    /// connect event, never the other way round.
    pub(super) async fn connected_on_cluster(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        steps: &mut ClusterSteps,
        limit: Duration,
    ) -> Result<(), LifecycleError> {
        if steps.done < 1 {
            let mut hset = redis::cmd("HSET");
            hset.arg(self.keys.process_connections(&self.process))
                .arg(&steps.id)
                .arg(&steps.registration);
            bounded(limit, hset.query_async::<i64>(redis)).await?;
            steps.done = 1;
        }
        if steps.done < 2 {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(crate::keys::PROCESSES)
                .arg("NX")
                .arg(steps.now)
                .arg(&self.process);
            bounded(limit, zadd.query_async::<i64>(redis)).await?;
            steps.done = 2;
        }
        if steps.done < 3 {
            if let Some((key, entry)) = &steps.presence {
                let mut hset = redis::cmd("HSET");
                hset.arg(key).arg(&steps.id).arg(entry);
                bounded(limit, hset.query_async::<i64>(redis)).await?;
            }
            steps.done = 3;
        }
        if steps.done < 4 {
            if let Some(event) = &steps.event {
                self.append_event(redis, event, steps.channel.as_deref(), limit)
                    .await?;
            }
            steps.done = 4;
        }
        Ok(())
    }

    /// Finishes a registration whose step failed on a cluster (its shard
    /// was failing over), in the background: retried for the dead-after
    /// time. The returned receiver completes when it is done or given up;
    /// the connection's removal waits for it, so its disconnect event
    /// comes after its connect event.
    pub fn finish_later(
        self: &Arc<Self>,
        mut redis: crate::redis_conn::RedisConn,
        mut steps: ClusterSteps,
        limit: Duration,
        tracker: &tokio_util::task::TaskTracker,
        metrics: Arc<Metrics>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (done, finished) = tokio::sync::oneshot::channel();
        let lifecycle = self.clone();
        tracker.spawn(async move {
            let started = tokio::time::Instant::now();
            let mut pause = Duration::from_millis(250);
            loop {
                tokio::time::sleep(pause).await;
                match lifecycle
                    .connected_on_cluster(&mut redis, &mut steps, limit)
                    .await
                {
                    Ok(()) => break,
                    Err(e) => {
                        metrics.lifecycle_failures.inc();
                        if started.elapsed() >= lifecycle.dead_after {
                            tracing::warn!(connection = %steps.id, error = %e, "lifecycle: registration given up");
                            break;
                        }
                    }
                }
                pause = pause.saturating_mul(2).min(Duration::from_secs(2));
            }
            let _ = done.send(());
        });
        finished
    }

    /// Appends an event to the stream and, if named, publishes it on the
    /// session's channel (`SPUBLISH` with sharded pub/sub). Nothing for an
    /// empty event.
    pub(super) async fn append_event(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        event: &[u8],
        channel: Option<&str>,
        limit: Duration,
    ) -> Result<(), LifecycleError> {
        if event.is_empty() {
            return Ok(());
        }
        let mut xadd = redis::cmd("XADD");
        xadd.arg(crate::keys::EVENTS)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.events_max_len)
            .arg("*")
            .arg("event")
            .arg(event);
        bounded(limit, xadd.query_async::<String>(redis)).await?;
        if let Some(channel) = channel {
            let mut publish = redis::cmd(self.keys.publish_command());
            publish.arg(channel).arg(event);
            bounded(limit, publish.query_async::<i64>(redis)).await?;
        }
        Ok(())
    }

    /// Removes connection `id` on a cluster, as far as `progress` has not
    /// yet: moves it to the process's closing hash with its disconnect
    /// event (so a failure from here on leaves it where this process's
    /// heartbeat and the reapers look), removes its presence entry, writes
    /// its event once, and deletes it from the closing hash. Nothing when
    /// it is gone (a reaper finished it) or was never registered.
    pub(super) async fn disconnected_on_cluster(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        closing: &Closing<'_>,
        progress: &mut Removal,
        limit: Duration,
    ) -> Result<(), LifecycleError> {
        let presence = self
            .config
            .presence
            .then(|| self.keys.session_presence(closing.session_id));
        let channel = (self.config.events && self.config.session_channel)
            .then(|| self.keys.session_events(closing.session_id));
        if !progress.claimed {
            let record = json(&Registration {
                session_id: closing.session_id,
                agent_id: closing.agent_id,
                since: closing.since,
                presence: presence.as_deref(),
                events: self.config.events,
                channel: channel.as_deref(),
                event: (!closing.event.is_empty()).then_some(closing.event),
            });
            let mut call = self.scripts.claim.prepare_invoke();
            call.key(self.keys.process_connections(&self.process))
                .key(self.keys.process_closing(&self.process))
                .key(self.keys.process_claims(&self.process))
                .arg(closing.id)
                .arg(record)
                .arg(now_ms());
            if bounded(limit, call.invoke_async::<i64>(redis)).await? == 0 {
                return Ok(());
            }
            progress.claimed = true;
        }
        let writes = Writes {
            id: closing.id,
            presence: presence.as_deref(),
            event: closing.event.as_bytes(),
            channel: channel.as_deref(),
        };
        self.close_writes(redis, &writes, progress, limit).await?;
        self.finish(redis, &self.process, &[closing.id], &[], limit)
            .await
    }

    /// The writes that close a connection outside its process's slot:
    /// its presence entry's removal, its event (once: a marker in the
    /// stream's slot, set in the same script, tells a retry or a second
    /// reaper that it is there) and the channel's copy (by the call that
    /// wrote the event only). Each step done is recorded in `progress`,
    /// and each is safe to do again.
    pub(super) async fn close_writes(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        writes: &Writes<'_>,
        progress: &mut Removal,
        limit: Duration,
    ) -> Result<(), LifecycleError> {
        if !progress.presence_removed {
            if let Some(presence) = writes.presence {
                let mut hdel = redis::cmd("HDEL");
                hdel.arg(presence).arg(writes.id);
                bounded(limit, hdel.query_async::<i64>(redis)).await?;
            }
            progress.presence_removed = true;
        }
        if !progress.recorded {
            if !writes.event.is_empty() {
                let ttl = self.dead_after.saturating_mul(SENT_MARK_LIFETIMES);
                let mut call = self.scripts.event_once.prepare_invoke();
                call.key(crate::keys::EVENTS)
                    .key(self.keys.event_sent(writes.id))
                    .arg(writes.event)
                    .arg(self.config.events_max_len)
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                let wrote: i64 = bounded(limit, call.invoke_async(redis)).await?;
                progress.publish = wrote == 1 && writes.channel.is_some();
            }
            progress.recorded = true;
        }
        if progress.publish {
            if let Some(channel) = writes.channel {
                let mut publish = redis::cmd(self.keys.publish_command());
                publish.arg(channel).arg(writes.event);
                bounded(limit, publish.query_async::<i64>(redis)).await?;
            }
            progress.publish = false;
        }
        Ok(())
    }

    /// Deletes the connections `done` from `process`'s closing hash and
    /// frees the claims of those `left` for the next try (the next reap or
    /// heartbeat takes them at once).
    pub(super) async fn finish(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        process: &str,
        done: &[&str],
        left: &[&str],
        limit: Duration,
    ) -> Result<(), LifecycleError> {
        if done.is_empty() && left.is_empty() {
            return Ok(());
        }
        let mut call = self.scripts.finish.prepare_invoke();
        call.key(self.keys.process_closing(process))
            .key(self.keys.process_claims(process))
            .arg(done.len())
            .arg(done)
            .arg(left);
        bounded(limit, call.invoke_async::<i64>(redis)).await?;
        Ok(())
    }
}

/// How long a disconnect event's marker lives, in dead-after times: longer
/// than any retry of its connection's removal (a claim is taken again after
/// one dead-after time, at the next beat) plus a shard's failover.
const SENT_MARK_LIFETIMES: u32 = 4;

/// How far a removal got on a cluster, where its steps are separate
/// commands (the registration, the presence entry and the event live in
/// different slots): a retry goes on from the step that failed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Removal {
    /// The connection is in its process's closing hash (moved there by
    /// this removal, or found there).
    pub(super) claimed: bool,
    /// The presence entry is gone.
    pub(super) presence_removed: bool,
    /// The event is in the stream (written by this removal, or found
    /// written).
    pub(super) recorded: bool,
    /// This removal wrote the event and still owes the session's channel
    /// its copy.
    pub(super) publish: bool,
}

/// A connection a removal closes on a cluster.
pub(super) struct Closing<'a> {
    pub(super) id: &'a str,
    pub(super) session_id: &'a str,
    pub(super) agent_id: &'a str,
    /// When it opened (ms), for the record a reaper may read.
    pub(super) since: u64,
    /// Its disconnect event, or empty.
    pub(super) event: &'a str,
}

/// What closing a connection writes outside its process's slot.
pub(super) struct Writes<'a> {
    pub(super) id: &'a str,
    pub(super) presence: Option<&'a str>,
    /// The event, or empty.
    pub(super) event: &'a [u8],
    pub(super) channel: Option<&'a str>,
}

/// The scripts of the steps on a cluster that each write one slot.
#[derive(Debug)]
pub(super) struct ClusterScripts {
    pub(super) reap_own: redis::Script,
    pub(super) claim: redis::Script,
    pub(super) finish: redis::Script,
    pub(super) event_once: redis::Script,
}

impl ClusterScripts {
    pub(super) fn new() -> Self {
        Self {
            reap_own: redis::Script::new(scripts::REAP_OWN),
            claim: redis::Script::new(scripts::CLAIM),
            finish: redis::Script::new(scripts::FINISH),
            event_once: redis::Script::new(scripts::EVENT_ONCE),
        }
    }
}
