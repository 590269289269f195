//! What a backend learns about connections through Redis alone: lifecycle
//! events, presence, and disconnects that survive the death of a process.
//!
//! With `LIFECYCLE_EVENTS` or `PRESENCE` on, every session connection is
//! *registered*: when it opens, one script (one round trip, atomic)
//! records it in its process's connection hash
//! (`wsproxy:process:{p}:connections`), in the session's presence hash
//! (`session:{id}:presence`, with `PRESENCE`) and appends a `connect` or
//! `resume` event to the stream `wsproxy:events` (with
//! `LIFECYCLE_EVENTS`); when it closes, another script removes it and
//! appends its `disconnect` event. The first runs in the admission round
//! trips, before the 101 (so a burst of connections is held back by its own
//! handshakes, not queued behind them: queued registrations cost about
//! 500 bytes of lasting memory per connection of a 5,000-connection burst);
//! the second is the connection task's last step. So a connection's events
//! are in the stream in the order they happened.
//!
//! **Crash safety.** Each process renews a heartbeat key every
//! `PROCESS_HEARTBEAT_SECS` (its TTL is `PROCESS_DEAD_AFTER_SECS`: by
//! default two intervals on one Redis, 30 s on a cluster, so that a shard
//! failing over is not a death) and its entry in `wsproxy:processes`. On
//! every beat it also looks for processes whose entry is older than that
//! and *reaps* them: a script that runs only while the dead process's
//! heartbeat key is missing removes its connections from presence and
//! appends a `disconnect` event (reason `process_lost`) for each, in
//! batches. Everything a reap does to one connection is one atomic step
//! that also removes it from the dead process's hash, so however many
//! processes reap at once, each connection gets exactly one `disconnect`
//! event. A process dead for good is reaped within the dead-after time
//! plus one interval of its last beat.
//!
//! A process that was silent too long itself (Redis unreachable, or
//! restarted without persistence) finds its heartbeat key gone at its next
//! beat, or the dead-after time passed since its last confirmed beat (a
//! late beat may have set the key again after a reap): it may have been
//! reaped, so it closes its session connections with 1013 and their
//! clients reconnect and register again.
//!
//! **On a cluster** a connection's registration, presence entry and
//! events are in different slots, so these steps are separate commands
//! (`cluster.rs`, `reap.rs`). A removal, or a reaper, first moves the
//! connection from its process's hash to the process's closing hash (one
//! script in that slot, so it is taken once), then removes the presence
//! entry and writes the event, and deletes it from the closing hash only
//! when both are done: a step that fails leaves it there, and this
//! process's next beats (or a reaper, once it is gone) take it again. The
//! event is written by a script that also sets a marker in the stream's
//! slot, so a retry after an answer that was lost, or a second reaper,
//! never writes it twice.
//!
//! The limits of "exactly once" are in the manual (docs/src/backend.md): a
//! registration Redis never took has no events at all, and on one Redis a
//! removal that fails for every retry while its process lives stays until
//! that process dies.
//!
//! Events and presence are written by these scripts only, so their format
//! is here (and in the manual's backend guide, docs/src/backend.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::broker::{Broker, CloseOrder};
use crate::config::LifecycleConfig;
use crate::metrics::Metrics;

mod cluster;
mod reap;
mod scripts;
pub use cluster::{ClusterSteps, Removal, Unfinished};

/// Connections a reap handles per script call, so one call stays short.
const REAP_BATCH: usize = 500;
/// Removals in flight at once (registrations are bounded by the
/// handshakes they are part of). A burst of closes would otherwise queue
/// its scripts in the command connection's buffers, which keep their
/// largest size.
const IN_FLIGHT: usize = 64;

/// Why a registration or removal did not reach Redis.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Redis refused or failed the call.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the limit.
    #[error("Redis did not answer in time")]
    Timeout,
    /// Redis answered with something the script does not return.
    #[error("unexpected answer from Redis: {0}")]
    Unexpected(&'static str),
}

/// What a connect (or resume) event says about the connection, gathered
/// and sent at its admission, before the 101.
#[derive(Debug, Default)]
pub struct ConnectInfo {
    /// The client's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The client's `User-Agent` (at most 256 bytes).
    pub user_agent: Option<String>,
    /// The query parameters `EVENTS_QUERY_PARAMS` allows.
    pub query: Vec<(String, String)>,
    /// A `wsproxy.v1` connection.
    pub reliable: bool,
    /// How a reliable client's resume went, when it asked for one.
    pub resume: Option<Resume>,
    /// `websocket` or `sse`.
    pub transport: &'static str,
}

