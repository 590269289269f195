//! What travels on a session bridge, in both modes: the values the
//! application sees (offsets, positions, the welcome, messages, acks) and
//! the parsing of the server's frames into them. No I/O here.
//!
//! Reliable frames (`wsproxy.v1`), down: `{"type":"welcome",...}` first,
//! then `{"type":"message","offset":"<ms>-<seq>","data":<json>}`,
//! `{"type":"ack","id":...,"offset":...[,"duplicate":true]}` and
//! `{"type":"error","error":<code>[,"id":...],"message":...}`. Up:
//! `{"type":"message","id":<id>,"data":<json>}`. Plain frames are the
//! backend's text as it was published, down, and JSON text, up.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::{Error, ServerError};

/// A position in a session's history: the id Redis gave the entry in the
/// stream `session:{id}:history`, `<milliseconds>-<sequence>`. Offsets
/// of one history grow with every message; [`Offset::ZERO`] comes before
/// the first.
///
/// Serializes as its text form, so a [`Position`] can be stored as JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    ms: u64,
    seq: u64,
}

impl Offset {
    /// `0-0`: before any message.
    pub const ZERO: Offset = Offset { ms: 0, seq: 0 };

    /// The offset `<ms>-<seq>`.
    pub fn new(ms: u64, seq: u64) -> Offset {
        Offset { ms, seq }
    }

    /// The milliseconds part (Redis' clock when the entry was added).
    pub fn millis(&self) -> u64 {
        self.ms
    }

    /// The sequence part (entries within the same millisecond).
    pub fn sequence(&self) -> u64 {
        self.seq
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Offset {
    type Err = Error;

    /// Parses `<ms>-<seq>`, both decimal.
    fn from_str(s: &str) -> Result<Offset, Error> {
        let parsed = s
            .split_once('-')
            .and_then(|(ms, seq)| Some(Offset::new(ms.parse().ok()?, seq.parse().ok()?)));
        parsed.ok_or_else(|| Error::InvalidArgument {
            what: "offset",
            value: s.to_owned(),
            reason: "expected <milliseconds>-<sequence>, two decimal numbers",
        })
    }
}

impl Serialize for Offset {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Offset {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Offset, D::Error> {
        let text = Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a reliable client stands in its session's history: the history's
/// epoch and the offset of the last message the client got. Reconnecting
/// with it (`?epoch=&offset=`) resumes after that message.
///
/// [`SessionClient`](crate::SessionClient) keeps its own and resumes by
/// itself; store one (it serializes to JSON) and give it to
/// [`SessionBuilder::resume_from`](crate::SessionBuilder::resume_from) to
/// resume across a restart of the application.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The history's epoch: it changes when the history was lost and made
    /// again, so offsets of one epoch mean nothing in another.
    pub epoch: String,
    /// The last message seen (the welcome's offset before any).
    pub offset: Offset,
}

/// The first frame of a reliable connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The session, as the server names it.
    pub session_id: String,
    /// The history's epoch.
    pub epoch: String,
    /// The offset of the history's newest message when the connection
    /// joined. On a fresh connection the client gets what comes after it.
    pub offset: Offset,
    /// What became of the resume the client asked for, if it asked.
    pub resume: Resume,
}

/// The outcome of a resume, as the welcome tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The client did not ask to resume.
    Fresh,
    /// Resumed: the next `replayed` messages are the ones missed, then the
    /// live ones follow, with no gap and no duplicate.
    Resumed {
        /// How many missed messages follow the welcome.
        replayed: u64,
    },
    /// The resume was impossible; messages were lost to this client. The
    /// connection goes on from the welcome's offset.
    Failed(ResumeFailure),
}

/// Why a resume was impossible (the welcome's `reason`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResumeFailure {
    /// Messages after the client's offset were trimmed away
    /// (`HISTORY_MAX_LEN`).
    Trimmed,
    /// The history was lost and started again: it expired
    /// (`HISTORY_TTL_SECS`), or Redis restarted without persistence.
    EpochChanged,
    /// The history was deleted although its epoch is the client's.
    Expired,
    /// The offset is not one this history gave out.
    UnknownOffset,
    /// A reason this client does not know, as the server sent it; or, when
    /// the server did not answer a resume at all, this client's account
    /// of that.
    Other(String),
}

impl ResumeFailure {
    /// The reason as the server names it (`trimmed`, `epoch_changed`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            ResumeFailure::Trimmed => "trimmed",
            ResumeFailure::EpochChanged => "epoch_changed",
            ResumeFailure::Expired => "expired",
            ResumeFailure::UnknownOffset => "unknown_offset",
            ResumeFailure::Other(reason) => reason,
        }
    }

    fn parse(reason: &str) -> ResumeFailure {
        match reason {
            "trimmed" => ResumeFailure::Trimmed,
            "epoch_changed" => ResumeFailure::EpochChanged,
            "expired" => ResumeFailure::Expired,
            "unknown_offset" => ResumeFailure::UnknownOffset,
            other => ResumeFailure::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ResumeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resume the server could not honour: the messages between `from` and
/// `now` are lost to this client, which must reload its state from the
/// backend. Delivery goes on after `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeFailed {
    /// Why.
    pub reason: ResumeFailure,
    /// Where the client asked to resume from.
    pub from: Position,
    /// Where it goes on from (the welcome's epoch and offset).
    pub now: Position,
}

/// A message from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMessage {
    /// Its offset in the session's history (reliable mode); `None` in
    /// plain mode, where messages have no position.
    pub offset: Option<Offset>,
    /// The message as the backend published it.
    pub payload: Payload,
}

