//! What the clients and their workers share: the connection state, handler
//! ids, the reconnect policy and the tunables (`Options`). `client`,
//! `worker` and `session` import this module; none of them imports the
//! others' types back, so they do not form a circle.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Where a client's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected and caught up: a [`WsClient`](crate::WsClient) is
    /// registered with every subscription confirmed; a
    /// [`SessionClient`](crate::SessionClient) has its welcome (reliable
    /// mode) and has sent again what was waiting.
    Connected,
    /// The connection was lost; the client is reconnecting (or has
    /// reconnected and is still restoring subscriptions).
    Reconnecting,
    /// Closed by `close()`, or reconnection gave up. Final.
    Closed,
}

/// Identifies a handler registered with [`WsClient::on_message`](crate::WsClient::on_message) or
/// [`WsClient::on_error`](crate::WsClient::on_error), for [`WsClient::remove_handler`](crate::WsClient::remove_handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(pub(crate) u64);

/// How the client retries after losing its connection.
///
/// The first attempt is immediate; then the delay doubles from
/// `initial_delay` up to `max_delay`, each randomized to between half and
/// all of its value so that many clients do not reconnect in lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the second attempt.
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
    /// Attempts before giving up and closing the client; `None` retries
    /// forever, `Some(0)` never reconnects. Attempts add up over connections
    /// that drop again within 10 s of being established, and so does the
    /// backoff: a server that accepts and immediately closes is not hammered.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    /// 100 ms doubling to 5 s, forever.
    fn default() -> Self {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// Never reconnect: a lost connection closes the client.
    pub fn never() -> Self {
        ReconnectPolicy {
            max_attempts: Some(0),
            ..Self::default()
        }
    }

    /// The pause before attempt number `attempt` (0-based).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let exponent = (attempt - 1).min(20);
        let full = self
            .initial_delay
            .saturating_mul(1 << exponent)
            .min(self.max_delay);
        full.mul_f64(0.5 + 0.5 * random_unit(u64::from(attempt)))
    }
}

/// A connection that lasted this long resets the reconnection backoff.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Tunables, with the defaults documented on [`ClientBuilder`] (and on
/// [`SessionBuilder`](crate::SessionBuilder) for the session client).
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_message_bytes: usize,
    pub reconnect: ReconnectPolicy,
    pub offline_queue: usize,
    pub command_queue: usize,
    pub event_queue: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(45),
            max_message_bytes: 1 << 20,
            reconnect: ReconnectPolicy::default(),
            offline_queue: 256,
            command_queue: 64,
            event_queue: 1024,
        }
    }
}

/// A number in [0, 1) that differs between calls (for backoff jitter).
fn random_unit(salt: u64) -> f64 {
    (random_u64(salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// 64 bits that differ between calls and between processes: `RandomState`
/// is keyed from the OS's randomness once per thread and changes its keys
/// with every instance. Not for secrets; for jitter and id prefixes.
pub(crate) fn random_u64(salt: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one((salt, nanos, std::process::id()))
}
