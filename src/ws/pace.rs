//! How fast a connection's messages are read (`WS_CLIENT_MESSAGE_RATE`
//! after a burst of `WS_CLIENT_MESSAGE_BURST`).
//!
//! A client that sends faster is not refused or cut: its next frame is
//! simply not read until its turn, so TCP's flow control slows the client
//! down and nothing it sent is lost. While a read is held the connection
//! goes on delivering, pinging and noticing shutdown; the pong that
//! answers a ping waits behind the held frames, at most one interval.
//!
//! The arithmetic is the generic cell rate algorithm: one instant per
//! connection (when the steady rate would have read everything read so
//! far), no counters and no refills.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

use crate::config::Pace;

/// A connection's place against its pace.
#[derive(Default)]
pub(super) struct Throttle {
    /// When the steady rate would have read every message read so far;
    /// `None` before the first.
    due: Option<Instant>,
    /// What a held read waits on: made the first time a read is held and
    /// kept, so a client that stays fast costs no allocation per message.
    timer: Option<Pin<Box<Sleep>>>,
    /// True while the next read waits for the timer.
    pub(super) held: bool,
}

impl Throttle {
    /// Counts one message read at `now`. True when it holds the next read
    /// (until [`Throttle::wait`] returns).
    pub(super) fn count(&mut self, pace: Pace, now: Instant) -> bool {
        let from = self.due.map_or(now, |due| due.max(now));
        let Some(due) = from.checked_add(pace.interval) else {
            return false;
        };
        self.due = Some(due);
        let Some(next) = due.checked_sub(pace.tolerance) else {
            return false;
        };
        if next <= now {
            return false;
        }
        match self.timer.as_mut() {
            Some(timer) => timer.as_mut().reset(next),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(next))),
        }
        self.held = true;
        true
    }

    /// Waits until a held read may go on; pending for ever when none is
    /// held (a `select!` branch that never fires).
    pub(super) async fn wait(&mut self) {
        match self.timer.as_mut() {
            Some(timer) if self.held => timer.as_mut().await,
            _ => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pace(rate: u32, burst: u32) -> Pace {
        Pace::new(rate, burst).expect("a rate above 0")
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_read_at_once_and_then_one_message_an_interval() {
        let pace = pace(10, 3);
        let mut t = Throttle::default();
        let start = Instant::now();
        assert!(!t.count(pace, start));
        assert!(!t.count(pace, start));
        // The third of a burst of three fills it: the fourth must wait.
        assert!(t.count(pace, start));
        t.wait().await;
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
        t.held = false;
        let now = Instant::now();
        assert!(t.count(pace, now));
        t.wait().await;
        assert_eq!(Instant::now() - now, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_at_the_rate_is_never_held() {
        // (A burst of 1 holds after every message: the next is due one
        // interval later, whenever it comes.)
        let pace = pace(100, 2);
        let mut t = Throttle::default();
        for _ in 0..50 {
            assert!(!t.count(pace, Instant::now()));
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(t.timer.is_none(), "no timer was ever needed");
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_time_refills_the_burst_but_no_more() {
        let pace = pace(10, 5);
        let mut t = Throttle::default();
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        let read_at_once = (0..20).take_while(|_| !t.count(pace, now)).count();
        // Four pass, the fifth is read and holds the sixth.
        assert_eq!(read_at_once, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_without_a_hold_never_ends() {
        let mut t = Throttle::default();
        let waited = tokio::time::timeout(Duration::from_secs(3600), t.wait()).await;
        assert!(waited.is_err());
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        assert_eq!(Pace::new(0, 10), None);
        assert_eq!(
            pace(4, 3),
            Pace {
                interval: Duration::from_millis(250),
                tolerance: Duration::from_millis(500),
            }
        );
    }
}
