//! The Redis key schema: every key and channel name wsproxy reads or
//! writes, and the rule for the ids that go into them. Nothing else in the
//! crate spells a key, so a new layout (Redis Cluster hash tags, say) is a
//! change to this file alone.
//!
//! | Name | Kind | Who writes it |
//! |---|---|---|
//! | `session:{id}:auth` | string (the token), with a TTL | the backend (`SETEX`); wsproxy resets its TTL |
//! | `session:{id}:down` | channel | the backend publishes, wsproxy subscribes |
//! | `session:{id}:up` | channel | wsproxy publishes client messages |
//! | `pubsub:{session}:{topic}` | channel | topic pub/sub, both ways |
//! | `session:{id}:history` | stream of down messages (field `d`), with a TTL | `wsproxy_publish`; read on resume |
//! | `session:{id}:epoch` | hash (`epoch`, `trimmed`: the newest offset trimmed), with the history's TTL | `wsproxy_publish` and `wsproxy_join` |
//! | `session:{id}:live` | channel of enveloped down messages | `wsproxy_publish`; reliable connections subscribe |
//! | `wsproxy:up:{n}` | stream of client messages of reliable sessions | wsproxy; backend workers read it with a consumer group |
//! | `wsproxy:up:{n}:seen:{session}:{id}` | string (the stream id), with a TTL | wsproxy, to store a resent message once |
//! | `wsproxy:events` | stream of lifecycle events (field `event`, JSON) | wsproxy; backend workers read it with a consumer group |
//! | `session:{id}:events` | channel of the session's lifecycle events | wsproxy, with `EVENTS_SESSION_CHANNEL` |
//! | `session:{id}:presence` | hash: connection id -> JSON | wsproxy, with `PRESENCE` |
//! | `wsproxy:processes` | sorted set: process -> last heartbeat (unix ms) | every process |
//! | `wsproxy:process:{p}` | string, the heartbeat, with a TTL of two intervals | process `p` |
//! | `wsproxy:process:{p}:connections` | set of the connections `p` registered (JSON) | process `p`; emptied by whoever reaps it |
//! | `wsproxy:control` | channel of commands for every process | backends |
//!
//! The `wsproxy_*` Redis Functions (see [`crate::history`]) derive a
//! session's other names from its `:history` key, so the suffixes here and
//! in the library's Lua source must agree (a test checks they do).

/// Longest id (agent, session, topic) accepted.
pub const MAX_ID_LEN: usize = 128;

/// True for an id that can go into a key or channel name unchanged: 1 to
/// [`MAX_ID_LEN`] ASCII letters, digits, `-`, `_` or `.`. Everything else,
/// notably `:` (the separator), glob characters (`*?[]`), `{}` (cluster
/// hash tags) and whitespace, could change which key or channel is named.
pub fn valid_id(id: &str) -> bool {
    first_invalid(id).is_none() && !id.is_empty() && id.len() <= MAX_ID_LEN
}

/// The first character [`valid_id`] does not allow, if any.
pub fn first_invalid(id: &str) -> Option<char> {
    id.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// The key holding a session's token.
pub fn session_auth(session_id: &str) -> String {
    format!("session:{session_id}:auth")
}

/// The channel a session's backend publishes on.
pub fn session_down(session_id: &str) -> String {
    format!("session:{session_id}:down")
}

/// The channel a session's client messages are published on.
pub fn session_up(session_id: &str) -> String {
    format!("session:{session_id}:up")
}

/// The stream of a session's replayable down messages.
pub fn session_history(session_id: &str) -> String {
    format!("session:{session_id}:history")
}

/// The key holding a session history's epoch.
pub fn session_epoch(session_id: &str) -> String {
    format!("session:{session_id}:epoch")
}

/// The channel of a session's enveloped (replayable) down messages.
pub fn session_live(session_id: &str) -> String {
    format!("session:{session_id}:live")
}

/// The stream of client messages in shard `shard`.
pub fn up_stream(shard: usize) -> String {
    format!("wsproxy:up:{shard}")
}

/// The key remembering that client message `id` of `session` was stored.
pub fn up_seen(shard: usize, session_id: &str, id: &str) -> String {
    format!("wsproxy:up:{shard}:seen:{session_id}:{id}")
}

/// The shard of `session`'s client messages: FNV-1a of the id, so every
/// process (and a backend that wants to know) picks the same one.
pub fn up_shard(session_id: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // `shards` is at least 1 (the configuration's range).
    (hash % shards.max(1) as u64) as usize
}

/// The stream of lifecycle events.
pub const EVENTS: &str = "wsproxy:events";

/// The channel every process takes commands on.
pub const CONTROL: &str = "wsproxy:control";

/// The sorted set of live processes by last heartbeat.
pub const PROCESSES: &str = "wsproxy:processes";

/// The channel of a session's lifecycle events.
pub fn session_events(session_id: &str) -> String {
    format!("session:{session_id}:events")
}

/// The hash of a session's open connections.
pub fn session_presence(session_id: &str) -> String {
    format!("session:{session_id}:presence")
}

/// A process's heartbeat key.
pub fn process_heartbeat(process: &str) -> String {
    format!("wsproxy:process:{process}")
}

/// The set of the connections a process registered.
pub fn process_connections(process: &str) -> String {
    format!("wsproxy:process:{process}:connections")
}

/// The channel of a topic in a session.
pub fn topic(session: &str, topic: &str) -> String {
    format!("pubsub:{session}:{topic}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_schema() {
        assert_eq!(session_auth("s1"), "session:s1:auth");
        assert_eq!(session_down("s1"), "session:s1:down");
        assert_eq!(session_up("s1"), "session:s1:up");
        assert_eq!(topic("s1", "t"), "pubsub:s1:t");
        assert_eq!(session_history("s1"), "session:s1:history");
        assert_eq!(session_epoch("s1"), "session:s1:epoch");
        assert_eq!(session_live("s1"), "session:s1:live");
        assert_eq!(up_stream(3), "wsproxy:up:3");
        assert_eq!(up_seen(3, "s1", "m-1"), "wsproxy:up:3:seen:s1:m-1");
        assert_eq!(session_events("s1"), "session:s1:events");
        assert_eq!(session_presence("s1"), "session:s1:presence");
        assert_eq!(process_heartbeat("p1"), "wsproxy:process:p1");
        assert_eq!(process_connections("p1"), "wsproxy:process:p1:connections");
    }

    #[test]
    fn a_session_keeps_its_shard() {
        assert_eq!(up_shard("anything", 1), 0);
        let spread: std::collections::HashSet<usize> =
            (0..200).map(|i| up_shard(&format!("s{i}"), 4)).collect();
        assert_eq!(spread.len(), 4, "200 sessions use all 4 shards");
        assert_eq!(up_shard("s7", 4), up_shard("s7", 4));
        assert!(up_shard("s7", 4) < 4);
    }

    #[test]
    fn only_ids_that_cannot_change_a_name_are_valid() {
        for bad in [
            "", "a:b", "a*", "a?", "a[b]", "a b", "ä", "a/b", "a{b}", "a|b",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(!valid_id(&"x".repeat(MAX_ID_LEN + 1)));
        for good in ["s", "session-user.123_x", &"x".repeat(MAX_ID_LEN)] {
            assert!(valid_id(good), "{good:?}");
        }
        assert_eq!(first_invalid("a:b"), Some(':'));
    }
}
