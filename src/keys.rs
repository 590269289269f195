//! The Redis key schema: every key and channel name wsproxy reads or
//! writes, and the rule for the ids that go into them. Nothing else in the
//! crate spells a key: the names come from a [`Keys`] value, which knows
//! whether Redis is one server or a cluster.
//!
//! # Standalone (`REDIS_URL`)
//!
//! | Name | Kind | Who writes it |
//! |---|---|---|
//! | `session:<id>:auth` | string (the token), with a TTL | the backend (`SETEX`); wsproxy resets its TTL |
//! | `session:<id>:down` | channel | the backend publishes, wsproxy subscribes |
//! | `session:<id>:up` | channel | wsproxy publishes client messages |
//! | `pubsub:<session>:<topic>` | channel | topic pub/sub, both ways |
//! | `pubsub:anon:<session>:<topic>` | channel | topic pub/sub of anonymous clients when `JWT_SECRET` is set too |
//! | `session:<id>:history` | stream of down messages (field `d`), with a TTL | `wsproxy_publish` (or `_batch`); read on resume |
//! | `session:<id>:epoch` | hash (`epoch`, `trimmed`: the newest offset trimmed, `started`, and with classic cluster pub/sub `last`: the newest offset published), with the history's TTL | `wsproxy_publish` and `wsproxy_join` |
//! | `session:<id>:live` | channel of enveloped down messages | `wsproxy_publish`; reliable connections subscribe |
//! | `wsproxy:up:<n>` | stream of client messages of reliable sessions | wsproxy; backend workers read it with a consumer group |
//! | `wsproxy:up:<n>:seen:<session>:<id>` | string (the stream id), with a TTL | wsproxy, to store a resent message once |
//! | `wsproxy:events` | stream of lifecycle events (field `event`, JSON) | wsproxy; backend workers read it with a consumer group |
//! | `session:<id>:events` | channel of the session's lifecycle events | wsproxy, with `EVENTS_SESSION_CHANNEL` |
//! | `session:<id>:presence` | hash: connection id -> JSON | wsproxy, with `PRESENCE` |
//! | `wsproxy:processes` | sorted set: process -> last heartbeat (unix ms) | every process |
//! | `wsproxy:process:<p>` | string, the heartbeat, with a TTL of two intervals | process `p` |
//! | `wsproxy:process:<p>:connections` | hash of the connections `p` registered (JSON) | process `p`; emptied by whoever reaps it |
//! | `wsproxy:control:log` | stream of commands for every process (field `c`, JSON), the newest ~100,000 | backends, with `FCALL wsproxy_control` |
//! | `wsproxy:control` | channel: a wake-up (the new entry's id) for every process; a command itself in the old, deprecated form | `wsproxy_control`; backends (deprecated) |
//!
//! # Redis Cluster (`REDIS_CLUSTER_NODES`)
//!
//! The same names, with a hash tag (the part in braces, which alone
//! decides a key's slot) around the session id, the topic's session and
//! the up-stream shard, so that every key and channel of one session lives
//! in one slot, and a stream with its seen-keys in another:
//!
//! | Name |
//! |---|
//! | `session:{<id>}:auth`, `session:{<id>}:down`, `session:{<id>}:up` |
//! | `session:{<id>}:history`, `session:{<id>}:epoch`, `session:{<id>}:live` |
//! | `pubsub:{<session>}:<topic>`, `pubsub:anon:{<session>}:<topic>` |
//! | `wsproxy:up:{<n>}`, `wsproxy:up:{<n>}:seen:<session>:<id>` |
//! | `session:{<id>}:presence`, `session:{<id>}:events` |
//! | `wsproxy:process:{<p>}`, `wsproxy:process:{<p>}:connections` |
//! | `{wsproxy:control}:log` (in the slot of the channel `wsproxy:control`) |
//!
//! (`wsproxy:events`, `wsproxy:processes` and `wsproxy:control` keep their
//! names: each is one key or channel in its own slot. The control stream's
//! tag is the channel's whole name, so `wsproxy_control` can append to the
//! one and publish on the other in one call, sharded pub/sub included.)
//!
//! Three names exist on a cluster only, where closing a connection takes
//! several commands in different slots (see `session::lifecycle`):
//!
//! | Name | Kind | Who writes it |
//! |---|---|---|
//! | `wsproxy:process:{<p>}:closing` | hash of `p`'s connections taken out of `:connections` whose presence entry and disconnect event are not confirmed yet (JSON) | `p` or a reaper; each entry deleted once done |
//! | `wsproxy:process:{<p>}:claims` | sorted set: connection -> when its `:closing` entry was last taken (unix ms; 0: free for the next try) | the same |
//! | `{wsproxy:events}:sent:<connection>` | string: the connection's disconnect event is in `wsproxy:events` (the stream's slot, so one script checks it and appends), with a TTL of four dead-after times | whoever writes the event |
//!
//! Ids never hold braces ([`valid_id`]), so the tag is exactly the id. A
//! backend on a cluster uses these names: `SETEX session:{42}:auth ...`,
//! `SPUBLISH session:{42}:down ...` (sharded pub/sub, the default) or
//! `PUBLISH` (`REDIS_CLUSTER_PUBSUB=classic`), `FCALL wsproxy_publish 1
//! session:{42}:history ...`.
//!
//! The `wsproxy_*` Redis Functions (see [`crate::session::history`]) derive a
//! session's other names from its `:history` key, in either form, so the
//! suffixes here and in the library's Lua source must agree (a test checks
//! they do).

