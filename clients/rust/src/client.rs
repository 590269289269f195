//! The public handle, [`WsClient`], and its [`ClientBuilder`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::auth::{Auth, REFRESH_MARGIN};
use crate::message::{Outgoing, check_id, check_name};
use crate::options::Options;
pub use crate::options::{ConnectionState, HandlerId, ReconnectPolicy};
use crate::worker::{self, Command, Handlers, Shared, Worker};
use crate::{Error, Message};

/// Configures a [`WsClient`] before connecting. The `WsClient::connect*`
/// shortcuts use the defaults.
///
/// ```no_run
/// use std::time::Duration;
/// use wsproxy_client::{ReconnectPolicy, WsClient};
///
/// # async fn demo() -> Result<(), wsproxy_client::Error> {
/// let client = WsClient::builder("sensor-7", "ws://127.0.0.1:8080/ws")
///     .session("plant-3")
///     .request_timeout(Duration::from_secs(5))
///     .reconnect(ReconnectPolicy {
///         initial_delay: Duration::from_millis(250),
///         max_delay: Duration::from_secs(30),
///         max_attempts: None,
///     })
///     .connect()
///     .await?;
/// # drop(client);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClientBuilder {
    name: String,
    url: String,
    session: Option<String>,
    credentials: Option<(String, String, String)>,
    options: Options,
}

impl fmt::Debug for ClientBuilder {
    // Never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("session", &self.session)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(auth_url, user, _)| (auth_url, user, "<redacted>")),
            )
            .field("options", &self.options)
            .finish()
    }
}

impl ClientBuilder {
    /// The session to join. Anonymous clients default to `session-{name}`;
    /// authenticated ones to whatever session the server binds into the
    /// token (`session-{username}` unless this is set).
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.session = Some(session.into());
        self
    }

    /// Log in at `auth_url` (`POST /auth/token`, plain `http://`) and
    /// connect with the token; the credentials are kept to renew it.
    pub fn credentials(
        mut self,
        auth_url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some((auth_url.into(), username.into(), password.into()));
        self
    }

    /// Bound on each call that waits for the server (subscribe, unsubscribe,
    /// publish, ping) and on each token request. Default 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = timeout;
        self
    }

    /// Bound on opening the socket and registering, per attempt. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Send a WebSocket ping every `interval`, and treat the connection as
    /// dead when nothing at all has arrived for `timeout`. Default 15 s / 45 s.
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

    /// Reconnection behaviour. Default: [`ReconnectPolicy::default`].
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.options.reconnect = policy;
        self
    }

    /// Publishes kept while reconnecting; beyond it `publish` fails with
    /// [`Error::QueueFull`]. Default 256.
    pub fn offline_queue(mut self, messages: usize) -> Self {
        self.options.offline_queue = messages;
        self
    }

    /// Connects: gets a token if credentials were given, opens the socket,
    /// registers the name and session, and starts the background task.
    pub async fn connect(self) -> Result<WsClient, Error> {
        let ClientBuilder {
            name,
            url,
            session,
            credentials,
            options,
        } = self;
        check_name(&name)?;
        check_url(&url)?;
        if let Some(session) = &session {
            check_id("session id", session)?;
        }
        let (auth, session) = match credentials {
            Some((auth_url, username, password)) => {
                let auth = Auth::new(
                    &auth_url,
                    &username,
                    &password,
                    session.as_deref(),
                    options.request_timeout,
                )?;
                auth.refresh().await?;
                let bound = auth.current().map(|t| t.session).unwrap_or_default();
                (Some(auth), bound)
            }
            None => (None, session.unwrap_or_else(|| format!("session-{name}"))),
        };
        check_id("session id", &session)?;

        let (state, _) = watch::channel(ConnectionState::Connected);
        let shared = Arc::new(Shared {
            name,
            session,
            url,
            auth,
            handlers: Mutex::new(Handlers::default()),
            topics: Mutex::new(BTreeSet::new()),
            state,
            options,
        });
        let (events_tx, events_rx) = mpsc::channel(shared.options.event_queue);
        let ws = worker::establish(&shared, &events_tx).await?;
        let (commands, commands_rx) = mpsc::channel(shared.options.command_queue);
        tokio::spawn(worker::dispatch(shared.clone(), events_rx));
        tokio::spawn(Worker::new(shared.clone(), commands_rx, events_tx).run(ws));
        Ok(WsClient { shared, commands })
    }
}

/// Accepts `ws://` URLs only (the crate has no TLS).
pub(crate) fn check_url(url: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let request = url
        .into_client_request()
        .map_err(|e| invalid(e.to_string()))?;
    match request.uri().scheme_str() {
        Some("ws") => Ok(()),
        Some("wss") => Err(invalid(
            "wss:// is not supported by this client (built without TLS); \
             use ws:// behind a TLS-terminating proxy"
                .into(),
        )),
        _ => Err(invalid("expected a ws:// URL".into())),
    }
}

