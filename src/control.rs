//! Commands from backends, through Redis: every process subscribes to
//! `wsproxy:control` (through the broker, so it costs one channel, not a
//! connection) and acts on what is published there.
//!
//! One command today:
//!
//! ```text
//! PUBLISH wsproxy:control '{"type":"disconnect","session_id":"s1","code":4001,"reason":"revoked"}'
//! ```
//!
//! closes every session connection (plain and reliable) of `s1` on every
//! process, with that close code and reason, once what was already queued
//! for them has gone out. `code` is optional (4000) and must be 1000, 1008
//! or 3000-4999 (codes a server may send that do not claim a protocol
//! failure); `reason` is optional and at most 123 bytes. To revoke the
//! session's token in the same step, a backend wraps `DEL
//! session:s1:auth` and the `PUBLISH` in `MULTI`/`EXEC`.
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

use crate::broker::{Broker, CloseOrder, Outbox, Outgoing};
use crate::metrics::Metrics;

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

/// The control task: subscribes to `wsproxy:control` and applies what
/// comes, until `shutdown`. A subscription that fails (Redis down) is
/// tried again every second; the broker keeps it across reconnections.
pub async fn listen(
    broker: Broker,
    keys: crate::keys::Keys,
    recent: Arc<Recent>,
    metrics: Arc<Metrics>,
    limit: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let outbox = Outbox::new(QUEUE);
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = broker.subscribe(crate::keys::CONTROL, outbox.clone(), limit) => s,
        };
        let _subscription = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "control: not subscribed yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = outbox.pop() => next,
            };
            let payload = match next {
                Outgoing::Message(Message::Text(t)) => t.as_bytes().to_vec(),
                Outgoing::Message(Message::Binary(b)) => b.to_vec(),
                Outgoing::Message(_) => continue,
                // A flood of commands faster than they are applied: start
                // over (commands in the overflow are lost, and logged).
                Outgoing::Slow | Outgoing::Lost | Outgoing::Close(_) => {
                    metrics.control_message("overflow");
                    tracing::warn!(
                        "control: commands arrived faster than they were applied; some were dropped"
                    );
                    break;
                }
            };
            match parse(&payload) {
                Ok(command) => {
                    let closed = apply(&broker, keys, &recent, &command);
                    metrics.control_message("applied");
                    let Command::Disconnect { session_id, order } = &command;
                    tracing::info!(%session_id, code = order.code, closed, "control: disconnect");
                }
                Err(e) => {
                    metrics.control_message("malformed");
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(code: u16) -> CloseOrder {
        CloseOrder {
            code,
            reason: "r".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_admission_finds_the_disconnects_that_came_after_it_began() {
        let recent = Recent::new(Duration::from_secs(5));
        let earlier = Instant::now();
        recent.record("s1", &order(4001));
        // A disconnect before the admission began is not its own: the
        // backend may have made a new token since.
        tokio::time::advance(Duration::from_millis(10)).await;
        let began = Instant::now();
        assert_eq!(recent.since("s1", began), None);
        assert_eq!(recent.since("s1", earlier), Some(order(4001)));
        assert_eq!(recent.since("s2", earlier), None);
        recent.record("s1", &order(4002));
        assert_eq!(recent.since("s1", began), Some(order(4002)));
        // Forgotten once no admission can still be under way.
        tokio::time::advance(Duration::from_secs(6)).await;
        recent.record("s3", &order(4003));
        assert_eq!(recent.since("s1", began), None);
        assert_eq!(recent.inner.lock().expect("lock").queue.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_disconnect_at_the_same_instant_outlives_the_older_one() {
        let recent = Recent::new(Duration::from_secs(5));
        let began = Instant::now();
        // The clock does not move: every disconnect gets the same instant.
        recent.record("s1", &order(4001));
        recent.record("s1", &order(4002));
        // The cap pushes the first one out, not the second.
        for i in 0..RECENT_MAX - 1 {
            recent.record(&format!("other{i}"), &order(4000));
        }
        assert_eq!(recent.since("s1", began), Some(order(4002)));
    }

    #[test]
    fn recent_disconnects_are_bounded() {
        let recent = Recent::new(Duration::from_secs(3600));
        for i in 0..RECENT_MAX + 10 {
            recent.record(&format!("s{i}"), &order(4000));
        }
        let inner = recent.inner.lock().expect("lock");
        assert_eq!(inner.queue.len(), RECENT_MAX);
        assert_eq!(inner.last.len(), RECENT_MAX);
        assert!(!inner.last.contains_key("s0"));
    }

    #[test]
    fn a_disconnect_takes_defaults_and_limits() {
        assert_eq!(
            parse(br#"{"type":"disconnect","session_id":"s1"}"#),
            Ok(Command::Disconnect {
                session_id: "s1".into(),
                order: CloseOrder {
                    code: 4000,
                    reason: "disconnected by the backend".into()
                }
            })
        );
        let Ok(Command::Disconnect { order, .. }) =
            parse(br#"{"type":"disconnect","session_id":"s1","code":4001,"reason":"revoked"}"#)
        else {
            panic!("valid");
        };
        assert_eq!((order.code, order.reason.as_str()), (4001, "revoked"));
        for code in [1000, 1008, 3000, 4999] {
            let msg = format!(r#"{{"type":"disconnect","session_id":"s","code":{code}}}"#);
            assert!(parse(msg.as_bytes()).is_ok(), "{code}");
        }
    }

    #[test]
    fn malformed_commands_are_refused_by_cause() {
        let long_reason = format!(
            r#"{{"type":"disconnect","session_id":"s","reason":"{}"}}"#,
            "x".repeat(124)
        );
        let huge = format!(
            r#"{{"type":"disconnect","session_id":"{}"}}"#,
            "s".repeat(5000)
        );
        type Expect = fn(&ControlError) -> bool;
        let cases: [(&[u8], Expect); 12] = [
            (b"", |e| matches!(e, ControlError::Shape(_))),
            (b"not json", |e| matches!(e, ControlError::Shape(_))),
            (b"[1,2]", |e| matches!(e, ControlError::Shape(_))),
            (br#"{"session_id":"s"}"#, |e| {
                matches!(e, ControlError::Shape(_))
            }),
            (br#"{"type":"reboot","session_id":"s"}"#, |e| {
                matches!(e, ControlError::UnknownType(_))
            }),
            (br#"{"type":"disconnect"}"#, |e| {
                *e == ControlError::SessionId
            }),
            (br#"{"type":"disconnect","session_id":"a:b"}"#, |e| {
                *e == ControlError::SessionId
            }),
            (
                br#"{"type":"disconnect","session_id":"s","code":1006}"#,
                |e| *e == ControlError::Code(1006),
            ),
            (
                br#"{"type":"disconnect","session_id":"s","code":70000}"#,
                |e| matches!(e, ControlError::Shape(_)),
            ),
            (
                br#"{"type":"disconnect","session_id":"s","extra":1}"#,
                |e| matches!(e, ControlError::Shape(_)),
            ),
            (long_reason.as_bytes(), |e| *e == ControlError::Reason),
            (huge.as_bytes(), |e| *e == ControlError::TooLong),
        ];
        for (input, expected) in cases {
            let e = parse(input).expect_err("malformed");
            assert!(expected(&e), "{:?}: {e:?}", String::from_utf8_lossy(input));
        }
    }
}
