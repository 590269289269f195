//! Topic pub/sub between clients: `GET /ws` (its tokens come from
//! `POST /auth/token`, in [`crate::auth::issue`]).
//!
//! Clients speak a line protocol of text commands (`register-name:`,
//! `register-session:`, `subscribe:{topic}|{session}`,
//! `unsubscribe:{topic}|{session}`, `publish-json:{json}`, `ping`); the
//! `|{session}` part may be left out on a connection bound to a session.
//! Messages travel through the same [`Broker`](crate::broker::Broker) as the
//! session bridge, on Redis channels `pubsub:{session}:{topic}`: one Redis
//! subscription per topic per process, so clients on different wsproxy
//! processes sharing a Redis see each other's messages.
//!
//! Isolation: every connection is bound to exactly one session, the one in
//! its token, or for anonymous clients (when allowed) the first one it
//! names. Commands for any other session are refused; a message only ever
//! reaches subscribers of its topic in its session. On a server that takes
//! tokens (`JWT_SECRET`) as well as anonymous clients, anonymous clients'
//! sessions are apart from token holders' (channels
//! `pubsub:anon:{session}:{topic}`): naming a token holder's session gives
//! an anonymous client a session of the same name among anonymous clients
//! only, never the token holder's messages.
//!
//! Every refusal is a JSON error message on the socket
//! (`{"type":"error","error":"<code>","message":...,"command":...}`); the
//! connection stays open and nothing is published.

use std::collections::HashMap;
use std::sync::Arc;

use crate::redis_conn::RedisConn;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Utf8Bytes, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::{self, jwt};
use crate::broker::{self, Outbox, Subscription};
use crate::context::{App, ConnectionSlot};
use crate::error::{ApiError, Refusal};
use crate::ws::{self, Counters, Driver, Handler, HandlerFuture, Label, Reply};

/// Longest topic, session or client name.
const MAX_NAME_LEN: usize = crate::keys::MAX_ID_LEN;

/// The Redis channel of a topic in a session.
pub fn channel(keys: crate::keys::Keys, session: &str, topic: &str) -> String {
    keys.topic(session, topic)
}

/// Topics and sessions: the ids of [`crate::keys::valid_id`], so they can
/// never change the Redis channel they name.
pub fn valid_name(s: &str) -> bool {
    crate::keys::valid_id(s)
}