/// Longest id (agent, session, topic) accepted.
pub const MAX_ID_LEN: usize = 128;

/// What every name of a session begins with.
const SESSION: &str = "session:";
/// The suffixes of a session's channels a process subscribes to: down,
/// live and events (as [`Keys::session_down`], [`Keys::session_live`] and
/// [`Keys::session_events`] spell them).
pub const SESSION_CHANNELS: [&str; 3] = [":down", ":live", ":events"];

/// Writes `session:<id><suffix>` into `name` (cleared first), `id` as a
/// name already spells it (tagged on a cluster): a session's channels,
/// looked up without allocating once `name` has grown.
pub fn write_session_name(name: &mut String, spelled_id: &str, suffix: &str) {
    name.clear();
    name.push_str(SESSION);
    name.push_str(spelled_id);
    name.push_str(suffix);
}

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

/// Which names a Redis deployment uses, and how its channels are
/// published: see the module's tables. Cheap to copy; the configuration
/// gives it ([`crate::config::Config::keys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keys {
    /// One Redis server: names without hash tags, classic pub/sub.
    #[default]
    Standalone,
    /// A Redis Cluster with classic pub/sub (`PUBLISH`/`SUBSCRIBE`, every
    /// message broadcast to every node).
    ClusterClassic,
    /// A Redis Cluster with sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`,
    /// Redis 7): a channel lives in its slot's shard.
    ClusterSharded,
}

impl Keys {
    /// True on a Redis Cluster (names carry hash tags).
    pub fn is_cluster(self) -> bool {
        !matches!(self, Self::Standalone)
    }

    /// True when channels are sharded (`SPUBLISH`/`SSUBSCRIBE`).
    pub fn is_sharded(self) -> bool {
        matches!(self, Self::ClusterSharded)
    }

