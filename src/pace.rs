//! How fast clients' messages are taken (`WS_CLIENT_MESSAGE_RATE` after a
//! burst of `WS_CLIENT_MESSAGE_BURST`): the generic cell rate algorithm,
//! one instant per sender (when the steady rate would have taken
//! everything taken so far), no counters and no refills.
//!
//! A session's connections and its `POST`s share one budget in a process
//! ([`Paces`], keyed by session id), so opening more connections with one
//! token does not raise its rate; a topic connection has its own
//! (`crate::ws`). Nothing is refused for its pace alone: a WebSocket's next
//! frame is not read until its turn, a `POST` waits for its turn, and only
//! a `POST` whose turn is further away than `AUTH_TIMEOUT_SECS` is
//! answered `429`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Pace;

/// Takes one message at `now` against a sender whose steady rate is
/// `due` (`None`: a fresh sender): the sender's new `due`, and when its
/// next message may be taken if that is later than `now`.
pub fn advance(due: Option<Instant>, pace: Pace, now: Instant) -> (Instant, Option<Instant>) {
    let from = due.map_or(now, |due| due.max(now));
    // An instant this far out does not exist in practice; if it did, the
    // sender would simply not be held.
    let due = from.checked_add(pace.interval).unwrap_or(from);
    let next = due.checked_sub(pace.tolerance).filter(|next| *next > now);
    (due, next)
}

/// The senders that share a budget, by key (a session id). A sender whose
/// `due` has passed is the same as one never seen, so such entries are
/// swept out whenever the map has doubled since the last sweep.
#[derive(Debug, Default)]
pub struct Paces {
    senders: Mutex<Senders>,
}

#[derive(Debug, Default)]
struct Senders {
    due: HashMap<Box<str>, Instant>,
    /// The map's size after the last sweep.
    swept_at: usize,
}

/// Fewest entries before a sweep is worth it.
const SWEEP_FROM: usize = 1024;

impl Paces {
    fn lock(&self) -> MutexGuard<'_, Senders> {
        // Nothing here can panic with the lock held; a poisoned lock still
        // holds valid instants.
        self.senders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one message of `key` at `now` (see [`advance`]): when `key`'s
    /// next message may be taken, if later than `now`.
    pub fn take(&self, key: &str, pace: Pace, now: Instant) -> Option<Instant> {
        let mut senders = self.lock();
        let (due, next) = advance(senders.due.get(key).copied(), pace, now);
        senders.set(key, due, now);
        next
    }

    /// Reserves the turn of one message of `key` arriving at `now`: when it
    /// may be taken (`now` or later). When that is further away than
    /// `limit`, nothing is reserved and the error says how much later a
    /// message would get a turn within `limit`.
    pub fn reserve(
        &self,
        key: &str,
        pace: Pace,
        now: Instant,
        limit: Duration,
    ) -> Result<Instant, Duration> {
        let mut senders = self.lock();
        let due = senders.due.get(key).copied();
        // Its turn: when the message before it let it be taken.
        let turn = due
            .and_then(|due| due.checked_sub(pace.tolerance))
            .map_or(now, |at| at.max(now));
        let wait = turn.saturating_duration_since(now);
        if wait > limit {
            return Err(wait.saturating_sub(limit));
        }
        let (due, _) = advance(due, pace, turn);
        senders.set(key, due, now);
        Ok(turn)
    }

    /// Senders with a budget in use.
    pub fn len(&self) -> usize {
        self.lock().due.len()
    }

    /// True when no sender has a budget in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Senders {
    fn set(&mut self, key: &str, due: Instant, now: Instant) {
        match self.due.get_mut(key) {
            Some(at) => *at = due,
            None => {
                self.due.insert(key.into(), due);
                if self.due.len() >= SWEEP_FROM.max(self.swept_at.saturating_mul(2)) {
                    self.due.retain(|_, due| *due > now);
                    self.swept_at = self.due.len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(rate: u32, burst: u32) -> Pace {
        Pace::new(rate, burst).expect("a rate above 0")
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_message_an_interval() {
        let p = pace(10, 3);
        let now = Instant::now();
        let (due, next) = advance(None, p, now);
        assert_eq!(next, None);
        let (due, next) = advance(Some(due), p, now);
        assert_eq!(next, None);
        // The third of a burst of three: the fourth is due 100 ms on.
        let (due, next) = advance(Some(due), p, now);
        assert_eq!(next, Some(now + Duration::from_millis(100)));
        let (_, next) = advance(Some(due), p, now + Duration::from_millis(100));
        assert_eq!(next, Some(now + Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_at_the_rate_is_never_held() {
        let p = pace(100, 2);
        let mut due = None;
        for _ in 0..50 {
            let (d, next) = advance(due, p, Instant::now());
            assert_eq!(next, None);
            due = Some(d);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_time_refills_the_burst_but_no_more() {
        let p = pace(10, 5);
        let now = Instant::now();
        let (mut due, _) = advance(None, p, now - Duration::from_secs(60));
        let mut taken = 0;
        loop {
            let (d, next) = advance(Some(due), p, now);
            due = d;
            if next.is_some() {
                break;
            }
            taken += 1;
        }
        // Four pass at once; the fifth is taken and holds the sixth.
        assert_eq!(taken, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_shares_its_budget_and_others_are_apart() {
        let paces = Paces::default();
        let p = pace(10, 2);
        let now = Instant::now();
        assert_eq!(paces.take("a", p, now), None);
        // The second message of "a", from another connection, spends the
        // burst; "b" has its own.
        assert!(paces.take("a", p, now).is_some());
        assert_eq!(paces.take("b", p, now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_waits_its_turn_or_is_refused_past_the_limit() {
        let paces = Paces::default();
        let p = pace(10, 2);
        let now = Instant::now();
        let limit = Duration::from_millis(250);
        assert_eq!(paces.reserve("s", p, now, limit), Ok(now));
        assert_eq!(paces.reserve("s", p, now, limit), Ok(now));
        let ms = |n| now + Duration::from_millis(n);
        assert_eq!(paces.reserve("s", p, now, limit), Ok(ms(100)));
        assert_eq!(paces.reserve("s", p, now, limit), Ok(ms(200)));
        // The next turn is 300 ms away: refused, not reserved, and told to
        // come back 50 ms later.
        assert_eq!(
            paces.reserve("s", p, now, limit),
            Err(Duration::from_millis(50))
        );
        assert_eq!(paces.reserve("s", p, ms(100), limit), Ok(ms(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn senders_whose_turn_has_come_are_swept() {
        let paces = Paces::default();
        let p = pace(1000, 1);
        for i in 0..SWEEP_FROM - 1 {
            paces.take(&format!("old{i}"), p, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        paces.take("new", p, Instant::now());
        assert_eq!(paces.len(), 1, "only the sender still ahead is kept");
    }
}