/// A connection to wsproxy's topic pub/sub.
///
/// A background task owns the WebSocket; this handle sends it requests over
/// a bounded channel. Cloning the handle is cheap and every clone talks to
/// the same connection. The task reconnects on its own after a lost
/// connection (see [`ReconnectPolicy`]), registers again, renews the token
/// when it is about to expire, and subscribes every topic it had.
///
/// The connection closes when [`close`](Self::close) is called or when the
/// last handle is dropped. A handler that holds a clone of the client keeps
/// it alive, so call `close` explicitly in that case.
///
/// Requires a Tokio runtime with the time and net drivers enabled.
#[derive(Clone)]
pub struct WsClient {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl fmt::Debug for WsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsClient")
            .field("name", &self.shared.name)
            .field("session", &self.shared.session)
            .field("url", &self.shared.url)
            .field("state", &self.connection_state())
            .field("authenticated", &self.shared.auth.is_some())
            .finish()
    }
}

impl WsClient {
    /// Starts configuring a client named `name` for the WebSocket endpoint
    /// `url` (e.g. `ws://127.0.0.1:8080/ws`).
    pub fn builder(name: impl Into<String>, url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            name: name.into(),
            url: url.into(),
            session: None,
            credentials: None,
            options: Options::default(),
        }
    }

    /// Connects without a token, in the session `session-{name}`.
    ///
    /// The server must allow anonymous pub/sub (`PUBSUB_ALLOW_ANONYMOUS=true`),
    /// otherwise this fails with [`Error::Rejected`] (HTTP 401).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), wsproxy_client::Error> {
    /// use wsproxy_client::WsClient;
    ///
    /// let client = WsClient::connect("Client1", "ws://127.0.0.1:8080/ws").await?;
    /// assert_eq!(client.session_id(), "session-Client1");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(name: &str, url: &str) -> Result<WsClient, Error> {
        Self::builder(name, url).connect().await
    }

    /// Connects without a token, in the given session. Clients only exchange
    /// messages with clients of the same session.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), wsproxy_client::Error> {
    /// use wsproxy_client::WsClient;
    ///
    /// let client =
    ///     WsClient::connect_with_session("Client1", "session-A", "ws://127.0.0.1:8080/ws")
    ///         .await?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with_session(
        name: &str,
        session: &str,
        url: &str,
    ) -> Result<WsClient, Error> {
        Self::builder(name, url).session(session).connect().await
    }

    /// Logs in at `auth_url` (`POST /auth/token`), then connects with the
    /// JWT in an `Authorization: Bearer` header. The connection belongs to
    /// the session bound into the token: `session` if given, otherwise the
    /// server's default, `session-{username}`.
    ///
    /// The credentials stay in memory so that the client can fetch a new
    /// token before the current one expires and after reconnecting.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), wsproxy_client::Error> {
    /// use wsproxy_client::WsClient;
    ///
    /// let client = WsClient::connect_with_auth(
    ///     "Client1",
    ///     "ws://127.0.0.1:8080/ws",
    ///     "http://127.0.0.1:8080/auth/token",
    ///     "alice",
    ///     "correct horse battery staple",
    ///     Some("session-A"),
    /// )
    /// .await?;
    /// assert!(client.is_authenticated());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with_auth(
        name: &str,
        url: &str,
        auth_url: &str,
        username: &str,
        password: &str,
        session: Option<&str>,
    ) -> Result<WsClient, Error> {
        let mut builder = Self::builder(name, url).credentials(auth_url, username, password);
        if let Some(session) = session {
            builder = builder.session(session);
        }
        builder.connect().await
    }

    /// The name this client registered.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The session this client belongs to.
    pub fn session_id(&self) -> &str {
        &self.shared.session
    }

    /// The topics the client is subscribed to (or will subscribe to again
    /// after reconnecting).
    pub fn subscriptions(&self) -> Vec<String> {
        self.shared.topics().iter().cloned().collect()
    }

    /// Sends a request to the background task and waits for its answer,
    /// all within the request timeout.
    async fn request<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>, Instant) -> Command,
    ) -> Result<T, Error> {
        let deadline = Instant::now() + self.shared.options.request_timeout;
        let (reply, answer) = oneshot::channel();
        let work = async {
            self.commands
                .send(make(reply, deadline))
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| Error::Timeout(what))?
    }

    /// Subscribes to `topic` in the client's session and waits until the
    /// server confirms: from then on every message published on the topic
    /// in this session is delivered to the [`on_message`](Self::on_message)
    /// handlers.
    ///
    /// `name` and `payload_hint` are accepted for compatibility with the
    /// API this client mirrors; the protocol carries neither (the server
    /// knows the name from registration), so they are not sent.
    ///
    /// The topic is remembered and subscribed again after a reconnection.
    /// If the server refuses ([`Error::Server`] with `invalid_topic`,
    /// `too_many_subscriptions`, ...) it is forgotten. On
    /// [`Error::Timeout`] it stays remembered; call
    /// [`unsubscribe`](Self::unsubscribe) to drop it.
    ///
    /// ```no_run
    /// # async fn demo(client: wsproxy_client::WsClient) -> Result<(), wsproxy_client::Error> {
    /// client.on_message("DetectCustomerEvent", |msg| println!("customer: {msg}"));
    /// client
    ///     .subscribe("Client1", "DetectCustomerEvent", "no-payload")
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        name: &str,
        topic: &str,
        payload_hint: &str,
    ) -> Result<(), Error> {
        let _ = (name, payload_hint);
        check_id("topic", topic)?;
        let topic = topic.to_owned();
        self.request("the subscription to be confirmed", |reply, _| {
            Command::Subscribe { topic, reply }
        })
        .await
    }

    /// Stops the subscription to `topic` and waits for the server's
    /// confirmation. Handlers registered for the topic stay registered (use
    /// [`remove_handler`](Self::remove_handler)).
    ///
    /// ```no_run
    /// # async fn demo(client: wsproxy_client::WsClient) -> Result<(), wsproxy_client::Error> {
    /// client.unsubscribe("DetectCustomerEvent").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), Error> {
        check_id("topic", topic)?;
        let topic = topic.to_owned();
        self.request("the unsubscription to be confirmed", |reply, _| {
            Command::Unsubscribe { topic, reply }
        })
        .await
    }

    /// Calls `handler` with every message delivered on `topic`; `"*"`
    /// matches every topic. Several handlers may share a topic; they run in
    /// registration order, one message at a time, on a task of their own.
    /// Keep them quick (hand longer work to a channel or a spawned task):
    /// while one runs, further messages wait in a bounded queue.
    ///
    /// Registering a handler does not subscribe; see
    /// [`subscribe`](Self::subscribe).
    ///
    /// ```no_run
    /// # fn demo(client: &wsproxy_client::WsClient) {
    /// let (tx, mut rx) = tokio::sync::mpsc::channel(100);
    /// client.on_message("NetworkConnectedEvent", move |msg| {
    ///     // try_send: never block the dispatcher on a full channel.
    ///     let _ = tx.try_send(msg);
    /// });
    /// # }
    /// ```
    pub fn on_message(
        &self,
        topic: impl Into<String>,
        handler: impl Fn(Message) + Send + Sync + 'static,
    ) -> HandlerId {
        self.shared
            .handlers()
            .add_message(topic.into(), Arc::new(handler))
    }

    /// Calls `handler` with errors that no call returns: the server's error
    /// frames (for example `payload_too_large` for a publish, which has no
    /// success reply), lost connections and failed reconnection attempts.
    /// Errors that answer a [`subscribe`](Self::subscribe) or
    /// [`unsubscribe`](Self::unsubscribe) call are returned by the call and
    /// also reported here.
    ///
    /// ```no_run
    /// # fn demo(client: &wsproxy_client::WsClient) {
    /// use wsproxy_client::Error;
    ///
    /// client.on_error(|error| match error {
    ///     Error::Server(e) => eprintln!("server refused {}: {}", e.command, e.code),
    ///     other => eprintln!("connection trouble: {other}"),
    /// });
    /// # }
    /// ```
    pub fn on_error(&self, handler: impl Fn(&Error) + Send + Sync + 'static) -> HandlerId {
        self.shared.handlers().add_error(Arc::new(handler))
    }

    /// Unregisters a handler; false if it was not registered.
    pub fn remove_handler(&self, id: HandlerId) -> bool {
        self.shared.handlers().remove(id)
    }

    /// Publishes `payload` (anything serializable: a string, a number, a
    /// struct) on `topic` in the client's session.
    ///
    /// `name` is the publisher name receivers see, and `timestamp` an
    /// RFC 3339 time such as [`now_rfc3339`](crate::now_rfc3339) gives;
    /// either may be empty to let the server fill in the registered name or
    /// the current time.
    ///
    /// Returns once the message is written to the socket. The server sends no
    /// acknowledgement for a successful publish, so a refusal (for example
    /// `payload_too_large`) arrives later, at the [`on_error`](Self::on_error)
    /// handlers. While the client is reconnecting, the message waits (up to
    /// the request timeout) and is sent once the connection is back.
    ///
    /// ```no_run
    /// # async fn demo(client: wsproxy_client::WsClient) -> Result<(), wsproxy_client::Error> {
    /// use wsproxy_client::now_rfc3339;
    ///
    /// client
    ///     .publish("Client1", "NetworkConnectedEvent", "Network connected", &now_rfc3339())
    ///     .await?;
    ///
    /// // Structured payloads work too.
    /// let reading = serde_json::json!({ "celsius": 21.5 });
    /// client.publish("Client1", "Temperature", &reading, "").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish(
        &self,
        name: &str,
        topic: &str,
        payload: impl Serialize,
        timestamp: &str,
    ) -> Result<(), Error> {
        check_id("topic", topic)?;
        if !name.is_empty() {
            check_name(name)?;
        }
        let body = Outgoing {
            publisher_name: name,
            topic,
            payload: serde_json::to_value(payload)?,
            timestamp,
            session_id: &self.shared.session,
        };
        let frame = format!("publish-json:{}", serde_json::to_string(&body)?);
        self.request("the message to be sent", |reply, deadline| {
            Command::Publish {
                frame,
                reply,
                deadline,
            }
        })
        .await
    }

    /// Sends the protocol's `ping` command and returns the time until the
    /// server's `pong`. Fails with [`Error::NotConnected`] while
    /// reconnecting.
    pub async fn ping(&self) -> Result<Duration, Error> {
        self.request("pong", |reply, _| Command::Ping { reply })
            .await
    }

    /// True when the client logged in with credentials and its token has not
    /// expired.
    pub fn is_authenticated(&self) -> bool {
        self.shared
            .auth
            .as_ref()
            .and_then(Auth::current)
            .is_some_and(|t| t.remaining().is_none_or(|left| !left.is_zero()))
    }

    /// The current JWT, if the client logged in with credentials.
    pub fn get_token(&self) -> Option<String> {
        self.shared.auth.as_ref()?.current().map(|t| t.jwt)
    }

    /// When the current token expires (from its `exp` claim).
    pub fn token_expires_at(&self) -> Option<SystemTime> {
        self.shared.auth.as_ref()?.current()?.expires_at
    }

    /// Fetches a new token with the stored credentials if the current one
    /// expires within 60 seconds. Returns whether it did; `Ok(false)` also
    /// for an anonymous client.
    ///
    /// The background task already renews the token shortly before expiry
    /// (and reconnects with it, since the server closes a connection whose
    /// token expired); calling this is only needed when you use
    /// [`get_token`](Self::get_token) elsewhere.
    ///
    /// ```no_run
    /// # async fn demo(client: wsproxy_client::WsClient) -> Result<(), wsproxy_client::Error> {
    /// if client.refresh_token_if_needed().await? {
    ///     println!("new token until {:?}", client.token_expires_at());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn refresh_token_if_needed(&self) -> Result<bool, Error> {
        match &self.shared.auth {
            Some(auth) => auth.refresh_if_needed(REFRESH_MARGIN).await,
            None => Ok(false),
        }
    }

    /// The connection's current state.
    pub fn connection_state(&self) -> ConnectionState {
        *self.shared.state.borrow()
    }

    /// Waits until the client is [`Connected`](ConnectionState::Connected)
    /// (after a reconnection: until its subscriptions are restored).
    /// Fails with [`Error::Closed`] if the client closes first, or
    /// [`Error::Timeout`].
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut states = self.shared.state.subscribe();
        let state = tokio::time::timeout(
            timeout,
            states.wait_for(|s| *s != ConnectionState::Reconnecting),
        )
        .await
        .map_err(|_| Error::Timeout("the connection"))?
        .map_err(|_| Error::Closed)?;
        match *state {
            ConnectionState::Connected => Ok(()),
            _ => Err(Error::Closed),
        }
    }

    /// Closes the connection (close code 1000) and stops the background
    /// task. Calls waiting on the client fail with [`Error::Closed`]; so does
    /// every later call. Closing twice is harmless.
    pub async fn close(&self) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).await.is_err() {
            return Ok(()); // already closed
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .map_err(|_| Error::Timeout("the connection to close"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        let p = ReconnectPolicy::default();
        assert_eq!(p.delay(0), Duration::ZERO);
        for attempt in 1..50 {
            let d = p.delay(attempt);
            let full = p
                .initial_delay
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(p.max_delay);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(p.delay(40) <= p.max_delay);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let b = WsClient::builder("n", "ws://h/ws").credentials("http://h/a", "user", "hunter2");
        let text = format!("{b:?}");
        assert!(text.contains("user") && !text.contains("hunter2"), "{text}");
    }

    #[test]
    fn urls() {
        assert!(check_url("ws://127.0.0.1:8080/ws").is_ok());
        assert!(matches!(
            check_url("wss://example.com/ws"),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(check_url("http://example.com/ws").is_err());
        assert!(check_url("not a url").is_err());
    }
}
