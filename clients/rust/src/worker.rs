//! The background side: one task owns the WebSocket (sends commands, reads
//! frames, keeps the connection alive, reconnects), a second one runs the
//! user's handlers so that a slow handler never stalls the socket's reads for
//! long and never runs while the socket task holds a lock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as Frame, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::auth::{Auth, REFRESH_MARGIN, Token};
use crate::message::{Incoming, Verb, parse_incoming};
use crate::options::{ConnectionState, HandlerId, Options, STABLE_AFTER};
use crate::{Error, Message};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub(crate) type Reply = oneshot::Sender<Result<(), Error>>;
pub(crate) type PingReply = oneshot::Sender<Result<Duration, Error>>;
pub(crate) type MessageHandler = Arc<dyn Fn(Message) + Send + Sync>;
pub(crate) type ErrorHandler = Arc<dyn Fn(&Error) + Send + Sync>;

/// Registered callbacks.
#[derive(Default)]
pub(crate) struct Handlers {
    next_id: u64,
    /// Topic (or `*`) to its handlers, in registration order.
    messages: HashMap<String, Vec<(HandlerId, MessageHandler)>>,
    errors: Vec<(HandlerId, ErrorHandler)>,
}

impl Handlers {
    fn next_id(&mut self) -> HandlerId {
        self.next_id += 1;
        HandlerId(self.next_id)
    }

    pub fn add_message(&mut self, topic: String, handler: MessageHandler) -> HandlerId {
        let id = self.next_id();
        self.messages.entry(topic).or_default().push((id, handler));
        id
    }

    pub fn add_error(&mut self, handler: ErrorHandler) -> HandlerId {
        let id = self.next_id();
        self.errors.push((id, handler));
        id
    }

    pub fn remove(&mut self, id: HandlerId) -> bool {
        let mut found = false;
        self.messages.retain(|_, list| {
            list.retain(|(h, _)| {
                found |= *h == id;
                *h != id
            });
            !list.is_empty()
        });
        self.errors.retain(|(h, _)| {
            found |= *h == id;
            *h != id
        });
        found
    }

    fn for_topic(&self, topic: &str) -> Vec<MessageHandler> {
        let exact = self.messages.get(topic).into_iter().flatten();
        let any = self.messages.get("*").into_iter().flatten();
        exact.chain(any).map(|(_, h)| h.clone()).collect()
    }

    fn for_errors(&self) -> Vec<ErrorHandler> {
        self.errors.iter().map(|(_, h)| h.clone()).collect()
    }
}

/// State shared by the handle(s), the socket task and the dispatcher.
pub(crate) struct Shared {
    pub name: String,
    pub session: String,
    pub url: String,
    pub options: Options,
    pub auth: Option<Auth>,
    pub handlers: Mutex<Handlers>,
    /// Topics to be subscribed on every (re)connection.
    pub topics: Mutex<BTreeSet<String>>,
    pub state: watch::Sender<ConnectionState>,
}

impl Shared {
    pub fn handlers(&self) -> std::sync::MutexGuard<'_, Handlers> {
        self.handlers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn topics(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, state: ConnectionState) {
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }
}

/// Requests from the handle to the socket task.
pub(crate) enum Command {
    Subscribe {
        topic: String,
        reply: Reply,
    },
    Unsubscribe {
        topic: String,
        reply: Reply,
    },
    Publish {
        frame: String,
        reply: Reply,
        deadline: Instant,
    },
    Ping {
        reply: PingReply,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What the dispatcher hands to the user's callbacks.
pub(crate) enum Event {
    Message(Message),
    Error(Error),
}

/// Runs handlers, in order, one event at a time. A panicking handler is
/// logged and does not take the others down.
pub(crate) async fn dispatch(shared: Arc<Shared>, mut events: mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Message(message) => {
                let handlers = shared.handlers().for_topic(&message.topic);
                if handlers.is_empty() {
                    tracing::trace!(topic = %message.topic, "message without a handler");
                }
                for handler in handlers {
                    let m = message.clone();
                    if std::panic::catch_unwind(AssertUnwindSafe(|| handler(m))).is_err() {
                        tracing::error!(topic = %message.topic, "a message handler panicked");
                    }
                }
            }
            Event::Error(error) => {
                tracing::debug!("{error}");
                for handler in shared.handlers().for_errors() {
                    if std::panic::catch_unwind(AssertUnwindSafe(|| handler(&error))).is_err() {
                        tracing::error!("an error handler panicked");
                    }
                }
            }
        }
    }
}