/// A `/ws` command line, split and with its topic and session checked
/// (see [`parse_command`]); what needs the connection's state (the session
/// binding, the name's rules, the published JSON) is checked by the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `ping`.
    Ping,
    /// `register-name:{name}`, the name as sent.
    RegisterName(&'a str),
    /// `register-session:{session}`, trimmed and a [`valid_name`].
    RegisterSession(&'a str),
    /// `subscribe:{topic}|{session}`, or `subscribe:{topic}` for the
    /// connection's own session; both trimmed and [`valid_name`]s.
    Subscribe {
        /// The topic.
        topic: &'a str,
        /// The session it is in; `None`: the connection's.
        session: Option<&'a str>,
    },
    /// `unsubscribe:{topic}|{session}` or `unsubscribe:{topic}`, as for
    /// [`Command::Subscribe`].
    Unsubscribe {
        /// The topic.
        topic: &'a str,
        /// The session it is in; `None`: the connection's.
        session: Option<&'a str>,
    },
    /// `publish-json:{json}`, the JSON as sent.
    PublishJson(&'a str),
}

/// A command line refused by [`parse_command`]: the refusal's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandError<'a> {
    /// The refusal's `command`: the verb (at most 32 bytes of an unknown
    /// one, or of a line without `:`).
    pub command: &'a str,
    /// The error code.
    pub error: &'static str,
    /// The explanation.
    pub message: &'static str,
}

const UNKNOWN_COMMAND: &str =
    "expected register-name:, register-session:, subscribe:, unsubscribe:, publish-json: or ping";
const INVALID_TOPIC: &str = "a topic is 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.'";
const INVALID_SESSION: &str = "a session id is 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.'";

/// Splits a `/ws` command line into its verb and arguments, and checks the
/// topic and session it names (not whether the connection may use that
/// session: that is the hub's, see `Hub::bind_session`).
pub fn parse_command(line: &str) -> Result<Command<'_>, CommandError<'_>> {
    if line == "ping" {
        return Ok(Command::Ping);
    }
    let unknown = |command| CommandError {
        command,
        error: "unknown_command",
        message: UNKNOWN_COMMAND,
    };
    let Some((verb, arg)) = line.split_once(':') else {
        return Err(unknown(clipped(line)));
    };
    match verb {
        "register-name" => Ok(Command::RegisterName(arg)),
        "register-session" => {
            session_name("register-session", arg.trim()).map(Command::RegisterSession)
        }
        "subscribe" => topic_and_session("subscribe", arg)
            .map(|(topic, session)| Command::Subscribe { topic, session }),
        "unsubscribe" => topic_and_session("unsubscribe", arg)
            .map(|(topic, session)| Command::Unsubscribe { topic, session }),
        "publish-json" => Ok(Command::PublishJson(arg)),
        _ => Err(unknown(clipped(verb))),
    }
}

/// At most the first 32 bytes of `s`, cut at a character boundary: what a
/// refusal echoes of an unknown command.
fn clipped(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn session_name<'a>(command: &'static str, session: &'a str) -> Result<&'a str, CommandError<'a>> {
    if !valid_name(session) {
        return Err(CommandError {
            command,
            error: "invalid_session",
            message: INVALID_SESSION,
        });
    }
    Ok(session)
}

/// Splits `topic|session` (or takes a lone `topic`) and checks the names.
fn topic_and_session<'a>(
    command: &'static str,
    arg: &'a str,
) -> Result<(&'a str, Option<&'a str>), CommandError<'a>> {
    let (topic, session) = match arg.split_once('|') {
        Some((topic, session)) => (topic, Some(session)),
        None => (arg, None),
    };
    let topic = topic.trim();
    if !valid_name(topic) {
        return Err(CommandError {
            command,
            error: "invalid_topic",
            message: INVALID_TOPIC,
        });
    }
    let session = match session {
        Some(session) => Some(session_name(command, session.trim())?),
        None => None,
    };
    Ok((topic, session))
}

/// A refused command, as sent to the client.
#[derive(Debug, Serialize)]
struct CommandRefusal<'a> {
    r#type: &'static str,
    error: &'static str,
    message: &'a str,
    command: &'a str,
}

fn refuse(app: &App, command: &str, error: &'static str, message: &str) -> Reply {
    app.metrics.pubsub_refused(error);
    let body = CommandRefusal {
        r#type: "error",
        error,
        message,
        command,
    };
    Reply::text(serde_json::to_string(&body).unwrap_or_default())
}

/// A message as clients publish it: every field but `topic` and `payload`
/// may be left out and is filled in by the server ([`Publish::parse`]).
#[doc(hidden)]
#[derive(Debug, Deserialize)]
pub struct Publish<'a> {
    /// Who publishes; the connection's name when left out.
    #[serde(borrow)]
    pub publisher_name: Option<std::borrow::Cow<'a, str>>,
    /// The topic, a [`valid_name`].
    #[serde(borrow)]
    pub topic: std::borrow::Cow<'a, str>,
    /// The payload, as sent.
    #[serde(borrow)]
    pub payload: &'a RawValue,
    /// When; now when left out.
    #[serde(borrow)]
    pub timestamp: Option<std::borrow::Cow<'a, str>>,
    /// The session, a [`valid_name`] when given; the connection's when left
    /// out.
    #[serde(borrow)]
    pub session_id: Option<std::borrow::Cow<'a, str>>,
}

