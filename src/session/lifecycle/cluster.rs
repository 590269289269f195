//! Lifecycle on a Redis Cluster, where a connection's keys are in
//! different slots: a registration is written one command at a time (and
//! finished later in the background when a shard fails over mid-way), and
//! a reap takes the dead process's own slot first, then each connection's.
//! Also the event append both modes share.

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

/// A registration as a reaper reads it back.
#[derive(serde::Deserialize)]
struct Registered {
    session_id: String,
    agent_id: String,
    since: u64,
    presence: Option<String>,
    events: bool,
    channel: Option<String>,
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

// On a cluster, the part of a reap that lives in the dead process's slot:
// KEYS: its heartbeat key, its connections. ARGV: batch. Returns -1 if it
// is alive after all, else the entries it removed (id, registration, ...).
const REAP_OWN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local entries = redis.call('HRANDFIELD', KEYS[2], ARGV[1], 'WITHVALUES')
local out = {}
for i = 1, #entries, 2 do
  if redis.call('HDEL', KEYS[2], entries[i]) == 1 then
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
  end
end
return out
";

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

    /// Reaps one dead process on a cluster: batches taken from its hash
    /// atomically (so each connection is taken once), then each one's
    /// presence entry and disconnect event. Returns the count and whether
    /// the process is done (false: `deadline` came first). A reaper that
    /// dies in the middle of a batch loses those events: at most one batch.
    pub(super) async fn reap_on_cluster(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        process: &str,
        limit: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<(u64, bool), LifecycleError> {
        let script = redis::Script::new(REAP_OWN);
        let mut reaped = 0u64;
        loop {
            let mut call = script.prepare_invoke();
            call.key(self.keys.process_heartbeat(process))
                .key(self.keys.process_connections(process))
                .arg(REAP_BATCH);
            let taken: redis::Value = bounded(limit, call.invoke_async(redis)).await?;
            let entries: Vec<String> = match taken {
                redis::Value::Int(_) => return Ok((reaped, true)),
                other => redis::from_redis_value(other)
                    .map_err(|_| LifecycleError::Unexpected("a reap's entries"))?,
            };
            if entries.is_empty() {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(crate::keys::PROCESSES).arg(process);
                bounded(limit, zrem.query_async::<i64>(redis)).await?;
                return Ok((reaped, true));
            }
            let now = now_ms();
            for pair in entries.chunks(2) {
                let [id, raw] = pair else { continue };
                reaped = reaped.saturating_add(1);
                let Ok(r) = serde_json::from_str::<Registered>(raw) else {
                    continue;
                };
                if let Some(presence) = &r.presence {
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(presence).arg(id);
                    bounded(limit, hdel.query_async::<i64>(redis)).await?;
                }
                if r.events {
                    let event = json(&LostEvent {
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
                    self.append_event(redis, event.as_bytes(), r.channel.as_deref(), limit)
                        .await?;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok((reaped, false));
            }
        }
    }
}
