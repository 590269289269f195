//! The reaper of dead processes' connections (`reap_dead`, after each
//! heartbeat): on one Redis one atomic script per batch (`scripts::REAP`);
//! on a cluster the steps below, and first this process's sweep of its own
//! removals that failed.
//!
//! On a cluster a dead process's connections are taken a batch at a time,
//! in one script in the process's slot that moves them from its
//! connections hash to its closing hash and stamps each claim; then each
//! one's presence entry is removed and its event written once (the steps
//! of a removal, [`Lifecycle::close_writes`]); the batch's connections
//! that are done are deleted from the closing hash, those that failed are
//! left there with their claim freed, for a later batch or beat (at most half
//! of each batch goes to them). A claim older than
//! the dead-after time (its reaper died, or is stuck) is taken again by
//! whoever reaps next. So a connection leaves the place reapers look only
//! once its presence entry and its event are written, and its event's
//! marker keeps a second reaper, or a retry, from writing it twice.

use super::cluster::{Removal, Writes};
use super::*;

/// A registration (or a closing record) as a reaper reads it back.
#[derive(serde::Deserialize)]
struct Registered {
    session_id: String,
    agent_id: String,
    since: u64,
    presence: Option<String>,
    events: bool,
    channel: Option<String>,
    /// The connection's own disconnect event, in the record its process's
    /// removal left in the closing hash; written as it is.
    #[serde(default)]
    event: Option<String>,
}

#[derive(Serialize)]
struct LostEvent<'a> {
    r#type: &'static str,
    session_id: &'a str,
    agent_id: &'a str,
    connection_id: &'a str,
    process: &'a str,
    time: u64,
    code: u16,
    reason: &'static str,
    duration_ms: u64,
    messages_in: Option<u64>,
    messages_out: Option<u64>,
    reaped_by: &'a str,
}

/// What one process's reap (or this process's sweep) got done.
#[derive(Debug, Default)]
pub(super) struct Pass {
    /// Connections done: presence entry and event written (or found
    /// written).
    pub(super) finished: u64,
    /// Connections left in the closing hash for the next beat: a step
    /// failed, or the deadline came first.
    pub(super) left: u64,
    /// The first step that failed.
    pub(super) error: Option<String>,
    /// False when the deadline came first.
    pub(super) done: bool,
}