/// The outcome of a reliable client's resume.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// Everything after its position was replayed.
    pub resumed: bool,
    /// How many messages were replayed.
    pub replayed: usize,
    /// Why not, when it did not resume.
    pub reason: Option<&'static str>,
}

/// A connection's registration, kept by its task: zero (untracked) or its
/// number in this process, and the counts its disconnect event reports.
#[derive(Debug, Default)]
pub struct Tracking {
    /// The connection's number in this process; 0 when it is not tracked.
    pub connection: u64,
    /// Frames the client sent.
    pub messages_in: u64,
    /// Messages delivered to the client.
    pub messages_out: u64,
    /// The close code the client sent, when it closed.
    pub peer_close: Option<u16>,
    /// The order that closes the connection, once one came.
    pub order: Option<Box<CloseOrder>>,
    /// A registration still being finished in the background (a cluster
    /// shard was failing over): its removal waits for it.
    pub registering: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A tracked connection that ended: what its removal needs.
#[derive(Debug, Clone, Copy)]
pub struct Gone {
    /// The connection's number in this process.
    pub connection: u64,
    /// Frames the client sent.
    pub messages_in: u64,
    /// Messages delivered to the client.
    pub messages_out: u64,
    /// How it ended.
    pub ended: Ended,
}

/// How a connection ended, for its disconnect event.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// The close code (sent by wsproxy, or by the client; 1006 when the
    /// client left without one).
    pub code: u16,
    /// wsproxy's reason label (the `wsproxy_disconnects_total` reason).
    pub reason: &'static str,
    /// How long the connection was open.
    pub duration: Duration,
}

/// The process's side of lifecycle tracking: its id, the connection
/// counter and the scripts.
#[derive(Debug)]
pub struct Lifecycle {
    config: LifecycleConfig,
    /// How long a process may be silent before it counts as dead
    /// ([`LifecycleConfig::dead_after`]).
    dead_after: Duration,
    keys: crate::keys::Keys,
    process: String,
    next: AtomicU64,
    connect: redis::Script,
    disconnect: redis::Script,
    heartbeat: redis::Script,
    reap: redis::Script,
    /// The scripts of the steps on a cluster.
    scripts: cluster::ClusterScripts,
    /// Bounds the registrations and removals in flight.
    turns: tokio::sync::Semaphore,
    /// When Redis last took a heartbeat, in milliseconds since the Unix
    /// epoch (0: never), for the status page.
    last_beat_ms: AtomicU64,
    /// When a heartbeat last failed (0: never).
    last_beat_failure_ms: AtomicU64,
}

#[derive(Serialize)]
struct ConnectEvent<'a> {
    r#type: &'static str,
    session_id: &'a str,
    agent_id: &'a str,
    connection_id: &'a str,
    process: &'a str,
    time: u64,
    reliable: bool,
    /// `websocket` or `sse`.
    transport: &'static str,
    remote: Option<std::net::SocketAddr>,
    user_agent: Option<&'a str>,
    query: Query<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed: Option<usize>,
    /// Why a resume failed (`trimmed`, `epoch_changed`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// The copied query parameters, as a JSON object, without copying them.
struct Query<'a>(&'a [(String, String)]);

impl Serialize for Query<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct DisconnectEvent<'a> {
    r#type: &'static str,
    session_id: &'a str,
    agent_id: &'a str,
    connection_id: &'a str,
    process: &'a str,
    time: u64,
    code: u16,
    reason: &'static str,
    duration_ms: u64,
    messages_in: u64,
    messages_out: u64,
}

/// A presence entry (and, with the keys a reaper needs, a registration).
#[derive(Serialize)]
struct Presence<'a> {
    connection_id: &'a str,
    process: &'a str,
    agent_id: &'a str,
    since: u64,
    reliable: bool,
    /// `websocket` or `sse`.
    transport: &'static str,
}

/// What a process's connection hash keeps per connection: enough for
/// another process to clean up after it.
#[derive(Serialize)]
struct Registration<'a> {
    session_id: &'a str,
    agent_id: &'a str,
    since: u64,
    /// The presence hash to remove the connection from, with `PRESENCE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    presence: Option<&'a str>,
    /// Append a disconnect event (`LIFECYCLE_EVENTS`).
    events: bool,
    /// The session's events channel, with `EVENTS_SESSION_CHANNEL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    /// (Cluster) In the closing record a removal leaves: the connection's
    /// own disconnect event, for whoever finishes the removal.
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `call` with a time limit.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, LifecycleError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LifecycleError::Timeout),
    }
}

