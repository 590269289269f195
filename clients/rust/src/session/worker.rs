//! The session client's background task: it owns the WebSocket, writes
//! what the handle gives it, reads the server's frames into events, keeps
//! the connection alive, and after a loss reconnects (resuming, in
//! reliable mode) and sends again what was not acknowledged.
//!
//! One task, and so one order: events reach the application in the order
//! their frames arrived, and messages reach the server in the order they
//! were given to the client, resends included.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::error::{ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as Frame, Utf8Bytes};

use super::wire::{self, Down, Payload, Position, Resume, ResumeFailed, ResumeFailure, Sent};
use super::{Mode, SessionEvent, SessionMessage, Welcome};
use crate::Error;
use crate::options::{ConnectionState, Options, STABLE_AFTER};
use crate::worker::{Ws, close_error, close_politely};

/// The subprotocol of reliable sessions.
pub(crate) const PROTOCOL: &str = "wsproxy.v1";

/// What the handle(s) and the task share.
pub(crate) struct Shared {
    /// `ws://host:port[/prefix]`, without a trailing slash.
    pub base_url: String,
    pub agent_id: String,
    pub session_id: String,
    pub mode: Mode,
    /// Sent as `Authorization: Bearer` on every (re)connection.
    pub token: Mutex<String>,
    pub options: Options,
    pub state: watch::Sender<ConnectionState>,
    /// The worker's position, for [`SessionClient::position`](super::SessionClient::position).
    pub position: Mutex<Option<Position>>,
    /// Random per client, so that two clients of one session never pick
    /// the same message id (wsproxy would store the second as a duplicate
    /// of the first, that is, not at all).
    pub id_prefix: String,
    pub next_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn token(&self) -> String {
        self.token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn position(&self) -> Option<Position> {
        self.position
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_position(&self, position: Option<Position>) {
        *self.position.lock().unwrap_or_else(PoisonError::into_inner) = position;
    }

    fn set_state(&self, state: ConnectionState) {
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }
}

pub(crate) type SendReply = oneshot::Sender<Result<Sent, Error>>;

/// A message on its way to the server.
pub(crate) struct Outgoing {
    /// The client message id (reliable mode).
    pub id: Option<String>,
    pub frame: Utf8Bytes,
    pub reply: SendReply,
    /// Plain mode: when a message still waiting for a connection is given
    /// up. Reliable messages wait as long as the client lives.
    pub deadline: Option<Instant>,
    /// Its place in the `max_unacked` window, given back when it settles.
    pub _permit: OwnedSemaphorePermit,
    /// Written on the current connection (so an answer may come for it).
    pub on_wire: bool,
}

impl Outgoing {
    /// Answers the sender, giving its place in the window back first: a
    /// caller woken by the answer finds it free.
    fn answer(self, result: Result<Sent, Error>) -> Result<(), Result<Sent, Error>> {
        let Outgoing { reply, _permit, .. } = self;
        drop(_permit);
        reply.send(result)
    }
}

/// Requests from the handle.
pub(crate) enum Command {
    Send(Outgoing),
    Close { reply: oneshot::Sender<()> },
}

/// A new connection, and its welcome in reliable mode.
pub(crate) struct Connection {
    pub ws: Ws,
    pub welcome: Option<Welcome>,
}

/// Opens the session's WebSocket (resuming from `resume`, in reliable
/// mode) and, in reliable mode, reads its welcome. Bounded by the connect
/// timeout.
pub(crate) async fn establish(
    shared: &Shared,
    resume: Option<&Position>,
) -> Result<Connection, Error> {
    let reliable = shared.mode == Mode::Reliable;
    let url = wire::session_url(
        &shared.base_url,
        &shared.agent_id,
        &shared.session_id,
        resume.filter(|_| reliable),
    );
    let work = async {
        let mut request = url.as_str().into_client_request()?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", shared.token()))
            .map_err(|_| Error::InvalidToken("not a valid header value".into()))?;
        request.headers_mut().insert("authorization", bearer);
        if reliable {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(PROTOCOL));
        }
        let max = shared.options.max_message_bytes;
        let config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let (mut ws, _response) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), true)
                .await
                .map_err(handshake_error)?;
        if !reliable {
            // The 101 comes after wsproxy's subscription is confirmed:
            // nothing published from now on is missed.
            return Ok(Connection { ws, welcome: None });
        }
        loop {
            match ws.next().await.ok_or(Error::ConnectionLost)?? {
                Frame::Text(text) => {
                    return match wire::parse_reliable(&text)? {
                        Down::Welcome(welcome) => Ok(Connection {
                            ws,
                            welcome: Some(welcome),
                        }),
                        _ => Err(Error::Protocol(format!(
                            "the first frame is not a welcome: {text}"
                        ))),
                    };
                }
                Frame::Close(frame) => return Err(session_close_error(frame)),
                _ => {}
            }
        }
    };
    tokio::time::timeout(shared.options.connect_timeout, work)
        .await
        .map_err(|_| Error::Timeout("the connection and its welcome"))?
}