/// A `publish-json:` message refused by [`Publish::parse`] or
/// [`Publish::publisher`]: the refusal's error code and message.
#[doc(hidden)]
#[derive(Debug)]
pub struct PublishRefusal {
    /// The error code.
    pub error: &'static str,
    /// The explanation.
    pub message: String,
}

impl<'a> Publish<'a> {
    /// Reads a `publish-json:` message and checks what needs no connection
    /// state: its shape, the payload's size, the topic, and the session's
    /// name (not whether the connection may use it). Public for the fuzz
    /// target.
    pub fn parse(json: &'a str, max_payload_bytes: usize) -> Result<Self, PublishRefusal> {
        let refuse = |error, message: String| PublishRefusal { error, message };
        let msg: Publish<'_> = serde_json::from_str(json).map_err(|e| {
            refuse(
                "invalid_json",
                format!(
                    "expected a JSON object with topic and payload (publisher_name, timestamp, session_id optional): {e}"
                ),
            )
        })?;
        if msg.payload.get().len() > max_payload_bytes {
            return Err(refuse(
                "payload_too_large",
                format!("the payload is larger than {max_payload_bytes} bytes"),
            ));
        }
        if !valid_name(&msg.topic) {
            return Err(refuse("invalid_topic", INVALID_TOPIC.to_owned()));
        }
        if msg.session_id.as_deref().is_some_and(|s| !valid_name(s)) {
            return Err(refuse("invalid_session", INVALID_SESSION.to_owned()));
        }
        Ok(msg)
    }

    /// The publisher's name: the message's, else `fallback` (the
    /// connection's), else `anonymous`; 1-128 printable characters.
    pub fn publisher<'b>(&'b self, fallback: Option<&'b str>) -> Result<&'b str, PublishRefusal> {
        let publisher = self
            .publisher_name
            .as_deref()
            .or(fallback)
            .unwrap_or("anonymous");
        if publisher.is_empty()
            || publisher.len() > MAX_NAME_LEN
            || publisher.chars().any(char::is_control)
        {
            return Err(PublishRefusal {
                error: "invalid_command",
                message: "publisher_name must be 1-128 printable characters".to_owned(),
            });
        }
        Ok(publisher)
    }

    /// The message as subscribers of `session` receive it, `timestamp`
    /// filling in a missing one.
    pub fn delivered(
        &self,
        publisher: &str,
        subject: Option<&str>,
        session: &str,
        timestamp: &str,
    ) -> serde_json::Result<String> {
        serde_json::to_string(&Delivered {
            publisher_name: publisher,
            publisher_sub: subject,
            topic: &self.topic,
            payload: self.payload,
            timestamp: self.timestamp.as_deref().unwrap_or(timestamp),
            session_id: session,
        })
    }
}

/// A message as subscribers receive it (the payload passes through as the
/// publisher wrote it).
#[derive(Debug, Serialize)]
struct Delivered<'a> {
    /// The name the publisher gives itself: a display name, not checked.
    publisher_name: &'a str,
    /// The verified token's `sub` of the connection that published (never
    /// the client's word): absent for an anonymous connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher_sub: Option<&'a str>,
    topic: &'a str,
    payload: &'a RawValue,
    timestamp: &'a str,
    session_id: &'a str,
}

/// State of one `/ws` connection.
struct Hub {
    app: Arc<App>,
    redis: RedisConn,
    outbox: Arc<Outbox>,
    /// Set by the token, or by the first session an anonymous client uses.
    session: Option<String>,
    /// True when the session came from a verified token.
    session_from_token: bool,
    /// `register-name`, or the token's subject.
    name: Option<String>,
    /// The verified token's subject (`publisher_sub` of what it publishes).
    subject: Option<Box<str>>,
    /// Topic -> its live broker subscription.
    topics: HashMap<String, Subscription>,
    /// An anonymous connection on a server that also takes tokens: its
    /// topics are on [`crate::keys::Keys::anonymous_topic`] channels, apart
    /// from token holders' sessions of the same name.
    apart: bool,
}

