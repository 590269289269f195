//! A connection's place against `WS_CLIENT_MESSAGE_RATE` (the arithmetic
//! and the sessions' shared budgets are [`crate::pace`]).
//!
//! A client that sends faster is not refused or cut: its next frame is
//! simply not read until its turn, so TCP's flow control slows the client
//! down and nothing it sent is lost. While a read is held the connection
//! goes on delivering, pinging and noticing shutdown. The pong that
//! answers a ping waits behind the held frames, however long the hold
//! lasts (a session flooding from many connections pushes each one's turn
//! seconds out): the ping timeout does not run out while a read is held,
//! since a client whose messages wait to be read is there.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

use crate::config::Pace;
use crate::pace::{Paces, advance};

/// A connection's reading against its pace.
#[derive(Default)]
pub(super) struct Throttle {
    /// The steady rate's place for a connection with a budget of its own
    /// (see [`advance`]); unused when it shares its session's.
    due: Option<Instant>,
    /// What a held read waits on: made the first time a read is held and
    /// kept, so a client that stays fast costs no allocation per message.
    timer: Option<Pin<Box<Sleep>>>,
    /// True while the next read waits for the timer.
    pub(super) held: bool,
}

impl Throttle {
    /// Counts one message read at `now`, against the budget `shared` names
    /// or the connection's own. True when it holds the next read (until
    /// [`Throttle::wait`] returns).
    pub(super) fn count(
        &mut self,
        pace: Pace,
        shared: Option<(&str, &Paces)>,
        now: Instant,
    ) -> bool {
        let next = match shared {
            Some((key, paces)) => paces.take(key, pace, now),
            None => {
                let (due, next) = advance(self.due, pace, now);
                self.due = Some(due);
                next
            }
        };
        let Some(next) = next else {
            return false;
        };
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
    async fn a_held_read_waits_one_interval_past_the_burst() {
        let pace = pace(10, 3);
        let mut t = Throttle::default();
        let start = Instant::now();
        assert!(!t.count(pace, None, start));
        assert!(!t.count(pace, None, start));
        assert!(t.count(pace, None, start));
        t.wait().await;
        assert_eq!(Instant::now() - start, Duration::from_millis(100));
        t.held = false;
        let now = Instant::now();
        assert!(t.count(pace, None, now));
        t.wait().await;
        assert_eq!(Instant::now() - now, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn two_connections_of_a_session_share_its_budget() {
        let pace = pace(10, 2);
        let paces = Paces::default();
        let (mut a, mut b) = (Throttle::default(), Throttle::default());
        let now = Instant::now();
        assert!(!a.count(pace, Some(("s", &paces)), now));
        // Alone, b would have a burst of two; its session's is spent.
        assert!(b.count(pace, Some(("s", &paces)), now));
        assert!(!a.held && b.held);
        let mut c = Throttle::default();
        assert!(!c.count(pace, Some(("other", &paces)), now));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_without_a_hold_never_ends() {
        let mut t = Throttle::default();
        let waited = tokio::time::timeout(Duration::from_secs(3600), t.wait()).await;
        assert!(waited.is_err());
    }
}