/// A server without reliable sessions refuses `wsproxy.v1` with 400
/// `reliable_sessions_off`; a 101 that selects no subprotocol (a proxy in
/// between dropped the header, say) means the same, and tungstenite fails
/// it.
fn handshake_error(e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(
            SubProtocolError::NoSubProtocol,
        )) => Error::ReliableUnavailable,
        tungstenite::Error::Http(response)
            if response.status().as_u16() == 400
                && response
                    .body()
                    .as_deref()
                    .is_some_and(|b| b.windows(21).any(|w| w == b"reliable_sessions_off")) =>
        {
            Error::ReliableUnavailable
        }
        other => other.into(),
    }
}

/// A close frame's error. Codes 4000-4999 are [`Error::SessionEnded`]:
/// wsproxy sends none of its own, only a backend's `disconnect` does, and
/// coming back would undo the backend's decision (or fail on its revoked
/// token at every attempt).
fn session_close_error(frame: Option<tungstenite::protocol::CloseFrame>) -> Error {
    match close_error(frame) {
        Error::ServerClosed { code, reason } if (4000..=4999).contains(&code) => {
            Error::SessionEnded { code, reason }
        }
        other => other,
    }
}

/// Why the connected loop stopped.
enum Exit {
    /// close() was called or every handle was dropped.
    Shutdown(Option<oneshot::Sender<()>>),
    /// The connection is gone.
    Lost(Error),
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<SessionEvent>,
    /// Reliable mode: every message not yet answered, in the order it was
    /// given. Plain mode: messages waiting for a connection.
    queue: VecDeque<Outgoing>,
    /// Reliable mode: where the client stands in the history; the next
    /// connection resumes from it.
    position: Option<Position>,
    /// Reconnection attempts of recent connections that did not last, as
    /// in the pub/sub client: the backoff continues from here.
    streak: u32,
}

impl Worker {
    pub fn new(
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<SessionEvent>,
        position: Option<Position>,
    ) -> Worker {
        Worker {
            shared,
            commands,
            events,
            queue: VecDeque::new(),
            position,
            streak: 0,
        }
    }

    fn reliable(&self) -> bool {
        self.shared.mode == Mode::Reliable
    }

    pub async fn run(mut self, mut connection: Connection) {
        loop {
            let connected_at = Instant::now();
            let exit = match self.start(&mut connection).await {
                Ok(()) => self.serve(&mut connection.ws).await,
                Err(e) => Exit::Lost(e),
            };
            let error = match exit {
                Exit::Shutdown(reply) => {
                    close_politely(&mut connection.ws, "client closed").await;
                    self.finish();
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    return;
                }
                Exit::Lost(error @ Error::SessionEnded { .. }) => {
                    self.end(error).await;
                    return;
                }
                Exit::Lost(error) => error,
            };
            if connected_at.elapsed() >= STABLE_AFTER {
                self.streak = 0;
            }
            connection = match self.reconnect(error).await {
                Some(connection) => connection,
                None => return,
            };
        }
    }

    /// Hands an event to the application. Waits while its queue is full:
    /// the socket is then not read, and wsproxy's own bounded queue takes
    /// over (in reliable mode a slow reader costs a reconnect, not a
    /// message). A dropped receiver discards events.
    async fn emit(&self, event: SessionEvent) {
        let _ = self.events.send(event).await;
    }

