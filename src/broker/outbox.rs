//! The outbox: a connection's bounded outbound queue, and what the
//! connection gets from it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Message;
use tokio::sync::Notify;

/// A connection's bounded outbound queue, filled by the broker's reader and
/// drained by the connection's task.
///
/// It is a `VecDeque` behind a short std mutex plus a [`Notify`], rather
/// than a tokio mpsc channel, because it must be small while idle: an
/// empty `VecDeque` allocates nothing, where a bounded mpsc channel
/// allocates a block of 32 slots (about 1.5 KiB) up front. The reader never
/// waits on it: a push into a full queue marks the connection slow instead.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    capacity: usize,
    /// Its connection must not miss a message: it ends when the pub/sub
    /// connection drops.
    gapless: bool,
}

#[derive(Debug, Default)]
struct OutboxState {
    queue: VecDeque<Message>,
    /// Set when a push found the queue full: the client is not keeping up.
    slow: bool,
    /// Set (gapless outboxes only) when the pub/sub connection dropped
    /// after the outbox's channel was live: what is queued came before the
    /// gap, nothing after it is taken.
    lost: bool,
    /// Set when something (a backend, through the control channel) ordered
    /// the connection closed: what is queued goes out first, nothing more
    /// is taken. Boxed: an idle connection pays one pointer.
    close: Option<Box<CloseOrder>>,
}

/// An order to close a connection with this code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseOrder {
    /// The close code the client gets.
    pub code: u16,
    /// The close reason (at most 123 bytes).
    pub reason: String,
}

/// What a connection gets from its outbox.
#[derive(Debug)]
pub enum Outgoing {
    /// The next message, in publish order.
    Message(Message),
    /// The queue overflowed; the connection must be closed (1008).
    Slow,
    /// A gapless outbox's messages stopped: the pub/sub connection dropped,
    /// and what Redis published until it was back is missing. Everything
    /// queued before has been handed out; the connection must be closed
    /// (1013) so that its client resumes.
    Lost,
    /// The connection was ordered closed ([`Outbox::order_close`]); what was
    /// queued before has been handed out.
    Close(Box<CloseOrder>),
}

impl Outbox {
    /// An empty outbox holding at most `capacity` messages.
    pub fn new(capacity: usize) -> Arc<Self> {
        Self::with(capacity, false)
    }

    /// An outbox for a connection that must not miss a message: when the
    /// pub/sub connection drops, it takes nothing more and, once drained,
    /// gives [`Outgoing::Lost`].
    pub fn gapless(capacity: usize) -> Arc<Self> {
        Self::with(capacity, true)
    }

    fn with(capacity: usize, gapless: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OutboxState::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            gapless,
        })
    }

    /// The pub/sub connection dropped: a gapless outbox stops here.
    pub(super) fn lose(&self) {
        if self.gapless {
            self.lock().lost = true;
            self.notify.notify_one();
        }
    }

    /// Orders the connection closed once what is queued has gone out; the
    /// first order wins. Returns false if one was already given.
    pub fn order_close(&self, order: CloseOrder) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(Box::new(order));
        drop(state);
        self.notify.notify_one();
        true
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `msg`; a full queue marks the outbox slow and drops `msg`.
    /// Returns false if the message was not queued.
    pub fn push(&self, msg: Message) -> bool {
        let mut state = self.lock();
        if state.slow || state.lost || state.close.is_some() {
            return false;
        }
        let queued = if state.queue.len() >= self.capacity {
            state.slow = true;
            false
        } else {
            state.queue.push_back(msg);
            true
        };
        drop(state);
        // One consumer: a stored permit covers a push that happens while
        // the consumer is between checking and waiting.
        self.notify.notify_one();
        queued
    }

    /// Takes a queued message without waiting (used to flush on shutdown).
    pub fn try_pop(&self) -> Option<Message> {
        self.lock().queue.pop_front()
    }

    /// Takes the close order given and not yet handed out (on shutdown,
    /// once what was queued is flushed: its code wins over "going away").
    pub fn take_close_order(&self) -> Option<Box<CloseOrder>> {
        self.lock().close.take()
    }

    /// Waits for the next message, or for the outbox to turn slow, or (once
    /// drained) lost.
    ///
    /// # Cancel safety
    /// Cancel safe: a message is only removed in the poll that returns it.
    pub async fn pop(&self) -> Outgoing {
        loop {
            {
                let mut state = self.lock();
                if state.slow {
                    return Outgoing::Slow;
                }
                if let Some(msg) = state.queue.pop_front() {
                    return Outgoing::Message(msg);
                }
                if state.lost {
                    return Outgoing::Lost;
                }
                if let Some(order) = state.close.take() {
                    return Outgoing::Close(order);
                }
            }
            self.notify.notified().await;
        }
    }

    /// Resolves once the outbox has overflowed. Used to abandon a write to
    /// a client that has stopped reading. Cancel safe.
    pub async fn overflowed(&self) {
        loop {
            if self.lock().slow {
                return;
            }
            self.notify.notified().await;
        }
    }
}