impl Handler for Hub {
    fn on_text(&mut self, text: Utf8Bytes) -> HandlerFuture<'_> {
        Box::pin(async move { self.command(text.as_str()).await })
    }

    fn on_binary(&mut self, _data: bytes::Bytes) -> Reply {
        refuse(
            &self.app,
            "binary",
            "invalid_command",
            "binary frames are not commands; send text",
        )
    }
}

impl Hub {
    /// The Redis channel of `topic` in `session` for this connection.
    fn channel(&self, session: &str, topic: &str) -> String {
        let keys = self.app.config.keys();
        if self.apart {
            keys.anonymous_topic(session, topic)
        } else {
            channel(keys, session, topic)
        }
    }

    async fn command(&mut self, line: &str) -> Reply {
        match parse_command(line) {
            Err(e) => refuse(&self.app, e.command, e.error, e.message),
            Ok(Command::Ping) => Reply::text("pong"),
            Ok(Command::RegisterName(name)) => self.register_name(name),
            Ok(Command::RegisterSession(session)) => self.register_session(session),
            Ok(Command::Subscribe { topic, session }) => self.subscribe(topic, session).await,
            Ok(Command::Unsubscribe { topic, session }) => self.unsubscribe(topic, session),
            Ok(Command::PublishJson(json)) => self.publish(json).await,
        }
    }