    async fn write(&self, ws: &mut Ws, frame: Frame) -> Result<(), Error> {
        tokio::time::timeout(self.shared.options.request_timeout, ws.send(frame))
            .await
            .map_err(|_| Error::Timeout("the socket to accept a frame"))?
            .map_err(Error::from)
    }

    /// A new connection: take in its welcome, tell the application, then
    /// send what has been waiting, oldest first.
    async fn start(&mut self, connection: &mut Connection) -> Result<(), Error> {
        let welcome = connection.welcome.take();
        let failed = welcome.as_ref().and_then(|w| self.take_welcome(w));
        self.emit(SessionEvent::Connected { welcome }).await;
        if let Some(failed) = failed {
            tracing::warn!(reason = %failed.reason, "resume failed; messages were lost");
            self.emit(SessionEvent::ResumeFailed(failed)).await;
        }
        let ws = &mut connection.ws;
        if self.reliable() {
            let frames: Vec<Utf8Bytes> = self
                .queue
                .iter_mut()
                .map(|out| {
                    out.on_wire = true;
                    out.frame.clone()
                })
                .collect();
            for frame in frames {
                self.write(ws, Frame::Text(frame)).await?;
            }
        } else {
            while let Some(out) = self.queue.pop_front() {
                if out.deadline.is_some_and(|d| Instant::now() >= d) {
                    let _ = out.answer(Err(Error::Timeout("the connection to return")));
                    continue;
                }
                if let Err(e) = self.write(ws, Frame::Text(out.frame.clone())).await {
                    self.queue.push_front(out);
                    return Err(e);
                }
                let _ = out.answer(Ok(Sent::Written));
            }
        }
        self.shared.set_state(ConnectionState::Connected);
        Ok(())
    }

    /// Moves the position to where the welcome says delivery goes on, and
    /// says whether a resume this client asked for failed.
    fn take_welcome(&mut self, welcome: &Welcome) -> Option<ResumeFailed> {
        let here = Position {
            epoch: welcome.epoch.clone(),
            offset: welcome.offset,
        };
        let asked = self.position.take();
        let (position, failure) = match (&welcome.resume, asked) {
            // The replay follows: go on from where the client was.
            (Resume::Resumed { .. }, Some(from)) if from.epoch == welcome.epoch => (from, None),
            (Resume::Resumed { .. }, Some(from)) => {
                let why = ResumeFailure::Other("resumed_in_another_epoch".into());
                (here.clone(), Some((why, from)))
            }
            (Resume::Failed(why), Some(from)) => (here.clone(), Some((why.clone(), from))),
            // Never a silent gap: a resume left unanswered is a failed one.
            (Resume::Fresh, Some(from)) => {
                let why = ResumeFailure::Other("not_answered".into());
                (here.clone(), Some((why, from)))
            }
            (_, None) => (here.clone(), None),
        };
        self.position = Some(position.clone());
        self.shared.set_position(Some(position));
        failure.map(|(reason, from)| ResumeFailed {
            reason,
            from,
            now: here,
        })
    }

