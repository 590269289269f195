//! Reliable sessions on the bridge: the `wsproxy.v1` subprotocol.
//!
//! A client asks for it with `Sec-WebSocket-Protocol: wsproxy.v1`; with
//! `RELIABLE_SESSIONS=true` wsproxy selects it (otherwise the upgrade is
//! refused with 400 `reliable_sessions_off`). Then, on top of the plain
//! session:
//!
//! - **Down**, the connection carries what the backend published with
//!   `FCALL wsproxy_publish` (see [`crate::session::history`]), each message as
//!   `{"type":"message","offset":"<offset>","data":<json>}`. Plain
//!   `PUBLISH`es on `session:{id}:down` reach plain connections only.
//! - **First frame**: `{"type":"welcome","epoch":...,"offset":...}`: the
//!   history's epoch and its last offset when the connection joined. A
//!   client that reconnects with `?epoch=<epoch>&offset=<last offset it
//!   saw>` gets `"resumed":true` and every message after that offset, in
//!   order, then the live ones, with no gap and no duplicate; or
//!   `"resumed":false` and a `"reason"` (`epoch_changed`, `trimmed`,
//!   `expired`, `unknown_offset`, `unreplayable`): it must reload its
//!   state from the backend, and continues from the welcome's offset.
//! - **Up**, the client sends `{"type":"message","id":"<its id>","data":<json>}`;
//!   wsproxy appends it to the stream `wsproxy:up:{n}` that backend workers
//!   read with a consumer group, and answers
//!   `{"type":"ack","id":...,"offset":...}` once Redis has it (with
//!   `"duplicate":true` for a resend of an id stored in the last
//!   `UP_DEDUPE_SECS`), or `{"type":"error","error":"not_stored","id":...}`
//!   when Redis could not take it (or did not answer in time: resending
//!   with the same id is safe), or `id_conflict` when the id was stored
//!   with other data: never a false acknowledgement.
//!
//! Race-free resume: the connection subscribes to `session:{id}:live`
//! first, then reads history ([`crate::session::history::join`]); a message that
//! arrives both ways is dropped from the live side by its offset
//! (`ReliableBridge`'s `deliver`). When wsproxy's pub/sub connection drops,
//! live messages stop until it has resubscribed, and what Redis published
//! meanwhile never arrives: the connection's outbox is gapless
//! ([`crate::broker::Outbox::gapless`]), so it is then closed with 1013 and
//! the client resumes from history. With classic pub/sub on a cluster,
//! messages reach wsproxy over the cluster bus, which can lose one without
//! the connection dropping: there each live envelope names the message
//! before it (`"prev"`), and a connection that never had that one is
//! closed with 1013 the same way.

use std::sync::Arc;

use crate::redis_conn::RedisConn;
use axum::extract::ws::{Message, Utf8Bytes};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::broker::Subscription;
use crate::context::App;
use crate::error::{ApiError, Refusal, socket_error};
use crate::metrics::InvalidMessage;
use crate::session::history::{self, Joined, UpMessage};
use crate::ws::{Budget, Delivery, HandlerFuture, Reply};

/// The subprotocol of reliable sessions.
pub const PROTOCOL: &str = "wsproxy.v1";

/// Longest epoch or offset a client may send back.
const MAX_POSITION_LEN: usize = 64;

/// Whether the client asked for [`PROTOCOL`]: `Ok(true)` when it did and
/// reliable sessions are on. When they are off, a client that asked is
/// refused (400 `reliable_sessions_off`) before its token is checked:
/// a 101 that selects none of the offered protocols fails the handshake in
/// browsers and most clients, and a plain session is not what it asked for.
pub fn requested(app: &App, headers: &HeaderMap) -> Result<bool, ApiError> {
    let offered = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == PROTOCOL);
    if offered && !app.config.reliable.enabled {
        return Err(Refusal::ReliableSessionsOff(
            "this server runs plain sessions only (RELIABLE_SESSIONS is off); connect without the wsproxy.v1 subprotocol".into(),
        )
        .into());
    }
    Ok(offered)
}

