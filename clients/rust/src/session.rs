//! The session bridge client: [`SessionClient`] for
//! `GET /{agent_id}/ws/{session_id}`, in plain or reliable mode.
//!
//! - This file: the handle and its events.
//! - `builder`: the settings, and connecting.
//! - `wire`: the values the application sees, and the frames' parsing.
//! - `worker`: the background task that owns the socket.

mod builder;
mod wire;
mod worker;

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::Error;
use crate::message::check_id;
use crate::options::ConnectionState;
use builder::check_token;
use worker::{Command, Outgoing, Shared};

pub use builder::SessionBuilder;
pub use wire::{
    Ack, Offset, Payload, Position, Resume, ResumeFailed, ResumeFailure, Sent, SessionMessage,
    Welcome,
};

/// How a [`SessionClient`] talks to the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The seeds' protocol: the backend's messages arrive as they were
    /// published on `session:{id}:down`, and what the client sends is
    /// published on `session:{id}:up`. What is published while the client
    /// is between two connections is lost; nothing is acknowledged.
    Plain,
    /// The `wsproxy.v1` subprotocol (the server needs
    /// `RELIABLE_SESSIONS=true`): messages carry offsets, a reconnection
    /// resumes after the last one seen, and client messages are
    /// acknowledged once stored, sent again until they are.
    Reliable,
}

/// What a [`SessionClient`] reports, in order, through [`SessionEvents`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A connection is open: the first one, or again after
    /// [`Disconnected`](Self::Disconnected). In reliable mode `welcome` is
    /// the server's first frame; `None` in plain mode.
    Connected {
        /// The welcome (reliable mode).
        welcome: Option<Welcome>,
    },
    /// A message from the backend. In reliable mode, in history order,
    /// each once, across reconnections.
    Message(SessionMessage),
    /// Reliable mode: the resume could not be honoured (right after the
    /// `Connected` whose welcome says so). Messages were lost to this
    /// client; reload the state from the backend. Delivery goes on after
    /// [`ResumeFailed::now`].
    ResumeFailed(ResumeFailed),
    /// The connection was lost (the error says how); the client is
    /// reconnecting. Except after [`Error::SessionEnded`] (a close code
    /// 4000-4999: the backend ended the session): the client is then
    /// closed, this is the last event, and it does not reconnect.
    Disconnected(Error),
    /// Something nobody's call returns: a failed reconnection attempt, a
    /// refusal wsproxy sent about a plain message (`publish_failed`), a
    /// frame that does not follow the protocol (skipped), or the failure
    /// of a message whose sender stopped waiting.
    Error(Error),
}

/// The events of a [`SessionClient`], from
/// [`SessionBuilder::connect`]. Read them steadily: while the (bounded)
/// queue is full the client stops reading its socket, and a send waits
/// for an acknowledgement queued behind the events. The stream ends when
/// the client closes.
#[derive(Debug)]
pub struct SessionEvents {
    events: mpsc::Receiver<SessionEvent>,
}

impl SessionEvents {
    /// The next event; `None` once the client is closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: an event is never lost to a `select!` that picks
    /// another branch.
    pub async fn recv(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }
}

impl futures_util::Stream for SessionEvents {
    type Item = SessionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SessionEvent>> {
        self.events.poll_recv(cx)
    }
}

/// A connection to a wsproxy session bridge, `GET /{agent_id}/ws/{session_id}`.
///
/// A background task owns the WebSocket; this handle talks to it over a
/// bounded channel, and every clone talks to the same connection. Events
/// (messages, connections, losses) come through the [`SessionEvents`]
/// that [`SessionBuilder::connect`] returns beside the handle.
///
/// After a lost connection the task reconnects by itself with capped,
/// jittered exponential backoff
/// ([`ReconnectPolicy`](crate::ReconnectPolicy)). In reliable mode it
/// resumes from the last message it got, and sends again, in their order
/// and with their ids, the messages not yet acknowledged.
///
/// The connection closes when [`close`](Self::close) is called or the
/// last handle is dropped. Requires a Tokio runtime with the time and net
/// drivers enabled.
#[derive(Clone)]
pub struct SessionClient {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    /// `max_unacked` permits; a queued message holds one until it settles.
    window: Arc<Semaphore>,
    max_unacked: usize,
}

impl fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionClient")
            .field("base_url", &self.shared.base_url)
            .field("agent_id", &self.shared.agent_id)
            .field("session_id", &self.shared.session_id)
            .field("mode", &self.shared.mode)
            .field("state", &self.connection_state())
            .field("position", &self.position())
            .finish()
    }
}

impl SessionClient {
    fn new(
        shared: Arc<Shared>,
        commands: mpsc::Sender<Command>,
        window: Arc<Semaphore>,
    ) -> SessionClient {
        let max_unacked = window.available_permits();
        SessionClient {
            shared,
            commands,
            window,
            max_unacked,
        }
    }