    fn register_name(&mut self, name: &str) -> Reply {
        let name = name.trim();
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return refuse(
                &self.app,
                "register-name",
                "invalid_command",
                "the name must be 1-128 printable characters",
            );
        }
        self.name = Some(name.to_owned());
        Reply::text(serde_json::json!({ "type": "registered", "name": name }).to_string())
    }

    /// Binds the connection to `session`, or checks it is the bound one.
    fn bind_session(&mut self, command: &str, session: &str) -> Result<(), Reply> {
        if !valid_name(session) {
            return Err(refuse(
                &self.app,
                command,
                "invalid_session",
                "a session id is 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.'",
            ));
        }
        match &self.session {
            Some(bound) if bound == session => Ok(()),
            Some(bound) => {
                let why = if self.session_from_token {
                    format!("this connection's token is for session {bound:?}")
                } else {
                    format!("this connection is bound to session {bound:?}")
                };
                Err(refuse(&self.app, command, "session_mismatch", &why))
            }
            None => {
                self.session = Some(session.to_owned());
                Ok(())
            }
        }
    }

    fn register_session(&mut self, session: &str) -> Reply {
        let session = session.trim();
        if let Err(refusal) = self.bind_session("register-session", session) {
            return refusal;
        }
        Reply::text(serde_json::json!({ "type": "registered", "session_id": session }).to_string())
    }

    /// Checks a command's session (split and checked by [`parse_command`])
    /// against the connection, or, for a command without one, that the
    /// connection has a session; returns its topic.
    fn topic_and_session<'a>(
        &mut self,
        command: &str,
        topic: &'a str,
        session: Option<&str>,
    ) -> Result<&'a str, Reply> {
        match session {
            Some(session) => self.bind_session(command, session)?,
            None if self.session.is_none() => {
                return Err(refuse(
                    &self.app,
                    command,
                    "not_registered",
                    "no session: send register-session:{session} first or name it, as in subscribe:{topic}|{session}",
                ));
            }
            None => {}
        }
        Ok(topic)
    }

    async fn subscribe(&mut self, topic: &str, session: Option<&str>) -> Reply {
        let topic = match self.topic_and_session("subscribe", topic, session) {
            Ok(t) => t,
            Err(refusal) => return refusal,
        };
        let session = self.session.clone().unwrap_or_default();
        let confirmed =
            serde_json::json!({ "type": "subscribed", "topic": topic, "session_id": session })
                .to_string();
        if self.topics.contains_key(topic) {
            return Reply::text(confirmed);
        }
        let limit = self.app.config.pubsub.max_subscriptions;
        if self.topics.len() >= limit {
            return refuse(
                &self.app,
                "subscribe",
                "too_many_subscriptions",
                &format!("a connection may subscribe to at most {limit} topics"),
            );
        }
        let wait = self.app.config.auth_timeout;
        match self
            .app
            .broker
            .subscribe(&self.channel(&session, topic), self.outbox.clone(), wait)
            .await
        {
            Ok(subscription) => {
                self.topics.insert(topic.to_owned(), subscription);
                self.app.metrics.pubsub_subscriptions.inc();
                Reply::text(confirmed)
            }
            Err(e) => refuse(
                &self.app,
                "subscribe",
                "subscribe_failed",
                &format!("Redis is unavailable: {e}"),
            ),
        }
    }

    fn unsubscribe(&mut self, topic: &str, session: Option<&str>) -> Reply {
        let topic = match self.topic_and_session("unsubscribe", topic, session) {
            Ok(t) => t,
            Err(refusal) => return refusal,
        };
        if self.topics.remove(topic).is_some() {
            self.app.metrics.pubsub_subscriptions.dec();
        }
        let session = self.session.as_deref().unwrap_or_default();
        Reply::text(
            serde_json::json!({ "type": "unsubscribed", "topic": topic, "session_id": session })
                .to_string(),
        )
    }

    async fn publish(&mut self, json: &str) -> Reply {
        let msg = match Publish::parse(json, self.app.config.pubsub.max_payload_bytes) {
            Ok(m) => m,
            Err(e) => return refuse(&self.app, "publish-json", e.error, &e.message),
        };
        let session = match (&msg.session_id, &self.session) {
            (Some(s), _) => {
                if let Err(refusal) = self.bind_session("publish-json", s) {
                    return refusal;
                }
                s.to_string()
            }
            (None, Some(bound)) => bound.clone(),
            (None, None) => {
                return refuse(
                    &self.app,
                    "publish-json",
                    "not_registered",
                    "no session: send register-session first or include session_id",
                );
            }
        };
        let publisher = match msg.publisher(self.name.as_deref()) {
            Ok(p) => p,
            Err(e) => return refuse(&self.app, "publish-json", e.error, &e.message),
        };
        let now = match msg.timestamp {
            Some(_) => String::new(),
            None => humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let Ok(body) = msg.delivered(publisher, self.subject.as_deref(), &session, &now) else {
            return refuse(
                &self.app,
                "publish-json",
                "invalid_json",
                "could not encode the message",
            );
        };
        let limit = self.app.config.auth_timeout;
        let keys = self.app.config.keys();
        let channel = self.channel(&session, &msg.topic);
        match broker::publish(&mut self.redis, keys, &channel, body.as_bytes(), limit).await {
            Ok(_) => {
                self.app.metrics.pubsub_published.inc();
                Reply::None
            }
            _ => refuse(
                &self.app,
                "publish-json",
                "publish_failed",
                "the message was not delivered: Redis is unavailable",
            ),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let n = self.topics.len() as i64;
        self.app.metrics.pubsub_subscriptions.dec_by(n);
    }
}

/// Query parameters of `/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// The JWT, for browsers (which cannot set headers on a WebSocket).
    access_token: Option<String>,
}

/// `GET /ws`.
pub async fn handler(
    State(app): State<Arc<App>>,
    query: Result<Query<WsQuery>, QueryRejection>,
    slot: Option<Extension<ConnectionSlot>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match accept(app, query, slot.map(|s| s.0), headers, upgrade) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// What a client without a token is told: where a token comes from on
/// this server, or what the operator has to configure first.
fn missing_token_hint(app: &App) -> &'static str {
    match (&app.config.jwt, &app.users) {
        (Some(_), Some(_)) => {
            "send \"Authorization: Bearer <token>\" or ?access_token=<token> (get one from POST /auth/token)"
        }
        (Some(_), None) => {
            "send \"Authorization: Bearer <token>\" or ?access_token=<token>, a JWT signed with the server's JWT_SECRET (POST /auth/token also needs USERS_FILE on the server)"
        }
        (None, _) => {
            "this server takes no tokens on /ws: its operator must set JWT_SECRET (and USERS_FILE for POST /auth/token), or PUBSUB_ALLOW_ANONYMOUS=true"
        }
    }
}