/// The position a client resumes from: `?epoch=&offset=`, both or neither
/// (400 `invalid_query` otherwise); an empty one counts as missing.
pub fn resume_from<'a>(
    epoch: Option<&'a str>,
    offset: Option<&'a str>,
) -> Result<Option<(&'a str, &'a str)>, ApiError> {
    let given = |s: Option<&'a str>| s.filter(|s| !s.is_empty());
    match (given(epoch), given(offset)) {
        (None, None) => Ok(None),
        (Some(e), Some(o)) if e.len() <= MAX_POSITION_LEN && o.len() <= MAX_POSITION_LEN => {
            Ok(Some((e, o)))
        }
        (Some(_), Some(_)) => Err(Refusal::InvalidQuery(
            format!("epoch and offset are at most {MAX_POSITION_LEN} characters").into(),
        )
        .into()),
        _ => Err(Refusal::InvalidQuery(
            "epoch and offset go together: both (to resume) or neither".into(),
        )
        .into()),
    }
}

#[derive(Serialize)]
struct Welcome<'a> {
    r#type: &'static str,
    session_id: &'a str,
    epoch: &'a str,
    offset: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// The frames a reliable connection starts with: the welcome, then the
/// replayed messages. Counts replays and failed resumes.
pub fn preamble(app: &App, session_id: &str, joined: &mut Joined) -> Vec<Message> {
    let (resumed, replayed, reason) = match joined.resume {
        None => (None, None, None),
        Some(Ok(n)) => (Some(true), Some(n), None),
        Some(Err(why)) => (Some(false), None, Some(why.as_str())),
    };
    if let Some(reason) = reason {
        app.metrics.resume_failure(reason);
    }
    let welcome = Welcome {
        r#type: "welcome",
        session_id,
        epoch: &joined.epoch,
        offset: &joined.last,
        resumed,
        replayed,
        reason,
    };
    let mut frames = Vec::with_capacity(joined.replay.len().saturating_add(1));
    frames.push(Message::Text(
        serde_json::to_string(&welcome).unwrap_or_default().into(),
    ));
    app.metrics
        .reliable_replayed
        .inc_by(joined.replay.len() as u64);
    frames.extend(
        std::mem::take(&mut joined.replay)
            .into_iter()
            .map(|m| Message::Text(m.into())),
    );
    frames
}

/// A reliable session's handler: acknowledged client messages, and the
/// live side of the resume's de-duplication.
pub struct ReliableBridge {
    /// Shared state (and the command connection: a clone per message is
    /// a reference count, where a field would be in every idle
    /// connection).
    pub app: Arc<App>,
    /// The session.
    pub session_id: Box<str>,
    /// The connection's agent id, stored with each client message.
    pub agent_id: Box<str>,
    /// The offset of the newest message the client has: the history's
    /// last when the connection joined (what the replay brought), then
    /// each live one delivered. A live message at or below it is a copy
    /// and is dropped; one that names another as the message before it
    /// (classic pub/sub on a cluster) shows that one never arrived.
    pub last: Option<(u64, u64)>,
    /// Keeps `session:{id}:live` subscribed while the connection lives.
    pub _subscription: Subscription,
}

/// What a reliable client sends ([`parse_client_message`]).
#[doc(hidden)]
#[derive(Deserialize)]
pub struct ClientMessage<'a> {
    /// `"message"`.
    #[serde(borrow)]
    pub r#type: std::borrow::Cow<'a, str>,
    /// The client's id for it, a [`crate::keys::valid_id`].
    #[serde(borrow)]
    pub id: std::borrow::Cow<'a, str>,
    /// The message, as sent.
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// Reads a reliable client's frame: `Err(Some(_))` when it is not JSON of
/// that shape, `Err(None)` when its `type` or `id` is wrong. Public for
/// the fuzz target.
#[doc(hidden)]
pub fn parse_client_message(text: &str) -> Result<ClientMessage<'_>, Option<serde_json::Error>> {
    match serde_json::from_str::<ClientMessage<'_>>(text) {
        // (`type` may be escaped, as any JSON string.)
        Ok(m) if m.r#type == "message" && crate::keys::valid_id(&m.id) => Ok(m),
        Ok(_) => Err(None),
        Err(e) => Err(Some(e)),
    }
}

#[derive(Serialize)]
struct Ack<'a> {
    r#type: &'static str,
    id: &'a str,
    offset: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