/// The body of a [`SessionMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Text: always, in reliable mode, where it is the JSON the backend
    /// gave `wsproxy_publish` (byte for byte); in plain mode, whatever was
    /// published, JSON or not.
    Text(String),
    /// Plain mode only: a published payload that is not UTF-8, which
    /// wsproxy sends as a binary frame.
    Binary(Bytes),
}

impl SessionMessage {
    /// The payload as text, unless it is binary.
    pub fn text(&self) -> Option<&str> {
        match &self.payload {
            Payload::Text(text) => Some(text),
            Payload::Binary(_) => None,
        }
    }

    /// The payload parsed as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(match &self.payload {
            Payload::Text(text) => serde_json::from_str(text)?,
            Payload::Binary(bytes) => serde_json::from_slice(bytes)?,
        })
    }
}

/// wsproxy's acknowledgement of a reliable client message: it is in the
/// stream `wsproxy:up:{n}` that backend workers read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The message's id.
    pub id: String,
    /// The stream entry's id (the first copy's, for a duplicate).
    pub offset: Offset,
    /// True when the id had been stored before (a resend after a lost
    /// acknowledgement): this copy was not stored again.
    pub duplicate: bool,
}

/// What became of a message given to
/// [`SessionClient::send`](crate::SessionClient::send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Plain mode: written to the socket. The plain protocol acknowledges
    /// nothing; a refusal (`publish_failed`, when the server's Redis is
    /// down) arrives later as a [`SessionEvent::Error`](crate::SessionEvent::Error).
    Written,
    /// Reliable mode: stored.
    Stored(Ack),
}

impl Sent {
    /// The acknowledgement, in reliable mode.
    pub fn ack(&self) -> Option<&Ack> {
        match self {
            Sent::Written => None,
            Sent::Stored(ack) => Some(ack),
        }
    }
}

/// A reliable frame from the server, classified.
#[derive(Debug)]
pub(crate) enum Down {
    Welcome(Welcome),
    Message {
        offset: Offset,
        data: String,
    },
    Ack(Ack),
    /// An error frame; `id` names the message it is about, when it does.
    Error {
        id: Option<String>,
        error: ServerError,
    },
    /// A frame type this client does not know (ignored).
    Other(String),
}

/// Every field any reliable frame has; each type uses some.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    offset: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    duplicate: Option<bool>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    resumed: Option<bool>,
    #[serde(default)]
    replayed: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// A present field, even `null` (a backend may publish `null`); absent
/// fields are `None` through `default`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

fn protocol(what: &str, text: &str) -> Error {
    const SHOWN: usize = 200;
    let shown = match text.char_indices().nth(SHOWN) {
        Some((end, _)) => &text[..end],
        None => text,
    };
    Error::Protocol(format!("{what}: {shown}"))
}

fn offset_field(field: Option<String>, what: &str, text: &str) -> Result<Offset, Error> {
    field
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| protocol(&format!("{what} without a valid offset"), text))
}