    /// Starts configuring a client of session `session_id` as agent
    /// `agent_id`, at wsproxy's `base_url` (`ws://host:port`, or with a
    /// path prefix when wsproxy is behind one). `token` is the one the
    /// backend stored in `session:{id}:auth`; it is sent as
    /// `Authorization: Bearer`.
    pub fn builder(
        base_url: impl Into<String>,
        agent_id: impl Into<String>,
        session_id: impl Into<String>,
        token: impl Into<String>,
    ) -> SessionBuilder {
        SessionBuilder::new(
            base_url.into(),
            agent_id.into(),
            session_id.into(),
            token.into(),
        )
    }

    /// Connects with the defaults in `mode`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), wsproxy_client::Error> {
    /// use wsproxy_client::{Mode, SessionClient};
    ///
    /// let (client, mut events) =
    ///     SessionClient::connect("ws://127.0.0.1:8080", "agent-1", "session-A", "t0k3n", Mode::Plain)
    ///         .await?;
    /// client.send(&serde_json::json!({"type": "ping", "counter": 1})).await?;
    /// # drop(events);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(
        base_url: &str,
        agent_id: &str,
        session_id: &str,
        token: &str,
        mode: Mode,
    ) -> Result<(SessionClient, SessionEvents), Error> {
        Self::builder(base_url, agent_id, session_id, token)
            .mode(mode)
            .connect()
            .await
    }

    /// The agent id the client connects as.
    pub fn agent_id(&self) -> &str {
        &self.shared.agent_id
    }

    /// The session.
    pub fn session_id(&self) -> &str {
        &self.shared.session_id
    }

    /// Plain or reliable.
    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    /// Reliable mode: where the client stands (the epoch and the offset of
    /// the last message it took from the socket; it may be ahead of the
    /// events read so far). `None` in plain mode. To resume after a
    /// restart of the application, store the offset of the last message it
    /// *handled* with the epoch, and give that to
    /// [`SessionBuilder::resume_from`].
    pub fn position(&self) -> Option<Position> {
        self.shared.position()
    }

    /// Replaces the token used from the next reconnection on (the backend
    /// issued a new one: the old one's grace period ran out).
    pub fn set_token(&self, token: impl Into<String>) -> Result<(), Error> {
        let token = token.into();
        check_token(&token)?;
        *self
            .shared
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = token;
        Ok(())
    }

    /// Messages held now: not yet acknowledged (reliable mode) or waiting
    /// for a connection (plain mode). At most `max_unacked`.
    pub fn unacknowledged(&self) -> usize {
        self.max_unacked
            .saturating_sub(self.window.available_permits())
    }

    /// Sends `data` (anything serializable to JSON) and waits for the
    /// outcome, up to the request timeout.
    ///
    /// - Reliable mode: the message gets an id unique to this client
    ///   (`<random prefix>-<n>`) and `send` returns [`Sent::Stored`] once
    ///   wsproxy has it in `wsproxy:up:{n}` (with `duplicate: true` for a
    ///   copy stored before). [`Error::NotStored`]: wsproxy's Redis could
    ///   not take it; [`Error::AckTimeout`]: no answer in time, and the
    ///   message stays queued. Across reconnections the message is sent
    ///   again until it is answered.
    /// - Plain mode: [`Sent::Written`] once written (nothing is
    ///   acknowledged); a message given while reconnecting waits up to the
    ///   request timeout for the connection.
    /// - Either: [`Error::QueueFull`] at once when `max_unacked` messages
    ///   are held (nothing is sent), [`Error::Closed`] when the client is.
    ///
    /// # Cancel safety
    ///
    /// Once the message is queued, dropping the future does not recall it:
    /// it is sent (and, in reliable mode, sent again) all the same.
    ///
    /// ```no_run
    /// # async fn demo(client: wsproxy_client::SessionClient) -> Result<(), wsproxy_client::Error> {
    /// use wsproxy_client::Sent;
    ///
    /// match client.send(&serde_json::json!({"type": "order", "qty": 3})).await? {
    ///     Sent::Stored(ack) => println!("stored as {} (resend: {})", ack.offset, ack.duplicate),
    ///     Sent::Written => println!("written (plain mode)"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send<T: Serialize + ?Sized>(&self, data: &T) -> Result<Sent, Error> {
        let queued = self.enqueue(data).await?;
        self.wait(queued).await
    }

    /// Like [`send`](Self::send), with the caller's id (reliable mode: 1-128
    /// of `A-Z a-z 0-9 - _ .`). wsproxy stores an id once within
    /// `UP_DEDUPE_SECS`, so sending again with the id of a message whose
    /// fate is unknown ([`Error::AckTimeout`], or a restart of the
    /// application) is safe: it is stored at most once. The id must be
    /// unique within the session, across all its clients. Plain mode
    /// ignores it.
    pub async fn send_with_id<T: Serialize + ?Sized>(
        &self,
        id: &str,
        data: &T,
    ) -> Result<Sent, Error> {
        let queued = self.enqueue_with_id(id, data).await?;
        self.wait(queued).await
    }

    async fn wait(&self, queued: Queued) -> Result<Sent, Error> {
        let timeout = self.shared.options.request_timeout;
        let id = queued.id.clone();
        match tokio::time::timeout(timeout, queued).await {
            Ok(result) => result,
            Err(_) => Err(match id {
                Some(id) => Error::AckTimeout { id },
                None => Error::Timeout("the message to be sent"),
            }),
        }
    }

    /// Queues `data` for sending and returns once it is queued, without
    /// waiting for its outcome: await the [`Queued`] for that. Messages
    /// are sent in the order they were queued, so several can be in
    /// flight at once (up to `max_unacked`):
    ///
    /// ```no_run
    /// # async fn demo(client: wsproxy_client::SessionClient) -> Result<(), wsproxy_client::Error> {
    /// let mut pending = Vec::new();
    /// for n in 0..10 {
    ///     pending.push(client.enqueue(&serde_json::json!({ "n": n })).await?);
    /// }
    /// for queued in pending {
    ///     let id = queued.id().map(str::to_owned);
    ///     let sent = queued.await?;
    ///     println!("{id:?}: {sent:?}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn enqueue<T: Serialize + ?Sized>(&self, data: &T) -> Result<Queued, Error> {
        let id = match self.shared.mode {
            Mode::Reliable => {
                let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                format!("{}-{n}", self.shared.id_prefix)
            }
            Mode::Plain => String::new(),
        };
        self.queue(id, data).await
    }

    /// [`enqueue`](Self::enqueue) with the caller's id (see
    /// [`send_with_id`](Self::send_with_id)).
    pub async fn enqueue_with_id<T: Serialize + ?Sized>(
        &self,
        id: &str,
        data: &T,
    ) -> Result<Queued, Error> {
        check_id("message id", id)?;
        self.queue(id.to_owned(), data).await
    }

    async fn queue<T: Serialize + ?Sized>(&self, id: String, data: &T) -> Result<Queued, Error> {
        let (id, frame, deadline) = match self.shared.mode {
            Mode::Reliable => {
                let frame = wire::up_frame(&id, data)?;
                (Some(id), frame, None)
            }
            Mode::Plain => {
                let deadline = Instant::now() + self.shared.options.request_timeout;
                (None, serde_json::to_string(data)?, Some(deadline))
            }
        };
        if self.commands.is_closed() {
            return Err(Error::Closed);
        }
        let permit = self
            .window
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::QueueFull)?;
        let (reply, outcome) = oneshot::channel();
        let out = Outgoing {
            id: id.clone(),
            frame: frame.into(),
            reply,
            deadline,
            _permit: permit,
            on_wire: false,
        };
        self.commands
            .send(Command::Send(out))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Queued { id, outcome })
    }

    /// The connection's current state.
    pub fn connection_state(&self) -> ConnectionState {
        *self.shared.state.borrow()
    }

    /// Waits until the client is [`Connected`](ConnectionState::Connected).
    /// Fails with [`Error::Closed`] if the client closes first, or
    /// [`Error::Timeout`].
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut states = self.shared.state.subscribe();
        let state = tokio::time::timeout(
            timeout,
            states.wait_for(|s| *s != ConnectionState::Reconnecting),
        )
        .await
        .map_err(|_| Error::Timeout("the connection"))?
        .map_err(|_| Error::Closed)?;
        match *state {
            ConnectionState::Connected => Ok(()),
            _ => Err(Error::Closed),
        }
    }

    /// Closes the connection (close code 1000) and stops the background
    /// task. Messages still queued fail with [`Error::Closed`] (in reliable
    /// mode: unacknowledged ones may or may not have been stored; send
    /// them again with their ids from a new client to be sure). The events
    /// end. Closing twice is harmless.
    pub async fn close(&self) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).await.is_err() {
            return Ok(()); // already closed
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .map_err(|_| Error::Timeout("the connection to close"))?;
        Ok(())
    }
}