    /// The connected loop.
    async fn serve(&mut self, ws: &mut Ws) -> Exit {
        let options = self.shared.options.clone();
        let mut keepalive = tokio::time::interval_at(
            Instant::now() + options.keepalive_interval,
            options.keepalive_interval,
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return Exit::Shutdown(None),
                    Some(Command::Close { reply }) => return Exit::Shutdown(Some(reply)),
                    Some(Command::Send(out)) => {
                        if let Err(e) = self.send_now(ws, out).await {
                            return Exit::Lost(e);
                        }
                    }
                },
                frame = ws.next() => {
                    let frame = match frame {
                        None => return Exit::Lost(Error::ConnectionLost),
                        Some(Err(e)) => return Exit::Lost(e.into()),
                        Some(Ok(frame)) => frame,
                    };
                    last_heard = Instant::now();
                    match frame {
                        Frame::Text(text) => self.on_text(&text).await,
                        Frame::Binary(data) => self.on_binary(data).await,
                        Frame::Close(frame) => return Exit::Lost(self.closed(session_close_error(frame))),
                        _ => {}
                    }
                }
                _ = keepalive.tick() => {
                    if last_heard.elapsed() >= options.keepalive_timeout {
                        return Exit::Lost(Error::Timeout("the server to answer keepalive pings"));
                    }
                    if let Err(e) = self.write(ws, Frame::Ping(Default::default())).await {
                        return Exit::Lost(e);
                    }
                }
            }
        }
    }

    /// A message while connected.
    async fn send_now(&mut self, ws: &mut Ws, mut out: Outgoing) -> Result<(), Error> {
        let frame = Frame::Text(out.frame.clone());
        if self.reliable() {
            // Queued before the write: whether or not the write fails, the
            // message is kept until it is answered.
            out.on_wire = true;
            self.queue.push_back(out);
            return self.write(ws, frame).await;
        }
        if out.deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = out.answer(Err(Error::Timeout("the message to be sent")));
            return Ok(());
        }
        match self.write(ws, frame).await {
            Ok(()) => {
                let _ = out.answer(Ok(Sent::Written));
                Ok(())
            }
            Err(e) => {
                // Most likely never left this machine: send it on the next
                // connection instead of failing the call.
                self.queue.push_front(out);
                Err(e)
            }
        }
    }

    async fn on_text(&mut self, text: &str) {
        if !self.reliable() {
            let event = match wire::plain_refusal(text) {
                Some(refusal) => SessionEvent::Error(Error::Server(refusal)),
                None => SessionEvent::Message(SessionMessage {
                    offset: None,
                    payload: Payload::Text(text.to_owned()),
                }),
            };
            return self.emit(event).await;
        }
        match wire::parse_reliable(text) {
            Ok(Down::Message { offset, data }) => self.on_message(offset, data).await,
            Ok(Down::Ack(ack)) => {
                let id = ack.id.clone();
                self.settle(Some(&id), Ok(Sent::Stored(ack))).await;
            }
            Ok(Down::Error { id, error }) => self.on_error(id, error).await,
            Ok(Down::Welcome(_)) => tracing::warn!("a second welcome on one connection, ignored"),
            Ok(Down::Other(text)) => tracing::debug!("ignored frame from the server: {text:?}"),
            // Not a reason to drop the connection: the resume would bring
            // the same frame back. Reported, and skipped.
            Err(e) => self.emit(SessionEvent::Error(e)).await,
        }
    }

    async fn on_message(&mut self, offset: wire::Offset, data: String) {
        if let Some(position) = &mut self.position {
            // wsproxy drops replayed messages from the live side already;
            // this keeps the promise even if something upstream did not.
            if offset <= position.offset {
                tracing::debug!(%offset, last = %position.offset, "duplicate message dropped");
                return;
            }
            position.offset = offset;
        }
        self.shared.set_position(self.position.clone());
        let message = SessionMessage {
            offset: Some(offset),
            payload: Payload::Text(data),
        };
        self.emit(SessionEvent::Message(message)).await;
    }

    async fn on_error(&mut self, id: Option<String>, error: crate::ServerError) {
        match (id, error.code.as_str()) {
            (Some(id), "not_stored") => {
                let e = Error::NotStored {
                    id: id.clone(),
                    message: error.message,
                };
                self.settle(Some(&id), Err(e)).await;
            }
            (Some(id), _) => self.settle(Some(&id), Err(Error::Server(error))).await,
            // wsproxy answers a connection's frames one by one, in order,
            // and names no id when it could not read one: the refusal is
            // about the oldest message still unanswered on this connection.
            (None, "invalid_message") => self.settle(None, Err(Error::Server(error))).await,
            (None, _) => self.emit(SessionEvent::Error(Error::Server(error))).await,
        }
    }

    /// Answers the oldest queued message written on this connection with
    /// `id` (any id when `None`). An answer nobody waits for any more, when
    /// it is a failure, goes to the events instead: never a silent loss.
    async fn settle(&mut self, id: Option<&str>, result: Result<Sent, Error>) {
        let found = self
            .queue
            .iter()
            .position(|o| o.on_wire && id.is_none_or(|id| o.id.as_deref() == Some(id)));
        let Some(out) = found.and_then(|i| self.queue.remove(i)) else {
            match result {
                Err(e) => self.emit(SessionEvent::Error(e)).await,
                Ok(_) => tracing::debug!(?id, "an answer for no queued message"),
            }
            return;
        };
        if let Err(Err(e)) = out.answer(result) {
            self.emit(SessionEvent::Error(e)).await;
        }
    }

    async fn on_binary(&mut self, data: bytes::Bytes) {
        if self.reliable() {
            tracing::debug!(
                len = data.len(),
                "binary frame on a reliable session, ignored"
            );
            return;
        }
        let message = SessionMessage {
            offset: None,
            payload: Payload::Binary(data),
        };
        self.emit(SessionEvent::Message(message)).await;
    }

    /// The server closed the connection. 1009 means the frame it was
    /// reading was too big: wsproxy answers frames in order, so that is the
    /// oldest unanswered one. It fails instead of being sent again (and
    /// refused again) forever.
    fn closed(&mut self, error: Error) -> Error {
        if let Error::ServerClosed { code: 1009, reason } = &error
            && let Some(index) = self.queue.iter().position(|o| o.on_wire)
            && let Some(out) = self.queue.remove(index)
        {
            let _ = out.answer(Err(Error::ServerClosed {
                code: 1009,
                reason: reason.clone(),
            }));
        }
        error
    }

    /// A message while disconnected: it waits. False when it was a
    /// shutdown (already carried out).
    fn offline(&mut self, command: Option<Command>) -> bool {
        match command {
            None => {
                self.finish();
                false
            }
            Some(Command::Close { reply }) => {
                self.finish();
                let _ = reply.send(());
                false
            }
            Some(Command::Send(out)) => {
                self.queue.push_back(out);
                true
            }
        }
    }

    /// Fails everything still waiting; the client is closed.
    fn finish(&mut self) {
        for out in self.queue.drain(..) {
            let _ = out.answer(Err(Error::Closed));
        }
        self.shared.set_state(ConnectionState::Closed);
    }

    /// The backend ended the session ([`Error::SessionEnded`]): no
    /// reconnection. What is queued fails with the same error, the state
    /// is `Closed`, and `Disconnected` with it is the last event.
    async fn end(&mut self, error: Error) {
        tracing::info!("{error}");
        if let Error::SessionEnded { code, reason } = &error {
            for out in self.queue.drain(..) {
                let _ = out.answer(Err(Error::SessionEnded {
                    code: *code,
                    reason: reason.clone(),
                }));
            }
        }
        self.finish();
        self.emit(SessionEvent::Disconnected(error)).await;
    }

    /// Sleeps while taking commands; false if the client was shut down.
    async fn idle_for(&mut self, delay: std::time::Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                command = self.commands.recv() => {
                    if !self.offline(command) {
                        return false;
                    }
                }
            }
        }
    }

    /// Reconnects with backoff, from the current position. `None` when the
    /// client shut down or gave up.
    async fn reconnect(&mut self, error: Error) -> Option<Connection> {
        for out in &mut self.queue {
            out.on_wire = false;
        }
        self.shared.set_state(ConnectionState::Reconnecting);
        tracing::info!("connection lost: {error}; reconnecting");
        self.emit(SessionEvent::Disconnected(error)).await;
        let policy = self.shared.options.reconnect.clone();
        let mut attempt = self.streak;
        loop {
            if policy.max_attempts.is_some_and(|max| attempt >= max) {
                tracing::warn!("giving up reconnecting after {attempt} attempts");
                self.finish();
                return None;
            }
            if !self.idle_for(policy.delay(attempt)).await {
                return None;
            }
            attempt = attempt.saturating_add(1);
            let shared = self.shared.clone();
            let position = self.position.clone();
            let connecting = async move { establish(&shared, position.as_ref()).await };
            tokio::pin!(connecting);
            let result = loop {
                tokio::select! {
                    result = &mut connecting => break result,
                    command = self.commands.recv() => {
                        if !self.offline(command) {
                            return None;
                        }
                    }
                }
            };
            match result {
                Ok(connection) => {
                    tracing::info!(attempt, "reconnected");
                    self.streak = attempt;
                    return Some(connection);
                }
                Err(error @ Error::SessionEnded { .. }) => {
                    self.end(error).await;
                    return None;
                }
                Err(error) => {
                    tracing::debug!(attempt, "reconnection failed: {error}");
                    self.emit(SessionEvent::Error(error)).await;
                }
            }
        }
    }
}
