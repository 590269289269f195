//! Sessions over HTTP: `GET /{agent_id}/sse/{session_id}` streams the
//! session as Server-Sent Events, `POST` to the same path sends a client
//! message. A thin writer over the session core: the admission
//! ([`crate::session::bridge::admit`]) and the driver ([`crate::ws::Driver`])
//! are the WebSocket endpoint's; [`SseSocket`] turns the driver's frames
//! into events, and the response body takes them.
//!
//! - **Plain stream**: each message on `session:{id}:down` is one event
//!   whose `data` is the message (a line feed splits it into `data:` lines).
//! - **Resumable stream** (`?reliable=true`, with `RELIABLE_SESSIONS`): a
//!   `welcome` event first, then each message with `id: <epoch>:<offset>`
//!   and the backend's JSON as `data`. `EventSource` reconnects with
//!   `Last-Event-ID` and resumes just after the last event it saw
//!   (`?last_event_id=` does the same from a stored position).
//! - **The end**: `event: close` with `{"code","reason"}` (a WebSocket's
//!   close code), then the stream ends.
//! - **Keepalive**: a comment line every `WS_PING_INTERVAL_SECS`; a client
//!   that takes nothing for `WS_PING_TIMEOUT_SECS` is closed.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::Message;
use axum::extract::{Extension, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use crate::context::{App, ConnectionSlot};
use crate::error::{ApiError, Refusal};
use crate::session::bridge::{Ask, Transport, validate_id};

/// How long a browser waits before it reconnects a stream that ended
/// (the `retry:` field, sent once at the start).
pub const RETRY_MS: u64 = 2000;

/// Formatted events the body has not taken yet, past which the driver's
/// writes wait (and a client that takes nothing is a slow consumer).
const HIGH_WATER: usize = 64 * 1024;

/// A request extension from a writer that runs the stream's driver in its
/// own task (`server::event_stream`, wsproxy's own HTTP/1.1 writer): the
/// handler hands the driver over in the response ([`InlineDriver`])
/// instead of spawning a task of its own, so a held stream is one task,
/// as a WebSocket is. Without it (hyper: TLS, HTTP/2, a reused
/// connection) the driver is spawned.
#[derive(Clone, Copy, Debug)]
pub struct DriveInline;

/// The stream's driver, handed to the writer that asked for it with
/// [`DriveInline`] as a response extension. The writer must run it to its
/// end (it unregisters the connection), also when the client has left.
#[derive(Clone)]
pub struct InlineDriver(Arc<Mutex<Option<DriverFuture>>>);

/// A stream's driver, boxed.
pub type DriverFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl InlineDriver {
    /// The driver, once.
    pub fn take(&self) -> Option<DriverFuture> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for InlineDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InlineDriver")
    }
}

/// The query parameters of the SSE endpoint.
#[derive(Debug, Deserialize)]
pub struct SseQuery {
    /// The token, for clients (`EventSource`) that cannot set headers.
    access_token: Option<String>,
    /// `true` for a resumable stream (needs `RELIABLE_SESSIONS`).
    reliable: Option<String>,
    /// A position (`<epoch>:<offset>`) to resume after, for a client that
    /// starts from a stored one; `Last-Event-ID` wins when both are sent.
    last_event_id: Option<String>,
}

/// `GET /{agent_id}/sse/{session_id}`: the session as an event stream.
pub async fn stream(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<SseQuery>, axum::extract::rejection::QueryRejection>,
    RawQuery(raw_query): RawQuery,
    slot: Option<Extension<ConnectionSlot>>,
    inline: Option<Extension<DriveInline>>,
    headers: HeaderMap,
) -> Response {
    let cors = allowed_origin(&app, &headers);
    let answer = open(
        app,
        path,
        query,
        raw_query,
        slot.map(|s| s.0),
        inline.is_some(),
        &headers,
    )
    .await;
    with_cors(answer.unwrap_or_else(|e| e.into_response()), cors)
}

