//! Commands from backends, through Redis. A backend sends one with
//!
//! ```text
//! FCALL wsproxy_control 1 wsproxy:control:log '{"type":"disconnect","session_id":"s1","code":4001,"reason":"revoked"}'
//! ```
//!
//! (key `{wsproxy:control}:log` on a cluster), which appends it to the
//! control stream and publishes the entry's id on `wsproxy:control` as a
//! wake-up ([`library`]). Every process subscribes to that channel
//! (through the broker, so it costs one channel, not a connection) and
//! reads the stream from its own position ([`listen`]): a burst waits in
//! the stream instead of overflowing a queue, and a process that was cut
//! off from Redis reads what it missed when it is back.
//!
//! One command today: `disconnect` closes every session connection (plain
//! and reliable) of `s1` on every process, with that close code and
//! reason, once what was already queued for them has gone out. `code` is
//! optional (4000) and must be 1000, 1008 or 3000-4999 (codes a server may
//! send that do not claim a protocol failure); `reason` is optional and at
//! most 123 bytes. To revoke the session's token in the same step, a
//! backend wraps `DEL session:s1:auth` and the `FCALL` in `MULTI`/`EXEC`.
//!
//! The old form, `PUBLISH wsproxy:control '<json>'`, is still applied as
//! it comes (best effort, counted `legacy`) for one release.
//!
//! A malformed command is logged (escaped) and counted, and changes
//! nothing. No per-connection state is kept for this: the broker already
//! knows which connections hold a session's channels.
//!
//! A connection still in its admission when a disconnect comes holds no
//! channel yet, but may have read the token just before it was revoked.
//! So each process also remembers its recent disconnects ([`Recent`]), and
//! an admission, once subscribed, looks there for one that came after it
//! began: that connection is closed the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use axum::extract::ws::Message;
use serde::Deserialize;

use redis::aio::ConnectionLike;

use crate::broker::{Broker, CloseOrder, Outbox, Outgoing};
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;

/// Largest control message read; anything longer is malformed.
pub const MAX_CONTROL_BYTES: usize = 4096;
/// The close code of a disconnect that names none.
pub const DEFAULT_CODE: u16 = 4000;
/// Longest close reason (a close frame's payload is at most 125 bytes).
pub const MAX_REASON_BYTES: usize = 123;
/// Commands that may wait for the control task.
const QUEUE: usize = 1024;

/// A command a backend sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Close every connection of a session.
    Disconnect {
        /// The session.
        session_id: String,
        /// What its connections are told.
        order: CloseOrder,
    },
}

/// Why a control message was ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// Longer than [`MAX_CONTROL_BYTES`].
    #[error("longer than {MAX_CONTROL_BYTES} bytes")]
    TooLong,
    /// Not a JSON object of the documented shape.
    #[error("not a control command: {0}")]
    Shape(String),
    /// A `type` this version does not know.
    #[error("unknown command type {0:?}")]
    UnknownType(String),
    /// The session id could not name a session.
    #[error("invalid session_id")]
    SessionId,
    /// A close code a server may not send.
    #[error("close code {0} is not 1000, 1008 or 3000-4999")]
    Code(u16),
    /// A close reason over [`MAX_REASON_BYTES`].
    #[error("reason is longer than {MAX_REASON_BYTES} bytes")]
    Reason,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    r#type: String,
    session_id: Option<String>,
    code: Option<u16>,
    reason: Option<String>,
}

/// Parses one control message.
pub fn parse(payload: &[u8]) -> Result<Command, ControlError> {
    if payload.len() > MAX_CONTROL_BYTES {
        return Err(ControlError::TooLong);
    }
    let raw: Raw =
        serde_json::from_slice(payload).map_err(|e| ControlError::Shape(e.to_string()))?;
    if raw.r#type != "disconnect" {
        return Err(ControlError::UnknownType(
            raw.r#type.chars().take(32).collect(),
        ));
    }
    let session_id = raw.session_id.ok_or(ControlError::SessionId)?;
    if !crate::keys::valid_id(&session_id) {
        return Err(ControlError::SessionId);
    }
    let code = raw.code.unwrap_or(DEFAULT_CODE);
    if !(code == 1000 || code == 1008 || (3000..=4999).contains(&code)) {
        return Err(ControlError::Code(code));
    }
    let reason = raw
        .reason
        .unwrap_or_else(|| "disconnected by the backend".to_owned());
    if reason.len() > MAX_REASON_BYTES {
        return Err(ControlError::Reason);
    }
    Ok(Command::Disconnect {
        session_id,
        order: CloseOrder { code, reason },
    })
}

