//! The WebSocket connection driver shared by the session bridge and topic
//! pub/sub: one task per connection that moves frames until something ends
//! it, then closes with a code that says why.
//!
//! What differs between endpoints is only what a client's text frame
//! means; that is the [`Handler`]. Everything else is here: delivering the
//! broker's [`Outbox`] in order, heartbeat pings, slow-consumer and
//! oversized-frame detection, token expiry, shutdown flush with 1001,
//! metrics and the open/close log lines.
//!
//! Every connection keeps this task's future in memory for its whole life,
//! so its size is watched: large, rarely used steps (a publish, the close
//! handshake) are boxed out of line, and see [`Driver::run`] for why it is
//! not an `async fn`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::broker::{Outbox, Outgoing};
use crate::context::{App, ConnectionSlot};
use crate::metrics::CloseReason;
use crate::session::lifecycle::{Ended, Gone, Tracking};

mod pace;

/// Close codes this driver sends (the table is [`crate::close`]).
pub use crate::close::{
    GOING_AWAY as CLOSE_GOING_AWAY, INTERNAL as CLOSE_INTERNAL, INVALID_DATA as CLOSE_INVALID_DATA,
    POLICY as CLOSE_POLICY, PROTOCOL as CLOSE_PROTOCOL, TOO_BIG as CLOSE_TOO_BIG,
    TRY_AGAIN_LATER as CLOSE_TRY_AGAIN_LATER,
};

/// How long we wait for the client's reply to our close frame.
const CLOSE_REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Per-connection read buffer. It is the largest allocation that stays for
/// a connection's life (tungstenite zero-fills it), and most messages are
/// small, so it is 512 bytes instead of tungstenite's 128 KiB; larger
/// frames still arrive whole, in more reads.
const READ_BUFFER_BYTES: usize = 512;
/// Most frames one flush carries (see [`Driver::write_queued`]): bounds how
/// long a burst keeps the connection's task from reading.
const WRITE_BATCH: u64 = 64;

/// A boxed future borrowing the handler: keeps rarely used, large steps
/// out of every idle connection's task.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// What a handler wants sent back for a client frame.
#[derive(Debug)]
pub enum Reply {
    /// Nothing.
    None,
    /// This frame.
    Send(Message),
}

impl Reply {
    /// A text reply.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Reply::Send(Message::Text(text.into()))
    }
}

/// The endpoint-specific meaning of client frames.
pub trait Handler: Send + Sync + 'static {
    /// A text frame arrived. The returned future is boxed by design.
    fn on_text(&mut self, text: Utf8Bytes) -> HandlerFuture<'_>;
    /// A binary frame arrived.
    fn on_binary(&mut self, data: bytes::Bytes) -> Reply;
    /// What becomes of a message from the outbox: a reliable session
    /// drops the live copies of the messages the client has, and ends when
    /// its live stream skipped one.
    fn deliver(&mut self, _msg: &Message) -> Delivery {
        Delivery::Send
    }
    /// What the client's messages count against at
    /// `WS_CLIENT_MESSAGE_RATE`: a budget of the connection's own unless
    /// said otherwise (they are paced wherever they reach Redis and other
    /// clients).
    fn budget(&self) -> Budget<'_> {
        Budget::Own
    }
}

/// What becomes of a message from the outbox ([`Handler::deliver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It goes to the client.
    Send,
    /// It does not (the client has it).
    Skip,
    /// One before it never arrived: the connection ends (1013) and its
    /// client resumes from history.
    Gap,
}

/// What a connection's messages count against at `WS_CLIENT_MESSAGE_RATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget<'a> {
    /// Nothing: they are not paced.
    Unpaced,
    /// A budget of the connection's own.
    Own,
    /// A budget shared by every connection that names this key (a
    /// session's, see [`crate::pace`]).
    Shared(&'a str),
}

/// The counters a driver keeps for its endpoint.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Open connections.
    pub active: Gauge,
    /// Connections accepted.
    pub opened: Counter,
    /// Messages written to clients from the outbox.
    pub delivered: Counter,
}

