//! The crate's error type.

use crate::message::ServerError;

/// Everything that can go wrong between this client and wsproxy.
///
/// Errors the server reports about one command (an unknown topic name, a
/// subscription limit, ...) arrive as [`Error::Server`]; transport problems
/// as [`Error::WebSocket`], [`Error::Io`] or [`Error::ConnectionLost`];
/// refusals of the WebSocket upgrade as [`Error::Rejected`]; failures of the
/// token endpoint as [`Error::Auth`]. The session client adds
/// [`Error::ReliableUnavailable`], [`Error::NotStored`],
/// [`Error::AckTimeout`], [`Error::SessionEnded`] and [`Error::Protocol`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A URL could not be used (bad syntax, unsupported scheme, no host).
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// A topic or session id is not 1-128 characters of `[A-Za-z0-9_.-]`,
    /// or a client name is empty or contains a control character.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// Which argument ("topic", "session id", "client name").
        what: &'static str,
        /// The value as given.
        value: String,
        /// What the server would have objected to.
        reason: &'static str,
    },

    /// The server refused the WebSocket upgrade, e.g. 401 `missing_token`
    /// or 403 `invalid_token`.
    #[error("the server refused the WebSocket upgrade: HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Rejected {
        /// HTTP status of the refusal.
        status: u16,
        /// The `error` field of the JSON body, when there is one.
        code: Option<String>,
        /// The response body as text.
        body: String,
    },

    /// The token endpoint answered with something other than 200.
    #[error("token request failed: HTTP {status} {code}: {message}")]
    Auth {
        /// HTTP status.
        status: u16,
        /// The `error` field of the JSON body (`invalid_credentials`,
        /// `invalid_request`, `auth_not_configured`, ...), or `unknown`.
        code: String,
        /// The `message` field, or the raw body.
        message: String,
    },

    /// An HTTP-level failure talking to the token endpoint.
    #[error("HTTP error: {0}")]
    Http(String),

    /// A token whose payload could not be read (not a JWT, bad base64 or
    /// JSON).
    #[error("malformed token: {0}")]
    InvalidToken(String),

    /// The server reported an error about a command this client sent.
    #[error("server error: {0}")]
    Server(#[from] ServerError),

    /// The server closed the connection with this close code and reason
    /// (1008 "token expired", 1001 when it shuts down, ...).
    #[error("the server closed the connection: {code} {reason:?}")]
    ServerClosed {
        /// The WebSocket close code.
        code: u16,
        /// The close reason text.
        reason: String,
    },

    /// The backend ended the session: the server closed its connection
    /// with a code 4000-4999 and this reason. wsproxy sends no such code
    /// of its own; it is a backend's `disconnect` through
    /// `wsproxy_control`, often with the token revoked. The session client
    /// does not reconnect after it (as the JavaScript client's
    /// `server_closed`): it is closed, and its queued messages fail with
    /// this error.
    #[error("the backend ended the session (close code {code} {reason:?}); not reconnecting")]
    SessionEnded {
        /// The WebSocket close code, 4000-4999.
        code: u16,
        /// The close reason text.
        reason: String,
    },

    /// The connection dropped before the operation completed.
    #[error("the connection was lost")]
    ConnectionLost,

    /// The operation needs a live connection and the client is between
    /// connections.
    #[error("not connected (reconnecting)")]
    NotConnected,

    /// Too many publishes are already waiting for the connection to return.
    #[error("the queue of messages waiting for the connection is full")]
    QueueFull,

    /// The operation did not complete within its time limit.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),

    /// The client was closed (by [`close`](crate::WsClient::close), by giving
    /// up reconnecting, or because the background task ended).
    #[error("the client is closed")]
    Closed,

    /// Reliable mode was asked for and the server upgraded the connection
    /// without selecting the `wsproxy.v1` subprotocol: its reliable
    /// sessions are off (`RELIABLE_SESSIONS=false`, the default), or a
    /// proxy in between dropped the `Sec-WebSocket-Protocol` header. The
    /// client does not fall back to plain mode on its own: a plain session
    /// would silently lose what reliable mode promises to keep.
    #[error(
        "the server does not offer reliable sessions (400 reliable_sessions_off, or a 101 \
         without the wsproxy.v1 subprotocol): RELIABLE_SESSIONS is off; connect in plain \
         mode or turn them on"
    )]
    ReliableUnavailable,

    /// wsproxy could not store a reliable client message (its Redis is
    /// unavailable): nothing was stored, and resending it with the same id
    /// is safe.
    #[error("message {id:?} was not stored: {message}")]
    NotStored {
        /// The message's id.
        id: String,
        /// The server's explanation.
        message: String,
    },

    /// No acknowledgement arrived within the request timeout. The message
    /// is not given up: it stays queued, is sent again after every
    /// reconnection until it is acknowledged, and counts against
    /// `max_unacked` until then. Sending it again with the same id (see
    /// [`SessionClient::send_with_id`](crate::SessionClient::send_with_id))
    /// is safe: wsproxy stores an id once.
    #[error(
        "no acknowledgement for message {id:?} in time; it stays queued and is sent again after reconnecting"
    )]
    AckTimeout {
        /// The message's id.
        id: String,
    },

    /// The server sent something that does not follow the session
    /// protocol (a welcome without an epoch, an offset that is not
    /// `<ms>-<seq>`, ...).
    #[error("protocol error: {0}")]
    Protocol(String),

    /// A WebSocket protocol or transport error.
    #[error("WebSocket error: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),

    /// A socket error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A value could not be serialized, or a server response parsed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        use tokio_tungstenite::tungstenite::Error as WsError;
        match e {
            WsError::Http(resp) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let code = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_owned));
                Error::Rejected { status, code, body }
            }
            WsError::Io(io) => Error::Io(io),
            WsError::ConnectionClosed | WsError::AlreadyClosed => Error::ConnectionLost,
            other => Error::WebSocket(Box::new(other)),
        }
    }
}

impl Error {
    /// True when the server refused the credentials or the token (HTTP 401 or
    /// 403 from either endpoint): retrying with the same secrets will not help.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Error::Rejected {
                status: 401 | 403,
                ..
            } | Error::Auth {
                status: 401 | 403,
                ..
            }
        )
    }
}
