//! Reliable sessions in Redis: a session's replayable down messages, the
//! join (and resume) of a reliable connection, and durable client messages.
//!
//! Everything that must be atomic runs in one library of Redis Functions
//! (`wsproxy`), loaded at start-up and whenever Redis comes back:
//!
//! - `FCALL wsproxy_publish 1 session:{id}:history <json>`: what a backend
//!   calls instead of `PUBLISH`. In one step it appends the message to the
//!   session's history stream (the newest `HISTORY_MAX_LEN`, trimmed in
//!   batches of 100, the newest trimmed offset recorded; kept
//!   `HISTORY_TTL_SECS` after the last publish, at most a hundredth longer),
//!   publishes it with its offset on `session:{id}:live` for reliable
//!   connections and as it is on `session:{id}:down` for plain ones, and
//!   returns its offset (the entry's id). The payload must be UTF-8 JSON,
//!   control characters in strings escaped: it goes inside an envelope.
//! - `FCALL wsproxy_publish_batch 1 session:{id}:history <json> ...`: the
//!   same for 1 to 1,000 messages of one session, all or none; the per-call
//!   work (the call, the new-history, trim and expiry checks) done once.
//! - `FCALL wsproxy_join 1 session:{id}:history <epoch> <offset>`: wsproxy's
//!   own, once a reliable connection has subscribed to `:live`: the
//!   history's epoch (made if there is none), its last offset and, for a
//!   resume from `<epoch>`/`<offset>`, whether it is possible and every
//!   message after the offset.
//! - `FCALL wsproxy_up 2 wsproxy:up:{n} <seen key> ...`: stores a client
//!   message in its shard's stream once (a resend within `UP_DEDUPE_SECS`
//!   returns the first copy's id), held to the same UTF-8 and control
//!   character checks.
//!
//! **Epochs.** A history's epoch is made when first needed and lives
//! exactly as long as the history (same TTL, same step). A history that
//! was lost (expired, deleted, Redis restarted without persistence) comes
//! back with a new epoch, so an old offset is never taken for a position in
//! the new one: the client is told its resume failed, never given a gap.

use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::config::ReliableConfig;
use crate::keys::Keys;

/// The envelope every replayable message reaches a reliable client in,
/// before its offset: `{"type":"message","offset":"<id>","data":<json>}`.
/// Built in Lua (see [`library`]); parsed back by [`offsets_of`].
pub const ENVELOPE_PREFIX: &str = r#"{"type":"message","offset":""#;

/// Why a client's resume could not be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFailure {
    /// The history was lost and made again (expired, deleted, or Redis
    /// restarted without persistence): its epoch is not the client's.
    EpochChanged,
    /// Messages after the client's offset were trimmed (`HISTORY_MAX_LEN`).
    Trimmed,
    /// The history is gone although its epoch is the client's (it was
    /// deleted or emptied).
    Expired,
    /// The offset is not one this history gave out (malformed, ahead of
    /// its last message, or not one of its messages).
    UnknownOffset,
    /// A message after the offset cannot be sent to the client: it is not
    /// UTF-8 or not JSON (stored before `wsproxy_publish` checked, or
    /// written to the stream by other means).
    Unreplayable,
}

impl ResumeFailure {
    /// The reason as clients and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::Trimmed => "trimmed",
            Self::Expired => "expired",
            Self::UnknownOffset => "unknown_offset",
            Self::Unreplayable => "unreplayable",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "epoch_changed" => Self::EpochChanged,
            "trimmed" => Self::Trimmed,
            "expired" => Self::Expired,
            "unknown_offset" => Self::UnknownOffset,
            "unreplayable" => Self::Unreplayable,
            _ => return None,
        })
    }
}

/// What joining a session's history gave.
#[derive(Debug)]
pub struct Joined {
    /// The history's epoch.
    pub epoch: String,
    /// The offset of the last message in history ("0-0" when none).
    pub last: String,
    /// `None`: the client did not ask to resume; `Some(Ok(n))`: resumed,
    /// `n` messages replayed; `Some(Err(why))`: it could not be.
    pub resume: Option<Result<usize, ResumeFailure>>,
    /// The missed messages, enveloped, oldest first.
    pub replay: Vec<String>,
}

/// Errors talking to Redis about history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Redis refused or failed the call.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the limit.
    #[error("Redis did not answer in time")]
    Timeout,
    /// The library's answer was not what it returns (an older library?).
    #[error("unexpected answer from the wsproxy Redis library: {0}")]
    Unexpected(&'static str),
}

