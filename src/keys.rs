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
