//! A test-only echo endpoint on the shared connection driver, so that the
//! Autobahn suite can judge wsproxy's own WebSocket stack (framing,
//! fragmentation, UTF-8, control frames, close handshake) and not only the
//! proxy's byte tunnel. Mounted at `GET /_test/echo` only when
//! `WS_TEST_ECHO=true` (a hidden setting): never in production.
//!
//! Everything but the meaning of a frame is [`crate::ws::Driver`]'s, as on
//! the session and pub/sub endpoints: the same limits, heartbeat, close
//! codes and shutdown.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::broker::Outbox;
use crate::context::App;
use crate::ws::{self, Budget, Counters, Driver, Handler, HandlerFuture, Label, Reply};

/// Sends every message back as it came.
struct Echo;

impl Handler for Echo {
    fn on_text(&mut self, text: Utf8Bytes) -> HandlerFuture<'_> {
        Box::pin(std::future::ready(Reply::Send(Message::Text(text))))
    }

    fn on_binary(&mut self, data: bytes::Bytes) -> Reply {
        Reply::Send(Message::Binary(data))
    }

    /// Not paced: the Autobahn suite's performance cases send thousands of
    /// messages, and what an echo costs stays on this connection.
    fn budget(&self) -> Budget<'_> {
        Budget::Unpaced
    }
}

/// `GET /_test/echo`.
pub async fn handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if let Err(e) = crate::handshake::admit(&headers, &app.config.ws_origins) {
        return e.into_response();
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return crate::error::ApiError::not_a_websocket(e).into_response(),
    };
    let driver = Driver {
        app: app.clone(),
        outbox: Outbox::new(1),
        handler: Echo,
        expires: None,
        // Counted apart from the real endpoints: nothing a dashboard reads.
        counters: Counters {
            active: Default::default(),
            opened: Default::default(),
            delivered: Default::default(),
        },
        label: Label {
            endpoint: "test-echo",
            session_id: "-".to_owned(),
            agent_id: None,
            user: None,
        },
        task: app.tracker.token(),
        slot: None,
        preamble: Vec::new(),
        tracking: Default::default(),
    };
    ws::upgrade(upgrade, driver)
}