impl Lifecycle {
    /// This process's lifecycle tracking, with a fresh random process id.
    pub fn new(config: &LifecycleConfig, keys: crate::keys::Keys) -> Self {
        Self {
            config: config.clone(),
            dead_after: config.dead_after(keys.is_cluster()),
            keys,
            process: format!("{:012x}", rand::random::<u64>() >> 16),
            next: AtomicU64::new(1),
            connect: redis::Script::new(scripts::CONNECT),
            disconnect: redis::Script::new(scripts::DISCONNECT),
            heartbeat: redis::Script::new(scripts::HEARTBEAT),
            reap: redis::Script::new(scripts::REAP),
            scripts: cluster::ClusterScripts::new(),
            turns: tokio::sync::Semaphore::new(IN_FLIGHT),
            last_beat_ms: AtomicU64::new(0),
            last_beat_failure_ms: AtomicU64::new(0),
        }
    }

    /// The heartbeat's interval (`PROCESS_HEARTBEAT_SECS`).
    pub fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat
    }

    /// How long a process may be silent before it counts as dead
    /// (`PROCESS_DEAD_AFTER_SECS`, or its default).
    pub fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// When Redis last took this process's heartbeat, and when one last
    /// failed, in milliseconds since the Unix epoch.
    pub fn last_beats(&self) -> (Option<u64>, Option<u64>) {
        let read = |a: &AtomicU64| Some(a.load(Ordering::Relaxed)).filter(|&ms| ms != 0);
        (read(&self.last_beat_ms), read(&self.last_beat_failure_ms))
    }

    /// Waits until a removal may go (at most `IN_FLIGHT` at once); hold
    /// the permit for the call.
    pub async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // Never closed: `None` cannot happen, and would only mean "go".
        self.turns.acquire().await.ok()
    }

    /// This process's id, as events and presence name it.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// True when connections are registered at all.
    pub fn enabled(&self) -> bool {
        self.config.tracked()
    }

    /// Puts the scripts of connects, disconnects, heartbeats and the
    /// reaper in Redis's script cache, all at once, when connections are
    /// tracked on a standalone Redis: the first of each after a start-up
    /// or a Redis restart then needs no second round trip. (On a cluster
    /// these steps are written one slot at a time, without them.) A call
    /// that still finds its script missing loads it itself.
    pub async fn load_scripts<C: redis::aio::ConnectionLike + Clone>(
        &self,
        redis: &C,
    ) -> Result<(), LifecycleError> {
        if !self.enabled() || self.keys.is_cluster() {
            return Ok(());
        }
        let loads = [&self.connect, &self.disconnect, &self.heartbeat, &self.reap].map(|script| {
            let mut redis = redis.clone();
            async move { script.load_async(&mut redis).await.map(|_| ()) }
        });
        futures_util::future::try_join_all(loads).await?;
        Ok(())
    }

    /// A number for a new connection (never 0).
    pub fn next_connection(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The id events and presence give connection `n` of this process.
    pub fn connection_id(&self, n: u64) -> String {
        format!("{}:{n}", self.process)
    }

    /// The query parameters a connect event may carry, from a raw query.
    pub fn allowed_query(&self, raw: Option<&str>) -> Vec<(String, String)> {
        let (Some(raw), false) = (raw, self.config.query_params.is_empty()) else {
            return Vec::new();
        };
        // The first value of a repeated parameter wins (`?lang=a&lang=b`
        // is `"lang":"a"`): the event's `query` object never holds a key
        // twice, which JSON parsers resolve each their own way.
        let mut copied: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            if copied.len() == self.config.query_params.len() {
                break;
            }
            if !self.config.query_params.iter().any(|p| *p == name)
                || copied.iter().any(|(n, _)| *n == name)
            {
                continue;
            }
            copied.push((
                name.chars().take(64).collect(),
                value.chars().take(256).collect(),
            ));
        }
        copied
    }

    /// Registers connection `n` of `session`: presence, the process's
    /// hash, the connect (or resume) event.
    pub async fn connected(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        session_id: &str,
        agent_id: &str,
        n: u64,
        info: &ConnectInfo,
        limit: Duration,
    ) -> Result<(), Unfinished> {
        let id = self.connection_id(n);
        let now = now_ms();
        let presence_key = self.keys.session_presence(session_id);
        let channel = self.keys.session_events(session_id);
        let registration = Registration {
            session_id,
            agent_id,
            since: now,
            presence: self.config.presence.then_some(presence_key.as_str()),
            events: self.config.events,
            channel: (self.config.events && self.config.session_channel)
                .then_some(channel.as_str()),
            event: None,
        };
        // The three JSON values go into one buffer and the command is
        // built in place (EVALSHA, the script loaded on a miss): a burst of
        // connections makes these allocations side by side with the
        // long-lived ones, and fewer of them leave fewer holes.
        let mut buffer = Vec::with_capacity(512);
        let _ = serde_json::to_writer(&mut buffer, &registration);
        let registration_end = buffer.len();
        if self.config.presence {
            let _ = serde_json::to_writer(
                &mut buffer,
                &Presence {
                    connection_id: &id,
                    process: &self.process,
                    agent_id,
                    since: now,
                    reliable: info.reliable,
                    transport: info.transport,
                },
            );
        }
        let presence_end = buffer.len();
        if self.config.events {
            let resume = info.resume;
            let _ = serde_json::to_writer(
                &mut buffer,
                &ConnectEvent {
                    r#type: if resume.is_some() {
                        "resume"
                    } else {
                        "connect"
                    },
                    session_id,
                    agent_id,
                    connection_id: &id,
                    process: &self.process,
                    time: now,
                    reliable: info.reliable,
                    transport: info.transport,
                    remote: info.remote,
                    user_agent: info.user_agent.as_deref(),
                    query: Query(&info.query),
                    resumed: resume.map(|r| r.resumed),
                    replayed: resume.filter(|r| r.resumed).map(|r| r.replayed),
                    reason: resume.and_then(|r| r.reason),
                },
            );
        }
        if self.keys.is_cluster() {
            let mut steps = ClusterSteps {
                registration: buffer[..registration_end].to_vec(),
                presence: (presence_end > registration_end).then(|| {
                    (
                        presence_key.clone(),
                        buffer[registration_end..presence_end].to_vec(),
                    )
                }),
                event: (buffer.len() > presence_end).then(|| buffer[presence_end..].to_vec()),
                channel: registration.channel.map(str::to_owned),
                id,
                now,
                done: 0,
            };
            return match self.connected_on_cluster(redis, &mut steps, limit).await {
                Ok(()) => Ok(()),
                Err(error) => Err(Unfinished {
                    error,
                    rest: Some(steps),
                }),
            };
        }
        let mut cmd = redis::Cmd::with_capacity(15, buffer.len() + 256);
        cmd.arg("EVALSHA")
            .arg(self.connect.get_hash())
            .arg(4)
            .arg(crate::keys::EVENTS)
            .arg(self.keys.process_connections(&self.process))
            .arg(&presence_key)
            .arg(crate::keys::PROCESSES)
            .arg(&id)
            .arg(&buffer[..registration_end])
            .arg(&buffer[registration_end..presence_end])
            .arg(&buffer[presence_end..])
            .arg(self.config.events_max_len)
            .arg(if registration.channel.is_some() {
                channel.as_str()
            } else {
                ""
            })
            .arg(&self.process)
            .arg(now);
        drop(buffer);
        match bounded(limit, cmd.query_async::<i64>(redis)).await {
            Err(LifecycleError::Redis(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                bounded(limit, self.connect.load_async(redis)).await?;
                bounded(limit, cmd.query_async::<i64>(redis)).await?;
            }
            other => {
                other?;
            }
        }
        Ok(())
    }

    /// Removes connection `n` of `session` and appends its disconnect
    /// event (unless another process reaped it meanwhile).
    pub async fn disconnected(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        session_id: &str,
        agent_id: &str,
        gone: Gone,
        progress: &mut Removal,
        limit: Duration,
    ) -> Result<(), LifecycleError> {
        let Gone {
            connection,
            messages_in,
            messages_out,
            ended,
        } = gone;
        let id = self.connection_id(connection);
        let event = if self.config.events {
            json(&DisconnectEvent {
                r#type: "disconnect",
                session_id,
                agent_id,
                connection_id: &id,
                process: &self.process,
                time: now_ms(),
                code: ended.code,
                reason: ended.reason,
                duration_ms: u64::try_from(ended.duration.as_millis()).unwrap_or(u64::MAX),
                messages_in,
                messages_out,
            })
        } else {
            String::new()
        };
        if self.keys.is_cluster() {
            let since = now_ms()
                .saturating_sub(u64::try_from(ended.duration.as_millis()).unwrap_or(u64::MAX));
            let closing = cluster::Closing {
                id: &id,
                session_id,
                agent_id,
                since,
                event: &event,
            };
            return self
                .disconnected_on_cluster(redis, &closing, progress, limit)
                .await;
        }
        let channel = if self.config.events && self.config.session_channel {
            self.keys.session_events(session_id)
        } else {
            String::new()
        };
        let mut call = self.disconnect.prepare_invoke();
        call.key(crate::keys::EVENTS)
            .key(self.keys.process_connections(&self.process))
            .key(self.keys.session_presence(session_id))
            .arg(&id)
            .arg(event)
            .arg(self.config.events_max_len)
            .arg(channel);
        bounded(limit, call.invoke_async::<i64>(redis)).await?;
        Ok(())
    }

    /// Renews this process's heartbeat; false when it had lapsed (this
    /// process may have been reaped).
    async fn beat(
        &self,
        redis: &mut impl redis::aio::ConnectionLike,
        limit: Duration,
    ) -> Result<bool, LifecycleError> {
        let ttl = self.dead_after;
        if self.keys.is_cluster() {
            // The heartbeat key and the process set are in different slots.
            let now = now_ms();
            let mut set = redis::cmd("SET");
            set.arg(self.keys.process_heartbeat(&self.process))
                .arg(now)
                .arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                .arg("GET");
            let before: Option<String> = bounded(limit, set.query_async(redis)).await?;
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(crate::keys::PROCESSES).arg(now).arg(&self.process);
            bounded(limit, zadd.query_async::<i64>(redis)).await?;
            return Ok(before.is_some());
        }
        let mut call = self.heartbeat.prepare_invoke();
        call.key(crate::keys::PROCESSES)
            .key(self.keys.process_heartbeat(&self.process))
            .arg(&self.process)
            .arg(now_ms())
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let alive: i64 = bounded(limit, call.invoke_async(redis)).await?;
        Ok(alive == 1)
    }
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The process's heartbeat and the reaper, while lifecycle tracking is on:
/// beats every `PROCESS_HEARTBEAT_SECS` until `shutdown`, reaping dead
/// processes after each beat. When its own heartbeat had lapsed, closes
/// this process's session connections (1013) so that they register again.
pub async fn keep_alive(
    lifecycle: Arc<Lifecycle>,
    mut redis: crate::redis_conn::RedisConn,
    broker: Broker,
    metrics: Arc<Metrics>,
    limit: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let interval = lifecycle.config.heartbeat;
    let ttl = lifecycle.dead_after;
    // When the last confirmed beat was sent: the key it set lived at least
    // until then plus the TTL.
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A beat never waits longer than the key lives.
    let limit = limit.min(ttl);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let sent = tokio::time::Instant::now();
        match lifecycle.beat(&mut redis, limit).await {
            Ok(alive) => {
                // Lapsed: Redis says the key was gone (it expired, or Redis
                // lost it), or so much time passed since the last confirmed
                // beat that it may have expired and been reaped, even if a
                // late beat (one this process stopped waiting for) has set
                // it again since.
                let overdue = last_sent.is_some_and(|t| t.elapsed() >= ttl);
                if last_sent.is_some() && (!alive || overdue) {
                    let order = CloseOrder {
                        code: crate::close::TRY_AGAIN_LATER,
                        reason: "wsproxy lost its registration in Redis: reconnect".into(),
                    };
                    let closed = broker.close_where(|c| c.starts_with("session:"), &order);
                    metrics.lifecycle_lapses.inc();
                    tracing::warn!(
                        process = %lifecycle.process,
                        closed,
                        "lifecycle: this process's heartbeat had lapsed (Redis was unreachable or lost its data); its session connections reconnect to register again"
                    );
                }
                last_sent = Some(sent);
                lifecycle.last_beat_ms.store(now_ms(), Ordering::Relaxed);
            }
            Err(e) => {
                lifecycle
                    .last_beat_failure_ms
                    .store(now_ms(), Ordering::Relaxed);
                metrics.lifecycle_failures.inc();
                tracing::warn!(error = %e, "lifecycle: heartbeat failed");
                continue;
            }
        }
        let deadline = sent + interval / 2;
        match lifecycle.reap_dead(&mut redis, limit, deadline).await {
            Ok(reaped) => reaped.report(&metrics),
            Err(e) => {
                metrics.lifecycle_failures.inc();
                tracing::warn!(error = %e, "lifecycle: reaping dead processes failed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
