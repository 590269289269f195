//! [`SessionBuilder`]: the session client's settings, and connecting.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::worker::{self, Shared, Worker};
use super::{Mode, Position, SessionClient, SessionEvents};
use crate::Error;
use crate::message::check_id;
use crate::options::{ConnectionState, Options, ReconnectPolicy, random_u64};

/// Configures a [`SessionClient`] before connecting.
///
/// ```no_run
/// use std::time::Duration;
/// use wsproxy_client::{ReconnectPolicy, SessionClient};
///
/// # async fn demo() -> Result<(), wsproxy_client::Error> {
/// let (client, events) =
///     SessionClient::builder("ws://127.0.0.1:8080", "agent-1", "session-A", "token-from-backend")
///         .reliable()
///         .max_unacked(64)
///         .reconnect(ReconnectPolicy {
///             initial_delay: Duration::from_millis(250),
///             max_delay: Duration::from_secs(10),
///             max_attempts: None,
///         })
///         .connect()
///         .await?;
/// # drop((client, events));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SessionBuilder {
    base_url: String,
    agent_id: String,
    session_id: String,
    token: String,
    mode: Mode,
    resume_from: Option<Position>,
    options: Options,
    max_unacked: usize,
}

impl fmt::Debug for SessionBuilder {
    // Never print the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("base_url", &self.base_url)
            .field("agent_id", &self.agent_id)
            .field("session_id", &self.session_id)
            .field("token", &"<redacted>")
            .field("mode", &self.mode)
            .field("resume_from", &self.resume_from)
            .field("options", &self.options)
            .field("max_unacked", &self.max_unacked)
            .finish()
    }
}

impl SessionBuilder {
    pub(super) fn new(
        base_url: String,
        agent_id: String,
        session_id: String,
        token: String,
    ) -> SessionBuilder {
        SessionBuilder {
            base_url,
            agent_id,
            session_id,
            token,
            mode: Mode::Plain,
            resume_from: None,
            options: Options::default(),
            max_unacked: 256,
        }
    }

    /// Plain (the default) or reliable.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Shorthand for `mode(Mode::Reliable)`.
    pub fn reliable(self) -> Self {
        self.mode(Mode::Reliable)
    }

    /// Reliable mode: resume from a position kept from an earlier client
    /// (see [`SessionClient::position`]), instead of starting at the
    /// history's end. If the server cannot honour it, the first events are
    /// `Connected` and
    /// [`SessionEvent::ResumeFailed`](crate::SessionEvent::ResumeFailed).
    pub fn resume_from(mut self, position: Position) -> Self {
        self.resume_from = Some(position);
        self
    }

    /// How long [`send`](SessionClient::send) waits for its
    /// acknowledgement (reliable mode) or for the connection (plain mode).
    /// Default 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = timeout;
        self
    }

    /// Bound on opening the socket and reading the welcome, per attempt.
    /// Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Send a WebSocket ping every `interval`, and treat the connection as
    /// dead when nothing at all has arrived for `timeout`. Default 15 s /
    /// 45 s.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.options.keepalive_interval = interval.max(Duration::from_millis(10));
        self.options.keepalive_timeout = timeout;
        self
    }

    /// Largest frame accepted from the server. Default 1 MiB.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.options.max_message_bytes = bytes;
        self
    }

    /// Reconnection behaviour. Default: [`ReconnectPolicy::default`]
    /// (100 ms doubling to 5 s, jittered, forever).
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.options.reconnect = policy;
        self
    }

    /// The most messages the client holds at once: in reliable mode those
    /// not yet answered (acknowledged or refused), in plain mode those
    /// waiting for a connection. When it is full, `send` and `enqueue`
    /// fail at once with [`Error::QueueFull`] and nothing is sent; wait for
    /// an acknowledgement and try again. Default 256, at least 1.
    pub fn max_unacked(mut self, messages: usize) -> Self {
        self.max_unacked = messages.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Events held for the application before the client stops reading
    /// its socket (see [`SessionEvents`]). Default 1024, at least 1.
    pub fn event_queue(mut self, events: usize) -> Self {
        self.options.event_queue = events.max(1);
        self
    }

    /// Connects, and in reliable mode waits for the welcome. The first
    /// attempt is not retried: a refusal (a bad token: [`Error::Rejected`]
    /// 403; reliable mode against a server without it:
    /// [`Error::ReliableUnavailable`]) is returned. From then on the client
    /// reconnects by itself.
    pub async fn connect(self) -> Result<(SessionClient, SessionEvents), Error> {
        let SessionBuilder {
            base_url,
            agent_id,
            session_id,
            token,
            mode,
            resume_from,
            options,
            max_unacked,
        } = self;
        crate::client::check_url(&base_url)?;
        if base_url.contains(['?', '#']) {
            return Err(Error::InvalidUrl {
                url: base_url,
                reason: "the base URL takes no query or fragment".into(),
            });
        }
        check_id("agent id", &agent_id)?;
        check_id("session id", &session_id)?;
        check_token(&token)?;

        let (state, _) = watch::channel(ConnectionState::Connected);
        let shared = Arc::new(Shared {
            base_url: base_url.trim_end_matches('/').to_owned(),
            agent_id,
            session_id,
            mode,
            token: Mutex::new(token),
            state,
            position: Mutex::new(resume_from.clone()),
            id_prefix: format!("{:016x}", random_u64(0)),
            next_id: AtomicU64::new(1),
            options,
        });
        let connection = worker::establish(&shared, resume_from.as_ref()).await?;
        let (events_tx, events) = mpsc::channel(shared.options.event_queue);
        let (commands, commands_rx) = mpsc::channel(shared.options.command_queue);
        let task = Worker::new(shared.clone(), commands_rx, events_tx, resume_from);
        tokio::spawn(task.run(connection));
        let client = SessionClient::new(shared, commands, Arc::new(Semaphore::new(max_unacked)));
        Ok((client, SessionEvents { events }))
    }
}

pub(super) fn check_token(token: &str) -> Result<(), Error> {
    if token.is_empty() {
        return Err(Error::InvalidToken("the token is empty".into()));
    }
    HeaderValue::from_str(&format!("Bearer {token}"))
        .map(drop)
        .map_err(|_| Error::InvalidToken("not a valid header value".into()))
}
