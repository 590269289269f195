//! The session bridge: `GET /{agent_id}/ws/{session_id}`.
//!
//! Data flows one way through this module:
//! 1. **validate** the ids (400 before anything touches Redis);
//! 2. **authenticate** the bearer token against `session:{id}:auth` (401/403);
//! 3. **attach** to the broker: subscribe `session:{id}:down` and wait for
//!    Redis to confirm, so the client misses nothing published after its 101;
//! 4. **pump** frames in one task per connection: broker outbox -> client,
//!    client JSON -> `PUBLISH session:{id}:up`, heartbeat pings;
//! 5. **close** with a code that says why (1001 shutdown, 1008 slow consumer,
//!    1009 too big, 1011 heartbeat timeout), log and count it.
//!
//! One task (not a reader and a writer) per connection keeps the idle cost
//! small and makes ordering trivial: frames from one client are published
//! in the order they arrive, one after the other.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::auth::{self, AuthError};
use crate::broker::{Outbox, Outgoing, Subscription};
use crate::error::{ApiError, socket_error};
use crate::metrics::{AuthFailure, CloseReason, InvalidMessage};
use crate::server::{App, ConnectionSlot};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Longest agent or session id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Close codes (RFC 6455 section 7.4.1).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

/// Per-connection read buffer (see `accept`).
const READ_BUFFER_BYTES: usize = 512;

/// How long we wait for the client's reply to our close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// Checks an id used in Redis key and channel names: 1 to [`MAX_ID_LEN`]
/// ASCII letters, digits, `-`, `_` or `.`. Everything else, notably `:`,
/// glob characters (`*?[]`) and whitespace, could change which key or
/// channel is addressed, so it is refused.
pub fn validate_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{what} must be 1-{MAX_ID_LEN} characters long"),
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{what} contains {bad:?}; allowed are A-Z, a-z, 0-9, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// The query parameters the endpoint understands.
#[derive(Debug, Deserialize)]
pub struct AuthQuery {
    /// The token, for clients (browsers) that cannot set headers.
    access_token: Option<String>,
}

/// Axum handler for the session endpoint. Every refusal is an [`ApiError`].
pub async fn handler(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<AuthQuery>, QueryRejection>,
    slot: Option<Extension<ConnectionSlot>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match accept(app, path, query, slot.map(|s| s.0), headers, upgrade).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn accept(
    app: Arc<App>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<AuthQuery>, QueryRejection>,
    slot: Option<ConnectionSlot>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // 1. Validate everything that needs no I/O.
    let Path((agent_id, session_id)) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", e.body_text()))?;
    validate_id("agent_id", &agent_id)?;
    validate_id("session_id", &session_id)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            e.status(),
            "not_a_websocket",
            format!(
                "this endpoint only accepts WebSocket upgrades: {}",
                e.body_text()
            ),
        )
    })?;
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    if app.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    let token = auth::bearer_token(&headers, query.access_token.as_deref()).map_err(|e| {
        app.metrics.auth_failure(AuthFailure::MissingToken);
        ApiError::new(StatusCode::UNAUTHORIZED, "missing_token", e.to_string())
    })?;

    // 2 and 3, bounded together by AUTH_TIMEOUT_SECS.
    let config = &app.config;
    let outbox = Outbox::new(config.outbound_queue);
    let down = format!("session:{session_id}:down");
    let mut redis = app.redis.clone();
    let attach = async {
        auth::check_session_token(&mut redis, &session_id, token, config.auth_grace_period).await?;
        app.broker
            .subscribe(&down, outbox.clone(), config.auth_timeout)
            .await
            .map_err(|e| {
                AuthError::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "subscribe",
                    e.to_string(),
                )))
            })
    };
    let subscription = match tokio::time::timeout(config.auth_timeout, attach).await {
        Ok(Ok(subscription)) => subscription,
        Ok(Err(AuthError::Invalid)) => {
            app.metrics.auth_failure(AuthFailure::InvalidToken);
            tracing::info!(%session_id, %agent_id, "refused: invalid or expired token");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_token",
                "the token is invalid or has expired",
            ));
        }
        Ok(Err(AuthError::Missing(m))) => {
            app.metrics.auth_failure(AuthFailure::MissingToken);
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing_token", m));
        }
        Ok(Err(AuthError::Redis(e))) => {
            app.metrics.auth_failure(AuthFailure::RedisUnavailable);
            tracing::warn!(%session_id, error = %e, "refused: redis unavailable");
            return Err(redis_unavailable());
        }
        Err(_) => {
            app.metrics.auth_failure(AuthFailure::RedisUnavailable);
            tracing::warn!(%session_id, "refused: authentication timed out");
            return Err(redis_unavailable());
        }
    };

    // 4. Upgrade. The task tracker token keeps shutdown waiting for us.
    let connection = Connection {
        redis,
        up: format!("session:{session_id}:up"),
        session_id,
        agent_id,
        outbox,
        _subscription: subscription,
        _task: app.tracker.token(),
        _slot: slot,
        app: app.clone(),
    };
    let limit = config.max_message_bytes;
    // The read buffer is the largest per-connection allocation that stays
    // for the connection's life (tungstenite zero-fills it), and most
    // messages are small, so it is 512 bytes instead of tungstenite's
    // 128 KiB; frames larger than that still arrive whole, in more reads.
    Ok(upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(limit + 64 * 1024)
        .max_message_size(limit)
        .max_frame_size(limit)
        // axum runs the upgrade in a task of its own; the connection gets a
        // fresh task whose future is exactly `run`'s, so the long-lived
        // state holds no copy of axum's upgrade machinery.
        .on_upgrade(move |socket| {
            tokio::spawn(connection.run(socket));
            std::future::ready(())
        }))
}

