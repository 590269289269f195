//! The session bridge: `GET /{agent_id}/ws/{session_id}`.
//!
//! Data flows one way through this module:
//! 1. **validate** the ids (400 before anything touches Redis);
//! 2. **authenticate** the bearer token against `session:{id}:auth` (401/403);
//! 3. **attach** to the broker: subscribe `session:{id}:down` and wait for
//!    Redis to confirm, so the client misses nothing published after its 101;
//! 4. **pump** frames in one task per connection (the shared driver in
//!    [`crate::ws`]): broker outbox -> client,
//!    client JSON -> `PUBLISH session:{id}:up`, heartbeat pings;
//! 5. **close** with a code that says why (1001 shutdown, 1008 slow consumer,
//!    1009 too big, 1011 heartbeat timeout), log and count it.
//!
//! One task (not a reader and a writer) per connection keeps the idle cost
//! small and makes ordering trivial: frames from one client are published
//! in the order they arrive, one after the other.

use std::sync::Arc;

use crate::redis_conn::RedisConn;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::{Utf8Bytes, WebSocketUpgrade};
use axum::extract::{Extension, Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::auth::{self, AuthError};
use crate::broker::{self, Outbox, Subscription};
use crate::context::{App, ConnectionSlot};
use crate::error::{ApiError, Refusal, socket_error};
use crate::metrics::InvalidMessage;
use crate::ws::{self, Budget, Counters, Driver, Handler, HandlerFuture, Label, Reply};

pub use crate::keys::MAX_ID_LEN;

/// Checks an id used in Redis key and channel names (see
/// [`crate::keys::valid_id`]): 400 `invalid_id` naming the bad character.
pub fn validate_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ApiError::from(Refusal::InvalidId(
            format!("{what} must be 1-{MAX_ID_LEN} characters long").into(),
        )));
    }
    if let Some(bad) = crate::keys::first_invalid(id) {
        return Err(ApiError::from(Refusal::InvalidId(
            format!("{what} contains {bad:?}; allowed are A-Z, a-z, 0-9, '-', '_' and '.'").into(),
        )));
    }
    Ok(())
}

/// The query parameters the endpoint understands.
#[derive(Debug, Deserialize)]
pub struct AuthQuery {
    /// The token, for clients (browsers) that cannot set headers.
    access_token: Option<String>,
    /// A reliable client's history epoch, to resume.
    epoch: Option<String>,
    /// The last offset a reliable client saw, to resume after.
    offset: Option<String>,
}

/// Axum handler for the session endpoint. Every refusal is an [`ApiError`].
pub async fn handler(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<AuthQuery>, QueryRejection>,
    RawQuery(raw_query): RawQuery,
    slot: Option<Extension<ConnectionSlot>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let request = Request {
        headers,
        raw_query,
        slot: slot.map(|s| s.0),
    };
    match accept(app, path, query, request, upgrade).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// What the upgrade request carries besides its path and known query.
struct Request {
    headers: HeaderMap,
    /// The whole query, for the parameters a connect event may copy.
    raw_query: Option<String>,
    slot: Option<ConnectionSlot>,
}

async fn accept(
    app: Arc<App>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<AuthQuery>, QueryRejection>,
    request: Request,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Request {
        headers,
        raw_query,
        slot,
    } = request;
    // 1. Validate everything that needs no I/O, the page's origin first.
    crate::handshake::admit(&headers, &app.config.ws_origins)?;
    let Path((agent_id, session_id)) =
        path.map_err(|e| ApiError::from(Refusal::InvalidId(e.body_text().into())))?;
    validate_id("agent_id", &agent_id)?;
    validate_id("session_id", &session_id)?;
    let upgrade = upgrade.map_err(ApiError::not_a_websocket)?;
    let Query(query) = query.map_err(ApiError::invalid_query)?;
    // A reliable session (the wsproxy.v1 subprotocol) subscribes to the
    // enveloped live channel and then reads its history. Asked for where
    // it is off, it is refused before the token: the client learns the
    // server lacks the feature, whatever its token.
    let reliable = crate::session::reliable::requested(&app, &headers)?;
    let resume = if reliable {
        crate::session::reliable::resume_from(query.epoch.as_deref(), query.offset.as_deref())?
    } else {
        None
    };
    let token = auth::bearer_token(&headers, query.access_token.as_deref())
        .map_err(|e| Refusal::MissingToken(e.to_string().into()).counted(&app.metrics))?;
    let ask = Ask {
        agent_id: &agent_id,
        session_id: &session_id,
        headers: &headers,
        raw_query: raw_query.as_deref(),
        token,
        reliable,
        resume,
        transport: Transport::WebSocket,
    };
    let admitted = admit(&app, ask, slot).await?;
    // 4. Upgrade; the driver pumps frames until the connection ends.
    Ok(match admitted {
        SessionDriver::Plain(driver) => ws::upgrade(upgrade, driver),
        SessionDriver::Reliable(driver) => ws::upgrade(
            upgrade.protocols([crate::session::reliable::PROTOCOL]),
            driver,
        ),
    })
}

/// The transport a session connection is served over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /{agent_id}/ws/{session_id}`, upgraded.
    WebSocket,
    /// `GET /{agent_id}/sse/{session_id}`, a `text/event-stream`.
    Sse,
}