impl Lifecycle {
    /// Reaps every process whose last beat is older than the dead-after
    /// time (and, on a cluster, first takes again this process's own
    /// removals that failed a dead-after time ago or more). Stops at
    /// `deadline` (the rest waits for the next beat), so that a long reap
    /// never delays this process's own heartbeat.
    pub(super) async fn reap_dead(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        limit: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Reaped, LifecycleError> {
        let mut reaped = Reaped::default();
        if self.keys.is_cluster() {
            let own = self
                .reap_on_cluster(redis, &self.process, limit, deadline)
                .await?;
            reaped.finished = own.finished;
            reaped.add_left(own.left, own.error);
        }
        let silence = u64::try_from(self.dead_after.as_millis()).unwrap_or(u64::MAX);
        let before = now_ms().saturating_sub(silence);
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(crate::keys::PROCESSES)
            .arg("-inf")
            .arg(format!("({before}"))
            .arg("LIMIT")
            .arg(0)
            .arg(100);
        let dead: Vec<String> = bounded(limit, cmd.query_async(redis)).await?;
        for process in dead.iter().filter(|p| **p != self.process) {
            if self.keys.is_cluster() {
                let pass = self
                    .reap_on_cluster(redis, process, limit, deadline)
                    .await?;
                reaped.connections = reaped.connections.saturating_add(pass.finished);
                reaped.add_left(pass.left, pass.error);
                if !pass.done {
                    return Ok(reaped);
                }
                continue;
            }
            loop {
                let mut call = self.reap.prepare_invoke();
                call.key(crate::keys::PROCESSES)
                    .key(self.keys.process_heartbeat(process))
                    .key(self.keys.process_connections(process))
                    .key(crate::keys::EVENTS)
                    .arg(process)
                    .arg(now_ms())
                    .arg(self.config.events_max_len)
                    .arg(REAP_BATCH)
                    .arg(&self.process);
                let (n, left, error): (i64, u64, String) =
                    bounded(limit, call.invoke_async(redis)).await?;
                reaped.connections = reaped.connections.saturating_add(n.max(0).unsigned_abs());
                if n <= 0 {
                    // The failed ones are tried again at the next beat.
                    reaped.add_left(left, Some(error).filter(|e| !e.is_empty()));
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(reaped);
                }
            }
        }
        Ok(reaped)
    }

    /// Reaps one dead process on a cluster, or (`process` is this one)
    /// takes again this process's own removals whose claim is a dead-after
    /// old: batch after batch until nothing is left, a batch finished none
    /// of its connections (what failed waits for the next beat) or
    /// `deadline` came. A batch that finished some goes on: connections
    /// that keep failing (a presence key of the wrong type) take at most
    /// half of each batch, so they cannot hold the others back. Errors only when
    /// the process's own slot failed (its claims are then taken again
    /// after the dead-after time).
    pub(super) async fn reap_on_cluster(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        process: &str,
        limit: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Pass, LifecycleError> {
        let own = process == self.process;
        let lease = u64::try_from(self.dead_after.as_millis()).unwrap_or(u64::MAX);
        let mut pass = Pass::default();
        loop {
            let now = now_ms();
            let mut call = self.scripts.reap_own.prepare_invoke();
            call.key(self.keys.process_heartbeat(process))
                .key(self.keys.process_connections(process))
                .key(self.keys.process_closing(process))
                .key(self.keys.process_claims(process))
                .arg(REAP_BATCH)
                .arg(now)
                .arg(now.saturating_sub(lease))
                .arg(if own { "1" } else { "0" });
            let taken: redis::Value = bounded(limit, call.invoke_async(redis)).await?;
            let entries: Vec<String> = match taken {
                // Alive after all.
                redis::Value::Int(-1) => Vec::new(),
                // Nothing left at all: forget the process.
                redis::Value::Int(0) if !own => {
                    let mut zrem = redis::cmd("ZREM");
                    zrem.arg(crate::keys::PROCESSES).arg(process);
                    bounded(limit, zrem.query_async::<i64>(redis)).await?;
                    Vec::new()
                }
                redis::Value::Int(0) => Vec::new(),
                redis::Value::Int(_) => return Err(LifecycleError::Unexpected("a reap's answer")),
                other => redis::from_redis_value(other)
                    .map_err(|_| LifecycleError::Unexpected("a reap's entries"))?,
            };
            if entries.is_empty() {
                pass.done = true;
                return Ok(pass);
            }
            let finished = pass.finished;
            self.close_batch(redis, process, &entries, limit, deadline, &mut pass)
                .await?;
            if tokio::time::Instant::now() >= deadline {
                return Ok(pass);
            }
            if pass.finished == finished {
                // Every step failed: the rest waits for the next beat.
                pass.done = true;
                return Ok(pass);
            }
        }
    }

    /// Closes a batch of connections taken from `process` (id, record,
    /// ...): the writes of each, then one script in the process's slot
    /// that deletes those done and frees the others' claims.
    async fn close_batch(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        process: &str,
        entries: &[String],
        limit: Duration,
        deadline: tokio::time::Instant,
        pass: &mut Pass,
    ) -> Result<(), LifecycleError> {
        let now = now_ms();
        let mut done: Vec<&str> = Vec::new();
        let mut left: Vec<&str> = Vec::new();
        for pair in entries.chunks(2) {
            let [id, raw] = pair else { continue };
            if tokio::time::Instant::now() >= deadline {
                left.push(id);
                continue;
            }
            // A record that is not one (nothing wsproxy wrote) is dropped,
            // as the standalone reaper drops it.
            let Ok(r) = serde_json::from_str::<Registered>(raw) else {
                done.push(id);
                continue;
            };
            let lost;
            let event = match (&r.event, r.events) {
                (Some(event), _) => event.as_str(),
                (None, true) => {
                    lost = json(&LostEvent {
                        r#type: "disconnect",
                        session_id: &r.session_id,
                        agent_id: &r.agent_id,
                        connection_id: id,
                        process,
                        time: now,
                        code: crate::close::ABNORMAL,
                        reason: "process_lost",
                        duration_ms: now.saturating_sub(r.since),
                        messages_in: None,
                        messages_out: None,
                        reaped_by: &self.process,
                    });
                    lost.as_str()
                }
                (None, false) => "",
            };
            let writes = Writes {
                id,
                presence: r.presence.as_deref(),
                event: event.as_bytes(),
                channel: r.channel.as_deref(),
            };
            let mut progress = Removal {
                claimed: true,
                ..Removal::default()
            };
            match self
                .close_writes(redis, &writes, &mut progress, limit)
                .await
            {
                Ok(()) => done.push(id),
                // Only the channel's copy failed: the stream has the event
                // (a retry would find its marker and publish nothing).
                Err(e) if progress.recorded => {
                    tracing::debug!(connection = %id, error = %e, "lifecycle: a reaped disconnect's channel copy failed");
                    done.push(id);
                }
                Err(e) => {
                    pass.error.get_or_insert_with(|| e.to_string());
                    left.push(id);
                }
            }
        }
        pass.finished = pass.finished.saturating_add(done.len() as u64);
        pass.left = pass.left.saturating_add(left.len() as u64);
        self.finish(redis, process, &done, &left, limit).await
    }
}

/// What a heartbeat's reap got done.
#[derive(Debug, Default)]
pub(super) struct Reaped {
    /// Connections of dead processes reaped.
    connections: u64,
    /// (Cluster) This process's own removals finished after they had
    /// failed.
    finished: u64,
    /// Connections whose presence entry or event failed, left for the
    /// next beat.
    left: u64,
    /// The first of those failures.
    error: Option<String>,
}

impl Reaped {
    /// Counts and logs what was done, and what was left.
    pub(super) fn report(self, metrics: &Metrics) {
        if self.connections > 0 {
            metrics.reaped_connections.inc_by(self.connections);
            tracing::info!(
                connections = self.connections,
                "lifecycle: reaped the connections of dead processes"
            );
        }
        if self.finished > 0 {
            tracing::info!(
                connections = self.finished,
                "lifecycle: finished the removals of closed connections that had failed"
            );
        }
        if self.left > 0 {
            metrics.lifecycle_failures.inc();
            tracing::warn!(
                connections = self.left,
                error = self.error.as_deref().unwrap_or_default(),
                "lifecycle: presence entries or disconnect events not written yet; tried again at the next beat"
            );
        }
    }

    fn add_left(&mut self, left: u64, error: Option<String>) {
        self.left = self.left.saturating_add(left);
        if self.error.is_none() {
            self.error = error;
        }
    }
}