async fn open(
    app: Arc<App>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<SseQuery>, axum::extract::rejection::QueryRejection>,
    raw_query: Option<String>,
    slot: Option<ConnectionSlot>,
    inline: bool,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    app.config.ws_origins.check(headers)?;
    let (agent_id, session_id) = ids(path)?;
    let Query(query) = query.map_err(ApiError::invalid_query)?;
    let reliable = reliable_asked(&app, query.reliable.as_deref())?;
    // The browser's reconnect carries the header; the URL keeps whatever
    // position it was first opened with, so the header wins, unless it is
    // empty (no browser sends one; a proxy or polyfill may).
    // A header that is not visible ASCII is refused, never ignored: the
    // client would get a fresh stream and a gap it was not told of.
    let header = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::from(Refusal::InvalidQuery(
                "Last-Event-ID is <epoch>:<offset>, as an event's id (visible ASCII)".into(),
            ))
        })?),
        None => None,
    };
    let position = header
        .filter(|p| !p.is_empty())
        .or(query.last_event_id.as_deref())
        .filter(|p| !p.is_empty());
    let resume = match (reliable, position) {
        (true, Some(p)) => Some(parse_position(p)?),
        _ => None,
    };
    let token = crate::auth::bearer_token(headers, query.access_token.as_deref())
        .map_err(|e| Refusal::MissingToken(e.to_string().into()).counted(&app.metrics))?;
    let ask = Ask {
        agent_id: &agent_id,
        session_id: &session_id,
        headers,
        raw_query: raw_query.as_deref(),
        token,
        reliable,
        resume,
        transport: Transport::Sse,
    };
    let driver = crate::session::bridge::admit(&app, ask, slot).await?;
    let (socket, body) = pipe(resume.map(|(epoch, offset)| format!("{epoch}:{offset}")));
    let run = driver.run(socket);
    let mut response = Response::new(axum::body::Body::from_stream(body));
    if inline {
        let run: DriverFuture = Box::pin(run);
        response
            .extensions_mut()
            .insert(InlineDriver(Arc::new(Mutex::new(Some(run)))));
    } else {
        tokio::spawn(run);
    }
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The path's ids, checked as the WebSocket endpoint checks them.
fn ids(
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<(String, String), ApiError> {
    let Path((agent_id, session_id)) =
        path.map_err(|e| ApiError::from(Refusal::InvalidId(e.body_text().into())))?;
    validate_id("agent_id", &agent_id)?;
    validate_id("session_id", &session_id)?;
    Ok((agent_id, session_id))
}

/// `?reliable=`: `true`/`1` asks for a resumable stream (refused while
/// reliable sessions are off, before the token is looked at).
fn reliable_asked(app: &App, value: Option<&str>) -> Result<bool, ApiError> {
    let asked = match value {
        None | Some("" | "false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => {
            return Err(Refusal::InvalidQuery("reliable is true or false".into()).into());
        }
    };
    if asked && !app.config.reliable.enabled {
        return Err(Refusal::ReliableSessionsOff(
            "this server runs plain sessions only (RELIABLE_SESSIONS is off); open the stream without reliable=true".into(),
        )
        .into());
    }
    Ok(asked)
}

/// An event id, `<epoch>:<offset>` (`Last-Event-ID`, `?last_event_id=`),
/// split at the first colon, each half checked as a WebSocket resume's are
/// ([`crate::session::reliable::resume_from`]). Public for the fuzz target.
pub fn parse_position(id: &str) -> Result<(&str, &str), ApiError> {
    let (epoch, offset) = id.split_once(':').ok_or_else(|| {
        ApiError::from(Refusal::InvalidQuery(
            "Last-Event-ID (or last_event_id) is <epoch>:<offset>, as an event's id".into(),
        ))
    })?;
    crate::session::reliable::resume_from(Some(epoch), Some(offset))?
        .ok_or_else(|| ApiError::from(Refusal::InvalidQuery("an empty position".into())))
}

/// The query parameters of `POST /{agent_id}/sse/{session_id}`.
#[derive(Debug, Deserialize)]
pub struct PostQuery {
    /// The token, as on the stream.
    access_token: Option<String>,
    /// `true`: the body is `{"type":"message","id","data"}`, stored once.
    reliable: Option<String>,
}

/// `POST /{agent_id}/sse/{session_id}`: one client message, in its turn.
/// Plain: JSON, published on `session:{id}:up` (`200 {"status":"published"}`).
/// `?reliable=true`: stored once in `wsproxy:up:{n}`, answered with a
/// WebSocket's ack (`200`), `409` `id_conflict`, `503` `not_stored`, `400`.
pub async fn post(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<PostQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let cors = allowed_origin(&app, &headers);
    let answer = send(app, path, query, &headers, body).await;
    with_cors(answer.unwrap_or_else(|e| e.into_response()), cors)
}

async fn send(
    app: Arc<App>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<PostQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    app.config.ws_origins.check(headers)?;
    let (agent_id, session_id) = ids(path)?;
    let Query(query) = query.map_err(ApiError::invalid_query)?;
    let reliable = reliable_asked(&app, query.reliable.as_deref())?;
    let token = crate::auth::bearer_token(headers, query.access_token.as_deref())
        .map_err(|e| Refusal::MissingToken(e.to_string().into()).counted(&app.metrics))?;
    let limit = app.config.max_message_bytes;
    let too_large = || {
        app.metrics.session_post("invalid");
        ApiError::from(Refusal::BodyTooLarge(
            format!("the body is over WS_MAX_MESSAGE_BYTES ({limit} bytes)").into(),
        ))
    };
    // A declared length over the limit is refused before anything else.
    if declared_length(headers).is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    let config = &app.config;
    let mut redis = app.redis.clone();
    // The token first: a client without one holds nothing beyond its head.
    let checked = tokio::time::timeout(
        config.auth_timeout,
        crate::auth::check_session_token(
            &mut redis,
            config.keys(),
            &session_id,
            token,
            config.auth_grace_period,
        ),
    )
    .await;
    crate::session::bridge::admitted_or_refused(&app, &session_id, &agent_id, checked)?;
    // The body must arrive within AUTH_TIMEOUT_SECS, as a token request's
    // does: a client that sends it slowly holds its connection no longer.
    let wait = config.auth_timeout;
    let body = tokio::time::timeout(wait, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            app.metrics.session_post("invalid");
            ApiError::from(Refusal::BodyTimeout(
                format!("the body did not arrive within AUTH_TIMEOUT_SECS ({wait:?})").into(),
            ))
        })?
        .map_err(|_| too_large())?;
    let Ok(text) = std::str::from_utf8(&body) else {
        app.metrics.session_post("invalid");
        return Err(Refusal::InvalidJson("the body is not UTF-8".into()).into());
    };
    crate::session::bridge::wait_turn(&app, &session_id).await?;
    if reliable {
        let (stored, answer) =
            crate::session::reliable::store_message(&app, &mut redis, &session_id, &agent_id, text)
                .await;
        app.metrics.session_post(stored.as_str());
        let status = match stored {
            crate::session::reliable::Stored::Stored
            | crate::session::reliable::Stored::Duplicate => StatusCode::OK,
            crate::session::reliable::Stored::IdConflict => StatusCode::CONFLICT,
            crate::session::reliable::Stored::Invalid => StatusCode::BAD_REQUEST,
            crate::session::reliable::Stored::NotStored => StatusCode::SERVICE_UNAVAILABLE,
        };
        return Ok(json_response(status, answer));
    }
    match crate::session::bridge::publish_up(&app, &mut redis, &session_id, text).await {
        Ok(()) => {
            app.metrics.session_post("published");
            Ok(json_response(
                StatusCode::OK,
                r#"{"status":"published"}"#.to_owned(),
            ))
        }
        Err(refusal) => {
            app.metrics.session_post(match refusal {
                Refusal::InvalidJson(_) => "invalid",
                _ => "publish_failed",
            });
            Err(refusal.into())
        }
    }
}

