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

/// Reliable sessions (see [`crate::history`] and [`crate::reliable`]).
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

/// What backends learn through Redis (see [`crate::lifecycle`]).
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
}

impl LifecycleConfig {
    /// True when connections are registered with Redis at all.
    pub fn tracked(&self) -> bool {
        self.events || self.presence
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
        Ok(LifecycleConfig {
            events: boolean("LIFECYCLE_EVENTS", &self.lifecycle_events)?,
            events_max_len: number("EVENTS_MAX_LEN", &self.events_max_len, 1..=100_000_000)?,
            session_channel: boolean("EVENTS_SESSION_CHANNEL", &self.events_session_channel)?,
            query_params,
            presence: boolean("PRESENCE", &self.presence)?,
            heartbeat: seconds(
                "PROCESS_HEARTBEAT_SECS",
                &self.process_heartbeat_secs,
                1..=3600,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
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
        for (flag, value, var) in [
            (
                "--events-query-params",
                "lang,access_token",
                "EVENTS_QUERY_PARAMS",
            ),
            ("--events-query-params", "a b", "EVENTS_QUERY_PARAMS"),
            ("--presence", "maybe", "PRESENCE"),
            ("--process-heartbeat-secs", "0", "PROCESS_HEARTBEAT_SECS"),
            ("--events-max-len", "0", "EVENTS_MAX_LEN"),
        ] {
            let e = parse(&[flag, value]).expect_err(value);
            assert_eq!(e.var, var, "{e}");
        }
    }
}