fn accept(
    app: Arc<App>,
    query: Result<Query<WsQuery>, QueryRejection>,
    slot: Option<ConnectionSlot>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    crate::handshake::admit(&headers, &app.config.ws_origins)?;
    let upgrade = upgrade.map_err(ApiError::not_a_websocket)?;
    let Query(query) = query.map_err(ApiError::invalid_query)?;
    if app.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let present =
        headers.contains_key(axum::http::header::AUTHORIZATION) || query.access_token.is_some();
    let claims = if present {
        let token = auth::bearer_token(&headers, query.access_token.as_deref())
            .map_err(|e| Refusal::MissingToken(e.to_string().into()).counted(&app.metrics))?;
        let Some(jwt_config) = &app.config.jwt else {
            return Err(Refusal::InvalidToken(
                "this server issues no tokens (JWT_SECRET is not set)".into(),
            )
            .counted(&app.metrics));
        };
        let claims = jwt::verify(jwt_config, token).map_err(|e| {
            tracing::info!(error = %crate::logsafe::escaped(&e.to_string()), "refused /ws: invalid token");
            Refusal::InvalidToken(e.to_string().into()).counted(&app.metrics)
        })?;
        // The verifier tolerates a few seconds of clock skew; a token that
        // is past its exp would only be closed at once, so refuse it here.
        if jwt::remaining(&claims).is_zero() {
            return Err(Refusal::InvalidToken("the token has expired".into()).counted(&app.metrics));
        }
        if !valid_name(&claims.sid) {
            return Err(
                Refusal::InvalidToken("the token's session id is not valid".into())
                    .counted(&app.metrics),
            );
        }
        Some(claims)
    } else if app.config.pubsub.allow_anonymous {
        None
    } else {
        return Err(Refusal::MissingToken(missing_token_hint(&app).into()).counted(&app.metrics));
    };

    let outbox = Outbox::new(app.config.outbound_queue);
    // Saturating: `exp` is the client's, and an instant past what the clock
    // can hold is a connection that never expires (its token still has to
    // be signed by us).
    let expires = claims
        .as_ref()
        .and_then(|c| tokio::time::Instant::now().checked_add(jwt::remaining(c)));
    let (session, name) = match &claims {
        Some(c) => (Some(c.sid.clone()), Some(c.sub.clone())),
        None => (None, None),
    };
    let label = Label {
        endpoint: "pubsub",
        session_id: session.clone().unwrap_or_else(|| "-".to_owned()),
        agent_id: None,
        user: Some(name.as_deref().unwrap_or("anonymous").into()),
    };
    let hub = Hub {
        app: app.clone(),
        redis: app.redis.clone(),
        outbox: outbox.clone(),
        session_from_token: session.is_some(),
        session,
        subject: name.as_deref().map(Box::from),
        name,
        topics: HashMap::new(),
        // Token holders' sessions are out of anonymous clients' reach: when
        // this server takes tokens, anonymous clients' sessions are in a
        // namespace of their own (they still reach each other there).
        apart: claims.is_none() && app.config.jwt.is_some(),
    };
    let driver = Driver {
        app: app.clone(),
        outbox,
        handler: hub,
        expires,
        counters: Counters {
            active: app.metrics.pubsub_connections_active.clone(),
            opened: app.metrics.pubsub_connections.clone(),
            delivered: app.metrics.pubsub_delivered.clone(),
        },
        label,
        task: app.tracker.token(),
        slot,
        preamble: Vec::new(),
        tracking: Default::default(),
    };
    Ok(ws::upgrade(upgrade, driver))
}

#[cfg(test)]
mod tests;