/// Who a connection is, for its log lines.
#[derive(Debug)]
pub struct Label {
    /// `session` or `pubsub`.
    pub endpoint: &'static str,
    /// The session the connection belongs to (may be set later for
    /// anonymous pub/sub clients, hence not used for routing).
    pub session_id: String,
    /// The agent id, on a session connection.
    pub agent_id: Option<Box<str>>,
    /// The token's user (or `anonymous`), on a pub/sub connection.
    pub user: Option<Box<str>>,
}

/// Everything one connection owns.
pub struct Driver<H: Handler> {
    /// Shared server state.
    pub app: Arc<App>,
    /// Messages from the broker.
    pub outbox: Arc<Outbox>,
    /// The endpoint's frame handler.
    pub handler: H,
    /// When the connection's credentials expire (closes with 1008).
    pub expires: Option<tokio::time::Instant>,
    /// Metrics for this endpoint.
    pub counters: Counters,
    /// For the log lines.
    pub label: Label,
    /// Keeps shutdown waiting for this connection.
    pub task: TaskTrackerToken,
    /// Counts the connection against `MAX_CONNECTIONS` until it closes.
    pub slot: Option<ConnectionSlot>,
    /// Frames sent before anything else (a reliable session's welcome and
    /// replay); emptied then.
    pub preamble: Vec<Message>,
    /// The connection's registration with Redis (lifecycle events,
    /// presence); untracked by default.
    pub tracking: Tracking,
}

/// What the driver runs over: axum's `WebSocket` in the server, anything
/// else that is a stream and a sink of messages in tests (a pair of
/// channels, say, on paused time), as axum's testing-websockets example
/// does.
pub trait Socket:
    futures_util::Stream<Item = Result<Message, axum::Error>>
    + futures_util::Sink<Message, Error = axum::Error>
    + Unpin
    + Send
{
}

impl<T> Socket for T where
    T: futures_util::Stream<Item = Result<Message, axum::Error>>
        + futures_util::Sink<Message, Error = axum::Error>
        + Unpin
        + Send
{
}

/// Why the pump stopped, and so how to close.
type Stop = CloseReason;

/// What woke the pump.
enum Event {
    Heartbeat,
    Expired,
    /// A read held for the client's message rate may go on.
    Resume,
    Frame(Option<Result<Message, axum::Error>>),
    Outgoing(Outgoing),
}