fn redis_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "redis_unavailable",
        "Redis is unavailable; try again shortly",
    )
}

/// One established session connection and everything it owns.
struct Connection {
    app: Arc<App>,
    redis: ConnectionManager,
    session_id: String,
    agent_id: String,
    /// Channel client messages are published on.
    up: String,
    /// Messages from the broker, bounded by `WS_OUTBOUND_QUEUE`.
    outbox: Arc<Outbox>,
    /// Keeps `session:{id}:down` subscribed while the connection lives.
    _subscription: Subscription,
    /// Keeps shutdown waiting for this connection.
    _task: TaskTrackerToken,
    /// Counts the connection against `MAX_CONNECTIONS` until it closes.
    _slot: Option<ConnectionSlot>,
}

/// Why the pump stopped, and so how to close.
type Stop = CloseReason;

/// What woke the pump.
enum Event {
    Heartbeat,
    Frame(Option<Result<Message, axum::Error>>),
    Outgoing(Outgoing),
}

impl Connection {
    /// The connection's whole life: count, pump, close, count, log.
    ///
    /// A plain fn returning an `async move` block rather than an `async fn`
    /// with `mut` parameters: the latter stores each argument twice in the
    /// future (once as the argument, once as the `mut` binding), and this
    /// future is what every open connection keeps in memory.
    #[allow(clippy::manual_async_fn)] // deliberate, see above
    fn run(mut self, mut socket: WebSocket) -> impl Future<Output = ()> + Send {
        async move {
            let started = Instant::now();
            let metrics = self.app.metrics.clone();
            metrics.connections_active.inc();
            metrics.connections_opened.inc();
            tracing::info!(session_id = %self.session_id, agent_id = %self.agent_id, "connection opened");

            let reason = match self.pump(&mut socket).await {
                Err(reason) => reason,
                Ok(never) => match never {},
            };
            self.close(&mut socket, reason).await;

            metrics.connections_active.dec();
            metrics.disconnect(reason);
            tracing::info!(
                session_id = %self.session_id,
                agent_id = %self.agent_id,
                reason = reason.as_str(),
                duration_ms = started.elapsed().as_millis() as u64,
                "connection closed"
            );
        }
    }