/// Classifies a reliable frame; a frame of a known type that lacks what
/// that type carries is an [`Error::Protocol`].
pub(crate) fn parse_reliable(text: &str) -> Result<Down, Error> {
    let frame: Frame<'_> = serde_json::from_str(text)
        .map_err(|_| protocol("a frame that is not a JSON object with a type", text))?;
    Ok(match &*frame.kind {
        "message" => Down::Message {
            data: frame
                .data
                .ok_or_else(|| protocol("a message without data", text))?
                .get()
                .to_owned(),
            offset: offset_field(frame.offset, "a message", text)?,
        },
        "ack" => Down::Ack(Ack {
            id: frame
                .id
                .ok_or_else(|| protocol("an ack without an id", text))?,
            offset: offset_field(frame.offset, "an ack", text)?,
            duplicate: frame.duplicate.unwrap_or(false),
        }),
        "error" => Down::Error {
            id: frame.id,
            error: ServerError {
                code: frame.error.unwrap_or_default(),
                message: frame.message.unwrap_or_default(),
                command: "send".into(),
            },
        },
        "welcome" => {
            let resume = match frame.resumed {
                None => Resume::Fresh,
                Some(true) => Resume::Resumed {
                    replayed: frame.replayed.unwrap_or(0),
                },
                Some(false) => Resume::Failed(ResumeFailure::parse(
                    frame.reason.as_deref().unwrap_or("unspecified"),
                )),
            };
            Down::Welcome(Welcome {
                session_id: frame.session_id.unwrap_or_default(),
                epoch: frame
                    .epoch
                    .ok_or_else(|| protocol("a welcome without an epoch", text))?,
                offset: offset_field(frame.offset, "a welcome", text)?,
                resume,
            })
        }
        _ => Down::Other(text.to_owned()),
    })
}

/// The refusals wsproxy sends on a plain session. Plain down frames are
/// the backend's, unchanged, so a refusal can only be told from a message
/// by its shape; these are the codes the server uses there.
const PLAIN_REFUSALS: [&str; 3] = ["invalid_json", "binary_not_supported", "publish_failed"];

/// A plain text frame that is one of wsproxy's own refusals, as a
/// [`ServerError`]; `None` for the backend's messages.
pub(crate) fn plain_refusal(text: &str) -> Option<ServerError> {
    #[derive(Deserialize)]
    struct Refusal<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        error: String,
        #[serde(default)]
        message: String,
    }
    // Most messages are not error objects; skip the parse for them.
    if !(text.starts_with('{') && text.contains("\"error\"")) {
        return None;
    }
    let refusal: Refusal<'_> = serde_json::from_str(text).ok()?;
    (refusal.kind == "error" && PLAIN_REFUSALS.contains(&refusal.error.as_str())).then(|| {
        ServerError {
            code: refusal.error,
            message: refusal.message,
            command: "send".into(),
        }
    })
}

/// The frame of a reliable client message.
pub(crate) fn up_frame<T: Serialize + ?Sized>(id: &str, data: &T) -> Result<String, Error> {
    #[derive(Serialize)]
    struct Up<'a, T: ?Sized> {
        #[serde(rename = "type")]
        kind: &'static str,
        id: &'a str,
        data: &'a T,
    }
    Ok(serde_json::to_string(&Up {
        kind: "message",
        id,
        data,
    })?)
}

/// `{base}/{agent}/ws/{session}`, with `?epoch=&offset=` to resume.
pub(crate) fn session_url(
    base: &str,
    agent: &str,
    session: &str,
    resume: Option<&Position>,
) -> String {
    let mut url = format!("{}/{agent}/ws/{session}", base.trim_end_matches('/'));
    if let Some(position) = resume {
        url.push_str("?epoch=");
        percent_encode(&position.epoch, &mut url);
        url.push_str(&format!("&offset={}", position.offset));
    }
    url
}

