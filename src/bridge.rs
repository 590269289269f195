//! The session bridge: `GET /{agent_id}/ws/{session_id}`.
//!
//! Data flows one way through this module:
//! 1. **validate** the ids (400 before anything touches Redis);
//! 2. **authenticate** the bearer token against `session:{id}:auth` (401/403);
//! 3. **attach** to the broker: subscribe `session:{id}:down` and wait for
//!    Redis to confirm, so the client misses nothing published after its 101;
//! 4. **pump** frames in one task per connection: broker queue -> client,
//!    client JSON -> `PUBLISH session:{id}:up`, heartbeat pings;
//! 5. **close** with a code that says why (1001 shutdown, 1008 slow consumer,
//!    1009 too big, 1011 heartbeat timeout), log and count it.
//!
//! One task (not a reader and a writer) per connection keeps the idle cost
//! small and makes ordering trivial: frames from one client are published
//! in the order they arrive, one after the other.

use std::convert::Infallible;
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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthError};
use crate::broker::{Subscriber, Subscription};
use crate::error::{ApiError, socket_error};
use crate::metrics::{AuthFailure, CloseReason, InvalidMessage};
use crate::server::{App, ConnectionSlot};

/// Longest agent or session id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Close codes (RFC 6455 section 7.4.1).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

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
    let (queue_tx, queue_rx) = mpsc::channel(config.outbound_queue);
    let slow = CancellationToken::new();
    let subscriber = Subscriber {
        queue: queue_tx,
        slow: slow.clone(),
    };
    let down = format!("session:{session_id}:down");
    let mut redis = app.redis.clone();
    let attach = async {
        auth::check_session_token(&mut redis, &session_id, token, config.auth_grace_period).await?;
        app.broker
            .subscribe(&down, subscriber, config.auth_timeout)
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
        queue: queue_rx,
        slow,
        _subscription: subscription,
        app: app.clone(),
    };
    let task = app.tracker.token();
    let limit = config.max_message_bytes;
    Ok(upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(limit + 64 * 1024)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            connection.run(socket).await;
            // Released only now: the WebSocket counted against
            // MAX_CONNECTIONS and kept shutdown waiting until here.
            drop((task, slot));
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
    queue: mpsc::Receiver<Message>,
    /// Cancelled by the broker when `queue` overflows.
    slow: CancellationToken,
    /// Keeps `session:{id}:down` subscribed while the connection lives.
    _subscription: Subscription,
}

/// Why the pump stopped, and so how to close.
type Stop = CloseReason;

impl Connection {
    async fn run(mut self, mut socket: WebSocket) {
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

    /// Moves frames until something ends the connection.
    async fn pump(&mut self, socket: &mut WebSocket) -> Result<Infallible, Stop> {
        let config = self.app.config.clone();
        let shutdown = self.app.shutdown.clone();
        let mut ping_timer = tokio::time::interval_at(
            tokio::time::Instant::now() + config.ping_interval,
            config.ping_interval,
        );
        ping_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Deadline for the pong of the ping in flight, if any.
        let mut pong_due: Option<tokio::time::Instant> = None;

        loop {
            let pong_timeout = async {
                match pong_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.slow.cancelled() => return Err(Stop::SlowConsumer),
                _ = pong_timeout => return Err(Stop::HeartbeatTimeout),
                frame = socket.recv() => match frame {
                    None | Some(Ok(Message::Close(_))) => return Err(Stop::Client),
                    Some(Err(e)) => return Err(classify(e)),
                    Some(Ok(Message::Text(text))) => self.forward_up(socket, text).await?,
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
                    Some(Ok(Message::Pong(_))) => pong_due = None,
                },
                msg = self.queue.recv() => match msg {
                    Some(msg) => {
                        self.write(socket, msg).await?;
                        self.app.metrics.messages_down.inc();
                    }
                    // The broker never drops a live subscriber's sender; if
                    // it did, the connection could no longer work.
                    None => return Err(Stop::Error),
                },
                _ = ping_timer.tick() => {
                    if pong_due.is_none() {
                        self.write(socket, Message::Ping(bytes::Bytes::new())).await?;
                        pong_due = Some(tokio::time::Instant::now() + config.ping_timeout);
                    }
                }
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
            _ = self.slow.cancelled() => Err(Stop::SlowConsumer),
            _ = tokio::time::sleep(self.app.config.ping_timeout) => Err(Stop::SlowConsumer),
        }
    }

    /// Ends the connection the way `reason` calls for.
    async fn close(&mut self, socket: &mut WebSocket, reason: Stop) {
        let (code, text) = match reason {
            // The client started the close; tungstenite has queued the
            // reply, flushing sends it.
            Stop::Client | Stop::Error => {
                let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, socket.flush()).await;
                return;
            }
            Stop::Shutdown => {
                // Deliver what was already queued before saying goodbye.
                while let Ok(msg) = self.queue.try_recv() {
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
