//! HTTP errors, turned into responses in one place.
//!
//! Every refusal wsproxy sends before a WebSocket upgrade is a status code
//! with a JSON body `{"error": "<code>", "message": "<what went wrong>"}`:
//! the code is stable and meant for programs, the message for people.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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
        }
    }
}

impl ApiError {
    /// 503 while the server drains.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
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
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code,
            message: &self.message,
        };
        (self.status, Json(body)).into_response()
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
    fn socket_errors_are_json_with_type_error() {
        let text = socket_error("invalid_json", "expected value at line 1 column 1");
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"], "invalid_json");
        assert_eq!(v["message"], "expected value at line 1 column 1");
    }
}