/// The error a close frame from the server stands for.
pub(crate) fn close_error(frame: Option<CloseFrame>) -> Error {
    match frame {
        Some(f) => Error::ServerClosed {
            code: f.code.into(),
            reason: f.reason.to_string(),
        },
        None => Error::ConnectionLost,
    }
}

/// Closes with 1000 and waits (briefly) for the server's close reply.
pub(crate) async fn close_politely(ws: &mut Ws, reason: &'static str) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        ws.close(Some(frame)).await?;
        while let Some(frame) = ws.next().await {
            frame?;
        }
        Ok::<(), tungstenite::Error>(())
    })
    .await;
}

/// Opens the WebSocket (with the current token, if any) and registers the
/// client's name and session, waiting for both confirmations.
pub(crate) async fn establish(shared: &Shared, events: &mpsc::Sender<Event>) -> Result<Ws, Error> {
    let options = &shared.options;
    let work = async {
        let mut request = shared.url.as_str().into_client_request()?;
        if let Some(token) = shared.auth.as_ref().and_then(Auth::current) {
            let value = HeaderValue::from_str(&format!("Bearer {}", token.jwt))
                .map_err(|_| Error::InvalidToken("not a valid header value".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(options.max_message_bytes))
            .max_frame_size(Some(options.max_message_bytes));
        let (mut ws, _response) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
        ws.send(Frame::text(format!("register-name:{}", shared.name)))
            .await?;
        ws.send(Frame::text(format!("register-session:{}", shared.session)))
            .await?;
        let (mut name_done, mut session_done) = (false, false);
        while !(name_done && session_done) {
            let frame = ws.next().await.ok_or(Error::ConnectionLost)??;
            let text = match frame {
                Frame::Text(text) => text,
                Frame::Close(frame) => return Err(close_error(frame)),
                _ => continue,
            };
            match parse_incoming(&text) {
                Incoming::Reply {
                    verb: Verb::RegisterName,
                    result,
                    ..
                } => {
                    result?;
                    name_done = true;
                }
                Incoming::Reply {
                    verb: Verb::RegisterSession,
                    result,
                    ..
                } => {
                    result?;
                    session_done = true;
                }
                Incoming::Message(message) => {
                    let _ = events.send(Event::Message(message)).await;
                }
                Incoming::Error(error)
                | Incoming::Reply {
                    result: Err(error), ..
                } => {
                    let _ = events.send(Event::Error(Error::Server(error))).await;
                }
                other => tracing::debug!("ignored while registering: {other:?}"),
            }
        }
        Ok(ws)
    };
    tokio::time::timeout(options.connect_timeout, work)
        .await
        .map_err(|_| Error::Timeout("the connection and registration"))?
}

/// How long before expiry a token is replaced: a minute, or half its life
/// for short-lived tokens (so a 30 s token does not refresh continuously).
fn refresh_margin(token: &Token) -> Duration {
    REFRESH_MARGIN.min(token.lifetime / 2)
}

/// One reconnection attempt: a token first if needed, then the socket.
async fn try_connect(
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    force_refresh: bool,
) -> Result<Ws, Error> {
    if let Some(auth) = &shared.auth {
        if force_refresh {
            auth.refresh().await?;
        } else {
            let margin = auth
                .current()
                .map_or(REFRESH_MARGIN, |t| refresh_margin(&t));
            auth.refresh_if_needed(margin).await?;
        }
    }
    establish(&shared, &events).await
}

/// A command sent on the current connection and waiting for its answer.
struct Pending {
    topic: Option<String>,
    waiters: Vec<Reply>,
    ping: Option<(Instant, PingReply)>,
    /// Sent by the client itself after a reconnection.
    resubscribe: bool,
}

impl Pending {
    fn new(topic: Option<String>, waiter: Option<Reply>) -> Pending {
        Pending {
            topic,
            waiters: waiter.into_iter().collect(),
            ping: None,
            resubscribe: false,
        }
    }
}

/// Why the socket loop stopped.
enum Exit {
    /// close() was called or every handle was dropped.
    Shutdown(Option<oneshot::Sender<()>>),
    /// The connection is gone (or should be replaced).
    Lost(Cause),
}

enum Cause {
    Error(Error),
    /// The token is about to expire: reconnect with a fresh one.
    TokenRefresh,
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Per verb, the commands awaiting an answer, oldest first (the server
    /// answers each connection's commands in order).
    pending: HashMap<Verb, VecDeque<Pending>>,
    /// Subscribe calls whose answer was lost with a connection; answered
    /// when the topic is subscribed again.
    carried: HashMap<String, Vec<Reply>>,
    /// Publishes made while reconnecting.
    offline: VecDeque<(Utf8Bytes, Reply, Instant)>,
    /// Resubscriptions not yet confirmed after a reconnection.
    resubscribing: usize,
    /// Resubscriptions the server could not carry out for now
    /// (`subscribe_failed`: its Redis is down), to send again at `retry_at`.
    retry: Vec<(String, Vec<Reply>)>,
    retry_at: Option<Instant>,
    retry_attempt: u32,
    /// Reconnection attempts of recent connections that did not last; the
    /// backoff continues from here instead of restarting at zero, so a
    /// server that accepts and then drops connections is not hammered.
    streak: u32,
}

/// Subscription refusals that retrying cannot fix.
fn permanent_refusal(code: &str) -> bool {
    matches!(
        code,
        "invalid_topic"
            | "invalid_session"
            | "session_mismatch"
            | "too_many_subscriptions"
            | "invalid_command"
            | "unknown_command"
            | "not_registered"
    )
}

impl Worker {
    pub fn new(
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Worker {
        Worker {
            shared,
            commands,
            events,
            pending: HashMap::new(),
            carried: HashMap::new(),
            offline: VecDeque::new(),
            resubscribing: 0,
            retry: Vec::new(),
            retry_at: None,
            retry_attempt: 0,
            streak: 0,
        }
    }

    pub async fn run(mut self, mut ws: Ws) {
        loop {
            let connected_at = Instant::now();
            let mut cause = match self.serve(&mut ws).await {
                Exit::Shutdown(reply) => {
                    close_politely(&mut ws, "client closed").await;
                    self.finish();
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    return;
                }
                Exit::Lost(cause) => cause,
            };
            if matches!(cause, Cause::TokenRefresh) {
                close_politely(&mut ws, "token refresh").await;
                self.streak = 0;
            } else if connected_at.elapsed() >= STABLE_AFTER {
                self.streak = 0;
            }
            loop {
                ws = match self.reconnect(cause).await {
                    Some(ws) => ws,
                    None => return,
                };
                match self.resume(&mut ws).await {
                    Ok(()) => break,
                    Err(e) => cause = Cause::Error(e),
                }
            }
        }
    }

    async fn emit(&self, event: Event) {
        // The dispatcher only ends after this task; a failure means the
        // runtime is shutting down, when nobody is listening anyway.
        let _ = self.events.send(event).await;
    }

    async fn send(&self, ws: &mut Ws, frame: Frame) -> Result<(), Error> {
        tokio::time::timeout(self.shared.options.request_timeout, ws.send(frame))
            .await
            .map_err(|_| Error::Timeout("the socket to accept a frame"))?
            .map_err(Error::from)
    }

    /// When to replace the connection's token, if it has one.
    fn planned_refresh(&self) -> Option<Instant> {
        let token = self.shared.auth.as_ref()?.current()?;
        let remaining = token.remaining()?;
        let wait = remaining
            .saturating_sub(refresh_margin(&token))
            .max(Duration::from_secs(5));
        Some(Instant::now() + wait)
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
        let refresh_at = self.planned_refresh();
        let refresh = tokio::time::sleep_until(
            refresh_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365)),
        );
        tokio::pin!(refresh);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return Exit::Shutdown(None),
                    Some(Command::Close { reply }) => return Exit::Shutdown(Some(reply)),
                    Some(command) => {
                        if let Err(e) = self.online(ws, command).await {
                            return Exit::Lost(Cause::Error(e));
                        }
                    }
                },
                frame = ws.next() => match frame {
                    None => return Exit::Lost(Cause::Error(Error::ConnectionLost)),
                    Some(Err(e)) => return Exit::Lost(Cause::Error(e.into())),
                    Some(Ok(frame)) => {
                        last_heard = Instant::now();
                        match frame {
                            Frame::Text(text) => self.on_text(&text).await,
                            Frame::Close(frame) => return Exit::Lost(Cause::Error(close_error(frame))),
                            _ => {}
                        }
                    }
                },
                _ = keepalive.tick() => {
                    if last_heard.elapsed() >= options.keepalive_timeout {
                        return Exit::Lost(Cause::Error(Error::Timeout("the server to answer keepalive pings")));
                    }
                    if let Err(e) = self.send(ws, Frame::Ping(Default::default())).await {
                        return Exit::Lost(Cause::Error(e));
                    }
                },
                () = &mut refresh, if refresh_at.is_some() => return Exit::Lost(Cause::TokenRefresh),
                () = tokio::time::sleep_until(self.retry_at.unwrap_or_else(Instant::now)),
                    if self.retry_at.is_some() =>
                {
                    if let Err(e) = self.retry_subscriptions(ws).await {
                        return Exit::Lost(Cause::Error(e));
                    }
                }
            }
        }
    }

    /// A command while connected.
    async fn online(&mut self, ws: &mut Ws, command: Command) -> Result<(), Error> {
        let session = &self.shared.session;
        let (verb, pending, frame) = match command {
            Command::Subscribe { topic, reply } => {
                self.shared.topics().insert(topic.clone());
                let frame = format!("subscribe:{topic}|{session}");
                (
                    Verb::Subscribe,
                    Pending::new(Some(topic), Some(reply)),
                    frame,
                )
            }
            Command::Unsubscribe { topic, reply } => {
                self.shared.topics().remove(&topic);
                self.carried.remove(&topic);
                let frame = format!("unsubscribe:{topic}|{session}");
                let pending = Pending::new(Some(topic), Some(reply));
                (Verb::Unsubscribe, pending, frame)
            }
            Command::Ping { reply } => {
                let mut pending = Pending::new(None, None);
                pending.ping = Some((Instant::now(), reply));
                (Verb::Ping, pending, "ping".to_owned())
            }
            Command::Publish {
                frame,
                reply,
                deadline,
            } => {
                if Instant::now() >= deadline {
                    let _ = reply.send(Err(Error::Timeout("the message to be sent")));
                    return Ok(());
                }
                let text = Utf8Bytes::from(frame);
                return match self.send(ws, Frame::Text(text.clone())).await {
                    Ok(()) => {
                        let _ = reply.send(Ok(()));
                        Ok(())
                    }
                    Err(e) => {
                        // Most likely never left this machine: send it on
                        // the next connection instead of failing the call.
                        self.offline.push_front((text, reply, deadline));
                        Err(e)
                    }
                };
            }
            Command::Close { reply } => {
                // Handled by the caller; answer anyway rather than hang.
                let _ = reply.send(());
                return Ok(());
            }
        };
        // Queue first: if the send fails the waiter is carried over.
        self.pending.entry(verb).or_default().push_back(pending);
        self.send(ws, Frame::text(frame)).await
    }

    /// A command while reconnecting. False when it was a shutdown (already
    /// carried out).
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
            Some(Command::Subscribe { topic, reply }) => {
                self.shared.topics().insert(topic.clone());
                self.carried.entry(topic).or_default().push(reply);
                true
            }
            Some(Command::Unsubscribe { topic, reply }) => {
                // Not subscribed anywhere now, and no longer restored.
                self.shared.topics().remove(&topic);
                self.carried.remove(&topic);
                let _ = reply.send(Ok(()));
                true
            }
            Some(Command::Publish {
                frame,
                reply,
                deadline,
            }) => {
                if self.offline.len() >= self.shared.options.offline_queue {
                    let _ = reply.send(Err(Error::QueueFull));
                } else {
                    self.offline.push_back((frame.into(), reply, deadline));
                }
                true
            }
            Some(Command::Ping { reply }) => {
                let _ = reply.send(Err(Error::NotConnected));
                true
            }
        }
    }

    async fn on_text(&mut self, text: &str) {
        match parse_incoming(text) {
            Incoming::Message(message) => self.emit(Event::Message(message)).await,
            Incoming::Reply {
                verb,
                topic,
                result,
            } => self.on_reply(verb, topic, result).await,
            Incoming::Error(error) => self.emit(Event::Error(Error::Server(error))).await,
            Incoming::Other(text) => tracing::debug!("ignored frame from the server: {text:?}"),
        }
    }

    async fn on_reply(
        &mut self,
        verb: Verb,
        topic: Option<String>,
        result: Result<(), crate::ServerError>,
    ) {
        if let Err(error) = &result {
            self.emit(Event::Error(Error::Server(error.clone()))).await;
        }
        let Some(entry) = self.pending.get_mut(&verb).and_then(VecDeque::pop_front) else {
            tracing::debug!(?verb, "answer to a command this client did not send");
            return;
        };
        if let (Some(sent), Some(got)) = (&entry.topic, &topic)
            && sent != got
        {
            tracing::warn!(?verb, sent, got, "the server answered out of order");
        }
        if verb == Verb::Subscribe {
            if let (true, Some(topic), Err(error)) = (entry.resubscribe, &entry.topic, &result)
                && !permanent_refusal(&error.code)
            {
                // Keep the topic and its waiters; try again shortly. The
                // state stays Reconnecting until it is restored.
                self.retry.push((topic.clone(), entry.waiters));
                let delay = self
                    .shared
                    .options
                    .reconnect
                    .delay(self.retry_attempt.saturating_add(1));
                self.retry_attempt = self.retry_attempt.saturating_add(1);
                self.retry_at.get_or_insert_with(|| Instant::now() + delay);
                return;
            }
            if result.is_err()
                && let Some(topic) = &entry.topic
            {
                self.shared.topics().remove(topic);
            }
            if entry.resubscribe {
                self.resubscription_settled();
            }
        }
        for waiter in entry.waiters {
            let _ = waiter.send(result.clone().map_err(Error::Server));
        }
        if let Some((sent_at, reply)) = entry.ping {
            let _ = reply.send(result.map(|()| sent_at.elapsed()).map_err(Error::Server));
        }
    }

    fn resubscription_settled(&mut self) {
        self.resubscribing = self.resubscribing.saturating_sub(1);
        if self.resubscribing == 0 {
            self.retry_attempt = 0;
            self.shared.set_state(ConnectionState::Connected);
        }
    }

    /// Sends the resubscriptions that failed for a transient reason again.
    async fn retry_subscriptions(&mut self, ws: &mut Ws) -> Result<(), Error> {
        self.retry_at = None;
        let session = self.shared.session.clone();
        for (topic, waiters) in std::mem::take(&mut self.retry) {
            if !self.shared.topics().contains(&topic) {
                // Unsubscribed meanwhile.
                for waiter in waiters {
                    let _ = waiter.send(Err(Error::ConnectionLost));
                }
                self.resubscription_settled();
                continue;
            }
            let frame = format!("subscribe:{topic}|{session}");
            self.pending
                .entry(Verb::Subscribe)
                .or_default()
                .push_back(Pending {
                    topic: Some(topic),
                    waiters,
                    ping: None,
                    resubscribe: true,
                });
            self.send(ws, Frame::text(frame)).await?;
        }
        Ok(())
    }

    /// The connection is gone: keep what can be answered later, fail the rest.
    fn connection_dropped(&mut self) {
        self.retry_at = None;
        for (topic, waiters) in std::mem::take(&mut self.retry) {
            self.carried.entry(topic).or_default().extend(waiters);
        }
        let topics = self.shared.topics().clone();
        for (verb, queue) in self.pending.drain() {
            for entry in queue {
                match (verb, entry.topic) {
                    (Verb::Subscribe, Some(topic)) if topics.contains(&topic) => {
                        self.carried.entry(topic).or_default().extend(entry.waiters);
                    }
                    // The server forgets a closed connection's subscriptions.
                    (Verb::Unsubscribe, _) => {
                        for waiter in entry.waiters {
                            let _ = waiter.send(Ok(()));
                        }
                    }
                    _ => {
                        for waiter in entry.waiters {
                            let _ = waiter.send(Err(Error::ConnectionLost));
                        }
                    }
                }
                if let Some((_, reply)) = entry.ping {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
            }
        }
        self.resubscribing = 0;
        self.retry_attempt = 0;
    }

    /// Fails everything still waiting; the client is closed.
    fn finish(&mut self) {
        self.connection_dropped();
        for (_, waiters) in self.carried.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(Error::Closed));
            }
        }
        for (_, reply, _) in self.offline.drain(..) {
            let _ = reply.send(Err(Error::Closed));
        }
        self.shared.set_state(ConnectionState::Closed);
    }

    /// Sleeps while answering commands; false if the client was shut down.
    async fn idle_for(&mut self, delay: Duration) -> bool {
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

    /// Reconnects with backoff. None when the client shut down or gave up.
    async fn reconnect(&mut self, cause: Cause) -> Option<Ws> {
        self.connection_dropped();
        self.shared.set_state(ConnectionState::Reconnecting);
        let mut force_refresh = false;
        if let Cause::Error(error) = cause {
            tracing::info!("connection lost: {error}; reconnecting");
            // 1008 is also used for a slow client; a fresh token costs little.
            force_refresh = matches!(error, Error::ServerClosed { code: 1008, .. });
            self.emit(Event::Error(error)).await;
        }
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
            let connecting = try_connect(self.shared.clone(), self.events.clone(), force_refresh);
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
                Ok(ws) => {
                    tracing::info!(attempt, "reconnected");
                    self.streak = attempt;
                    return Some(ws);
                }
                Err(error) => {
                    tracing::debug!(attempt, "reconnection failed: {error}");
                    force_refresh = error.is_auth_failure();
                    self.emit(Event::Error(error)).await;
                }
            }
        }
    }

    /// On a new connection: subscribe every topic again, then send what was
    /// published in the meantime.
    async fn resume(&mut self, ws: &mut Ws) -> Result<(), Error> {
        let topics = self.shared.topics().clone();
        self.resubscribing = topics.len();
        if topics.is_empty() {
            self.shared.set_state(ConnectionState::Connected);
        }
        let session = self.shared.session.clone();
        for topic in topics {
            let waiters = self.carried.remove(&topic).unwrap_or_default();
            let frame = format!("subscribe:{topic}|{session}");
            self.pending
                .entry(Verb::Subscribe)
                .or_default()
                .push_back(Pending {
                    topic: Some(topic),
                    waiters,
                    ping: None,
                    resubscribe: true,
                });
            self.send(ws, Frame::text(frame)).await?;
        }
        // Waiters for topics unsubscribed meanwhile.
        for (_, waiters) in self.carried.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(Error::ConnectionLost));
            }
        }
        while let Some((frame, reply, deadline)) = self.offline.pop_front() {
            if Instant::now() >= deadline {
                let _ = reply.send(Err(Error::Timeout("the connection to return")));
                continue;
            }
            if let Err(e) = self.send(ws, Frame::Text(frame.clone())).await {
                self.offline.push_front((frame, reply, deadline));
                return Err(e);
            }
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }
}