/// Carries out `command` on this process's connections; how many were
/// ordered closed. It is remembered in `recent` first, so that an
/// admission that subscribes after this finds it there.
pub fn apply(
    broker: &Broker,
    keys: crate::keys::Keys,
    recent: &Recent,
    command: &Command,
) -> usize {
    match command {
        Command::Disconnect { session_id, order } => {
            recent.record(session_id, order);
            broker.close_channel(&keys.session_down(session_id), order)
                + broker.close_channel(&keys.session_live(session_id), order)
        }
    }
}

/// Most disconnects remembered at once; past it the oldest is forgotten
/// (only an admission that began before it and is still under way could
/// then miss it).
const RECENT_MAX: usize = 100_000;

/// The disconnects this process applied lately, kept as long as an
/// admission may take, so that one under way when a disconnect came is
/// closed too (see the module doc).
#[derive(Debug)]
pub struct Recent {
    /// How long a disconnect is kept: longer than any admission.
    keep: Duration,
    inner: Mutex<RecentInner>,
}

#[derive(Debug, Default)]
struct RecentInner {
    /// In the order they came, each with its number.
    queue: VecDeque<(Instant, u64, String)>,
    /// Session -> its latest disconnect: its number, when, the order.
    /// (Numbers, not instants, tell entries apart: a coarse clock can give
    /// two disconnects the same instant.)
    last: HashMap<String, (u64, Instant, CloseOrder)>,
    /// The next disconnect's number.
    next: u64,
}