/// The Lua source of the `wsproxy` library, with this configuration's
/// history bounds written in (a backend's `FCALL wsproxy_publish` must not
/// need to know them). Several wsproxy processes on one Redis should share
/// these settings: the last one to start wins. `keys` says how the
/// library publishes (`PUBLISH`, or `SPUBLISH` with sharded pub/sub).
pub fn library(config: &ReliableConfig, keys: Keys) -> String {
    let ttl_ms = config.history_ttl.as_millis().max(1);
    LIBRARY
        .replace("__MAX_LEN__", &config.history_max_len.max(1).to_string())
        .replace("__TTL_MS__", &ttl_ms.to_string())
        .replace("__RENEW_MS__", &(ttl_ms / 100).max(1).to_string())
        .replace("__PUBLISH__", keys.publish_command())
        .replace(
            "__WITH_PREV__",
            if keys == Keys::ClusterClassic {
                "true"
            } else {
                "false"
            },
        )
}

/// The library's text, before [`library`] writes the settings in.
const LIBRARY: &str = include_str!("history.lua");

impl HistoryError {
    /// True when Redis does not know the library's functions (it was
    /// flushed or deleted, or Redis restarted without it): the server
    /// loads it again.
    pub fn library_missing(&self) -> bool {
        matches!(self, Self::Redis(e) if e.to_string().contains("Function not found"))
    }
}

/// Loads (or replaces) the `wsproxy` library.
pub async fn install<C: ConnectionLike>(
    redis: &mut C,
    config: &ReliableConfig,
    keys: Keys,
    limit: Duration,
) -> Result<(), HistoryError> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(library(config, keys));
    within(limit, cmd.query_async::<String>(redis)).await?;
    Ok(())
}

async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, HistoryError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(HistoryError::Timeout),
    }
}

/// Joins `session`'s history: its epoch and last offset, and, when
/// `resume` names an epoch and offset, the messages after it (or why they
/// cannot be had). Call it after the connection's `:live` subscription is
/// confirmed, so that nothing falls between the history read and the live
/// messages (those both replayed and delivered live are dropped by offset,
/// see [`offsets_of`]).
pub async fn join<C: ConnectionLike>(
    redis: &mut C,
    keys: Keys,
    session: &str,
    resume: Option<(&str, &str)>,
    limit: Duration,
) -> Result<Joined, HistoryError> {
    let (epoch, offset) = resume.unwrap_or(("", ""));
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsproxy_join")
        .arg(1)
        .arg(keys.session_history(session))
        .arg(epoch)
        .arg(offset);
    // Bytes, not strings: a stored message that is not UTF-8 must fail
    // this resume, not the whole call (which would refuse every resume of
    // the session until the entry is gone).
    let answer: Vec<Vec<u8>> = within(limit, cmd.query_async(redis)).await?;
    let mut parts = answer.into_iter();
    let (Some(epoch), Some(last), Some(status)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(HistoryError::Unexpected("fewer than three fields"));
    };
    let text = |b: Vec<u8>| String::from_utf8(b).map_err(|_| HistoryError::Unexpected("not UTF-8"));
    let (epoch, last) = (text(epoch)?, text(last)?);
    let mut replay = Vec::new();
    let resume = match text(status)?.as_str() {
        "fresh" => None,
        "recovered" => match replayable(parts) {
            Ok(messages) => {
                replay = messages;
                Some(Ok(replay.len()))
            }
            Err(offset) => {
                tracing::warn!(
                    %session,
                    %offset,
                    "the history holds a message that is not UTF-8 JSON: resumes from before it fail"
                );
                Some(Err(ResumeFailure::Unreplayable))
            }
        },
        other => Some(Err(
            ResumeFailure::parse(other).ok_or(HistoryError::Unexpected("unknown status"))?
        )),
    };
    Ok(Joined {
        epoch,
        last,
        resume,
        replay,
    })
}

/// The enveloped messages of a replay, each checked to be UTF-8 JSON (what
/// `wsproxy_publish` takes now; an older one took less, and anyone may
/// `XADD`); or the offset of the first that is not.
fn replayable(messages: impl Iterator<Item = Vec<u8>>) -> Result<Vec<String>, String> {
    messages
        .map(|m| match String::from_utf8(m) {
            Ok(m) if serde_json::from_str::<serde::de::IgnoredAny>(&m).is_ok() => Ok(m),
            Ok(m) => Err(enveloped_offset(m.as_bytes())),
            Err(e) => Err(enveloped_offset(e.as_bytes())),
        })
        .collect()
}