/// The work an event calls for, boxed (see [`Driver::pump`]).
enum Step<'a> {
    /// Nothing to wait for.
    Done,
    /// A write, and what follows it.
    Write(Pin<Box<dyn Future<Output = Result<(), Stop>> + Send + 'a>>),
    /// The handler's answer to a client frame; the pump writes its reply.
    Handle(HandlerFuture<'a>),
}

/// The heartbeat: one timer, which fires for the next ping or, while a
/// ping is unanswered, at the pong deadline.
struct Beat {
    timer: Pin<Box<tokio::time::Sleep>>,
    last_ping: tokio::time::Instant,
    awaiting_pong: bool,
}

/// Applies the buffer and size limits and spawns the driver on upgrade.
pub fn upgrade<H: Handler>(
    upgrade: WebSocketUpgrade,
    driver: Driver<H>,
) -> axum::response::Response {
    let limit = driver.app.config.max_message_bytes;
    // The write buffer is left unbounded: what goes out is the backend's
    // (down messages, topic deliveries), of any size Redis carries, and
    // bounding it would drop a large message and the connection with it.
    // Memory stays bounded by the outbox: a client that does not read is
    // disconnected as slow after WS_PING_TIMEOUT_SECS or a full queue, and
    // with no write buffering the buffer holds at most the message that is
    // being written.
    // A registered connection whose upgrade fails (the client left before
    // it completed) is removed when the driver is dropped unrun (its Drop).
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(limit)
        .max_frame_size(limit)
        // axum runs the upgrade in a task of its own; the connection gets a
        // fresh task whose future is exactly `run`'s, so the long-lived
        // state holds no copy of axum's upgrade machinery.
        .on_upgrade(move |socket| {
            let socket_bytes = std::mem::size_of_val(&socket);
            let connection = driver.run(socket);
            // What every open connection keeps in its task (see the module
            // docs): watched with RUST_LOG=wsproxy::ws=trace.
            tracing::trace!(
                future_bytes = std::mem::size_of_val(&connection),
                socket_bytes,
                "connection task"
            );
            tokio::spawn(connection);
            std::future::ready(())
        })
}

impl<H: Handler> Drop for Driver<H> {
    /// A tracked driver dropped before it ran to its end (a failed upgrade,
    /// a task aborted at shutdown) still removes its registration.
    fn drop(&mut self) {
        if self.tracking.connection != 0 {
            self.remove(Ended {
                code: crate::close::ABNORMAL,
                reason: CloseReason::Error.as_str(),
                duration: std::time::Duration::ZERO,
            });
        }
    }
}

impl<H: Handler> Driver<H> {
    /// The connection's whole life: count, pump, close, count, log.
    ///
    /// A plain fn returning an `async move` block rather than an `async fn`
    /// with `mut` parameters: the latter stores each argument twice in the
    /// future (once as the argument, once as the `mut` binding), and this
    /// future is what every open connection keeps in memory.
    #[allow(clippy::manual_async_fn)] // deliberate, see above
    pub fn run<S: Socket>(mut self, mut socket: S) -> impl Future<Output = ()> + Send {
        async move {
            let started = Instant::now();
            self.counters.active.inc();
            self.counters.opened.inc();
            tracing::info!(
                endpoint = self.label.endpoint,
                session_id = %self.label.session_id,
                agent_id = self.label.agent_id.as_deref().map(tracing::field::display),
                user = self.label.user.as_deref().map(|u| tracing::field::display(crate::logsafe::escaped(u))),
                remote = self.slot.as_ref().map(|s| tracing::field::display(s.peer)),
                "connection opened"
            );

            let reason = match self.greet(&mut socket).await {
                Err(reason) => reason,
                Ok(()) => match self.pump(&mut socket).await {
                    Err(reason) => reason,
                    Ok(never) => match never {},
                },
            };
            let code = self.close(&mut socket, reason).await;
            if self.tracking.connection != 0 {
                let ended = Ended {
                    code,
                    reason: reason.as_str(),
                    duration: started.elapsed(),
                };
                self.remove(ended);
            }

            self.counters.active.dec();
            self.app.metrics.disconnect(reason);
            let job = match self.label.endpoint {
                "session" => "sessions",
                "pubsub" => "topics",
                other => other,
            };
            self.app.closes.record(job, reason.as_str(), Some(code));
            tracing::info!(
                endpoint = self.label.endpoint,
                session_id = %self.label.session_id,
                agent_id = self.label.agent_id.as_deref().map(tracing::field::display),
                user = self.label.user.as_deref().map(|u| tracing::field::display(crate::logsafe::escaped(u))),
                reason = reason.as_str(),
                duration_ms = started.elapsed().as_millis() as u64,
                "connection closed"
            );
        }
    }

    /// Sends the preamble, counting each frame as delivered. Boxed, like
    /// [`Self::close`]: it runs once.
    fn greet<'a, S: Socket>(
        &'a mut self,
        socket: &'a mut S,
    ) -> Pin<Box<dyn Future<Output = Result<(), Stop>> + Send + 'a>> {
        Box::pin(async move {
            let preamble = std::mem::take(&mut self.preamble);
            for msg in preamble {
                self.write(socket, msg).await?;
                self.counters.delivered.inc();
                self.tracking.messages_out += 1;
            }
            Ok(())
        })
    }

    /// Hands the connection's registration to a removal of its own
    /// (see [`remove_later`]); from then on the driver is untracked.
    fn remove(&mut self, ended: Ended) {
        let gone = Gone {
            connection: std::mem::take(&mut self.tracking.connection),
            messages_in: self.tracking.messages_in,
            messages_out: self.tracking.messages_out,
            ended,
        };
        let agent = self
            .label
            .agent_id
            .as_deref()
            .unwrap_or_default()
            .to_owned();
        let registering = self.tracking.registering.take();
        remove_later(
            &self.app,
            self.label.session_id.clone(),
            agent,
            gone,
            registering,
        );
    }

    /// Moves frames until something ends the connection.
    ///
    /// Every open connection keeps this future, and an idle one sits in
    /// the `select!` below: whatever is held across any other await point
    /// is memory each idle connection pays for. So the work an event
    /// calls for is a boxed [`Step`] (made by [`Driver::step`], which
    /// holds the event, the frame, the reply), and the only locals across
    /// awaits are the timers. With the writes and the event inline, the
    /// connection's future was 1,520 bytes (plain session), now 1,088
    /// (see the trace line in [`upgrade`]). One allocation per write (per
    /// batch of queued messages) instead.
    // The step is made in the match's scrutinee so that its borrow of
    // self and the socket ends with that statement, before the reply's write.
    #[allow(clippy::blocks_in_conditions)]
    async fn pump<S: Socket>(&mut self, socket: &mut S) -> Result<Infallible, Stop> {
        // A fresh `cancelled()` per event costs a few uncontended lock
        // operations but no memory while waiting, which matters more here:
        // a persistent waiter (like the tunnel's) added 88 bytes to every
        // idle connection.
        let shutdown = self.app.shutdown.clone();
        let mut beat = Beat {
            timer: Box::pin(tokio::time::sleep(self.app.config.ping_interval)),
            last_ping: tokio::time::Instant::now(),
            awaiting_pong: false,
        };
        // The token's expiry, registered with the timer once rather than
        // per event.
        let mut expiry = self
            .expires
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
        let mut throttle = pace::Throttle::default();

        loop {
            // Wait for the next event; the select's futures are gone before
            // it is handled, so a step's state never sits beside them.
            // (`step` borrows self and the socket until this statement
            // ends; the reply is written after it.)
            let reply = match {
                let event = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                    _ = beat.timer.as_mut() => Event::Heartbeat,
                    _ = async {
                        match expiry.as_mut() {
                            Some(at) => at.as_mut().await,
                            None => std::future::pending().await,
                        }
                    } => Event::Expired,
                    _ = throttle.wait() => Event::Resume,
                    frame = socket.next(), if !throttle.held => Event::Frame(frame),
                    out = self.outbox.pop() => Event::Outgoing(out),
                };
                self.step(socket, &mut beat, &mut throttle, event)?
            } {
                Step::Done => Reply::None,
                Step::Write(write) => {
                    write.await?;
                    Reply::None
                }
                Step::Handle(handling) => handling.await,
            };
            if let Reply::Send(msg) = reply {
                Box::pin(self.write(socket, msg)).await?;
            }
        }
    }

    /// What `event` calls for: done at once, or a step to run (see
    /// [`Driver::pump`]); or why the connection ends.
    fn step<'a, S: Socket>(
        &'a mut self,
        socket: &'a mut S,
        beat: &'a mut Beat,
        throttle: &mut pace::Throttle,
        event: Event,
    ) -> Result<Step<'a>, Stop> {
        Ok(match event {
            Event::Resume => {
                throttle.held = false;
                Step::Done
            }
            Event::Heartbeat => {
                let ping_timeout = self.app.config.ping_timeout;
                if beat.awaiting_pong {
                    if !throttle.held {
                        return Err(Stop::HeartbeatTimeout);
                    }
                    // The pong waits behind client messages held for their
                    // pace (a session flooding from many connections holds
                    // each for longer than the timeout): a client whose
                    // messages are waiting to be read is there. The
                    // deadline moves on while the hold lasts.
                    beat.timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + ping_timeout);
                    return Ok(Step::Done);
                }
                Step::Write(Box::pin(async move {
                    self.write(socket, Message::Ping(bytes::Bytes::new()))
                        .await?;
                    beat.last_ping = tokio::time::Instant::now();
                    beat.awaiting_pong = true;
                    beat.timer.as_mut().reset(beat.last_ping + ping_timeout);
                    Ok(())
                }))
            }
            Event::Expired => return Err(Stop::TokenExpired),
            Event::Outgoing(Outgoing::Message(msg)) => {
                match self.handler.deliver(&msg) {
                    Delivery::Send => {}
                    Delivery::Skip => return Ok(Step::Done),
                    Delivery::Gap => return Err(Stop::LiveGap),
                }
                Step::Write(Box::pin(async move {
                    let sent = self.write_queued(socket, msg).await?;
                    self.counters.delivered.inc_by(sent);
                    self.tracking.messages_out += sent;
                    Ok(())
                }))
            }
            Event::Outgoing(Outgoing::Slow) => return Err(Stop::SlowConsumer),
            Event::Outgoing(Outgoing::Lost) => return Err(Stop::PubSubLost),
            Event::Outgoing(Outgoing::Close(order)) => {
                self.tracking.order = Some(order);
                return Err(Stop::Backend);
            }
            Event::Frame(None) => return Err(Stop::Client),
            Event::Frame(Some(Ok(Message::Close(close)))) => {
                // 1005: the client's close frame had no code.
                self.tracking.peer_close = Some(close.map_or(1005, |c| c.code));
                return Err(Stop::Client);
            }
            Event::Frame(Some(Err(e))) => return Err(classify(e)),
            Event::Frame(Some(Ok(Message::Text(text)))) => {
                self.tracking.messages_in += 1;
                self.pace(throttle);
                Step::Handle(self.handler.on_text(text))
            }
            Event::Frame(Some(Ok(Message::Binary(data)))) => {
                self.tracking.messages_in += 1;
                self.pace(throttle);
                match self.handler.on_binary(data) {
                    Reply::None => Step::Done,
                    Reply::Send(msg) => Step::Write(Box::pin(self.write(socket, msg))),
                }
            }
            // tungstenite queues the pong itself; the next read sends it.
            Event::Frame(Some(Ok(Message::Ping(_)))) => Step::Done,
            Event::Frame(Some(Ok(Message::Pong(_)))) => {
                if beat.awaiting_pong {
                    beat.awaiting_pong = false;
                    beat.timer
                        .as_mut()
                        .reset(beat.last_ping + self.app.config.ping_interval);
                }
                Step::Done
            }
        })
    }

    /// Counts a client message against `WS_CLIENT_MESSAGE_RATE`, holding
    /// the next read when the client is ahead of it (see [`pace`]).
    fn pace(&self, throttle: &mut pace::Throttle) {
        let Some(pace) = self.app.config.client_pace else {
            return;
        };
        let shared = match self.handler.budget() {
            Budget::Unpaced => return,
            Budget::Own => None,
            Budget::Shared(key) => Some((key, &self.app.paces)),
        };
        if throttle.count(pace, shared, tokio::time::Instant::now()) {
            self.app.metrics.client_reads_held.inc();
        }
    }

    /// Writes `first` and what else the outbox holds right now (at most
    /// [`WRITE_BATCH`] frames in all), then flushes once: a burst costs one
    /// write to the socket, not one per message. The number of frames
    /// written. Slow consumers as [`Driver::write`].
    async fn write_queued<S: Socket>(
        &mut self,
        socket: &mut S,
        first: Message,
    ) -> Result<u64, Stop> {
        let Self {
            outbox,
            handler,
            app,
            ..
        } = self;
        let batch = async {
            socket.feed(first).await?;
            let mut sent = 1u64;
            let mut gap = false;
            while sent < WRITE_BATCH {
                let Some(msg) = outbox.try_pop() else {
                    break;
                };
                match handler.deliver(&msg) {
                    Delivery::Send => {
                        socket.feed(msg).await?;
                        sent += 1;
                    }
                    Delivery::Skip => {}
                    Delivery::Gap => {
                        gap = true;
                        break;
                    }
                }
            }
            socket.flush().await?;
            Ok::<_, axum::Error>((sent, gap))
        };
        tokio::select! {
            biased;
            r = batch => match r {
                Ok((_, true)) => Err(Stop::LiveGap),
                Ok((sent, false)) => Ok(sent),
                Err(_) => Err(Stop::Client),
            },
            _ = outbox.overflowed() => Err(Stop::SlowConsumer),
            _ = tokio::time::sleep(app.config.ping_timeout) => Err(Stop::SlowConsumer),
        }
    }

    /// Writes one frame. A client that takes longer than the ping timeout to
    /// accept it, or whose outbox overflows meanwhile, is a slow consumer.
    async fn write<S: Socket>(&self, socket: &mut S, msg: Message) -> Result<(), Stop> {
        tokio::select! {
            // The send first: it usually completes at once, and then the
            // timer below is never registered.
            biased;
            r = socket.send(msg) => r.map_err(|_| Stop::Client),
            _ = self.outbox.overflowed() => Err(Stop::SlowConsumer),
            _ = tokio::time::sleep(self.app.config.ping_timeout) => Err(Stop::SlowConsumer),
        }
    }

    /// Ends the connection the way `reason` calls for; the close code
    /// sent, or the client's (1006 when it left without a close frame).
    /// Boxed: an inline `async fn` would reserve its (large, used once)
    /// state in every connection's task for the connection's whole life.
    fn close<'a, S: Socket>(
        &'a mut self,
        socket: &'a mut S,
        reason: Stop,
    ) -> Pin<Box<dyn Future<Output = u16> + Send + 'a>> {
        Box::pin(async move {
            let mut order = self.tracking.order.take();
            let (code, text) = match reason {
                // The client started the close; tungstenite has queued the
                // reply, flushing sends it.
                Stop::Client | Stop::Error => {
                    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, socket.flush()).await;
                    return self.tracking.peer_close.unwrap_or(crate::close::ABNORMAL);
                }
                Stop::Shutdown => {
                    // Deliver what was already queued before saying goodbye.
                    // Up to a gap, if there is one: the client resumes
                    // from history after reconnecting anyway.
                    while let Some(msg) = self.outbox.try_pop() {
                        match self.handler.deliver(&msg) {
                            Delivery::Send => {}
                            Delivery::Skip => continue,
                            Delivery::Gap => break,
                        }
                        if self.write(socket, msg).await.is_err() {
                            return crate::close::ABNORMAL;
                        }
                        self.counters.delivered.inc();
                        self.tracking.messages_out += 1;
                    }
                    // A backend's order given before the shutdown still
                    // decides the code: its client must not take the close
                    // for a restart and come back.
                    match self.outbox.take_close_order() {
                        Some(pending) => {
                            let pending = order.insert(pending);
                            (pending.code, pending.reason.as_str())
                        }
                        None => (CLOSE_GOING_AWAY, "server shutting down"),
                    }
                }
                Stop::SlowConsumer => (CLOSE_POLICY, "slow consumer: outbound queue full"),
                Stop::TokenExpired => (CLOSE_POLICY, "token expired"),
                Stop::MessageTooBig => (CLOSE_TOO_BIG, "message too big"),
                Stop::ProtocolError => (CLOSE_PROTOCOL, "protocol error"),
                Stop::InvalidData => (CLOSE_INVALID_DATA, "text is not valid UTF-8"),
                Stop::HeartbeatTimeout => (CLOSE_INTERNAL, "heartbeat timeout: no pong"),
                Stop::PubSubLost => (
                    CLOSE_TRY_AGAIN_LATER,
                    "wsproxy lost its Redis pub/sub connection: reconnect to resume",
                ),
                Stop::LiveGap => (
                    CLOSE_TRY_AGAIN_LATER,
                    "the live stream missed a message: reconnect to resume",
                ),
                Stop::Backend => match &order {
                    Some(order) => (order.code, order.reason.as_str()),
                    None => (CLOSE_POLICY, "closed by the backend"),
                },
            };
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: text.to_owned().into(),
            }));
            // Best effort: a slow or dead peer must not hold us up.
            let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
                if socket.send(frame).await.is_ok() {
                    // Wait for the peer's close reply so the close handshake
                    // completes and the peer sees our code.
                    while let Some(Ok(msg)) = socket.next().await {
                        if matches!(msg, Message::Close(_)) {
                            break;
                        }
                    }
                }
            })
            .await;
            code
        })
    }
}

