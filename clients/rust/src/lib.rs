//! Async client for wsproxy's topic pub/sub.
//!
//! wsproxy's `/ws` endpoint carries a small text protocol: a client
//! registers a name and a session, subscribes to topics, and publishes JSON
//! messages that the server delivers to every subscriber of the topic in the
//! same session (across every wsproxy instance sharing the Redis).
//! [`WsClient`] wraps that protocol:
//!
//! - **Connecting**: [`WsClient::connect`] (anonymous, session
//!   `session-{name}`), [`WsClient::connect_with_session`], or
//!   [`WsClient::connect_with_auth`], which first gets a JWT from
//!   `POST /auth/token`. [`WsClient::builder`] exposes timeouts and the
//!   reconnection policy.
//! - **Receiving**: [`WsClient::subscribe`] returns once the server has
//!   confirmed the subscription; [`WsClient::on_message`] routes each
//!   delivered [`Message`] to the handlers of its topic.
//! - **Sending**: [`WsClient::publish`] with any serializable payload.
//! - **Failures**: calls return a typed [`Error`]; errors nobody is waiting
//!   for (a refused publish, a dropped connection) go to
//!   [`WsClient::on_error`] handlers.
//! - **Staying connected**: a background task owns the socket. After a lost
//!   connection it reconnects with capped exponential backoff, renewing the
//!   token first when it is close to expiry, registers again and restores
//!   every subscription. [`WsClient::connection_state`] and
//!   [`WsClient::wait_connected`] tell where it stands. Messages published
//!   while the connection was down are not replayed (Redis Pub/Sub keeps
//!   nothing); messages *this* client publishes meanwhile are held (bounded)
//!   and sent after reconnecting.
//!
//! Only plain `ws://` and `http://` URLs are supported: put a TLS-terminating
//! proxy in front when the network is not trusted.
//!
//! # Example
//!
//! ```no_run
//! use wsproxy_client::{WsClient, now_rfc3339};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), wsproxy_client::Error> {
//!     let url = "ws://127.0.0.1:8080/ws";
//!     let client = WsClient::connect_with_session("Client1", "session-A", url).await?;
//!
//!     client.on_message("NetworkConnectedEvent", |msg| {
//!         println!("[Client1] {msg}");
//!     });
//!     client
//!         .subscribe("Client1", "NetworkConnectedEvent", "no-payload")
//!         .await?;
//!
//!     // Every client of session-A subscribed to the topic gets it, this one
//!     // included.
//!     client
//!         .publish("Client1", "NetworkConnectedEvent", "Network connected", &now_rfc3339())
//!         .await?;
//!
//!     tokio::time::sleep(std::time::Duration::from_millis(200)).await;
//!     client.close().await
//! }
//! ```
//!
//! # Authentication
//!
//! ```no_run
//! # async fn demo() -> Result<(), wsproxy_client::Error> {
//! use wsproxy_client::WsClient;
//!
//! let client = WsClient::connect_with_auth(
//!     "Client1",
//!     "ws://127.0.0.1:8080/ws",
//!     "http://127.0.0.1:8080/auth/token",
//!     "alice",
//!     "correct horse battery staple",
//!     None, // the server binds the token to session-alice
//! )
//! .await?;
//! assert_eq!(client.session_id(), "session-alice");
//! if let Some(token) = client.get_token() {
//!     // e.g. hand it to a browser, which passes it as ?access_token=...
//!     println!("{} bytes of JWT", token.len());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Protocol notes
//!
//! The server answers `register-name`, `register-session`, `subscribe`,
//! `unsubscribe` and `ping` in the order it receives them, with either a
//! confirmation or `{"type":"error",...}`; the client pairs each answer with
//! the oldest unanswered command of the same kind. A successful
//! `publish-json` has no answer, which is why [`WsClient::publish`] cannot
//! report the server's verdict and [`WsClient::on_error`] exists.

mod auth;
mod client;
mod error;
mod message;
mod options;
mod worker;

pub use client::{ClientBuilder, ConnectionState, HandlerId, ReconnectPolicy, WsClient};
pub use error::Error;
pub use message::{Message, ServerError, now_rfc3339};