/// The offset in an envelope that may not be UTF-8 beyond it, for a log
/// line.
fn enveloped_offset(frame: &[u8]) -> String {
    let rest = frame
        .strip_prefix(ENVELOPE_PREFIX.as_bytes())
        .unwrap_or_default();
    let end = rest.iter().position(|&b| b == b'"').unwrap_or(0);
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

/// A stored client message: its id in the stream, and whether it had been
/// stored before (a resend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stream entry's id (the first copy's, for a resend).
    pub offset: String,
    /// True when this was a resend of a message already stored.
    pub duplicate: bool,
    /// True when the id was stored before with other data: nothing was
    /// stored now.
    pub conflict: bool,
}

/// What a reliable client message carries into its stream.
#[derive(Debug, Clone, Copy)]
pub struct UpMessage<'a> {
    /// The session.
    pub session: &'a str,
    /// The agent id of the connection.
    pub agent: &'a str,
    /// The client's id for the message.
    pub id: &'a str,
    /// The message itself (JSON).
    pub data: &'a str,
}

/// Appends a client message to its shard's stream, once per id within the
/// de-duplication window.
pub async fn store_up<C: ConnectionLike>(
    redis: &mut C,
    keys: Keys,
    config: &ReliableConfig,
    message: UpMessage<'_>,
    limit: Duration,
) -> Result<Stored, HistoryError> {
    let shard = crate::keys::up_shard(message.session, config.up_shards);
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsproxy_up")
        .arg(2)
        .arg(keys.up_stream(shard))
        .arg(keys.up_seen(shard, message.session, message.id))
        .arg(message.session)
        .arg(message.agent)
        .arg(message.id)
        .arg(message.data)
        .arg(config.up_max_len)
        .arg(config.dedupe_window.as_secs().max(1));
    let (offset, seen): (String, i64) = within(limit, cmd.query_async(redis)).await?;
    Ok(Stored {
        offset,
        duplicate: seen == 1,
        conflict: seen == 2,
    })
}

/// A stream id `<ms>-<seq>` as two numbers ([`parse_offset`]).
pub type Offset = (u64, u64);

/// What follows the offset in a live envelope that names the message
/// before it (classic pub/sub on a cluster, see the library's `publish`).
const PREV: &str = r#"","prev":""#;

/// The offset of an enveloped message (see [`ENVELOPE_PREFIX`]) as two
/// numbers, and the offset of the message before it when the envelope
/// names one; `None` for anything else.
pub fn offsets_of(frame: &str) -> Option<(Offset, Option<Offset>)> {
    let rest = frame.strip_prefix(ENVELOPE_PREFIX)?;
    let end = rest.find('"')?;
    let offset = parse_offset(&rest[..end])?;
    let prev = rest[end..].strip_prefix(PREV).and_then(|after| {
        let end = after.find('"')?;
        parse_offset(&after[..end])
    });
    Some((offset, prev))
}

/// An enveloped message (see [`ENVELOPE_PREFIX`]) as its offset and its
/// data, the backend's JSON as it was published; `None` for anything else.
/// The envelope is built by the library's `envelope` (or, live,
/// `envelope_after`) alone, so its shape is known: the prefix, the offset,
/// perhaps `","prev":"` and an offset, `","data":`, the data, `}`.
pub fn split_envelope(frame: &str) -> Option<(&str, &str)> {
    let rest = frame.strip_prefix(ENVELOPE_PREFIX)?;
    let end = rest.find('"')?;
    let (offset, mut rest) = rest.split_at(end);
    if let Some(after) = rest.strip_prefix(PREV) {
        rest = &after[after.find('"')?..];
    }
    let data = rest.strip_prefix("\",\"data\":")?.strip_suffix('}')?;
    Some((offset, data))
}