#[derive(Serialize)]
struct NotStored<'a> {
    r#type: &'static str,
    error: &'static str,
    id: &'a str,
    message: &'a str,
}

impl crate::ws::Handler for ReliableBridge {
    fn on_text(&mut self, text: Utf8Bytes) -> HandlerFuture<'_> {
        Box::pin(self.store(text))
    }

    fn budget(&self) -> Budget<'_> {
        Budget::Shared(&self.session_id)
    }

    fn on_binary(&mut self, _data: bytes::Bytes) -> Reply {
        self.app.metrics.invalid_message(InvalidMessage::Binary);
        Reply::text(socket_error(
            "binary_not_supported",
            "binary frames are not accepted; send {\"type\":\"message\",\"id\":...,\"data\":...} as text",
        ))
    }

    fn deliver(&mut self, msg: &Message) -> Delivery {
        // What reaches `:live` through `wsproxy_publish` is UTF-8 JSON; a
        // binary frame (bytes someone else published there) is no message
        // of this protocol, and reliable clients read text only.
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Binary(_)) {
                tracing::warn!(session_id = %self.session_id, "dropped a live message that is not UTF-8 (not from wsproxy_publish)");
                return Delivery::Skip;
            }
            return Delivery::Send;
        };
        // Text without an offset (something else published on `:live`) is
        // no message of this protocol either: dropped, and it does not end
        // the skipping of replayed messages' live copies.
        let Some((offset, prev)) = history::offsets_of(text.as_str()) else {
            tracing::warn!(session_id = %self.session_id, "dropped a live message without an offset (not from wsproxy_publish)");
            return Delivery::Skip;
        };
        if let Some(last) = self.last {
            if offset <= last {
                return Delivery::Skip;
            }
            if prev.is_some_and(|prev| prev != last) {
                tracing::warn!(session_id = %self.session_id, ?prev, ?last, "a live message follows one this connection never got: closing it to resume from history");
                return Delivery::Gap;
            }
        }
        self.last = Some(offset);
        Delivery::Send
    }
}

impl ReliableBridge {
    /// Stores one client message and answers with its acknowledgement.
    async fn store(&mut self, text: Utf8Bytes) -> Reply {
        let mut redis = self.app.redis.clone();
        let (_, answer) = store_message(
            &self.app,
            &mut redis,
            &self.session_id,
            &self.agent_id,
            text.as_str(),
        )
        .await;
        Reply::text(answer)
    }
}

/// What became of a client message (see [`store_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored now.
    Stored,
    /// Stored before, with the same data (a resend).
    Duplicate,
    /// Stored before with other data: refused.
    IdConflict,
    /// Not `{"type":"message","id","data"}`: refused.
    Invalid,
    /// Redis did not take it (or did not answer in time).
    NotStored,
}

impl Stored {
    /// The outcome as the metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Duplicate => "duplicate",
            Self::IdConflict => "id_conflict",
            Self::Invalid => "invalid",
            Self::NotStored => "not_stored",
        }
    }
}