    /// Moves frames until something ends the connection.
    async fn pump(&mut self, socket: &mut WebSocket) -> Result<Infallible, Stop> {
        let config = self.app.config.clone();
        let shutdown = self.app.shutdown.clone();
        // One timer serves the heartbeat: it fires for the next ping, or,
        // while a ping is unanswered, at the pong deadline.
        let mut heartbeat = Box::pin(tokio::time::sleep(config.ping_interval));
        let mut last_ping = tokio::time::Instant::now();
        let mut awaiting_pong = false;

        loop {
            // Wait for the next event; the select's futures are gone before
            // it is handled, so a write's state never sits beside them.
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = heartbeat.as_mut() => Event::Heartbeat,
                frame = socket.recv() => Event::Frame(frame),
                out = self.outbox.pop() => Event::Outgoing(out),
            };
            match event {
                Event::Heartbeat => {
                    if awaiting_pong {
                        return Err(Stop::HeartbeatTimeout);
                    }
                    self.write(socket, Message::Ping(bytes::Bytes::new()))
                        .await?;
                    last_ping = tokio::time::Instant::now();
                    awaiting_pong = true;
                    heartbeat.as_mut().reset(last_ping + config.ping_timeout);
                }
                Event::Outgoing(Outgoing::Message(msg)) => {
                    self.write(socket, msg).await?;
                    self.app.metrics.messages_down.inc();
                }
                Event::Outgoing(Outgoing::Slow) => return Err(Stop::SlowConsumer),
                Event::Frame(frame) => match frame {
                    None | Some(Ok(Message::Close(_))) => return Err(Stop::Client),
                    Some(Err(e)) => return Err(classify(e)),
                    // Boxed: publishing is the largest await point, and
                    // keeping it out of line keeps every idle
                    // connection's task small.
                    Some(Ok(Message::Text(text))) => {
                        Box::pin(self.forward_up(socket, text)).await?
                    }
                    Some(Ok(Message::Binary(_))) => {
                        self.app.metrics.invalid_message(InvalidMessage::Binary);
                        let error = socket_error(
                            "binary_not_supported",
                            "binary frames are not accepted; send JSON as a text frame",
                        );
                        self.write(socket, Message::Text(error.into())).await?;
                    }
                    // tungstenite queues the pong itself; the next read sends it.
                    Some(Ok(Message::Ping(_))) => {}
                    Some(Ok(Message::Pong(_))) => {
                        if awaiting_pong {
                            awaiting_pong = false;
                            heartbeat.as_mut().reset(last_ping + config.ping_interval);
                        }
                    }
                },
            }
        }
    }

    /// Validates a client message and publishes it on the up channel.
    async fn forward_up(&mut self, socket: &mut WebSocket, text: Utf8Bytes) -> Result<(), Stop> {
        // IgnoredAny validates without building a value: no allocation.
        if let Err(e) = serde_json::from_str::<IgnoredAny>(text.as_str()) {
            self.app
                .metrics
                .invalid_message(InvalidMessage::InvalidJson);
            let error = socket_error("invalid_json", &format!("message is not valid JSON: {e}"));
            return self.write(socket, Message::Text(error.into())).await;
        }
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.up).arg(text.as_str().as_bytes());
        let publish = cmd.query_async::<i64>(&mut self.redis);
        match tokio::time::timeout(self.app.config.auth_timeout, publish).await {
            Ok(Ok(_receivers)) => {
                self.app.metrics.messages_up.inc();
                Ok(())
            }
            failed => {
                self.app.metrics.publish_failures.inc();
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "Redis did not answer in time".to_owned(),
                };
                tracing::warn!(session_id = %self.session_id, error = %why, "publish failed");
                let error = socket_error(
                    "publish_failed",
                    &format!("message was not delivered, Redis is unavailable: {why}"),
                );
                self.write(socket, Message::Text(error.into())).await
            }
        }
    }

    /// Writes one frame. A client that takes longer than the ping timeout to
    /// accept it, or that the broker marks slow meanwhile, is a slow consumer.
    async fn write(&self, socket: &mut WebSocket, msg: Message) -> Result<(), Stop> {
        tokio::select! {
            r = socket.send(msg) => r.map_err(|_| Stop::Client),
            _ = self.outbox.overflowed() => Err(Stop::SlowConsumer),
            _ = tokio::time::sleep(self.app.config.ping_timeout) => Err(Stop::SlowConsumer),
        }
    }

    /// Ends the connection the way `reason` calls for.
    ///
    /// Returns a boxed future on purpose: an `async fn` awaited inline
    /// would reserve its (large, used once) state in every connection's
    /// task for the whole life of the connection.
    fn close<'a>(
        &'a mut self,
        socket: &'a mut WebSocket,
        reason: Stop,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let (code, text) = match reason {
                // The client started the close; tungstenite has queued the
                // reply, flushing sends it.
                Stop::Client | Stop::Error => {
                    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, socket.flush()).await;
                    return;
                }
                Stop::Shutdown => {
                    // Deliver what was already queued before saying goodbye.
                    while let Some(msg) = self.outbox.try_pop() {
                        if self.write(socket, msg).await.is_err() {
                            return;
                        }
                        self.app.metrics.messages_down.inc();
                    }
                    (CLOSE_GOING_AWAY, "server shutting down")
                }
                Stop::SlowConsumer => (CLOSE_POLICY, "slow consumer: outbound queue full"),
                Stop::MessageTooBig => (CLOSE_TOO_BIG, "message too big"),
                Stop::HeartbeatTimeout => (CLOSE_INTERNAL, "heartbeat timeout: no pong"),
            };
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: text.into(),
            }));
            // Best effort: a slow or dead peer must not hold us up.
            let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
                if socket.send(frame).await.is_ok() {
                    // Wait for the peer's close reply so the close handshake
                    // completes and the peer sees our code.
                    while let Some(Ok(msg)) = socket.recv().await {
                        if matches!(msg, Message::Close(_)) {
                            break;
                        }
                    }
                }
            })
            .await;
        })
    }
}

/// Maps a receive error to a close reason.
fn classify(error: axum::Error) -> Stop {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => Stop::MessageTooBig,
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Io(_) => Stop::Client,
            _ => Stop::Error,
        },
        Err(_) => Stop::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_key_changing_characters_are_refused() {
        for bad in [
            "", "a:b", "a*", "a?", "a[b]", "a b", "a\tb", "ä", "a/b", "a{b}",
        ] {
            assert!(
                validate_id("session_id", bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!(validate_id("session_id", &"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn ordinary_ids_are_accepted() {
        for good in [
            "test-session-123",
            "agent_1",
            "a.b",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert!(
                validate_id("session_id", good).is_ok(),
                "{good:?} should pass"
            );
        }
    }

    #[test]
    fn refusal_names_the_bad_character() {
        let e = validate_id("session_id", "a:b").expect_err("colon");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("':'"), "{}", e.message);
    }
}