impl Recent {
    /// Keeps each disconnect for `keep` (an admission's longest time).
    pub fn new(keep: Duration) -> Self {
        Self {
            keep,
            inner: Mutex::new(RecentInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecentInner> {
        // Every change leaves both maps usable: poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a disconnect of `session_id`, now.
    pub fn record(&self, session_id: &str, order: &CloseOrder) {
        let now = Instant::now();
        let mut inner = self.lock();
        while let Some((at, _, _)) = inner.queue.front() {
            let expired = now.saturating_duration_since(*at) > self.keep;
            if !expired && inner.queue.len() < RECENT_MAX {
                break;
            }
            let Some((_, number, session)) = inner.queue.pop_front() else {
                break;
            };
            // Only if it is still the session's latest.
            if inner
                .last
                .get(&session)
                .is_some_and(|(latest, _, _)| *latest == number)
            {
                inner.last.remove(&session);
            }
        }
        let number = inner.next;
        inner.next = number.wrapping_add(1);
        inner.queue.push_back((now, number, session_id.to_owned()));
        inner
            .last
            .insert(session_id.to_owned(), (number, now, order.clone()));
    }

    /// The disconnect of `session_id` that came at or after `began`, if
    /// one did.
    pub fn since(&self, session_id: &str, began: Instant) -> Option<CloseOrder> {
        let inner = self.lock();
        match inner.last.get(session_id) {
            Some((_, at, order)) if *at >= began => Some(order.clone()),
            _ => None,
        }
    }
}

/// Entries read from the control stream in one round trip: at most this
/// many times [`MAX_CONTROL_BYTES`] in memory.
const BATCH: usize = 1000;
/// Entries the control stream keeps (approximately: `MAXLEN ~`): a mass
/// revoke this large waits in Redis for a process that is behind.
pub const LOG_MAX_LEN: usize = 100_000;
/// Pause before trying again after Redis failed a read or a subscription.
const RETRY: Duration = Duration::from_millis(250);
/// A read even without a wake-up, in case one was lost unnoticed (or a
/// backend appended with a plain `XADD`): the whole idle cost.
const SAFETY_READ: Duration = Duration::from_secs(60);

/// The source of the `wsproxy_control` library: `FCALL wsproxy_control 1
/// <control stream> <json>` appends the command to the control stream
/// (`MAXLEN ~` [`LOG_MAX_LEN`]) and publishes the new entry's id on
/// `wsproxy:control` as a wake-up, in one step; it returns the id. It
/// refuses, with an error reply, a payload that is not a JSON object with
/// a string `type` or is longer than [`MAX_CONTROL_BYTES`], and any other
/// key (the processes
/// would never read it). A library of its own, without configuration
/// beyond the names, so that it is loaded whether or not reliable sessions
/// are on, and loading it never changes the `wsproxy` library's bounds.
pub fn library(keys: crate::keys::Keys) -> String {
    LIBRARY
        .replace("__LOG__", keys.control_log())
        .replace("__CHANNEL__", crate::keys::CONTROL)
        .replace("__PUBLISH__", keys.publish_command())
        .replace("__MAX_LEN__", &LOG_MAX_LEN.to_string())
        .replace("__MAX_BYTES__", &MAX_CONTROL_BYTES.to_string())
}

const LIBRARY: &str = r#"#!lua name=wsproxy_control

redis.register_function('wsproxy_control', function(keys, args)
  if #keys ~= 1 or #args ~= 1 then
    return redis.error_reply('ERR wsproxy_control takes one key (__LOG__) and one command')
  end
  if keys[1] ~= '__LOG__' then
    return redis.error_reply('ERR wsproxy_control: the key must be __LOG__, not ' .. keys[1])
  end
  local command = args[1]
  if #command > __MAX_BYTES__ then
    return redis.error_reply('ERR wsproxy_control: the command is longer than __MAX_BYTES__ bytes')
  end
  local ok, decoded = pcall(cjson.decode, command)
  if not ok or type(decoded) ~= 'table' or type(decoded['type']) ~= 'string' then
    return redis.error_reply('ERR wsproxy_control: the command must be a JSON object with a "type"')
  end
  local id = redis.call('XADD', keys[1], 'MAXLEN', '~', __MAX_LEN__, '*', 'c', command)
  redis.call('__PUBLISH__', '__CHANNEL__', id)
  return id
end)
"#;

/// Errors reading the control stream, or loading its library.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Redis refused or failed the call.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the limit.
    #[error("Redis did not answer in time")]
    Timeout,
    /// The answer was not of the shape the command returns.
    #[error("unexpected answer from Redis: {0}")]
    Unexpected(&'static str),
}

/// Loads (or replaces) the `wsproxy_control` library.
pub async fn install<C: ConnectionLike>(
    redis: &mut C,
    keys: crate::keys::Keys,
    limit: Duration,
) -> Result<(), StreamError> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(library(keys));
    within(limit, cmd.query_async::<String>(redis)).await?;
    Ok(())
}

async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StreamError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StreamError::Timeout),
    }
}

/// A stream entry id, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId(u64, u64);

