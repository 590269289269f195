//! What session and topic connections may do: topic pub/sub, reliable
//! sessions, and the lifecycle events and presence backends learn through
//! Redis.

use std::time::Duration;

use super::parse::{boolean, number, seconds};
use super::{Cli, ConfigError};

/// Topic pub/sub settings (`GET /ws`).
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    /// Accept `/ws` connections without a token.
    pub allow_anonymous: bool,
    /// Most topics one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Largest `payload` of a published message, in bytes.
    pub max_payload_bytes: usize,
}

/// Reliable sessions (see [`crate::session::history`] and [`crate::session::reliable`]).
#[derive(Debug, Clone)]
pub struct ReliableConfig {
    /// Offer the `wsproxy.v1` subprotocol on session connections.
    pub enabled: bool,
    /// Entries a session's history keeps at least (trimmed approximately).
    pub history_max_len: usize,
    /// How long a session's history outlives its last publish or connect.
    pub history_ttl: Duration,
    /// Streams client messages are spread over (`wsproxy:up:{n}`).
    pub up_shards: usize,
    /// Entries each client-message stream keeps at least.
    pub up_max_len: usize,
    /// How long a client message id is remembered, so a resend is stored
    /// once.
    pub dedupe_window: Duration,
}

impl Default for ReliableConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            history_max_len: 1000,
            history_ttl: Duration::from_secs(600),
            up_shards: 1,
            up_max_len: 100_000,
            dedupe_window: Duration::from_secs(300),
        }
    }
}

/// What backends learn through Redis (see [`crate::session::lifecycle`]).
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Append connect, resume and disconnect events to `wsproxy:events`.
    pub events: bool,
    /// Entries the events stream keeps at least (trimmed approximately).
    pub events_max_len: usize,
    /// Also publish each event on the session's own events channel.
    pub session_channel: bool,
    /// Query parameters of the upgrade request copied into connect events.
    pub query_params: Vec<String>,
    /// Keep each session's presence hash.
    pub presence: bool,
    /// How often a process renews its heartbeat (and looks for dead ones).
    pub heartbeat: Duration,
    /// How long a process may go without a heartbeat before it counts as
    /// dead (`PROCESS_DEAD_AFTER_SECS`); `None`: the default, see
    /// [`LifecycleConfig::dead_after`].
    pub dead_after: Option<Duration>,
}

/// The default of `PROCESS_DEAD_AFTER_SECS` on a Redis Cluster: above a
/// failover at Redis's default `cluster-node-timeout` of 15 s (the replica
/// takes over 15-20 s after its master died), so a shard that fails over
/// is not taken for the death of the processes registered on it.
pub const CLUSTER_DEAD_AFTER: Duration = Duration::from_secs(30);

impl LifecycleConfig {
    /// True when connections are registered with Redis at all.
    pub fn tracked(&self) -> bool {
        self.events || self.presence
    }

    /// How long a process may be silent before it counts as dead: its
    /// heartbeat key lives that long, other processes reap it after that,
    /// and a process whose last confirmed beat is older closes its
    /// connections to register again. Set, or by default two heartbeats on
    /// one Redis and 30 s (`CLUSTER_DEAD_AFTER`, at least two heartbeats) on a
    /// cluster.
    pub fn dead_after(&self, cluster: bool) -> Duration {
        let two_beats = self.heartbeat.saturating_mul(2);
        match self.dead_after {
            Some(d) => d,
            None if cluster => CLUSTER_DEAD_AFTER.max(two_beats),
            None => two_beats,
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            events: false,
            events_max_len: 100_000,
            session_channel: false,
            query_params: Vec::new(),
            presence: false,
            heartbeat: Duration::from_secs(5),
            dead_after: None,
        }
    }
}

/// Query parameters that never go into an event: the token, and the
/// position of a resume (the event says whether it resumed).
const PRIVATE_QUERY_PARAMS: [&str; 3] = ["access_token", "epoch", "offset"];

impl Cli {
    /// The topic pub/sub settings.
    pub(super) fn pubsub(&self) -> Result<PubSubConfig, ConfigError> {
        Ok(PubSubConfig {
            allow_anonymous: boolean("PUBSUB_ALLOW_ANONYMOUS", &self.pubsub_allow_anonymous)?,
            max_subscriptions: number(
                "PUBSUB_MAX_SUBSCRIPTIONS",
                &self.pubsub_max_subscriptions,
                1..=100_000,
            )?,
            max_payload_bytes: number(
                "PUBSUB_MAX_PAYLOAD_BYTES",
                &self.pubsub_max_payload_bytes,
                1..=(16 << 20),
            )?,
        })
    }