impl Transport {
    /// As events and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Sse => "sse",
        }
    }
}

/// A session connection asked for, whatever its transport: checked for
/// everything that needs no I/O (origin, ids, query, token present).
pub struct Ask<'a> {
    /// The agent id of the path.
    pub agent_id: &'a str,
    /// The session id of the path.
    pub session_id: &'a str,
    /// The request's headers (for the connect event).
    pub headers: &'a HeaderMap,
    /// The whole query, for the parameters a connect event may copy.
    pub raw_query: Option<&'a str>,
    /// The bearer token the client sent.
    pub token: &'a str,
    /// A reliable (resumable) connection.
    pub reliable: bool,
    /// Where a reliable client resumes from.
    pub resume: Option<(&'a str, &'a str)>,
    /// How the connection is served.
    pub transport: Transport,
}

/// An admitted session connection: its driver, for the transport's writer
/// to run over its socket.
pub enum SessionDriver {
    /// A plain session.
    Plain(Driver<Bridge>),
    /// A reliable session (welcome and replay first).
    Reliable(Driver<crate::session::reliable::ReliableBridge>),
}

impl SessionDriver {
    /// The connection's whole life over `socket` (see [`Driver::run`]).
    pub fn run<S: ws::Socket>(self, socket: S) -> impl Future<Output = ()> + Send {
        match self {
            Self::Plain(d) => futures_util::future::Either::Left(d.run(socket)),
            Self::Reliable(d) => futures_util::future::Either::Right(d.run(socket)),
        }
    }
}

/// The transport-neutral admission of a session connection: the token
/// check, the subscription (confirmed, so the client misses nothing
/// published after its answer), a reliable client's join or resume, a
/// disconnect that came meanwhile, and the lifecycle registration.
pub async fn admit(
    app: &Arc<App>,
    ask: Ask<'_>,
    slot: Option<ConnectionSlot>,
) -> Result<SessionDriver, ApiError> {
    // Boxed: the admission's state (the token check, the subscription,
    // the history, the registration) is about 2.3 KB. Awaited inline it
    // made the WebSocket handler's future 5.4 KB (936 B with the box),
    // copied whole each time axum and hyper move it on its way to the
    // task; one allocation costs less than those copies.
    Box::pin(admission(app, ask, slot)).await
}

