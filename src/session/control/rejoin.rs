//! Where the control task goes on when the control stream's last id is
//! behind its position: Redis failed over to a replica that had not got
//! the entries read last, or came back from an older snapshot, or lost the
//! stream and a new one was begun (by a Redis whose clock is behind).
//!
//! Going on from the position would skip a new entry with an id below it;
//! reading the stream from its start applies every old command again, and
//! an old `disconnect` closes the connections its session has now with
//! the old code. Neither is needed: the entries this process applied last
//! are remembered (id and digest, 24 bytes each), so the stream is walked
//! back from its end to the newest entry that is one of them, and what
//! comes after it, written since, is applied. An entry older than all of
//! those remembered cannot be told: it is taken as applied (a tail lost in
//! a failover is short; only a new stream whose ids are older still, a
//! clock far behind, would lose entries). A stream none of whose entries
//! is either, a new one, is read from its start. Bounded: [`BATCH`]
//! entries a round trip, back to the oldest remembered at most (past it
//! the first entry decides).

use std::collections::VecDeque;
use std::time::Duration;

use redis::aio::ConnectionLike;

use super::{BATCH, Entry, StreamError, StreamId, parse_entries, within};

/// Entries applied that the control task remembers.
const REMEMBERED: usize = BATCH;

/// The last [`REMEMBERED`] entries applied, oldest first: each id with the
/// [`digest`] of its command.
#[derive(Debug, Default)]
pub(super) struct Applied(VecDeque<(StreamId, u64)>);

impl Applied {
    /// Remembers an entry applied.
    pub(super) fn remember(&mut self, id: StreamId, command: Option<&[u8]>) {
        if self.0.len() >= REMEMBERED {
            self.0.pop_front();
        }
        self.0.push_back((id, digest(command)));
    }

    /// Forgets everything: every entry of a new stream is new.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    /// Where to go on in the control stream `log`, whose last id `last` is
    /// behind the position (see the module's text).
    pub(super) async fn rejoin<C: ConnectionLike>(
        &mut self,
        redis: &mut C,
        log: &str,
        last: StreamId,
        limit: Duration,
    ) -> Result<StreamId, StreamError> {
        let mut upto = last.to_string();
        let at = loop {
            let entries = read_back(redis, log, &upto, BATCH, limit).await?;
            let digested: Vec<(StreamId, u64)> = entries
                .iter()
                .map(|(id, c)| (*id, digest(c.as_deref())))
                .collect();
            if let Some(at) = rejoin_point(&self.0, &digested) {
                break at;
            }
            match digested.last() {
                Some((oldest, _)) if digested.len() >= BATCH => upto = format!("({oldest}"),
                _ => break StreamId::default(),
            }
        };
        // Those after it were in the lost tail: gone for good.
        while self.0.back().is_some_and(|&(id, _)| id > at) {
            self.0.pop_back();
        }
        Ok(at)
    }
}

/// Up to `count` entries at or before `upto` (an id, or `(<id>` for
/// before it), newest first, each id with its `c` field.
async fn read_back<C: ConnectionLike>(
    redis: &mut C,
    log: &str,
    upto: &str,
    count: usize,
    limit: Duration,
) -> Result<Vec<Entry>, StreamError> {
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(log).arg(upto).arg("-").arg("COUNT").arg(count);
    let answer: redis::Value = within(limit, cmd.query_async(redis)).await?;
    match &answer {
        redis::Value::Array(entries) => parse_entries(entries),
        _ => Err(StreamError::Unexpected("XREVRANGE")),
    }
}

/// A command's digest, so that an entry of the control stream can be
/// recognised as one applied (the same id with other content is not).
pub(super) fn digest(command: Option<&[u8]>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    command.hash(&mut hasher);
    hasher.finish()
}

/// Where to go on in a control stream whose last id fell behind the
/// position, given some of its entries, newest first, each with its
/// digest, and `applied`, the entries applied last (oldest first, ids
/// ascending): the newest entry that is one of them, or the newest older
/// than all of them; `None` when none of these entries is either (look
/// further back). See [`Applied::rejoin`].
pub(super) fn rejoin_point(
    applied: &VecDeque<(StreamId, u64)>,
    entries: &[(StreamId, u64)],
) -> Option<StreamId> {
    let oldest = applied.front().map(|&(id, _)| id);
    entries.iter().find_map(|&(id, d)| {
        let known = applied
            .binary_search_by(|&(a, _)| a.cmp(&id))
            .is_ok_and(|i| applied.get(i).is_some_and(|&(_, ad)| ad == d));
        (known || oldest.is_none_or(|o| id < o)).then_some(id)
    })
}
