//! HTTP errors, turned into responses in one place.
//!
//! Every refusal wsproxy sends before a WebSocket upgrade is a status code
//! with a JSON body `{"error": "<code>", "message": "<what went wrong>"}`:
//! the code is stable and meant for programs, the message for people.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;

use serde::Serialize;

use crate::metrics::{AuthFailure, Metrics};

/// A refusal with its HTTP status, a stable code and a human message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status sent.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_token`.
    pub code: &'static str,
    /// Explanation for people.
    pub message: String,
    /// Seconds for a `Retry-After` header, when the refusal says when to
    /// come back.
    pub retry_after: Option<u64>,
}

/// Every cause for refusing a request before its upgrade, each knowing its
/// HTTP status and stable code; its text says what went wrong, for people.
/// Becomes an [`ApiError`] (and so a JSON response) in one place, the
/// `From` below.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No usable bearer token (none, empty, not Bearer, too long).
    MissingToken(Cow<'static, str>),
    /// A token that does not verify, has expired or is for another session.
    InvalidToken(Cow<'static, str>),
    /// More than one token where one is checked (a proxy route: two
    /// `Authorization` headers, two `access_token` parameters, or both).
    AmbiguousToken(Cow<'static, str>),
    /// `POST /auth/token`: unknown user or wrong password.
    InvalidCredentials(Cow<'static, str>),
    /// `POST /auth/token`: a session the user's `USERS_FILE` list does not
    /// allow.
    SessionForbidden(Cow<'static, str>),
    /// Redis could not be asked in time.
    RedisUnavailable(Cow<'static, str>),
    /// An agent or session id that could change a Redis name.
    InvalidId(Cow<'static, str>),
    /// A request on a WebSocket endpoint that is not an upgrade.
    NotAWebsocket(Cow<'static, str>),
    /// A token request body that is not what the endpoint takes.
    InvalidRequest(Cow<'static, str>),
    /// A query string that does not parse.
    InvalidQuery(Cow<'static, str>),
    /// Something that should not happen did.
    Internal(Cow<'static, str>),
    /// A proxy route at its `max_connections`.
    RouteFull(Cow<'static, str>),
    /// An upgrade from a page whose origin is not allowed.
    OriginNotAllowed(Cow<'static, str>),
    /// No endpoint and no route for the path.
    NotFound(Cow<'static, str>),
    /// Every backend of the route is out (health checks, breakers).
    NoBackend(Cow<'static, str>),
    /// `/metrics` without the `METRICS_TOKEN`.
    MetricsTokenRequired(Cow<'static, str>),
    /// A method the endpoint does not take (the caller adds `Allow`).
    MethodNotAllowed(Cow<'static, str>),
    /// A `Sec-WebSocket-Key` that is not the base64 of 16 bytes.
    InvalidWebsocketKey(Cow<'static, str>),
    /// A request body over its limit.
    BodyTooLarge(Cow<'static, str>),
    /// A request body that did not arrive in time.
    BodyTimeout(Cow<'static, str>),
    /// A session's messages further ahead of `WS_CLIENT_MESSAGE_RATE`
    /// than a request may wait.
    RateLimited(Cow<'static, str>),
    /// A proxied path a backend could read as another route's.
    BadPath(Cow<'static, str>),
    /// No backend could be reached or completed its handshake.
    BackendUnavailable(Cow<'static, str>),
    /// The backend's handshake took longer than the route allows.
    BackendTimeout(Cow<'static, str>),
    /// Token issuing without `JWT_SECRET` and `USERS_FILE`.
    AuthNotConfigured(Cow<'static, str>),
    /// The server is draining.
    ShuttingDown(Cow<'static, str>),
    /// `MAX_CONNECTIONS` is reached (an HTTP/2 stream that would need a
    /// place of its own).
    ServerFull(Cow<'static, str>),
    /// A client asked for reliable sessions on a server without them.
    ReliableSessionsOff(Cow<'static, str>),
    /// A client message POSTed to a session that is not JSON.
    InvalidJson(Cow<'static, str>),
    /// A client message Redis could not take (plain sessions).
    PublishFailed(Cow<'static, str>),
    /// The backend answered the upgrade with this 4xx: passed on as it is.
    BackendRejected(StatusCode),
}

impl Refusal {
    /// The HTTP status sent.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidToken(_) => StatusCode::FORBIDDEN,
            Self::AmbiguousToken(_) => StatusCode::BAD_REQUEST,
            Self::InvalidCredentials(_) => StatusCode::UNAUTHORIZED,
            Self::SessionForbidden(_) => StatusCode::FORBIDDEN,
            Self::RedisUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidId(_) => StatusCode::BAD_REQUEST,
            Self::NotAWebsocket(_) => StatusCode::BAD_REQUEST,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::RouteFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::OriginNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NoBackend(_) => StatusCode::BAD_GATEWAY,
            Self::MetricsTokenRequired(_) => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidWebsocketKey(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::BadPath(_) => StatusCode::BAD_REQUEST,
            Self::BackendUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::AuthNotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ServerFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ReliableSessionsOff(_) => StatusCode::BAD_REQUEST,
            Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::PublishFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BackendRejected(status) => *status,
        }
    }

    /// The stable code in the body's `error`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken(_) => "missing_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::AmbiguousToken(_) => "ambiguous_token",
            Self::InvalidCredentials(_) => "invalid_credentials",
            Self::SessionForbidden(_) => "session_forbidden",
            Self::RedisUnavailable(_) => "redis_unavailable",
            Self::InvalidId(_) => "invalid_id",
            Self::NotAWebsocket(_) => "not_a_websocket",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidQuery(_) => "invalid_query",
            Self::Internal(_) => "internal",
            Self::RouteFull(_) => "route_full",
            Self::OriginNotAllowed(_) => "origin_not_allowed",
            Self::NotFound(_) => "not_found",
            Self::NoBackend(_) => "no_backend",
            Self::MetricsTokenRequired(_) => "metrics_token_required",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::InvalidWebsocketKey(_) => "invalid_websocket_key",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::RateLimited(_) => "rate_limited",
            Self::BadPath(_) => "bad_path",
            Self::BackendUnavailable(_) => "backend_unavailable",
            Self::BackendTimeout(_) => "backend_timeout",
            Self::AuthNotConfigured(_) => "auth_not_configured",
            Self::ShuttingDown(_) => "shutting_down",
            Self::ServerFull(_) => "server_full",
            Self::ReliableSessionsOff(_) => "reliable_sessions_off",
            Self::InvalidJson(_) => "invalid_json",
            Self::PublishFailed(_) => "publish_failed",
            Self::BackendRejected(_) => "backend_rejected",
        }
    }

    /// The explanation in the body's `message`.
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            Self::MissingToken(m)
            | Self::InvalidToken(m)
            | Self::AmbiguousToken(m)
            | Self::InvalidCredentials(m)
            | Self::SessionForbidden(m)
            | Self::RedisUnavailable(m)
            | Self::InvalidId(m)
            | Self::NotAWebsocket(m)
            | Self::InvalidRequest(m)
            | Self::InvalidQuery(m)
            | Self::Internal(m)
            | Self::RouteFull(m)
            | Self::OriginNotAllowed(m)
            | Self::NotFound(m)
            | Self::NoBackend(m)
            | Self::MetricsTokenRequired(m)
            | Self::MethodNotAllowed(m)
            | Self::InvalidWebsocketKey(m)
            | Self::BodyTooLarge(m)
            | Self::BodyTimeout(m)
            | Self::RateLimited(m)
            | Self::BadPath(m)
            | Self::BackendUnavailable(m)
            | Self::BackendTimeout(m)
            | Self::AuthNotConfigured(m)
            | Self::ShuttingDown(m)
            | Self::ServerFull(m)
            | Self::ReliableSessionsOff(m)
            | Self::InvalidJson(m)
            | Self::PublishFailed(m) => m.clone(),
            Self::BackendRejected(status) => format!(
                "the backend refused the upgrade with HTTP {}",
                status.as_u16()
            )
            .into(),
        }
    }
}

impl Refusal {
    /// The reason `auth_failures` counts this refusal under: a session or
    /// `/ws` connection whose authentication failed, or a token request
    /// with wrong credentials (counted as `invalid_token`). `None` for
    /// every other cause (the proxy counts its own by route).
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        match self {
            Self::MissingToken(_) => Some(AuthFailure::MissingToken),
            Self::InvalidToken(_) | Self::InvalidCredentials(_) => Some(AuthFailure::InvalidToken),
            Self::RedisUnavailable(_) => Some(AuthFailure::RedisUnavailable),
            _ => None,
        }
    }

    /// Counts the refusal in `metrics` under its [`auth_failure`] reason,
    /// if it has one, and turns it into its response.
    ///
    /// [`auth_failure`]: Self::auth_failure
    pub fn counted(self, metrics: &Metrics) -> ApiError {
        if let Some(reason) = self.auth_failure() {
            metrics.auth_failure(reason);
        }
        self.into()
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        Self {
            status: refusal.status(),
            code: refusal.code(),
            message: refusal.message().into_owned(),
            retry_after: None,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to come back in `seconds`.
    pub fn retry_after(self, seconds: u64) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }
}

impl ApiError {
    /// 503 while the server drains.
    pub fn shutting_down() -> Self {
        Refusal::ShuttingDown("the server is shutting down".into()).into()
    }

    /// A request on a WebSocket endpoint that is not a valid upgrade.
    pub fn not_a_websocket(
        rejection: axum::extract::ws::rejection::WebSocketUpgradeRejection,
    ) -> Self {
        Self::new(
            rejection.status(),
            "not_a_websocket",
            format!(
                "this endpoint only accepts WebSocket upgrades: {}",
                rejection.body_text()
            ),
        )
    }

    /// A query string that does not parse.
    pub fn invalid_query(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Refusal::InvalidQuery(rejection.body_text().into()).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code,
            message: &self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// 405 with `Allow: GET` and a JSON body: WebSocket endpoints upgrade a GET.
pub fn method_not_allowed() -> Response {
    not_allowed("GET", "a WebSocket upgrade is a GET request")
}

/// 405 with `Allow` and a JSON body, like every other refusal.
pub fn not_allowed(allow: &'static str, message: &'static str) -> Response {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, axum::http::HeaderValue::from_static(allow));
    response
}

/// The JSON error message sent on an open WebSocket when a client message is
/// refused: `{"type":"error","error":"<code>","message":"..."}`.
pub fn socket_error(code: &str, message: &str) -> String {
    serde_json::json!({ "type": "error", "error": code, "message": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_knows_its_status_and_code() {
        for (refusal, status, code) in [
            (Refusal::MissingToken("m".into()), 401, "missing_token"),
            (Refusal::InvalidToken("m".into()), 403, "invalid_token"),
            (Refusal::AmbiguousToken("m".into()), 400, "ambiguous_token"),
            (
                Refusal::RedisUnavailable("m".into()),
                503,
                "redis_unavailable",
            ),
            (Refusal::BodyTooLarge("m".into()), 413, "body_too_large"),
            (Refusal::BodyTimeout("m".into()), 408, "body_timeout"),
            (Refusal::RateLimited("m".into()), 429, "rate_limited"),
            (Refusal::BackendTimeout("m".into()), 504, "backend_timeout"),
            (Refusal::ServerFull("m".into()), 503, "server_full"),
            (
                Refusal::SessionForbidden("m".into()),
                403,
                "session_forbidden",
            ),
            (
                Refusal::BackendRejected(StatusCode::NOT_FOUND),
                404,
                "backend_rejected",
            ),
        ] {
            let e = ApiError::from(refusal);
            assert_eq!((e.status.as_u16(), e.code), (status, code));
        }
        let e = ApiError::from(Refusal::BackendRejected(StatusCode::FORBIDDEN));
        assert_eq!(e.message, "the backend refused the upgrade with HTTP 403");
    }

    #[test]
    fn authentication_refusals_are_counted_by_their_reason_and_others_not() {
        let metrics = Metrics::new();
        for refusal in [
            Refusal::MissingToken("m".into()),
            Refusal::InvalidToken("m".into()),
            Refusal::InvalidCredentials("m".into()),
            Refusal::RedisUnavailable("m".into()),
            Refusal::NotFound("m".into()),
            Refusal::BadPath("m".into()),
        ] {
            let _ = refusal.counted(&metrics);
        }
        let text = metrics.render();
        let count = |reason: &str| {
            let line = format!("wsproxy_auth_failures_total{{reason=\"{reason}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map(|n| n.trim().to_owned())
        };
        assert_eq!(count("missing_token").as_deref(), Some("1"));
        assert_eq!(count("invalid_token").as_deref(), Some("2"));
        assert_eq!(count("redis_unavailable").as_deref(), Some("1"));
        assert_eq!(Refusal::NotFound("m".into()).auth_failure(), None);
    }

    #[test]
    fn socket_errors_are_json_with_type_error() {
        let text = socket_error("invalid_json", "expected value at line 1 column 1");
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"], "invalid_json");
        assert_eq!(v["message"], "expected value at line 1 column 1");
    }
}