/// The pause before a removal's first retry, doubled each time up to the
/// longest. It is retried for as long as a process may be silent before
/// it counts as dead (`PROCESS_DEAD_AFTER_SECS`: a Redis that restarts, or
/// a cluster shard that fails over), and at least five times.
const REMOVAL_RETRY: std::time::Duration = std::time::Duration::from_millis(250);
const REMOVAL_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
const REMOVAL_ATTEMPTS: u32 = 5;

/// Removes a tracked connection's registration and appends its disconnect
/// event, in a task of its own (tracked: shutdown waits for it), so the
/// connection's slot and task are freed at once whatever Redis does. A
/// failed attempt is retried (each step is idempotent: only the first
/// that finds the registration writes the event, and on a cluster the
/// event's marker stops a second); the registration is deleted only once
/// the presence entry and the event are written, so when every attempt
/// failed it stays in Redis: on a cluster, once taken into the process's
/// closing hash, this process's heartbeat takes it again a dead-after time
/// later; otherwise it stays until this process's heartbeat lapses or it
/// dies, and the reaper records it.
/// `registering`: a registration still being finished in the background;
/// the removal starts when it is done.
pub fn remove_later(
    app: &Arc<App>,
    session_id: String,
    agent_id: String,
    gone: Gone,
    registering: Option<tokio::sync::oneshot::Receiver<()>>,
) {
    // Outside a runtime (it is shutting down), nothing can be sent.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let tracker = app.tracker.clone();
    let app = app.clone();
    let removal = async move {
        if let Some(registering) = registering {
            let _ = registering.await;
        }
        let mut pause = REMOVAL_RETRY;
        let mut progress = crate::session::lifecycle::Removal::default();
        let started = tokio::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let removed = {
                let _turn = app.lifecycle.turn().await;
                let mut redis = app.redis.clone();
                let limit = app.config.auth_timeout;
                app.lifecycle
                    .disconnected(
                        &mut redis,
                        &session_id,
                        &agent_id,
                        gone,
                        &mut progress,
                        limit,
                    )
                    .await
            };
            match removed {
                Ok(()) => return,
                Err(e) => {
                    app.metrics.lifecycle_failures.inc();
                    tracing::warn!(%session_id, attempt, error = %e, "lifecycle: disconnect not recorded yet");
                }
            }
            if attempt >= REMOVAL_ATTEMPTS && started.elapsed() >= app.lifecycle.dead_after() {
                tracing::warn!(%session_id, attempt, "lifecycle: disconnect not recorded yet; its registration stays in Redis, finished by this process's heartbeat (cluster) or by a reaper once this process is gone");
                return;
            }
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(REMOVAL_RETRY_MAX);
        }
    };
    runtime.spawn(tracker.track_future(removal));
}

/// Maps a receive error to a close reason.
fn classify(error: axum::Error) -> Stop {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => Stop::MessageTooBig,
            // tungstenite reports these and leaves the close to us: RFC
            // 6455 asks for a close frame before the connection drops.
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => Stop::Client,
            tungstenite::Error::Protocol(_) => Stop::ProtocolError,
            tungstenite::Error::Utf8(_) => Stop::InvalidData,
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Io(_) => Stop::Client,
            _ => Stop::Error,
        },
        Err(_) => Stop::Error,
    }
}

#[cfg(test)]
mod tests;
