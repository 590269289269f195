//! The session bridge, the first of wsproxy's three jobs: a client holds
//! a session (`/{agent_id}/ws/{session_id}` or `/{agent_id}/sse/{session_id}`)
//! with a token its backend stored in Redis; what the backend publishes on
//! `session:{id}:down` reaches it, what it sends goes to `session:{id}:up`.
//!
//! One session core, two transports:
//!
//! - [`bridge`]: the core every session connection goes through
//!   ([`bridge::admit`]: ids, origin, token, subscription, join or resume,
//!   lifecycle registration), and the WebSocket transport on the shared
//!   driver ([`crate::ws`]);
//! - [`sse`]: the Server-Sent Events transport (and client messages by
//!   `POST`), a thin writer over the same admission and delivery;
//! - [`reliable`]: reliable sessions (the `wsproxy.v1` subprotocol: offsets,
//!   resume, acknowledged client messages), and [`history`], their Redis
//!   Functions (the replayable history, the join, the stored client
//!   messages);
//! - [`lifecycle`]: connect, resume and disconnect events, presence, and the
//!   heartbeat that turns a dead process's connections into disconnects;
//! - [`control`]: commands from backends through Redis (close a session's
//!   connections).
//!
//! The other two jobs are [`crate::pubsub`] (topics between clients) and
//! [`crate::upstream`] (the reverse proxy).

pub mod bridge;
pub mod control;
pub mod history;
pub mod lifecycle;
pub mod reliable;
pub mod sse;