impl StreamId {
    /// Parses `<ms>-<seq>`; `None` for anything else.
    pub fn parse(s: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(s).ok()?;
        let (ms, seq) = s.split_once('-')?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// What `XINFO STREAM` says about the control stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogInfo {
    /// The id of the last entry ever added.
    last: StreamId,
    /// The newest id deleted with `XDEL` (Redis 7; `None` before).
    max_deleted: Option<StreamId>,
    /// The first entry still in the stream (trimming takes the oldest).
    first: Option<StreamId>,
}

fn text(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: &redis::Value) -> Option<Vec<(&redis::Value, &redis::Value)>> {
    match v {
        redis::Value::Map(m) => Some(m.iter().map(|(k, v)| (k, v)).collect()),
        redis::Value::Array(a) if a.len() % 2 == 0 => {
            Some(a.chunks_exact(2).map(|c| (&c[0], &c[1])).collect())
        }
        _ => None,
    }
}

/// The control stream's last id and newest deleted id; `None` when it
/// does not exist.
async fn log_info<C: ConnectionLike>(
    redis: &mut C,
    log: &str,
    limit: Duration,
) -> Result<Option<LogInfo>, StreamError> {
    let mut exists = redis::cmd("EXISTS");
    exists.arg(log);
    let mut info = redis::cmd("XINFO");
    info.arg("STREAM").arg(log);
    // `XINFO` on a missing key is an error; `EXISTS` first, and a stream
    // deleted in between is the error of a read that is tried again.
    if within(limit, exists.query_async::<i64>(redis)).await? == 0 {
        return Ok(None);
    }
    let answer: redis::Value = within(limit, info.query_async(redis)).await?;
    let fields = pairs(&answer).ok_or(StreamError::Unexpected("XINFO STREAM"))?;
    let field = |name: &[u8]| {
        fields
            .iter()
            .find(|(k, _)| text(k) == Some(name))
            .and_then(|(_, v)| text(v))
            .and_then(StreamId::parse)
    };
    let last = field(b"last-generated-id").ok_or(StreamError::Unexpected("no last id"))?;
    let first = fields
        .iter()
        .find(|(k, _)| text(k) == Some(b"first-entry".as_slice()))
        .and_then(|(_, v)| match v {
            redis::Value::Array(entry) => entry.first().and_then(text).and_then(StreamId::parse),
            _ => None,
        });
    Ok(Some(LogInfo {
        last,
        max_deleted: field(b"max-deleted-entry-id"),
        first,
    }))
}

/// An entry of the control stream: its id, and its `c` field (`None` when
/// it has none).
type Entry = (StreamId, Option<Vec<u8>>);

/// Up to `count` entries after `from`: each id with its `c` field (`None`
/// when it has none).
async fn read_after<C: ConnectionLike>(
    redis: &mut C,
    log: &str,
    from: StreamId,
    count: usize,
    limit: Duration,
) -> Result<Vec<Entry>, StreamError> {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(log)
        .arg(from.to_string());
    let answer: redis::Value = within(limit, cmd.query_async(redis)).await?;
    let bad = StreamError::Unexpected("XREAD");
    // RESP2: [[key, entries]]; RESP3: {key: entries}; nil: nothing new.
    let entries = match &answer {
        redis::Value::Nil => return Ok(Vec::new()),
        redis::Value::Map(m) => m.first().map(|(_, e)| e),
        redis::Value::Array(streams) => match streams.first() {
            Some(redis::Value::Array(kv)) => kv.get(1),
            _ => None,
        },
        _ => None,
    };
    let Some(redis::Value::Array(entries)) = entries else {
        return Err(bad);
    };
    parse_entries(entries)
}

/// Stream entries as Redis gives them (`[[id, [field, value, ...]], ...]`):
/// each id with its `c` field (`None` when it has none).
fn parse_entries(entries: &[redis::Value]) -> Result<Vec<Entry>, StreamError> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let redis::Value::Array(parts) = entry else {
            return Err(StreamError::Unexpected("stream entry"));
        };
        let id = parts
            .first()
            .and_then(text)
            .and_then(StreamId::parse)
            .ok_or(StreamError::Unexpected("stream entry id"))?;
        let command = parts
            .get(1)
            .and_then(pairs)
            .and_then(|fields| {
                fields
                    .into_iter()
                    .find(|(k, _)| text(k) == Some(b"c".as_slice()))
                    .and_then(|(_, v)| text(v))
            })
            .map(<[u8]>::to_vec);
        out.push((id, command));
    }
    Ok(out)
}

/// See [`Control::lost_after`]; `read_any`: `from` is an entry read.
fn lost_after(read_any: bool, from: StreamId, info: LogInfo) -> bool {
    // An empty stream lost something only if it had entries after us.
    let trimmed = read_any && info.first.map_or(info.last > from, |first| first > from);
    trimmed || info.max_deleted.is_some_and(|d| d > from)
}

/// What the control task shares with each step.
struct Control {
    broker: Broker,
    redis: RedisConn,
    keys: crate::keys::Keys,
    recent: Arc<Recent>,
    metrics: Arc<Metrics>,
    limit: Duration,
    /// The last entry of the control stream handled; `None` until the
    /// first read (see [`Control::start`]).
    position: Option<StreamId>,
    /// When the task started.
    started: Instant,
    /// True once the position is an entry read (not the start).
    read_any: bool,
    /// The entries applied last (see [`rejoin`]).
    applied: rejoin::Applied,
}

