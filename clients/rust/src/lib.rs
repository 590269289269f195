//! Async clients for wsproxy: [`WsClient`] for topic pub/sub (`GET /ws`)
//! and [`SessionClient`] for session bridges
//! (`GET /{agent_id}/ws/{session_id}`, plain or reliable; see
//! [Session bridge](#session-bridge)).
//!
//! # Layout
//!
//! - `client` and `worker`: [`WsClient`], its builder, and the task that
//!   owns its socket; `message` its frames, `auth` its JWTs.
//! - `session`: [`SessionClient`] and its events; `session/builder` its
//!   settings and connecting, `session/wire` the session frames and the
//!   values they carry, `session/worker` the task that owns its socket.
//! - `options`: what both share (the [`ReconnectPolicy`] and its backoff,
//!   [`ConnectionState`], timeouts); `error`: the one [`Error`] type.
//!
//! # Topic pub/sub
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
//! ## Example
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
//! ## Authentication
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
//! ## Protocol notes
//!
//! The server answers `register-name`, `register-session`, `subscribe`,
//! `unsubscribe` and `ping` in the order it receives them, with either a
//! confirmation or `{"type":"error",...}`; the client pairs each answer with
//! the oldest unanswered command of the same kind. A successful
//! `publish-json` has no answer, which is why [`WsClient::publish`] cannot
//! report the server's verdict and [`WsClient::on_error`] exists.

//!
//! # Session bridge
//!
//! [`SessionClient`] joins one session as an agent, with the token the
//! backend stored for it (`SETEX session:{id}:auth <ttl> <token>`, sent as
//! `Authorization: Bearer`). It reads [`SessionEvent`]s from the
//! [`SessionEvents`] returned beside it, and sends JSON.
//!
//! - [`Mode::Plain`] is the seeds' protocol: the backend's messages as
//!   published on `session:{id}:down`, client messages published on
//!   `session:{id}:up`. A reconnection loses what was published meanwhile.
//! - [`Mode::Reliable`] offers the `wsproxy.v1` subprotocol (the server
//!   needs `RELIABLE_SESSIONS=true`, otherwise connecting fails with
//!   [`Error::ReliableUnavailable`]; the client does not fall back to
//!   plain on its own). Each message carries its [`Offset`] in the
//!   session's history; after a lost connection the client reconnects
//!   with its epoch and last offset and gets exactly what it missed, or a
//!   [`SessionEvent::ResumeFailed`] saying why it cannot (the history was
//!   trimmed, expired, or lost): never a silent gap. [`SessionClient::send`]
//!   returns once wsproxy has stored the message ([`Sent::Stored`], with
//!   `duplicate` for a resend), and messages not acknowledged when a
//!   connection drops are sent again, in order and with their ids, after
//!   the next one opens; wsproxy stores each id once. At most
//!   `max_unacked` are held; beyond, `send` fails with
//!   [`Error::QueueFull`].
//!
//! In either mode a close code 4000-4999 ends the session for good: wsproxy
//! sends none of its own, only a backend's `disconnect` through
//! `wsproxy_control` does (often with the token revoked), so the client
//! does not reconnect. The last event is [`SessionEvent::Disconnected`]
//! with [`Error::SessionEnded`], queued messages fail with it, and the
//! client is closed, as the JavaScript client's `server_closed`.
//!
//! ```no_run
//! use wsproxy_client::{Mode, SessionClient, SessionEvent};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), wsproxy_client::Error> {
//!     let (client, mut events) = SessionClient::connect(
//!         "ws://127.0.0.1:8080",
//!         "agent-1",
//!         "session-A",
//!         "token-the-backend-stored",
//!         Mode::Reliable,
//!     )
//!     .await?;
//!
//!     let sent = client.send(&serde_json::json!({"type": "hello"})).await?;
//!     println!("stored: {:?}", sent.ack());
//!
//!     while let Some(event) = events.recv().await {
//!         match event {
//!             SessionEvent::Message(m) => println!("{:?}: {:?}", m.offset, m.text()),
//!             SessionEvent::ResumeFailed(f) => {
//!                 // Messages were lost to this client: reload from the backend.
//!                 eprintln!("resume failed ({}); reloading", f.reason);
//!             }
//!             SessionEvent::Disconnected(e) => eprintln!("lost: {e}; reconnecting"),
//!             other => println!("{other:?}"),
//!         }
//!     }
//!     Ok(())
//! }
//! ```

mod auth;
mod client;
mod error;
mod message;
mod options;
mod session;
mod worker;

pub use client::{ClientBuilder, ConnectionState, HandlerId, ReconnectPolicy, WsClient};
pub use error::Error;
pub use message::{Message, ServerError, now_rfc3339};
pub use session::{
    Ack, Mode, Offset, Payload, Position, Queued, Resume, ResumeFailed, ResumeFailure, Sent,
    SessionBuilder, SessionClient, SessionEvent, SessionEvents, SessionMessage, Welcome,
};