    /// The command that publishes on a channel: `PUBLISH` or `SPUBLISH`.
    pub fn publish_command(self) -> &'static str {
        if self.is_sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// `id` as it goes into a name: itself, or (cluster) as a hash tag.
    fn tag(self, id: &str) -> std::borrow::Cow<'_, str> {
        if self.is_cluster() {
            format!("{{{id}}}").into()
        } else {
            id.into()
        }
    }

    /// `<prefix><id><suffix>`, the id tagged on a cluster: one allocation
    /// of the exact length (a `format!` grows its string as it goes, and
    /// these are made on every connect).
    fn name(self, prefix: &str, id: &str, suffix: &str) -> String {
        let braces = if self.is_cluster() { 2 } else { 0 };
        let mut name = String::with_capacity(prefix.len() + braces + id.len() + suffix.len());
        name.push_str(prefix);
        if self.is_cluster() {
            name.push('{');
            name.push_str(id);
            name.push('}');
        } else {
            name.push_str(id);
        }
        name.push_str(suffix);
        name
    }

    /// The key holding a session's token.
    pub fn session_auth(self, session_id: &str) -> String {
        self.name(SESSION, session_id, ":auth")
    }

    /// The channel a session's backend publishes on.
    pub fn session_down(self, session_id: &str) -> String {
        self.name(SESSION, session_id, SESSION_CHANNELS[0])
    }

    /// The channel a session's client messages are published on.
    pub fn session_up(self, session_id: &str) -> String {
        self.name(SESSION, session_id, ":up")
    }

    /// The stream of a session's replayable down messages.
    pub fn session_history(self, session_id: &str) -> String {
        self.name(SESSION, session_id, ":history")
    }

    /// The key holding a session history's epoch.
    pub fn session_epoch(self, session_id: &str) -> String {
        self.name(SESSION, session_id, ":epoch")
    }

    /// The channel of a session's enveloped (replayable) down messages.
    pub fn session_live(self, session_id: &str) -> String {
        self.name(SESSION, session_id, SESSION_CHANNELS[1])
    }

    /// The channel of a session's lifecycle events.
    pub fn session_events(self, session_id: &str) -> String {
        self.name(SESSION, session_id, SESSION_CHANNELS[2])
    }

    /// The hash of a session's open connections.
    pub fn session_presence(self, session_id: &str) -> String {
        self.name(SESSION, session_id, ":presence")
    }

    /// A process's heartbeat key.
    pub fn process_heartbeat(self, process: &str) -> String {
        self.name("wsproxy:process:", process, "")
    }

    /// The hash of the connections a process registered.
    pub fn process_connections(self, process: &str) -> String {
        self.name("wsproxy:process:", process, ":connections")
    }

    /// (Cluster) The hash of a process's connections being closed: taken
    /// out of [`Keys::process_connections`], presence entry and event not
    /// confirmed yet.
    pub fn process_closing(self, process: &str) -> String {
        self.name("wsproxy:process:", process, ":closing")
    }

    /// (Cluster) When each entry of [`Keys::process_closing`] was taken.
    pub fn process_claims(self, process: &str) -> String {
        self.name("wsproxy:process:", process, ":claims")
    }

    /// (Cluster) The marker that connection `connection_id`'s disconnect
    /// event is in [`EVENTS`]: in the stream's slot.
    pub fn event_sent(self, connection_id: &str) -> String {
        if self.is_cluster() {
            format!("{{{EVENTS}}}:sent:{connection_id}")
        } else {
            format!("{EVENTS}:sent:{connection_id}")
        }
    }

    /// The stream of client messages in shard `shard`.
    pub fn up_stream(self, shard: usize) -> String {
        format!("wsproxy:up:{}", self.tag(&shard.to_string()))
    }

    /// The key remembering that client message `id` of `session` was
    /// stored; in the same slot as its stream.
    pub fn up_seen(self, shard: usize, session_id: &str, id: &str) -> String {
        format!("{}:seen:{session_id}:{id}", self.up_stream(shard))
    }

    /// The stream of control commands, in the slot of the [`CONTROL`]
    /// channel.
    pub fn control_log(self) -> &'static str {
        if self.is_cluster() {
            "{wsproxy:control}:log"
        } else {
            "wsproxy:control:log"
        }
    }

    /// The channel of a topic in a session.
    pub fn topic(self, session: &str, topic: &str) -> String {
        format!("pubsub:{}:{topic}", self.tag(session))
    }

    /// The channel of a topic in a session of anonymous `/ws` clients on a
    /// server that also takes tokens (`JWT_SECRET`): a namespace of their
    /// own, so that they never share a session with token holders. It
    /// cannot be a [`Keys::topic`]: ids hold no `:`, so that name has two
    /// after `pubsub`, this one three.
    pub fn anonymous_topic(self, session: &str, topic: &str) -> String {
        format!("pubsub:anon:{}:{topic}", self.tag(session))
    }
}