/// [`admit`]'s steps.
async fn admission(
    app: &Arc<App>,
    ask: Ask<'_>,
    slot: Option<ConnectionSlot>,
) -> Result<SessionDriver, ApiError> {
    if app.shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let Ask {
        agent_id,
        session_id,
        reliable,
        resume,
        token,
        ..
    } = ask;
    // A backend's disconnect from now on must reach this connection too.
    let began = tokio::time::Instant::now();
    // 2 and 3, bounded together by AUTH_TIMEOUT_SECS.
    let config = &app.config;
    // A reliable connection must not miss a live message: it ends when
    // the broker loses Redis, and its client resumes.
    let outbox = if reliable {
        Outbox::gapless(config.outbound_queue)
    } else {
        Outbox::new(config.outbound_queue)
    };
    let keys = config.keys();
    let down = if reliable {
        keys.session_live(session_id)
    } else {
        keys.session_down(session_id)
    };
    let mut redis = app.redis.clone();
    let attach = async {
        auth::check_session_token(
            &mut redis,
            keys,
            session_id,
            token,
            config.auth_grace_period,
        )
        .await?;
        let subscription = app
            .broker
            .subscribe(&down, outbox.clone(), config.auth_timeout)
            .await?;
        let joined = if reliable {
            let joined = crate::session::history::join(
                &mut redis,
                keys,
                session_id,
                resume,
                config.auth_timeout,
            )
            .await?;
            Some(joined)
        } else {
            None
        };
        Ok::<_, AuthError>((subscription, joined))
    };
    let attached = tokio::time::timeout(config.auth_timeout, attach).await;
    let (subscription, joined) = admitted_or_refused(app, session_id, agent_id, attached)?;
    app.metrics
        .session_attach
        .observe(began.elapsed().as_secs_f64());
    // A disconnect that came while the token was being read (so perhaps
    // just after it was, and revoked) found no channel of this connection:
    // it gets the order now, as the session's other connections did.
    if let Some(order) = app.disconnects.since(session_id, began) {
        outbox.order_close(order);
    }

    let label = Label {
        endpoint: match ask.transport {
            Transport::WebSocket => "session",
            Transport::Sse => "session-sse",
        },
        session_id: session_id.to_owned(),
        agent_id: Some(agent_id.into()),
        user: None,
    };
    // With events or presence on: registered before the answer.
    let resume = joined.as_ref().map(|j| j.resume);
    let admitted = Admitted {
        session_id,
        agent_id,
        headers: ask.headers,
        raw_query: ask.raw_query,
        slot: slot.as_ref(),
        resume,
        transport: ask.transport,
    };
    let tracking = register(app, &mut redis, admitted).await;
    let counters = match ask.transport {
        Transport::WebSocket => None,
        Transport::Sse => Some(Counters {
            active: app.metrics.sse_connections_active.clone(),
            opened: app.metrics.sse_connections_opened.clone(),
            delivered: app.metrics.messages_down.clone(),
        }),
    };
    let Some(mut joined) = joined else {
        let handler = Bridge {
            app: app.clone(),
            session_id: session_id.into(),
            _subscription: subscription,
        };
        let driver = driver(app, outbox, handler, label, slot, Vec::new(), tracking);
        return Ok(SessionDriver::Plain(with_counters(driver, counters)));
    };
    app.metrics.reliable_connections.inc();
    let preamble = crate::session::reliable::preamble(app, session_id, &mut joined);
    let handler = crate::session::reliable::ReliableBridge {
        app: app.clone(),
        // Whatever the live channel brings up to the history's last offset
        // at the join is in the history: replayed, or (on a fresh join)
        // older than the connection.
        last: crate::session::history::parse_offset(&joined.last),
        session_id: session_id.into(),
        agent_id: agent_id.into(),
        _subscription: subscription,
    };
    let driver = driver(app, outbox, handler, label, slot, preamble, tracking);
    Ok(SessionDriver::Reliable(with_counters(driver, counters)))
}

/// A driver counting on other metrics than the WebSocket endpoint's.
fn with_counters<H: Handler>(mut driver: Driver<H>, counters: Option<Counters>) -> Driver<H> {
    if let Some(counters) = counters {
        driver.counters = counters;
    }
    driver
}

/// An admitted connection, as its connect event describes it.
struct Admitted<'a> {
    session_id: &'a str,
    agent_id: &'a str,
    headers: &'a HeaderMap,
    raw_query: Option<&'a str>,
    slot: Option<&'a ConnectionSlot>,
    /// `Some` for a reliable connection: how its resume went, if it asked.
    resume: Option<Option<Result<usize, crate::session::history::ResumeFailure>>>,
    /// How the connection is served.
    transport: Transport,
}