/// Query-value encoding: an epoch is the server's to choose (digits today).
fn percent_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_print_and_order_as_numbers() {
        let a: Offset = "1700000000000-9".parse().expect("offset");
        let b: Offset = "1700000000000-10".parse().expect("offset");
        assert!(a < b, "numeric, not lexicographic");
        assert!(Offset::ZERO < a);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert_eq!((b.millis(), b.sequence()), (1_700_000_000_000, 10));
        for bad in [
            "",
            "12",
            "a-1",
            "1-",
            "-1",
            "1-2-3",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<Offset>().is_err(), "{bad:?}");
        }
        let p = Position {
            epoch: "17000".into(),
            offset: b,
        };
        let json = serde_json::to_string(&p).expect("json");
        assert_eq!(json, r#"{"epoch":"17000","offset":"1700000000000-10"}"#);
        assert_eq!(serde_json::from_str::<Position>(&json).expect("back"), p);
    }

    #[test]
    fn welcomes_say_whether_the_resume_worked() {
        let parse = |text: &str| match parse_reliable(text).expect("welcome") {
            Down::Welcome(w) => w,
            other => panic!("{other:?}"),
        };
        let w = parse(r#"{"type":"welcome","session_id":"s","epoch":"17","offset":"0-0"}"#);
        assert_eq!(
            (w.epoch.as_str(), w.offset, &w.resume),
            ("17", Offset::ZERO, &Resume::Fresh)
        );
        let w = parse(
            r#"{"type":"welcome","session_id":"s","epoch":"17","offset":"5-1","resumed":true,"replayed":3}"#,
        );
        assert_eq!(w.resume, Resume::Resumed { replayed: 3 });
        let w = parse(
            r#"{"type":"welcome","session_id":"s","epoch":"18","offset":"5-1","resumed":false,"reason":"trimmed"}"#,
        );
        assert_eq!(w.resume, Resume::Failed(ResumeFailure::Trimmed));
        let w = parse(
            r#"{"type":"welcome","epoch":"18","offset":"5-1","resumed":false,"reason":"new_reason"}"#,
        );
        assert_eq!(
            w.resume,
            Resume::Failed(ResumeFailure::Other("new_reason".into()))
        );
        for bad in [
            r#"{"type":"welcome","offset":"0-0"}"#,
            r#"{"type":"welcome","epoch":"1","offset":"zero"}"#,
            r#"{"type":"welcome","epoch":"1"}"#,
        ] {
            assert!(
                matches!(parse_reliable(bad), Err(Error::Protocol(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn messages_keep_their_data_byte_for_byte() {
        for data in [r#"{"b":1, "a":[2,"\u00e9"]}"#, "null", "7", r#""text""#] {
            let text = format!(r#"{{"type":"message","offset":"1-2","data":{data}}}"#);
            match parse_reliable(&text).expect("message") {
                Down::Message { offset, data: got } => {
                    assert_eq!((offset, got.as_str()), (Offset::new(1, 2), data));
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in [
            r#"{"type":"message","offset":"1-2"}"#,
            r#"{"type":"message","data":1}"#,
            r#"{"type":"message","offset":"x","data":1}"#,
            "not json",
            "[1]",
        ] {
            assert!(
                matches!(parse_reliable(bad), Err(Error::Protocol(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_reliable(r#"{"type":"presence","who":1}"#),
            Ok(Down::Other(_))
        ));
    }

    #[test]
    fn acks_and_errors() {
        match parse_reliable(r#"{"type":"ack","id":"m-1","offset":"3-0","duplicate":true}"#) {
            Ok(Down::Ack(ack)) => assert_eq!(
                ack,
                Ack {
                    id: "m-1".into(),
                    offset: Offset::new(3, 0),
                    duplicate: true
                }
            ),
            other => panic!("{other:?}"),
        }
        match parse_reliable(r#"{"type":"ack","id":"m-1","offset":"3-0"}"#) {
            Ok(Down::Ack(ack)) => assert!(!ack.duplicate),
            other => panic!("{other:?}"),
        }
        match parse_reliable(r#"{"type":"error","error":"not_stored","id":"m-2","message":"down"}"#)
        {
            Ok(Down::Error { id, error }) => {
                assert_eq!(id.as_deref(), Some("m-2"));
                assert_eq!(
                    (error.code.as_str(), error.message.as_str()),
                    ("not_stored", "down")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reliable(r#"{"type":"ack","offset":"3-0"}"#),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn only_wsproxys_own_refusals_are_errors_in_plain_mode() {
        let e =
            plain_refusal(r#"{"type":"error","error":"publish_failed","message":"redis down"}"#)
                .expect("a refusal");
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("publish_failed", "redis down")
        );
        for message in [
            r#"{"type":"data","payload":"Message #1"}"#,
            r#"{"type":"error","error":"backend_specific"}"#,
            r#"{"error":"publish_failed"}"#,
            "plain text",
        ] {
            assert!(plain_refusal(message).is_none(), "{message}");
        }
    }

    #[test]
    fn urls_and_frames() {
        assert_eq!(session_url("ws://h:1/", "a", "s", None), "ws://h:1/a/ws/s");
        let p = Position {
            epoch: "17 0&x".into(),
            offset: Offset::new(5, 1),
        };
        assert_eq!(
            session_url("ws://h:1/prefix", "a", "s", Some(&p)),
            "ws://h:1/prefix/a/ws/s?epoch=17%200%26x&offset=5-1"
        );
        assert_eq!(
            up_frame("m-1", &serde_json::json!({"k": [1]})).expect("frame"),
            r#"{"type":"message","id":"m-1","data":{"k":[1]}}"#
        );
        let m = SessionMessage {
            offset: None,
            payload: Payload::Text(r#"{"n":3}"#.into()),
        };
        assert_eq!(m.json::<serde_json::Value>().expect("json")["n"], 3);
        assert_eq!(m.text(), Some(r#"{"n":3}"#));
    }
}