/// Stores one reliable client message, whatever its transport brought it
/// in: its outcome, and the JSON answer (the ack or the error frame) the
/// client gets.
pub async fn store_message(
    app: &App,
    redis: &mut RedisConn,
    session_id: &str,
    agent_id: &str,
    text: &str,
) -> (Stored, String) {
    let message = match parse_client_message(text) {
        Ok(m) => m,
        Err(None) => {
            app.metrics.invalid_message(InvalidMessage::InvalidJson);
            return (
                Stored::Invalid,
                socket_error(
                    "invalid_message",
                    "expected {\"type\":\"message\",\"id\":\"<1-128 of A-Z a-z 0-9 - _ .>\",\"data\":<json>}",
                ),
            );
        }
        Err(Some(e)) => {
            app.metrics.invalid_message(InvalidMessage::InvalidJson);
            return (
                Stored::Invalid,
                socket_error(
                    "invalid_message",
                    &format!("expected {{\"type\":\"message\",\"id\":...,\"data\":<json>}}: {e}"),
                ),
            );
        }
    };
    let up = UpMessage {
        session: session_id,
        agent: agent_id,
        id: &message.id,
        data: message.data.get(),
    };
    let config = &app.config;
    match history::store_up(
        redis,
        config.keys(),
        &config.reliable,
        up,
        config.auth_timeout,
    )
    .await
    {
        Ok(stored) if stored.conflict => {
            app.metrics.invalid_message(InvalidMessage::IdConflict);
            let refusal = NotStored {
                r#type: "error",
                error: "id_conflict",
                id: &message.id,
                message: "this id was stored with other data; use a new id for a new message",
            };
            (
                Stored::IdConflict,
                serde_json::to_string(&refusal).unwrap_or_default(),
            )
        }
        Ok(stored) => {
            let metrics = &app.metrics;
            if stored.duplicate {
                metrics.reliable_duplicates.inc();
            } else {
                metrics.reliable_acks.inc();
            }
            let ack = Ack {
                r#type: "ack",
                id: &message.id,
                offset: &stored.offset,
                duplicate: stored.duplicate,
            };
            let outcome = if stored.duplicate {
                Stored::Duplicate
            } else {
                Stored::Stored
            };
            (outcome, serde_json::to_string(&ack).unwrap_or_default())
        }
        Err(e) => {
            if e.library_missing() {
                // The loader puts it back (see server::keep_history_library).
                app.history_loaded
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
            app.metrics.reliable_store_failures.inc();
            tracing::warn!(%session_id, error = %e, "client message not stored");
            let why = format!("the message was not stored, Redis is unavailable: {e}");
            let refusal = NotStored {
                r#type: "error",
                error: "not_stored",
                id: &message.id,
                message: &why,
            };
            (
                Stored::NotStored,
                serde_json::to_string(&refusal).unwrap_or_default(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_needs_both_its_epoch_and_its_offset() {
        assert_eq!(resume_from(None, None).ok(), Some(None));
        assert_eq!(
            resume_from(Some("1"), Some("2-0")).ok(),
            Some(Some(("1", "2-0")))
        );
        assert_eq!(resume_from(Some(""), Some("")).ok(), Some(None));
        for (e, o) in [
            (Some("1"), None),
            (None, Some("2-0")),
            (Some(""), Some("2-0")),
            (Some("1"), Some("")),
        ] {
            let err = resume_from(e, o).expect_err("one without the other");
            assert_eq!((err.status.as_u16(), err.code), (400, "invalid_query"));
        }
        let long = "9".repeat(65);
        assert!(resume_from(Some(&long), Some("1-0")).is_err());
    }

    /// Found by the reliable_client fuzz target (issue 22, defect 5):
    /// `?epoch=&offset=<offset>` was taken as a fresh join, silently.
    #[test]
    fn an_empty_half_of_a_position_is_a_missing_half() {
        assert_eq!(resume_from(Some(""), Some("")).ok(), Some(None));
        assert_eq!(resume_from(Some(""), None).ok(), Some(None));
        for (e, o) in [("", "1700000000123-0"), ("1700000000123456", "")] {
            let err = resume_from(Some(e), Some(o)).expect_err("half a position");
            assert_eq!((err.status.as_u16(), err.code), (400, "invalid_query"));
        }
    }

    /// Found by the reliable_client fuzz target: a `type` written with an
    /// escape (`"mess\u0061ge"`, valid JSON for `"message"`) was refused.
    #[test]
    fn a_message_type_may_be_escaped() {
        let Ok(m) = parse_client_message(r#"{"type":"mess\u0061ge","id":"c\u002d1","data":null}"#)
        else {
            panic!("refused");
        };
        assert_eq!(
            (&*m.r#type, &*m.id, m.data.get()),
            ("message", "c-1", "null")
        );
    }

    #[test]
    fn client_messages_borrow_their_data() {
        let m: ClientMessage<'_> =
            serde_json::from_str(r#"{"type":"message","id":"c-1","data":{"b":1, "a":[2]}}"#)
                .expect("parse");
        assert_eq!((&*m.r#type, &*m.id), ("message", "c-1"));
        assert_eq!(m.data.get(), r#"{"b":1, "a":[2]}"#);
        let ack = Ack {
            r#type: "ack",
            id: "c-1",
            offset: "1-0",
            duplicate: false,
        };
        assert_eq!(
            serde_json::to_string(&ack).expect("json"),
            r#"{"type":"ack","id":"c-1","offset":"1-0"}"#
        );
    }
}