/// Registers the connection with Redis when events or presence are on
/// (its presence entry, its connect or resume event); untracked otherwise.
/// A registration Redis does not take is logged and counted, and the
/// connection goes on (its disconnect then records nothing).
async fn register(
    app: &Arc<App>,
    redis: &mut RedisConn,
    admitted: Admitted<'_>,
) -> crate::session::lifecycle::Tracking {
    if !app.lifecycle.enabled() {
        return crate::session::lifecycle::Tracking::default();
    }
    let user_agent = admitted
        .headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.chars().take(256).collect());
    let info = crate::session::lifecycle::ConnectInfo {
        remote: admitted.slot.map(|s| s.peer),
        user_agent,
        query: app.lifecycle.allowed_query(admitted.raw_query),
        reliable: admitted.resume.is_some(),
        resume: admitted
            .resume
            .flatten()
            .map(|r| crate::session::lifecycle::Resume {
                resumed: r.is_ok(),
                replayed: r.unwrap_or(0),
                reason: r.err().map(|why| why.as_str()),
            }),
        transport: admitted.transport.as_str(),
    };
    let connection = app.lifecycle.next_connection();
    let limit = app.config.auth_timeout;
    // If the client leaves while the script is on its way (the request
    // is dropped), the script may still run: the guard removes it again.
    let mut pending = Pending {
        app,
        session_id: admitted.session_id,
        agent_id: admitted.agent_id,
        connection,
    };
    let registered = app
        .lifecycle
        .connected(
            redis,
            admitted.session_id,
            admitted.agent_id,
            connection,
            &info,
            limit,
        )
        .await;
    // From here the driver owns the registration.
    pending.connection = 0;
    let mut registering = None;
    if let Err(unfinished) = registered {
        app.metrics.lifecycle_failures.inc();
        tracing::warn!(session_id = %admitted.session_id, error = %unfinished.error, "lifecycle: connection not registered yet");
        // On a cluster, what is left goes on in the background: the
        // connection is not held back by another shard's failover.
        if let Some(rest) = unfinished.rest {
            registering = Some(app.lifecycle.finish_later(
                app.redis.clone(),
                rest,
                limit,
                &app.tracker,
                app.metrics.clone(),
            ));
        }
    }
    crate::session::lifecycle::Tracking {
        connection,
        registering,
        ..Default::default()
    }
}

/// A registration on its way, removed again if the admission is dropped
/// before the driver takes it over.
struct Pending<'a> {
    app: &'a Arc<App>,
    session_id: &'a str,
    agent_id: &'a str,
    /// 0 once the driver has it.
    connection: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.connection == 0 {
            return;
        }
        let gone = crate::session::lifecycle::Gone {
            connection: self.connection,
            messages_in: 0,
            messages_out: 0,
            ended: crate::session::lifecycle::Ended {
                code: crate::close::ABNORMAL,
                reason: crate::metrics::CloseReason::Error.as_str(),
                duration: std::time::Duration::ZERO,
            },
        };
        ws::remove_later(
            self.app,
            self.session_id.to_owned(),
            self.agent_id.to_owned(),
            gone,
            None,
        );
    }
}

/// The connection's driver, for either kind of session.
fn driver<H: Handler>(
    app: &Arc<App>,
    outbox: Arc<Outbox>,
    handler: H,
    label: Label,
    slot: Option<ConnectionSlot>,
    preamble: Vec<axum::extract::ws::Message>,
    tracking: crate::session::lifecycle::Tracking,
) -> Driver<H> {
    Driver {
        app: app.clone(),
        outbox,
        handler,
        expires: None,
        counters: Counters {
            active: app.metrics.connections_active.clone(),
            opened: app.metrics.connections_opened.clone(),
            delivered: app.metrics.messages_down.clone(),
        },
        label,
        task: app.tracker.token(),
        slot,
        preamble,
        tracking,
    }
}

/// What the admission's Redis steps came to: the subscription and the
/// history's answer, or the refusal that says why not (logged and
/// counted).
pub(crate) fn admitted_or_refused<T>(
    app: &App,
    session_id: &str,
    agent_id: &str,
    attached: Result<Result<T, AuthError>, tokio::time::error::Elapsed>,
) -> Result<T, ApiError> {
    match attached {
        Ok(Ok(attached)) => Ok(attached),
        Ok(Err(AuthError::Invalid)) => {
            tracing::info!(%session_id, %agent_id, "refused: invalid or expired token");
            Err(
                Refusal::InvalidToken("the token is invalid or has expired".into())
                    .counted(&app.metrics),
            )
        }
        Ok(Err(AuthError::Missing(m))) => {
            Err(Refusal::MissingToken(m.into()).counted(&app.metrics))
        }
        Ok(Err(e @ (AuthError::Redis(_) | AuthError::Subscribe(_) | AuthError::History(_)))) => {
            if let AuthError::History(h) = &e
                && h.library_missing()
            {
                // The loader puts it back (see server::keep_history_library).
                app.history_loaded
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
            tracing::warn!(%session_id, error = %e, "refused: redis unavailable");
            Err(redis_unavailable(app))
        }
        Err(_) => {
            tracing::warn!(%session_id, "refused: authentication timed out");
            Err(redis_unavailable(app))
        }
    }
}

fn redis_unavailable(app: &App) -> ApiError {
    Refusal::RedisUnavailable("Redis is unavailable; try again shortly".into())
        .counted(&app.metrics)
}

/// What client frames mean on a session: JSON to publish on the up channel.
///
/// Every idle connection keeps one, so it holds no more than it must:
/// the command connection is the app's (a clone is a reference count),
/// and the up channel's name is made per message, from the session id.
pub struct Bridge {
    app: Arc<App>,
    /// The session, whose up channel client messages are published on.
    session_id: Box<str>,
    /// Keeps `session:{id}:down` subscribed while the connection lives.
    _subscription: Subscription,
}

impl Handler for Bridge {
    fn on_text(&mut self, text: Utf8Bytes) -> HandlerFuture<'_> {
        Box::pin(self.forward_up(text))
    }

    fn budget(&self) -> Budget<'_> {
        Budget::Shared(&self.session_id)
    }

    fn on_binary(&mut self, _data: bytes::Bytes) -> Reply {
        self.app.metrics.invalid_message(InvalidMessage::Binary);
        Reply::text(socket_error(
            "binary_not_supported",
            "binary frames are not accepted; send JSON as a text frame",
        ))
    }
}