impl Control {
    /// Parses and applies one command, counting it under `outcome` (or
    /// `malformed`).
    fn handle(&self, payload: &[u8], outcome: &'static str) {
        match parse(payload) {
            Ok(command) => {
                let closed = apply(&self.broker, self.keys, &self.recent, &command);
                self.metrics.control_message(outcome);
                let Command::Disconnect { session_id, order } = &command;
                tracing::info!(%session_id, code = order.code, closed, "control: disconnect");
            }
            Err(e) => {
                self.metrics.control_message("malformed");
                let shown =
                    String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned();
                tracing::warn!(
                    error = %crate::logsafe::escaped(&e.to_string()),
                    message = %crate::logsafe::escaped(&shown),
                    "control: malformed command ignored"
                );
            }
        }
    }

    /// Where the first read starts: at what was appended from a second
    /// before this process started (in Redis' clock, which made the ids),
    /// so that nothing sent while it was coming up is skipped; never
    /// before what was trimmed, nor past the last entry (a position ahead
    /// of the stream would look like a stream that lost its tail). The
    /// first read goes on from it at once (see [`Control::catch_up`]).
    async fn start(&self, redis: &mut RedisConn) -> Result<StreamId, StreamError> {
        let info = log_info(redis, self.keys.control_log(), self.limit).await?;
        let Some(info) = info else {
            return Ok(StreamId::default());
        };
        let (secs, micros): (u64, u64) =
            within(self.limit, redis::cmd("TIME").query_async(redis)).await?;
        let now_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let up_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let since = StreamId(now_ms.saturating_sub(up_ms.saturating_add(1000)), 0);
        Ok(since
            .min(info.last)
            .max(info.max_deleted.unwrap_or_default()))
    }

    /// True when entries after `from` may be gone unread: the entry read
    /// last was trimmed away (trimming takes the oldest, in whole nodes
    /// of 100, so those after it in its node went too), or something after
    /// it was deleted. (A position that is no entry, the start, only
    /// counts deletions.)
    fn lost_after(&self, from: StreamId, info: LogInfo) -> bool {
        lost_after(self.read_any, from, info)
    }

    /// True when a wake-up for entry `id` names one not handled yet.
    fn behind(&self, id: StreamId) -> bool {
        self.position.is_none_or(|p| id > p)
    }

    /// Reads and applies every entry after the position, [`BATCH`] at a
    /// time. With `check` (after a (re)subscription), and after every
    /// full batch (a burst larger than the stream keeps may have passed
    /// the position), it first asks whether entries it had not read were
    /// trimmed away (`missed`), the stream was lost (read a new one from
    /// its start), or its last id is behind the position ([`rejoin`]).
    async fn catch_up(&mut self, mut check: bool) -> Result<(), StreamError> {
        let log = self.keys.control_log();
        let mut redis = self.redis.clone();
        let mut from = match self.position {
            Some(from) => from,
            None => {
                // The first read goes on at once from where `start` says:
                // what was appended while the process came up (before its
                // subscription, so with no wake-up it would see) must not
                // wait for the next wake-up or the safety read, and then
                // close connections its session opened since.
                let from = self.start(&mut redis).await?;
                self.position = Some(from);
                // `start` is within the stream as it is now.
                check = false;
                from
            }
        };
        loop {
            if check {
                match log_info(&mut redis, log, self.limit).await? {
                    Some(info) if info.last < from => {
                        let was = from;
                        from = self
                            .applied
                            .rejoin(&mut redis, log, info.last, self.limit)
                            .await?;
                        self.read_any = from > StreamId::default();
                        tracing::warn!(
                            position = %was, last = %info.last, after = %from,
                            "control: the control stream is behind this process's position (Redis failed over, or lost it); going on after the newest entry applied"
                        );
                    }
                    Some(info) if self.lost_after(from, info) => {
                        self.metrics.control_message("missed");
                        tracing::warn!(
                            position = %from,
                            "control: commands this process had not read were trimmed from the control stream"
                        );
                    }
                    Some(_) => {}
                    None if from > StreamId::default() => {
                        tracing::warn!(
                            position = %from,
                            "control: the control stream is gone (Redis lost it); reading a new one from its start"
                        );
                        from = StreamId::default();
                        self.read_any = false;
                        // Every entry of a new stream is new.
                        self.applied.clear();
                    }
                    None => {}
                }
                self.position = Some(from);
            }
            let entries = read_after(&mut redis, log, from, BATCH, self.limit).await?;
            let full = entries.len() >= BATCH;
            for (id, command) in entries {
                match &command {
                    Some(c) => self.handle(c, "applied"),
                    None => self.handle(b"", "applied"),
                }
                self.applied.remember(id, command.as_deref());
                from = id;
                self.position = Some(id);
                self.read_any = true;
            }
            if !full {
                return Ok(());
            }
            check = true;
        }
    }
}

