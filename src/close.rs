//! The one table of WebSocket close codes wsproxy sends (RFC 6455 section
//! 7.4.1), for the session and pub/sub driver and the proxy's tunnel alike.

/// The server is shutting down (or the proxy cut a client off: to the
/// backend, its client went away).
pub const GOING_AWAY: u16 = 1001;
/// The client broke the protocol (an unmasked frame, reserved bits, a bad
/// control frame, fragments out of order...).
pub const PROTOCOL: u16 = 1002;
/// Data that is not what it claims: text that is not UTF-8, compressed
/// data that does not inflate.
pub const INVALID_DATA: u16 = 1007;
/// Policy: a slow consumer, an expired token, a client over its rate.
pub const POLICY: u16 = 1008;
/// A message over the size limit.
pub const TOO_BIG: u16 = 1009;
/// Unexpected condition: a heartbeat that went unanswered.
pub const INTERNAL: u16 = 1011;
/// Try again later: a reliable session whose messages stopped because
/// wsproxy lost Redis; reconnecting resumes it from history.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Never sent: what a disconnect event reports when the client left
/// without a close frame (RFC 6455 section 7.1.5).
pub const ABNORMAL: u16 = 1006;

/// How many closes [`Recent`] keeps.
pub const RECENT_CLOSES: usize = 64;

/// One close, as [`Recent`] keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Which job the connection did: `sessions`, `topics` or `proxy`.
    pub job: &'static str,
    /// Why it ended, as `wsproxy_disconnects_total` (or, for the proxy,
    /// `wsproxy_upstream_failures_total`) names it.
    pub reason: &'static str,
    /// The close code the client got or sent, when one is known.
    pub code: Option<u16>,
}

/// The process's last [`RECENT_CLOSES`] closes, for the status page: a
/// bounded ring, written once per closed connection (never per message)
/// under a lock held for a push, and read by the status page. Nothing is
/// allocated after the first lap: the labels are static.
#[derive(Debug, Default)]
pub struct Recent {
    ring: std::sync::Mutex<std::collections::VecDeque<Closed>>,
}

impl Recent {
    /// Notes a close; the oldest goes when the ring is full.
    pub fn record(&self, job: &'static str, reason: &'static str, code: Option<u16>) {
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let closed = Closed {
            at_unix_ms,
            job,
            reason,
            code,
        };
        // A panic while holding the lock leaves a valid ring.
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() >= RECENT_CLOSES {
            ring.pop_front();
        }
        ring.push_back(closed);
    }

    /// The closes kept, newest first.
    pub fn newest_first(&self) -> Vec<Closed> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keeps_the_last_closes_newest_first() {
        let recent = Recent::default();
        for i in 0..RECENT_CLOSES + 3 {
            let code = u16::try_from(i).expect("small");
            recent.record("sessions", "client", Some(code));
        }
        let kept = recent.newest_first();
        assert_eq!(kept.len(), RECENT_CLOSES);
        assert_eq!(
            kept[0].code,
            Some(u16::try_from(RECENT_CLOSES + 2).expect("small"))
        );
        assert_eq!(kept[RECENT_CLOSES - 1].code, Some(3));
        assert!(kept[0].at_unix_ms > 0);
    }
}