/// A stream id `<ms>-<seq>` as two numbers (decimal digits only, as Redis
/// writes them: `u64::from_str` alone would take a `+`).
pub fn parse_offset(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((number(ms)?, number(seq)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_splits_into_its_offset_and_data() {
        assert_eq!(
            split_envelope(r#"{"type":"message","offset":"5-1","data":{"a":"}"}}"#),
            Some(("5-1", r#"{"a":"}"}"#))
        );
        assert_eq!(
            split_envelope(r#"{"type":"message","offset":"5-1","data":"x"}"#),
            Some(("5-1", r#""x""#))
        );
        let after = r#"{"type":"message","offset":"5-1","prev":"4-9","data":{"prev":"1-1"}}"#;
        assert_eq!(split_envelope(after), Some(("5-1", r#"{"prev":"1-1"}"#)));
        assert_eq!(offsets_of(after), Some(((5, 1), Some((4, 9)))));
        assert_eq!(
            offsets_of(r#"{"type":"message","offset":"5-1","data":{"prev":"1-1"}}"#),
            Some(((5, 1), None))
        );
        for other in [
            r#"{"type":"welcome"}"#,
            "plain",
            r#"{"type":"message","offset":"5-1"}"#,
        ] {
            assert_eq!(split_envelope(other), None, "{other}");
        }
    }

    #[test]
    fn the_library_gets_this_configurations_bounds() {
        let config = ReliableConfig {
            history_max_len: 42,
            history_ttl: Duration::from_secs(7),
            ..ReliableConfig::default()
        };
        let lua = library(&config, Keys::Standalone);
        assert!(lua.contains("local MAX_LEN = 42\n"), "{lua}");
        assert!(lua.contains("local PUBLISH = 'PUBLISH'\n"), "{lua}");
        let lua = library(&config, Keys::ClusterSharded);
        assert!(lua.contains("local PUBLISH = 'SPUBLISH'\n"), "{lua}");
        assert!(lua.contains("local TTL_MS = 7000\n"), "{lua}");
        assert!(lua.contains("local RENEW_MS = 70\n"), "{lua}");
        assert!(!lua.contains("__"), "a placeholder is left: {lua}");
    }

    #[test]
    fn the_library_and_the_key_schema_agree_on_names() {
        // The Lua derives a session's names from its history key, in
        // both layouts.
        for keys in [Keys::Standalone, Keys::ClusterSharded] {
            let history = keys.session_history("s1");
            let base = history.strip_suffix(":history").expect("suffix");
            assert_eq!(format!("{base}:epoch"), keys.session_epoch("s1"));
            assert_eq!(format!("{base}:live"), keys.session_live("s1"));
            assert_eq!(format!("{base}:down"), keys.session_down("s1"));
        }
        assert!(LIBRARY.contains("'^(session:[%w%-_%.]+):history$'"));
        assert!(LIBRARY.contains("'^(session:{[%w%-_%.]+}):history$'"));
        for suffix in ["):history$'", ".. ':epoch'", ".. ':live'", ".. ':down'"] {
            assert!(LIBRARY.contains(suffix), "{suffix} not in the Lua");
        }
        assert!(LIBRARY.contains(r#"'{"type":"message","offset":"' .. id"#));
        assert!(ENVELOPE_PREFIX.ends_with(r#""offset":""#));
    }

    #[test]
    fn offsets_are_read_from_envelopes_only() {
        assert_eq!(
            offsets_of(r#"{"type":"message","offset":"1700000000000-3","data":{"a":1}}"#),
            Some(((1_700_000_000_000, 3), None))
        );
        for other in [
            r#"{"type":"welcome","offset":"1-0"}"#,
            r#"{"type":"message","offset":"x-0","data":1}"#,
            r#"{"type":"message","offset":"1-0"#,
            "",
        ] {
            assert_eq!(offsets_of(other), None, "{other}");
        }
        assert_eq!(parse_offset("0-0"), Some((0, 0)));
        assert_eq!(parse_offset("12"), None);
        assert_eq!(parse_offset("99999999999999999999999-0"), None);
    }

    /// Found by the reliable_client fuzz target: `u64::from_str` takes a
    /// leading `+`, which no stream id (nor the library's own `parse`) has.
    #[test]
    fn offsets_are_decimal_digits_only() {
        for signed in ["+1-2", "1-+2", "+0-+0"] {
            assert_eq!(parse_offset(signed), None, "{signed}");
        }
        assert_eq!(parse_offset("01-002"), Some((1, 2)));
    }

    #[test]
    fn a_replay_with_a_message_that_is_not_utf8_json_is_refused_by_its_offset() {
        let frame = |data: &[u8]| {
            let mut f = format!("{ENVELOPE_PREFIX}1-{}\",\"data\":", data.len()).into_bytes();
            f.extend_from_slice(data);
            f.push(b'}');
            f
        };
        let good = [frame(b"{\"a\":\"\xc3\xa9\\n\"}"), frame(b"[1,2]")];
        let replay = replayable(good.clone().into_iter()).expect("replayable");
        assert_eq!(replay.len(), 2);
        for (bad, offset) in [
            (frame(b"\"\xff\xfe\""), "1-4"),
            (frame(b"\"a\x01b\""), "1-5"),
            (frame(b"{\"a\":"), "1-5"),
        ] {
            let all = [good[0].clone(), bad, good[1].clone()];
            assert_eq!(replayable(all.into_iter()).err().as_deref(), Some(offset));
        }
    }

    #[test]
    fn resume_failures_round_trip_their_names() {
        for f in [
            ResumeFailure::EpochChanged,
            ResumeFailure::Trimmed,
            ResumeFailure::Expired,
            ResumeFailure::UnknownOffset,
            ResumeFailure::Unreplayable,
        ] {
            assert_eq!(ResumeFailure::parse(f.as_str()), Some(f));
        }
        assert_eq!(ResumeFailure::parse("fresh"), None);
    }
}