impl Bridge {
    /// Validates a client message and publishes it on the up channel.
    async fn forward_up(&mut self, text: Utf8Bytes) -> Reply {
        let mut redis = self.app.redis.clone();
        match publish_up(&self.app, &mut redis, &self.session_id, text.as_str()).await {
            Ok(()) => Reply::None,
            Err(Refusal::InvalidJson(m)) => Reply::text(socket_error("invalid_json", &m)),
            Err(refusal) => Reply::text(socket_error("publish_failed", &refusal.message())),
        }
    }
}

/// Waits for the turn of one `POST`ed message of `session_id` under
/// `WS_CLIENT_MESSAGE_RATE`, shared with the session's WebSockets (see
/// [`crate::pace`]); `429 rate_limited` when it is further away than
/// `AUTH_TIMEOUT_SECS`.
pub(crate) async fn wait_turn(app: &App, session_id: &str) -> Result<(), ApiError> {
    let Some(pace) = app.config.client_pace else {
        return Ok(());
    };
    let now = tokio::time::Instant::now();
    let limit = app.config.auth_timeout;
    match app.paces.reserve(session_id, pace, now, limit) {
        Ok(turn) if turn > now => {
            app.metrics.client_reads_held.inc();
            tokio::time::sleep_until(turn).await;
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(later) => {
            app.metrics.session_post("rate_limited");
            // Whole seconds, rounded up: a retry any sooner would be
            // refused again.
            let seconds = later.as_secs().saturating_add(1);
            Err(ApiError::from(Refusal::RateLimited(
                format!(
                    "this session's messages are more than AUTH_TIMEOUT_SECS ({limit:?}) ahead of WS_CLIENT_MESSAGE_RATE; send more slowly"
                )
                .into(),
            ))
            .retry_after(seconds))
        }
    }
}

/// A plain client message, whatever its transport: checked to be JSON and
/// published on `session:{id}:up`.
pub(crate) async fn publish_up(
    app: &App,
    redis: &mut RedisConn,
    session_id: &str,
    text: &str,
) -> Result<(), Refusal> {
    let up = app.config.keys().session_up(session_id);
    publish_on(app, redis, &up, text).await
}

async fn publish_on(app: &App, redis: &mut RedisConn, up: &str, text: &str) -> Result<(), Refusal> {
    // IgnoredAny validates without building a value: no allocation.
    if let Err(e) = serde_json::from_str::<IgnoredAny>(text) {
        app.metrics.invalid_message(InvalidMessage::InvalidJson);
        return Err(Refusal::InvalidJson(
            format!("message is not valid JSON: {e}").into(),
        ));
    }
    let limit = app.config.auth_timeout;
    match broker::publish(redis, app.config.keys(), up, text.as_bytes(), limit).await {
        Ok(_receivers) => {
            app.metrics.messages_up.inc();
            Ok(())
        }
        Err(why) => {
            app.metrics.publish_failures.inc();
            tracing::warn!(channel = %up, error = %why, "publish failed");
            Err(Refusal::PublishFailed(
                format!("message was not delivered, Redis is unavailable: {why}").into(),
            ))
        }
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
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("':'"), "{}", e.message);
    }
}