/// The control task, until `shutdown`: subscribes to `wsproxy:control`
/// (a gapless subscription: it ends when the pub/sub connection drops)
/// and, after each (re)subscription and on each wake-up naming an entry
/// it has not handled, reads the control stream from its own position
/// on the command connection (`XREAD` without `BLOCK`: nothing waits on
/// that shared connection). A command published on the channel in the
/// old form is applied as it comes (best effort: counted `legacy`). A
/// failed subscription or read (Redis down) is tried again every
/// 250 ms, from the same position, so nothing appended meanwhile is
/// missed.
pub async fn listen(
    broker: Broker,
    redis: RedisConn,
    keys: crate::keys::Keys,
    recent: Arc<Recent>,
    metrics: Arc<Metrics>,
    limit: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut control = Control {
        broker,
        redis,
        keys,
        recent,
        metrics,
        limit,
        position: None,
        started: Instant::now(),
        read_any: false,
        applied: rejoin::Applied::default(),
    };
    // A subscription that Redis does not confirm soon is made again, so
    // that the stream is read soon after the pub/sub connection is back.
    let wait = limit.min(Duration::from_secs(1));
    loop {
        let outbox = Outbox::gapless(QUEUE);
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = control.broker.subscribe(crate::keys::CONTROL, outbox.clone(), wait) => s,
        };
        let _subscription = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "control: not subscribed yet; retrying");
                // The command connection may be up while pub/sub is not.
                if let Err(e) = control.catch_up(true).await {
                    tracing::debug!(error = %e, "control: cannot read the control stream yet");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        let mut due = Some(true);
        let mut failing = false;
        loop {
            if let Some(check) = due {
                match control.catch_up(check).await {
                    Ok(()) => {
                        due = None;
                        failing = false;
                    }
                    Err(e) => {
                        // Once per outage, not every RETRY.
                        if !failing {
                            tracing::warn!(error = %e, "control: cannot read the control stream; retrying");
                        }
                        failing = true;
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(RETRY) => continue,
                        }
                    }
                }
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = outbox.pop() => next,
                _ = tokio::time::sleep(SAFETY_READ) => {
                    due = Some(false);
                    continue;
                }
            };
            let payload = match next {
                Outgoing::Message(Message::Text(t)) => t.as_bytes().to_vec(),
                Outgoing::Message(Message::Binary(b)) => b.to_vec(),
                Outgoing::Message(_) => continue,
                // Wake-ups faster than they were taken: the stream has
                // every command; subscribe again and read it. (Commands
                // in the old form among them are lost.)
                Outgoing::Slow => {
                    control.metrics.control_message("overflow");
                    tracing::debug!("control: wake-ups overflowed; reading the stream");
                    break;
                }
                // The pub/sub connection dropped: wake-ups were missed.
                Outgoing::Lost | Outgoing::Close(_) => break,
            };
            match StreamId::parse(&payload) {
                Some(id) => {
                    if control.behind(id) {
                        due = Some(false);
                    }
                }
                None => control.handle(&payload, "legacy"),
            }
        }
    }
}

mod rejoin;
#[cfg(test)]
mod tests;