/// The body length a request declares (`Content-Length`), if a number.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `OPTIONS /{agent_id}/sse/{session_id}`: the CORS preflight of a
/// cross-origin `POST` (or a stream opened with headers) from a page whose
/// origin `WS_ALLOWED_ORIGINS` allows.
pub async fn preflight(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.config.ws_origins.check(&headers) {
        return e.into_response();
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, last-event-id"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    with_cors(response, allowed_origin(&app, &headers))
}

/// The request's `Origin`, to echo in `Access-Control-Allow-Origin`, when
/// `WS_ALLOWED_ORIGINS` allows it: a page of another origin cannot even
/// read a refusal.
fn allowed_origin(app: &App, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    app.config
        .ws_origins
        .allows(headers)
        .then(|| origin.clone())
}

fn with_cors(mut response: Response, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// The driver's side of an event stream (see [`pipe`]).
#[derive(Debug)]
pub struct SseSocket {
    shared: Arc<Shared>,
    /// The history's epoch, from the welcome (resumable streams).
    epoch: Option<String>,
    /// The position the client resumes from, `<epoch>:<offset>`: the id of
    /// a welcome that says `resumed`, so that a stream lost before the
    /// replay comes back for the same messages, never past them.
    resuming: Option<String>,
}

/// The response body's side of an event stream.
#[derive(Debug)]
pub struct SseBody {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State_>,
}

#[derive(Debug, Default)]
struct State_ {
    /// Formatted events the body has not taken yet.
    buffer: BytesMut,
    /// The body's task, waiting for events.
    body: Option<Waker>,
    /// The driver's task, waiting for room, a flush or a pong.
    writer: Option<Waker>,
    /// A keepalive went to the body: answer it as a pong once taken.
    pong_due: bool,
    /// The driver wrote its close event: the body ends after it.
    closed: bool,
    /// The body was dropped: the client left.
    gone: bool,
    /// The driver ended without its close event reaching the body (a
    /// client that stopped reading, a task stopped at shutdown): the body
    /// fails, so that the connection is closed rather than kept for a
    /// client that takes nothing.
    aborted: bool,
}

/// A new event stream: the driver's socket, and the body that carries what
/// it writes; `resuming` is the position a resumable client asked for.
pub fn pipe(resuming: Option<String>) -> (SseSocket, SseBody) {
    let shared = Arc::new(Shared::default());
    {
        let mut state = shared.lock();
        // Sent once: how long a browser waits before reconnecting.
        state
            .buffer
            .put_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
    }
    (
        SseSocket {
            shared: shared.clone(),
            epoch: None,
            resuming,
        },
        SseBody { shared },
    )
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State_> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State_ {
    fn pending(&self) -> usize {
        self.buffer.len()
    }

    fn wake_body(&mut self) {
        if let Some(w) = self.body.take() {
            w.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

/// Appends `data:` lines for `text`: one per line of it (a line feed, a
/// carriage return or both end a line in SSE; the browser joins the lines
/// with line feeds).
fn put_data(out: &mut BytesMut, text: &str) {
    let mut rest = text;
    loop {
        let end = rest.find(['\n', '\r']).unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            break;
        }
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
}

/// The welcome frame's position.
#[derive(Deserialize)]
struct WelcomePosition<'a> {
    r#type: &'a str,
    epoch: &'a str,
    offset: &'a str,
    resumed: Option<bool>,
}

impl SseSocket {
    /// Formats one frame of the driver as events.
    fn format(&mut self, msg: Message, out: &mut BytesMut) -> FrameKind {
        match msg {
            Message::Text(text) => {
                let text = text.as_str();
                if let Some((offset, data)) = crate::session::history::split_envelope(text) {
                    // A resumable stream's message: the id resumes after it.
                    out.put_slice(b"id: ");
                    out.put_slice(self.epoch.as_deref().unwrap_or("").as_bytes());
                    out.put_u8(b':');
                    out.put_slice(offset.as_bytes());
                    out.put_u8(b'\n');
                    put_data(out, data);
                } else if let Some(w) = (self.epoch.is_none()
                    && text.starts_with("{\"type\":\"welcome\""))
                .then(|| serde_json::from_str::<WelcomePosition<'_>>(text).ok())
                .flatten()
                .filter(|w| w.r#type == "welcome")
                {
                    self.epoch = Some(w.epoch.to_owned());
                    out.put_slice(b"event: welcome\nid: ");
                    match self.resuming.take().filter(|_| w.resumed == Some(true)) {
                        // Resumed: the replay follows, each event with its
                        // own id; until then the client is where it was.
                        Some(position) => out.put_slice(position.as_bytes()),
                        // Fresh, or a failed resume: it goes on from here.
                        None => {
                            out.put_slice(w.epoch.as_bytes());
                            out.put_u8(b':');
                            out.put_slice(w.offset.as_bytes());
                        }
                    }
                    out.put_u8(b'\n');
                    put_data(out, text);
                } else {
                    put_data(out, text);
                }
                out.put_u8(b'\n');
                FrameKind::Data
            }
            Message::Binary(data) => {
                // Not UTF-8: SSE carries text only, so it goes as base64
                // in an event of its own rather than not at all.
                use base64::Engine as _;
                out.put_slice(b"event: binary\n");
                put_data(
                    out,
                    &base64::engine::general_purpose::STANDARD.encode(&data),
                );
                out.put_u8(b'\n');
                FrameKind::Data
            }
            Message::Ping(_) => {
                out.put_slice(b":\n\n");
                FrameKind::Keepalive
            }
            Message::Pong(_) => FrameKind::Nothing,
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (f.code, f.reason.to_string()))
                    .unwrap_or((1000, String::new()));
                let data = serde_json::json!({ "code": code, "reason": reason }).to_string();
                out.put_slice(b"event: close\n");
                put_data(out, &data);
                out.put_u8(b'\n');
                FrameKind::Close
            }
        }
    }
}

enum FrameKind {
    Data,
    Keepalive,
    Close,
    Nothing,
}

impl futures_util::Sink<Message> for SseSocket {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut state = self.shared.lock();
        if state.gone {
            return Poll::Ready(Err(axum::Error::new("the client left")));
        }
        if state.pending() >= HIGH_WATER {
            state.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), Self::Error> {
        let this = self.get_mut();
        let mut out = BytesMut::new();
        let kind = this.format(msg, &mut out);
        let mut state = this.shared.lock();
        if state.gone {
            return Err(axum::Error::new("the client left"));
        }
        if state.buffer.is_empty() {
            state.buffer = out;
        } else {
            state.buffer.put_slice(&out);
        }
        match kind {
            FrameKind::Keepalive => state.pong_due = true,
            FrameKind::Close => state.closed = true,
            FrameKind::Data | FrameKind::Nothing => {}
        }
        state.wake_body();
        Ok(())
    }

    /// Flushed once the body holds less than `HIGH_WATER` (64 KiB), not once it
    /// has taken everything: events written while the connection's task
    /// is busy go out together, in one chunk and one write.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut state = self.shared.lock();
        if state.gone {
            return Poll::Ready(Err(axum::Error::new("the client left")));
        }
        if state.pending() < HIGH_WATER {
            return Poll::Ready(Ok(()));
        }
        state.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut state = self.shared.lock();
        state.closed = true;
        state.wake_body();
        Poll::Ready(Ok(()))
    }
}

impl futures_util::Stream for SseSocket {
    type Item = Result<Message, axum::Error>;

    /// A stream has no client frames: it answers a keepalive the body has
    /// taken with a pong (the heartbeat's "the client is reading"), and
    /// ends when the client leaves or the close event has gone out.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.shared.lock();
        if state.gone || (state.closed && state.pending() == 0) {
            return Poll::Ready(None);
        }
        if state.pong_due && state.pending() == 0 {
            state.pong_due = false;
            return Poll::Ready(Some(Ok(Message::Pong(Bytes::new()))));
        }
        state.writer = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for SseSocket {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if !state.closed || state.pending() > 0 {
            state.aborted = true;
            state.buffer = BytesMut::new();
        }
        state.closed = true;
        state.wake_body();
    }
}

impl futures_util::Stream for SseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.shared.lock();
        if state.aborted {
            state.aborted = false;
            return Poll::Ready(Some(Err(std::io::Error::other(
                "the stream ended without its close event reaching the client",
            ))));
        }
        if !state.buffer.is_empty() {
            let chunk = std::mem::take(&mut state.buffer).freeze();
            state.wake_writer();
            return Poll::Ready(Some(Ok(chunk)));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.body = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.gone = true;
        state.buffer = BytesMut::new();
        state.wake_writer();
    }
}

#[cfg(test)]
mod tests;
