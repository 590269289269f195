//! `POST /auth/token`: a user of the users file trades its password for a
//! JWT bound to one pub/sub session.
//!
//! The endpoint is here, beside the password check ([`super::users`]) and
//! the token format ([`super::jwt`]), and takes what it needs as an
//! [`Issuer`] rather than the connection context, which sits above `auth`;
//! the router ([`crate::http`]) hands it over.

use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::jwt;
use super::users::Users;
use crate::config::JwtConfig;
use crate::error::{ApiError, Refusal};
use crate::metrics::Metrics;

/// What issuing a token needs; either part missing means tokens are off.
#[derive(Debug, Clone, Copy)]
pub struct Issuer<'a> {
    /// `JWT_SECRET`, issuer, audience and lifetime.
    pub jwt: Option<&'a JwtConfig>,
    /// The users file.
    pub users: Option<&'a Users>,
    /// How long the whole body may take to arrive (`AUTH_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// Where wrong passwords are counted.
    pub metrics: &'a Metrics,
}

/// Body of `POST /auth/token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    username: String,
    password: String,
    session_id: Option<String>,
}

/// Largest `POST /auth/token` body: a username, a password and a session
/// id fit many times over.
pub const MAX_TOKEN_REQUEST_BYTES: usize = 16 * 1024;

/// `POST /auth/token`: checks the user's password and issues a JWT bound to
/// the requested session (default `session-{username}`), if the user's
/// `USERS_FILE` line allows it (`403 session_forbidden` otherwise).
///
/// The body is read here, not by an extractor, so that nothing waits on a
/// client that sends it slowly or never: a server that issues no tokens
/// answers before reading it, a `Content-Length` past
/// [`MAX_TOKEN_REQUEST_BYTES`] is refused at once (413), and the whole body
/// must arrive within `AUTH_TIMEOUT_SECS` (408). Answering early closes the
/// connection, unread body and all.
pub async fn issue_token(
    issuer: Issuer<'_>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (jwt_config, users) = match (issuer.jwt, issuer.users) {
        (Some(jwt), Some(users)) => (jwt, users),
        (jwt, users) => {
            let missing = match (jwt, users) {
                (None, None) => "JWT_SECRET and USERS_FILE are",
                (None, Some(_)) => "JWT_SECRET is",
                _ => "USERS_FILE is",
            };
            return Err(ApiError::from(Refusal::AuthNotConfigured(
                format!(
                    "token issuing needs JWT_SECRET and USERS_FILE on the server; {missing} not set (see docs/src/configuration.md)"
                )
                .into(),
            )));
        }
    };
    let req = read_token_request(request, issuer.timeout).await?;
    let session_id_given = req.session_id.is_some();
    let session = match req.session_id {
        Some(s) => s,
        None => format!("session-{}", req.username),
    };
    if !crate::keys::valid_id(&session) {
        return Err(ApiError::from(Refusal::InvalidRequest(
            "session_id must be 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.'".into(),
        )));
    }
    if !users.verify(&req.username, &req.password).await {
        tracing::info!(
            user = %crate::logsafe::escaped(&req.username),
            "refused /auth/token: wrong credentials"
        );
        return Err(
            Refusal::InvalidCredentials("unknown user or wrong password".into())
                .counted(issuer.metrics),
        );
    }
    // After the password: who may join what is for the user alone to learn.
    if !users.may_join(&req.username, &session) {
        tracing::info!(
            user = %crate::logsafe::escaped(&req.username),
            session = %session,
            "refused /auth/token: session not in the user's USERS_FILE list"
        );
        let asked = if session_id_given {
            format!("this user may not get a token for session {session:?}")
        } else {
            format!(
                "no session_id given, and this user may not get a token for the default session {session:?}; name one it may join"
            )
        };
        return Err(ApiError::from(Refusal::SessionForbidden(
            format!("{asked} (its USERS_FILE line lists the sessions it may get tokens for)")
                .into(),
        )));
    }
    let (token, claims) = jwt::issue(jwt_config, &req.username, &session)
        .map_err(|e| ApiError::from(Refusal::Internal(e.to_string().into())))?;
    Ok(Json(serde_json::json!({
        "token": token,
        "expires_in": claims.exp.saturating_sub(claims.iat),
        "session_id": session,
    }))
    .into_response())
}

/// Reads and parses the body of `POST /auth/token` within `limit`.
async fn read_token_request(
    request: axum::extract::Request,
    limit: Duration,
) -> Result<TokenRequest, ApiError> {
    let too_large = || {
        ApiError::from(Refusal::BodyTooLarge(
            format!("the request body may be at most {MAX_TOKEN_REQUEST_BYTES} bytes").into(),
        ))
    };
    let headers = request.headers();
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_TOKEN_REQUEST_BYTES as u64) {
        return Err(too_large());
    }
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    let invalid = |why: &str| {
        ApiError::from(Refusal::InvalidRequest(
            format!("expected JSON {{\"username\", \"password\", \"session_id\"?}}: {why}").into(),
        ))
    };
    if !is_json {
        return Err(invalid("the Content-Type must be application/json"));
    }
    let read = async {
        use futures_util::StreamExt;
        let mut body = Vec::new();
        let mut stream = request.into_body().into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| invalid("the body could not be read"))?;
            if body.len().saturating_add(chunk.len()) > MAX_TOKEN_REQUEST_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(limit, read).await.map_err(|_| {
        ApiError::from(Refusal::BodyTimeout(
            format!("the request body did not arrive within {limit:?}").into(),
        ))
    })??;
    serde_json::from_slice(&body).map_err(|e| invalid(&e.to_string()))
}