    /// The reliable-session settings.
    pub(super) fn reliable(&self) -> Result<ReliableConfig, ConfigError> {
        Ok(ReliableConfig {
            enabled: boolean("RELIABLE_SESSIONS", &self.reliable_sessions)?,
            history_max_len: number("HISTORY_MAX_LEN", &self.history_max_len, 1..=1_000_000)?,
            history_ttl: seconds("HISTORY_TTL_SECS", &self.history_ttl_secs, 1..=2_592_000)?,
            up_shards: number("UP_STREAM_SHARDS", &self.up_stream_shards, 1..=1024)?,
            up_max_len: number(
                "UP_STREAM_MAX_LEN",
                &self.up_stream_max_len,
                1..=100_000_000,
            )?,
            dedupe_window: seconds("UP_DEDUPE_SECS", &self.up_dedupe_secs, 1..=86_400)?,
        })
    }

    /// Lifecycle events, presence and heartbeats.
    pub(super) fn lifecycle(&self) -> Result<LifecycleConfig, ConfigError> {
        let mut query_params = Vec::new();
        for name in self.events_query_params.split(',').map(str::trim) {
            if name.is_empty() {
                continue;
            }
            if PRIVATE_QUERY_PARAMS.contains(&name) {
                return Err(ConfigError::new(
                    "EVENTS_QUERY_PARAMS",
                    format!("{name:?} is never copied into events (it is a token or a position)"),
                ));
            }
            if name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    "EVENTS_QUERY_PARAMS",
                    format!("{name:?} is not a query parameter name (1-64 printable characters)"),
                ));
            }
            query_params.push(name.to_owned());
        }
        let heartbeat = seconds(
            "PROCESS_HEARTBEAT_SECS",
            &self.process_heartbeat_secs,
            1..=3600,
        )?;
        let dead_after = match self.process_dead_after_secs.trim() {
            "" => None,
            _ => {
                let d = seconds(
                    "PROCESS_DEAD_AFTER_SECS",
                    &self.process_dead_after_secs,
                    2..=86_400,
                )?;
                if d < heartbeat.saturating_mul(2) {
                    return Err(ConfigError::new(
                        "PROCESS_DEAD_AFTER_SECS",
                        format!(
                            "{}s is less than two heartbeats (PROCESS_HEARTBEAT_SECS={}): a live process would be taken for dead",
                            d.as_secs(),
                            heartbeat.as_secs()
                        ),
                    ));
                }
                Some(d)
            }
        };
        Ok(LifecycleConfig {
            events: boolean("LIFECYCLE_EVENTS", &self.lifecycle_events)?,
            events_max_len: number("EVENTS_MAX_LEN", &self.events_max_len, 1..=100_000_000)?,
            session_channel: boolean("EVENTS_SESSION_CHANNEL", &self.events_session_channel)?,
            query_params,
            presence: boolean("PRESENCE", &self.presence)?,
            heartbeat,
            dead_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::parse;

    #[test]
    fn lifecycle_settings_are_validated() {
        let c = parse(&[
            "--lifecycle-events",
            "true",
            "--events-query-params",
            "lang, plan",
        ])
        .expect("valid");
        assert!(c.lifecycle.events && !c.lifecycle.presence && c.lifecycle.tracked());
        assert_eq!(c.lifecycle.query_params, ["lang", "plan"]);
        // The default: two heartbeats on one Redis, 30 s on a cluster.
        assert_eq!(c.lifecycle.dead_after(false), Duration::from_secs(10));
        assert_eq!(c.lifecycle.dead_after(true), Duration::from_secs(30));
        let c = parse(&["--process-heartbeat-secs", "20"]).expect("valid");
        assert_eq!(c.lifecycle.dead_after(true), Duration::from_secs(40));
        let c = parse(&["--process-dead-after-secs", "12"]).expect("valid");
        assert_eq!(c.lifecycle.dead_after(false), Duration::from_secs(12));
        assert_eq!(c.lifecycle.dead_after(true), Duration::from_secs(12));
        for (flag, value, var) in [
            (
                "--events-query-params",
                "lang,access_token",
                "EVENTS_QUERY_PARAMS",
            ),
            ("--events-query-params", "a b", "EVENTS_QUERY_PARAMS"),
            ("--presence", "maybe", "PRESENCE"),
            ("--process-heartbeat-secs", "0", "PROCESS_HEARTBEAT_SECS"),
            ("--process-dead-after-secs", "9", "PROCESS_DEAD_AFTER_SECS"),
            (
                "--process-dead-after-secs",
                "ten",
                "PROCESS_DEAD_AFTER_SECS",
            ),
            ("--events-max-len", "0", "EVENTS_MAX_LEN"),
        ] {
            let e = parse(&[flag, value]).expect_err(value);
            assert_eq!(e.var, var, "{e}");
        }
    }
}