/// What a pub/sub channel is for, as the status page counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind<'a> {
    /// One of a session's channels (down, live, events); the session's id
    /// as the name spells it (a hash tag on a cluster).
    Session(&'a str),
    /// A topic of `/ws` clients.
    Topic,
    /// Anything else (`wsproxy:control`).
    Other,
}

/// What `channel` is for (the inverse of the names above).
pub fn channel_kind(channel: &str) -> ChannelKind<'_> {
    if let Some(rest) = channel.strip_prefix("session:")
        && let Some((id, _)) = rest.rsplit_once(':')
    {
        ChannelKind::Session(id)
    } else if channel.starts_with("pubsub:") {
        ChannelKind::Topic
    } else {
        ChannelKind::Other
    }
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

/// The channel every process is woken on when a command is in
/// [`Keys::control_log`] (and takes commands in the old form on).
pub const CONTROL: &str = "wsproxy:control";

/// The sorted set of live processes by last heartbeat.
pub const PROCESSES: &str = "wsproxy:processes";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_schema() {
        let k = Keys::Standalone;
        assert_eq!(k.session_auth("s1"), "session:s1:auth");
        assert_eq!(k.session_down("s1"), "session:s1:down");
        assert_eq!(k.session_up("s1"), "session:s1:up");
        assert_eq!(k.topic("s1", "t"), "pubsub:s1:t");
        assert_eq!(k.anonymous_topic("s1", "t"), "pubsub:anon:s1:t");
        // Ids hold no ':', so no session and topic of a token holder name
        // an anonymous channel: two ':' against three.
        assert_eq!(k.topic("anon", "t").matches(':').count(), 2);
        assert_eq!(k.anonymous_topic("anon", "t").matches(':').count(), 3);
        assert_eq!(k.session_history("s1"), "session:s1:history");
        assert_eq!(k.session_epoch("s1"), "session:s1:epoch");
        assert_eq!(k.session_live("s1"), "session:s1:live");
        assert_eq!(k.up_stream(3), "wsproxy:up:3");
        assert_eq!(k.up_seen(3, "s1", "m-1"), "wsproxy:up:3:seen:s1:m-1");
        assert_eq!(k.publish_command(), "PUBLISH");
        assert_eq!(k.control_log(), "wsproxy:control:log");
        assert_eq!(k.session_events("s1"), "session:s1:events");
        assert_eq!(k.session_presence("s1"), "session:s1:presence");
        assert_eq!(k.process_heartbeat("p1"), "wsproxy:process:p1");
        assert_eq!(
            k.process_connections("p1"),
            "wsproxy:process:p1:connections"
        );
    }

    #[test]
    fn written_session_names_are_the_channels_names() {
        let mut name = String::from("left over");
        for k in [Keys::Standalone, Keys::ClusterSharded] {
            let spelled = if k.is_cluster() { "{s1}" } else { "s1" };
            let channels = [
                k.session_down("s1"),
                k.session_live("s1"),
                k.session_events("s1"),
            ];
            for (suffix, channel) in SESSION_CHANNELS.iter().zip(channels) {
                write_session_name(&mut name, spelled, suffix);
                assert_eq!(name, channel);
            }
        }
    }

    #[test]
    fn cluster_names_tag_the_session_and_the_shard() {
        for k in [Keys::ClusterClassic, Keys::ClusterSharded] {
            assert_eq!(k.session_auth("s1"), "session:{s1}:auth");
            assert_eq!(k.session_down("s1"), "session:{s1}:down");
            assert_eq!(k.session_up("s1"), "session:{s1}:up");
            assert_eq!(k.topic("s1", "t"), "pubsub:{s1}:t");
            assert_eq!(k.anonymous_topic("s1", "t"), "pubsub:anon:{s1}:t");
            assert_eq!(k.session_history("s1"), "session:{s1}:history");
            assert_eq!(k.session_epoch("s1"), "session:{s1}:epoch");
            assert_eq!(k.session_live("s1"), "session:{s1}:live");
            assert_eq!(k.up_stream(3), "wsproxy:up:{3}");
            assert_eq!(k.up_seen(3, "s1", "m-1"), "wsproxy:up:{3}:seen:s1:m-1");
            assert_eq!(k.control_log(), "{wsproxy:control}:log");
            assert_eq!(k.event_sent("p1:7"), "{wsproxy:events}:sent:p1:7");
            assert_eq!(k.process_closing("p1"), "wsproxy:process:{p1}:closing");
            assert_eq!(k.process_claims("p1"), "wsproxy:process:{p1}:claims");
        }
        assert_eq!(Keys::ClusterClassic.publish_command(), "PUBLISH");
        assert_eq!(Keys::ClusterSharded.publish_command(), "SPUBLISH");
    }

    #[test]
    fn a_sessions_names_share_one_slot_and_a_stream_its_seen_keys() {
        let get_slot = |name: &str| redis::cluster_routing::Slot::for_key(name.as_bytes());
        let k = Keys::ClusterSharded;
        for id in ["s1", "session-user.123_x", "a"] {
            let slot = get_slot(&k.session_auth(id));
            for name in [
                k.session_down(id),
                k.session_up(id),
                k.session_history(id),
                k.session_epoch(id),
                k.session_live(id),
                k.topic(id, "news"),
                k.anonymous_topic(id, "news"),
            ] {
                assert_eq!(get_slot(&name), slot, "{name}");
            }
        }
        // The control stream and its wake-up channel: one slot.
        assert_eq!(get_slot(k.control_log()), get_slot(CONTROL));
        // The events stream and its markers: one slot; a process's keys:
        // one slot.
        assert_eq!(get_slot(&k.event_sent("p1:7")), get_slot(EVENTS));
        let process = get_slot(&k.process_heartbeat("p1"));
        for name in [
            k.process_connections("p1"),
            k.process_closing("p1"),
            k.process_claims("p1"),
        ] {
            assert_eq!(get_slot(&name), process, "{name}");
        }
        for shard in [0, 1, 7, 1023] {
            let slot = get_slot(&k.up_stream(shard));
            let seen = k.up_seen(shard, "s1", "m-1");
            assert_eq!(get_slot(&seen), slot, "{seen}");
        }
        // Sessions spread over the slots.
        let slots: std::collections::HashSet<_> = (0..50)
            .map(|i| get_slot(&k.session_down(&format!("s{i}"))))
            .collect();
        assert!(slots.len() > 40, "{}", slots.len());
    }

    #[test]
    fn channel_kind_reads_back_the_names_above() {
        for k in [Keys::Standalone, Keys::ClusterSharded] {
            let id = k.tag("s-1").into_owned();
            for name in [
                k.session_down("s-1"),
                k.session_live("s-1"),
                k.session_events("s-1"),
            ] {
                assert_eq!(channel_kind(&name), ChannelKind::Session(&id), "{name}");
            }
            assert_eq!(channel_kind(&k.topic("s-1", "news")), ChannelKind::Topic);
            assert_eq!(
                channel_kind(&k.anonymous_topic("s-1", "news")),
                ChannelKind::Topic
            );
        }
        assert_eq!(channel_kind(CONTROL), ChannelKind::Other);
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
