//! wsproxy: a WebSocket gateway.
//!
//! Clients hold WebSockets to wsproxy; backends talk only to Redis. A
//! client connected to `/{agent_id}/ws/{session_id}` receives every message
//! published on `session:{session_id}:down`, and each JSON message it sends is
//! published on `session:{session_id}:up`.
//!
//! # Layout
//!
//! Data flows one way: accept -> admit -> authenticate -> attach -> pump ->
//! close. Modules are layered (see ARCHITECTURE.md): nothing imports a
//! module above its own layer, and nothing below [`http`] knows the
//! router.
//!
//! - [`config`]: the typed configuration, from environment, `.env` and flags,
//!   validated with errors that name the variable.
//! - [`server`]: [`run`] (the whole server on a given listener), the accept
//!   loop, TLS, signals and graceful shutdown.
//! - [`http`]: the router and the small handlers (`/health`, `/ready`,
//!   `/metrics`, `POST /auth/token`, 405s, the fallback).
//! - [`status`]: the status page (`/status`, `/status.json`): what the
//!   process holds, gathered when asked.
//! - [`context`]: what every connection task shares (`App`,
//!   `ConnectionSlot`, `Draining`, `WorkerPool`), below the server, so that
//!   no endpoint imports the server.
//! - [`net`]: binding the listener, socket options.
//! - [`keys`]: the Redis key and channel schema and the id rule.
//! - [`redis_conn`]: the shared command connection, standalone or cluster
//!   ([`cluster`]: a cluster's seeds, slot map and key slots).
//! - [`close`]: the one table of close codes.
//! - [`auth`]: bearer-token extraction, the one-round-trip Redis check,
//!   JWTs, the users file and the token endpoint.
//! - [`broker`]: the process's single Redis pub/sub connection, with
//!   reference-counted subscriptions, reconnection and resubscription.
//! - [`session`]: the session bridge, one core and two transports:
//!   the endpoint and its admission ([`session::bridge`], WebSocket),
//!   sessions over HTTP ([`session::sse`], Server-Sent Events and `POST`),
//!   reliable sessions ([`session::reliable`], [`session::history`]),
//!   lifecycle events and presence ([`session::lifecycle`]), and commands
//!   from backends ([`session::control`]).
//! - [`pubsub`]: topic pub/sub between clients (`/ws`).
//! - [`ws`]: the per-connection frame pump both endpoints share.
//! - [`upstream`]: the reverse proxy to backend WebSocket servers (routes
//!   file, balancing, health checks, circuit breaker, tunnel).
//! - [`metrics`]: Prometheus counters, per server instance.
//! - [`origin`]: which browser origins may open WebSockets.
//! - [`handshake`]: the checks every upgrade passes first (origin, key).
//! - [`logsafe`]: client-chosen values escaped for the log.
//! - [`error`]: how refusals become JSON responses and socket messages.
//! - [`echo`]: a test-only echo endpoint on the driver, for Autobahn.
//!
//! # Running it in-process
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = wsproxy::config::Config::for_redis("redis://127.0.0.1:6379");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! println!("listening on {}", listener.local_addr()?);
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let server = tokio::spawn(wsproxy::run(config, listener, shutdown.clone()));
//! // ... connect clients ...
//! shutdown.cancel(); // clients get close code 1001
//! server.await??;
//! # Ok(())
//! # }
//! ```

// The library has no `unsafe` (the workspace denies it; only the binary's
// allocator options in src/main.rs are allowed one).
#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod close;
pub mod cluster;
pub mod config;
pub mod context;
pub mod echo;
pub mod error;
pub mod handshake;
pub mod http;
pub mod keys;
pub mod logsafe;
pub mod metrics;
pub mod net;
pub mod origin;
pub mod pace;
pub mod pubsub;
pub mod redis_conn;
pub mod redis_tls;
pub mod server;
pub mod session;
pub mod status;
pub mod upstream;
pub mod ws;

pub use server::run;