/// A queued message (from [`SessionClient::enqueue`]); await it for its
/// outcome, as [`SessionClient::send`] describes, without a timeout.
/// Dropping it does not recall the message.
#[derive(Debug)]
pub struct Queued {
    id: Option<String>,
    outcome: oneshot::Receiver<Result<Sent, Error>>,
}

impl Queued {
    /// The message's id (reliable mode).
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

impl std::future::Future for Queued {
    type Output = Result<Sent, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_token() {
        let b = SessionClient::builder("ws://h:1", "a", "s", "hunter2").reliable();
        let text = format!("{b:?}");
        assert!(
            text.contains("Reliable") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bad_arguments_never_reach_the_network() {
        let cases = [
            ("wss://h:1", "a", "s", "t"),
            ("ws://h:1?x=1", "a", "s", "t"),
            ("ws://h:1", "a:b", "s", "t"),
            ("ws://h:1", "a", "s*", "t"),
            ("ws://h:1", "a", "s", ""),
            ("ws://h:1", "a", "s", "line\nbreak"),
        ];
        for (url, agent, session, token) in cases {
            let result = SessionClient::connect(url, agent, session, token, Mode::Plain).await;
            assert!(
                matches!(
                    result,
                    Err(Error::InvalidUrl { .. }
                        | Error::InvalidArgument { .. }
                        | Error::InvalidToken(_))
                ),
                "{url} {agent} {session} {token:?}: {result:?}"
            );
        }
    }
}
