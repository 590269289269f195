//! Configuration: one typed tree, read from the environment (and a `.env`
//! file), overridable by command-line flags, validated before anything starts.
//!
//! Parsing is two steps on purpose. [`Cli`] is what clap reads: every value is
//! kept as the raw string the user wrote, so that `--help` shows each
//! variable with its default and a bad value never produces clap's multi-line
//! usage dump. [`Cli::into_config`] then turns the strings into a [`Config`],
//! and every failure names the variable and the value in one line, e.g.
//! `PORT: "abc" is not a valid port (expected 1-65535)`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;

/// A setting that could not be accepted. The message names the environment
/// variable and the offending value, and is meant to be printed as is.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The environment variable (and flag) the value came from.
    pub var: &'static str,
    /// What is wrong with it, quoting the value.
    pub message: String,
}

impl ConfigError {
    fn new(var: &'static str, message: impl Into<String>) -> Self {
        Self {
            var,
            message: message.into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable single lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Topic pub/sub settings (`GET /ws`).
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    /// Accept `/ws` connections without a token.
    pub allow_anonymous: bool,
    /// Most topics one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Largest `payload` of a published message, in bytes.
    pub max_payload_bytes: usize,
}

/// Reliable sessions (see [`crate::history`] and [`crate::reliable`]).
#[derive(Debug, Clone)]
pub struct ReliableConfig {
    /// Offer the `wsproxy.v1` subprotocol on session connections.
    pub enabled: bool,
    /// Entries a session's history keeps at least (trimmed approximately).
    pub history_max_len: usize,
    /// How long a session's history outlives its last publish or connect.
    pub history_ttl: Duration,
    /// Streams client messages are spread over (`wsproxy:up:{n}`).
    pub up_shards: usize,
    /// Entries each client-message stream keeps at least.
    pub up_max_len: usize,
    /// How long a client message id is remembered, so a resend is stored
    /// once.
    pub dedupe_window: Duration,
}

impl Default for ReliableConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            history_max_len: 1000,
            history_ttl: Duration::from_secs(600),
            up_shards: 1,
            up_max_len: 100_000,
            dedupe_window: Duration::from_secs(300),
        }
    }
}

/// What backends learn through Redis (see [`crate::lifecycle`]).
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Append connect, resume and disconnect events to `wsproxy:events`.
    pub events: bool,
    /// Entries the events stream keeps at least (trimmed approximately).
    pub events_max_len: usize,
    /// Also publish each event on the session's own events channel.
    pub session_channel: bool,
    /// Query parameters of the upgrade request copied into connect events.
    pub query_params: Vec<String>,
    /// Keep each session's presence hash.
    pub presence: bool,
    /// How often a process renews its heartbeat (and looks for dead ones).
    pub heartbeat: Duration,
}

impl LifecycleConfig {
    /// True when connections are registered with Redis at all.
    pub fn tracked(&self) -> bool {
        self.events || self.presence
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            events: false,
            events_max_len: 100_000,
            session_channel: false,
            query_params: Vec::new(),
            presence: false,
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// Query parameters that never go into an event: the token, and the
/// position of a resume (the event says whether it resumed).
const PRIVATE_QUERY_PARAMS: [&str; 3] = ["access_token", "epoch", "offset"];
/// How a Redis Cluster carries wsproxy's channels (`REDIS_CLUSTER_PUBSUB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterPubSub {
    /// `SPUBLISH`/`SSUBSCRIBE` (Redis 7): each channel lives in its slot's
    /// shard, so a message travels to one shard only. The default.
    Sharded,
    /// `PUBLISH`/`SUBSCRIBE`: every message is broadcast to every node, for
    /// backends that keep `PUBLISH`.
    Classic,
}

/// A Redis Cluster (`REDIS_CLUSTER_NODES`), in place of `REDIS_URL`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Seed node URLs (`redis://host:port`), already parsed; wsproxy learns
    /// the rest of the cluster from them.
    pub nodes: Vec<String>,
    /// Sharded or classic pub/sub.
    pub pubsub: ClusterPubSub,
}

impl std::fmt::Debug for ClusterConfig {
    // The URLs may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(|n| redact_url(n)).collect();
        f.debug_struct("ClusterConfig")
            .field("nodes", &nodes)
            .field("pubsub", &self.pubsub)
            .finish()
    }
}

/// The default `REDIS_URL`: also how "not set" is told when
/// `REDIS_CLUSTER_NODES` is.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// JSON Web Token settings; present when `JWT_SECRET` is set.
#[derive(Clone)]
pub struct JwtConfig {
    /// HS256 signing secret (at least 32 bytes).
    pub secret: Vec<u8>,
    /// `iss` claim issued and required.
    pub issuer: String,
    /// `aud` claim issued and required.
    pub audience: String,
    /// Lifetime of issued tokens.
    pub ttl: Duration,
}

impl std::fmt::Debug for JwtConfig {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The validated configuration every module reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the listener binds (HOST and PORT).
    pub listen: SocketAddr,
    /// Redis server URL, already parsed; unused on a cluster.
    pub redis_url: String,
    /// CA and client certificate for a `rediss://` URL.
    pub redis_tls: RedisTlsConfig,
    /// The Redis Cluster, when `REDIS_CLUSTER_NODES` is set; `None`: one
    /// Redis server at `redis_url`.
    pub redis_cluster: Option<ClusterConfig>,
    /// Bound on the whole upgrade-and-authenticate step of one connection
    /// (reading the request, checking the token in Redis, subscribing).
    /// Also the default TTL the `auth_token_setter` example gives new tokens.
    pub auth_timeout: Duration,
    /// TTL given to `session:{id}:auth` after a successful connect, so the
    /// same token can reconnect within this period.
    pub auth_grace_period: Duration,
    /// How often the server pings each client.
    pub ping_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub ping_timeout: Duration,
    /// How long shutdown waits for connections to drain.
    pub shutdown_grace_period: Duration,
    /// Largest message (and frame) accepted from a client, in bytes.
    pub max_message_bytes: usize,
    /// Messages that may wait for one slow client before it is disconnected.
    pub outbound_queue: usize,
    /// Upper bound on simultaneously open client connections (HTTP and WS).
    pub max_connections: usize,
    /// Threads that run proxied tunnels, each its own event loop.
    pub workers: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Topic pub/sub.
    pub pubsub: PubSubConfig,
    /// Reliable sessions (history, resume, durable client messages).
    pub reliable: ReliableConfig,
    /// Lifecycle events, presence and process heartbeats.
    pub lifecycle: LifecycleConfig,
    /// Token issuing and checking for `/ws`; `None` without `JWT_SECRET`.
    pub jwt: Option<JwtConfig>,
    /// File of `username:argon2-hash` lines for `POST /auth/token`.
    pub users_file: Option<std::path::PathBuf>,
    /// Origins allowed to call `POST /auth/token` from a browser; `*` = any.
    pub cors_origins: Vec<String>,
    /// Browser origins allowed to open WebSockets (see [`crate::origin`]).
    pub ws_origins: crate::origin::AllowedOrigins,
    /// When set, `/metrics` answers only `Authorization: Bearer <token>`.
    pub metrics_token: Option<Secret>,
    /// Mount the test-only echo endpoint `/_test/echo` (see [`crate::echo`]).
    pub test_echo: bool,
    /// The reverse proxy's routes file, if any.
    pub routes_file: Option<std::path::PathBuf>,
    /// Extra trusted CA certificates (PEM) for `wss://` backends.
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// Certificate chain and private key (PEM) to serve wss:// / https.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Files for TLS to Redis (`rediss://` URLs), read at start-up by
/// [`crate::redis_tls`]. Both empty: the system's roots alone, no client
/// certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTlsConfig {
    /// PEM CA certificates trusted besides the system's roots
    /// (`REDIS_CA_FILE`).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain and private key presented to Redis (mutual
    /// TLS: `REDIS_CLIENT_CERT_FILE`, `REDIS_CLIENT_KEY_FILE`).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A value never shown by `Debug` (a token, a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Config {
    /// The Redis names this deployment uses (see [`crate::keys`]).
    pub fn keys(&self) -> crate::keys::Keys {
        match &self.redis_cluster {
            None => crate::keys::Keys::Standalone,
            Some(c) if c.pubsub == ClusterPubSub::Classic => crate::keys::Keys::ClusterClassic,
            Some(_) => crate::keys::Keys::ClusterSharded,
        }
    }

    /// Defaults for a Redis Cluster reached through `nodes` (seed URLs),
    /// with sharded pub/sub; otherwise as [`Config::for_redis`].
    pub fn for_cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        Config {
            redis_cluster: Some(ClusterConfig {
                nodes: nodes.into_iter().map(Into::into).collect(),
                pubsub: ClusterPubSub::Sharded,
            }),
            ..Config::for_redis(DEFAULT_REDIS_URL)
        }
    }

    /// Defaults for tests and embedding: everything as documented, listening
    /// on 127.0.0.1:0, talking to the given Redis.
    pub fn for_redis(redis_url: impl Into<String>) -> Self {
        // Built literally rather than through clap so that environment
        // variables of the machine running the tests cannot leak in.
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis_url: redis_url.into(),
            redis_tls: RedisTlsConfig::default(),
            redis_cluster: None,
            auth_timeout: Duration::from_secs(5),
            auth_grace_period: Duration::from_secs(10_800),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            shutdown_grace_period: Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            outbound_queue: 256,
            max_connections: 50_000,
            workers: default_workers(),
            log_format: LogFormat::Text,
            pubsub: PubSubConfig {
                allow_anonymous: false,
                max_subscriptions: 100,
                max_payload_bytes: 65_536,
            },
            reliable: ReliableConfig::default(),
            lifecycle: LifecycleConfig::default(),
            jwt: None,
            users_file: None,
            cors_origins: Vec::new(),
            ws_origins: crate::origin::AllowedOrigins::SameOrigin,
            metrics_token: None,
            test_echo: false,
            routes_file: None,
            upstream_ca_file: None,
            tls: None,
        }
    }
}

/// Command line and environment, as clap sees them. Every field can be given
/// as a flag or through the environment variable of the same name.
#[derive(Debug, Parser)]
#[command(
    name = "wsproxy",
    version,
    about = "WebSocket gateway: session bridge to Redis, topic pub/sub, reverse proxy",
    long_about = "WebSocket gateway, three jobs on one listener:\n\
        - session bridge: clients on /{agent_id}/ws/{session_id} receive what a backend \
        publishes on Redis (session:{id}:down) and their JSON goes to session:{id}:up;\n\
        - topic pub/sub: clients on /ws publish and subscribe to topics within their \
        session (JWT from POST /auth/token);\n\
        - reverse proxy: the paths of ROUTES_FILE go to backend WebSocket servers.\n\n\
        Every option can also be set through the environment variable shown beside it, \
        or in a .env file in the working directory (real environment variables win)."
)]
// The field docs are clap's --help text, written for a terminal: brackets
// and angle brackets there are not links or HTML.
#[allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value = "8080")]
    pub port: String,
    /// Redis URL (redis://[user:password@]host:port[/db], or rediss:// for TLS).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = DEFAULT_REDIS_URL,
        hide_env_values = true
    )]
    pub redis_url: String,
    /// PEM file of CA certificates trusted for a rediss:// REDIS_URL, besides
    /// the system's roots.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<String>,
    /// PEM certificate chain wsproxy presents to Redis (mutual TLS, rediss://
    /// only); needs REDIS_CLIENT_KEY_FILE.
    #[arg(long, env = "REDIS_CLIENT_CERT_FILE")]
    pub redis_client_cert_file: Option<String>,
    /// PEM private key of REDIS_CLIENT_CERT_FILE.
    #[arg(long, env = "REDIS_CLIENT_KEY_FILE")]
    pub redis_client_key_file: Option<String>,
    /// Redis Cluster: comma-separated seed node URLs
    /// (redis://[user:password@]host:port), in place of REDIS_URL (which
    /// must then be left unset). Session and topic names carry hash tags
    /// there: session:{<id>}:down.
    #[arg(long, env = "REDIS_CLUSTER_NODES", hide_env_values = true)]
    pub redis_cluster_nodes: Option<String>,
    /// Redis Cluster pub/sub: sharded (SPUBLISH/SSUBSCRIBE, Redis 7) or
    /// classic (PUBLISH/SUBSCRIBE, for backends that keep PUBLISH).
    #[arg(long, env = "REDIS_CLUSTER_PUBSUB", default_value = "sharded")]
    pub redis_cluster_pubsub: String,
    /// Seconds allowed for a connection's upgrade and authentication; also the
    /// initial token TTL the auth_token_setter example uses.
    #[arg(long, env = "AUTH_TIMEOUT_SECS", default_value = "5")]
    pub auth_timeout_secs: String,
    /// TTL (seconds) given to a session's auth key after a successful connect,
    /// so the same token can reconnect within it.
    #[arg(long, env = "AUTH_GRACE_PERIOD_SECS", default_value = "10800")]
    pub auth_grace_period_secs: String,
    /// Seconds between server pings to each client.
    #[arg(long, env = "WS_PING_INTERVAL_SECS", default_value = "30")]
    pub ws_ping_interval_secs: String,
    /// Seconds a ping may go unanswered before the connection is closed (1011).
    #[arg(long, env = "WS_PING_TIMEOUT_SECS", default_value = "10")]
    pub ws_ping_timeout_secs: String,
    /// Seconds shutdown waits for connections to close before exiting.
    #[arg(long, env = "SHUTDOWN_GRACE_PERIOD_SECS", default_value = "30")]
    pub shutdown_grace_period_secs: String,
    /// Largest client message in bytes; bigger ones close the connection (1009).
    #[arg(long, env = "WS_MAX_MESSAGE_BYTES", default_value = "1048576")]
    pub ws_max_message_bytes: String,
    /// Messages queued for one client before it counts as slow and is
    /// disconnected (1008).
    #[arg(long, env = "WS_OUTBOUND_QUEUE", default_value = "256")]
    pub ws_outbound_queue: String,
    /// Most client connections open at once; further ones wait to be accepted.
    #[arg(long, env = "MAX_CONNECTIONS", default_value = "50000")]
    pub max_connections: String,
    /// Threads running proxied tunnels, each an event loop that keeps its
    /// tunnels: "auto" (one per CPU core) or a number.
    #[arg(long, env = "WORKERS", default_value = "auto")]
    pub workers: String,
    /// Log format: text or json. Levels come from RUST_LOG
    /// (default "info,wsproxy=debug").
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Accept topic pub/sub connections (/ws) without a token: true or false.
    #[arg(long, env = "PUBSUB_ALLOW_ANONYMOUS", default_value = "false")]
    pub pubsub_allow_anonymous: String,
    /// Most topics one /ws connection may subscribe to.
    #[arg(long, env = "PUBSUB_MAX_SUBSCRIPTIONS", default_value = "100")]
    pub pubsub_max_subscriptions: String,
    /// Largest payload of a published topic message, in bytes.
    #[arg(long, env = "PUBSUB_MAX_PAYLOAD_BYTES", default_value = "65536")]
    pub pubsub_max_payload_bytes: String,
    /// Reliable sessions: true offers the wsproxy.v1 subprotocol (history,
    /// resume, acknowledged client messages) to session clients that ask.
    #[arg(long, env = "RELIABLE_SESSIONS", default_value = "false")]
    pub reliable_sessions: String,
    /// Entries kept in each session's history (at least; trimmed in
    /// batches).
    #[arg(long, env = "HISTORY_MAX_LEN", default_value = "1000")]
    pub history_max_len: String,
    /// Seconds a session's history lives after its last publish or connect.
    #[arg(long, env = "HISTORY_TTL_SECS", default_value = "600")]
    pub history_ttl_secs: String,
    /// Redis Streams client messages of reliable sessions are spread over.
    #[arg(long, env = "UP_STREAM_SHARDS", default_value = "1")]
    pub up_stream_shards: String,
    /// Entries each client-message stream keeps at least.
    #[arg(long, env = "UP_STREAM_MAX_LEN", default_value = "100000")]
    pub up_stream_max_len: String,
    /// Seconds a client message id is remembered (a resend within it is
    /// stored once).
    #[arg(long, env = "UP_DEDUPE_SECS", default_value = "300")]
    pub up_dedupe_secs: String,
    /// Lifecycle events: true appends connect, resume and disconnect events
    /// of session connections to the Redis Stream wsproxy:events.
    #[arg(long, env = "LIFECYCLE_EVENTS", default_value = "false")]
    pub lifecycle_events: String,
    /// Entries the wsproxy:events stream keeps at least.
    #[arg(long, env = "EVENTS_MAX_LEN", default_value = "100000")]
    pub events_max_len: String,
    /// Also publish each lifecycle event on session:{id}:events.
    #[arg(long, env = "EVENTS_SESSION_CHANNEL", default_value = "false")]
    pub events_session_channel: String,
    /// Comma-separated query parameters of the upgrade request copied into
    /// connect events (never access_token, epoch or offset).
    #[arg(long, env = "EVENTS_QUERY_PARAMS", default_value = "")]
    pub events_query_params: String,
    /// Presence: true keeps session:{id}:presence, one field per open
    /// connection.
    #[arg(long, env = "PRESENCE", default_value = "false")]
    pub presence: String,
    /// Seconds between a process's heartbeats (with events or presence on);
    /// a process silent for two is declared dead and its connections closed
    /// in Redis by another.
    #[arg(long, env = "PROCESS_HEARTBEAT_SECS", default_value = "5")]
    pub process_heartbeat_secs: String,
    /// HS256 secret (at least 32 bytes) for the tokens of POST /auth/token and /ws.
    /// Without it, /ws accepts only anonymous clients (if allowed).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Issuer (iss) of issued tokens, required on presented ones.
    #[arg(long, env = "JWT_ISSUER", default_value = "wsproxy")]
    pub jwt_issuer: String,
    /// Audience (aud) of issued tokens, required on presented ones.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "wsproxy")]
    pub jwt_audience: String,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, env = "JWT_TTL_SECS", default_value = "3600")]
    pub jwt_ttl_secs: String,
    /// File of "username:<argon2 hash>" lines for POST /auth/token
    /// (make hashes with `wsproxy hash-password`).
    #[arg(long, env = "USERS_FILE")]
    pub users_file: Option<String>,
    /// Comma-separated origins allowed to call POST /auth/token from a
    /// browser (CORS); "*" allows any. Empty: no CORS headers.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", default_value = "")]
    pub cors_allowed_origins: String,
    /// Comma-separated browser origins (scheme://host[:port]) allowed to open
    /// WebSockets besides wsproxy's own; "*" allows any page. Requests
    /// without an Origin header (not from a browser) are always allowed.
    #[arg(long, env = "WS_ALLOWED_ORIGINS", default_value = "")]
    pub ws_allowed_origins: String,
    /// Bearer token /metrics requires (at least 16 characters); unset:
    /// /metrics is open to anyone who can reach the port.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Test only: serve an echo endpoint on the connection driver at
    /// /_test/echo, for the Autobahn suite.
    #[arg(long, env = "WS_TEST_ECHO", default_value = "false", hide = true)]
    pub ws_test_echo: String,
    /// Reverse proxy routes (JSON, the format in the README); reloaded on SIGHUP.
    #[arg(long, env = "ROUTES_FILE")]
    pub routes_file: Option<String>,
    /// PEM file of extra CA certificates trusted for wss:// backends
    /// (besides the system's roots).
    #[arg(long, env = "UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<String>,
    /// PEM certificate chain to listen with TLS (wss://); needs TLS_KEY_FILE.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<String>,
    /// PEM private key for TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

fn path(raw: &Option<String>) -> Option<std::path::PathBuf> {
    raw.as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
}

/// Subcommands besides running the server.
#[derive(Debug, clap::Subcommand)]
#[allow(rustdoc::invalid_html_tags)]
pub enum Command {
    /// Print the argon2 hash of a password, for a USERS_FILE line
    /// ("username:<hash>"). Reads the password from stdin when not given.
    HashPassword {
        /// The password (prefer stdin: arguments end up in shell history).
        password: Option<String>,
    },
}

fn boolean(var: &'static str, raw: &str) -> Result<bool, ConfigError> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::new(
            var,
            format!("{raw:?} is not a boolean (expected true or false)"),
        )),
    }
}

/// Parses a whole number within `range`, naming `var` on failure.
fn number<T>(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let value: T = raw.trim().parse().map_err(|_| {
        ConfigError::new(
            var,
            format!(
                "{raw:?} is not a whole number (expected {}-{})",
                range.start(),
                range.end()
            ),
        )
    })?;
    if !range.contains(&value) {
        return Err(ConfigError::new(
            var,
            format!("{value} is outside {}-{}", range.start(), range.end()),
        ));
    }
    Ok(value)
}

fn nonempty(var: &'static str, raw: &str) -> Result<String, ConfigError> {
    let v = raw.trim();
    if v.is_empty() {
        return Err(ConfigError::new(var, "must not be empty"));
    }
    Ok(v.to_owned())
}

fn seconds(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    number(var, raw, range).map(Duration::from_secs)
}

/// Hides the password of a URL (`redis://user:secret@host` becomes
/// `redis://user:***@host`) so error messages can be logged safely.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

impl Cli {
    /// The topic pub/sub settings.
    fn pubsub(&self) -> Result<PubSubConfig, ConfigError> {
        Ok(PubSubConfig {
            allow_anonymous: boolean("PUBSUB_ALLOW_ANONYMOUS", &self.pubsub_allow_anonymous)?,
            max_subscriptions: number(
                "PUBSUB_MAX_SUBSCRIPTIONS",
                &self.pubsub_max_subscriptions,
                1..=100_000,
            )?,
            max_payload_bytes: number(
                "PUBSUB_MAX_PAYLOAD_BYTES",
                &self.pubsub_max_payload_bytes,
                1..=(16 << 20),
            )?,
        })
    }

    /// The reliable-session settings.
    fn reliable(&self) -> Result<ReliableConfig, ConfigError> {
        Ok(ReliableConfig {
            enabled: boolean("RELIABLE_SESSIONS", &self.reliable_sessions)?,
            history_max_len: number("HISTORY_MAX_LEN", &self.history_max_len, 1..=1_000_000)?,
            history_ttl: seconds("HISTORY_TTL_SECS", &self.history_ttl_secs, 1..=2_592_000)?,
            up_shards: number("UP_STREAM_SHARDS", &self.up_stream_shards, 1..=1024)?,
            up_max_len: number(
                "UP_STREAM_MAX_LEN",
                &self.up_stream_max_len,
                1..=100_000_000,
            )?,
            dedupe_window: seconds("UP_DEDUPE_SECS", &self.up_dedupe_secs, 1..=86_400)?,
        })
    }

    /// Lifecycle events, presence and heartbeats.
    fn lifecycle(&self) -> Result<LifecycleConfig, ConfigError> {
        let mut query_params = Vec::new();
        for name in self.events_query_params.split(',').map(str::trim) {
            if name.is_empty() {
                continue;
            }
            if PRIVATE_QUERY_PARAMS.contains(&name) {
                return Err(ConfigError::new(
                    "EVENTS_QUERY_PARAMS",
                    format!("{name:?} is never copied into events (it is a token or a position)"),
                ));
            }
            if name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    "EVENTS_QUERY_PARAMS",
                    format!("{name:?} is not a query parameter name (1-64 printable characters)"),
                ));
            }
            query_params.push(name.to_owned());
        }
        Ok(LifecycleConfig {
            events: boolean("LIFECYCLE_EVENTS", &self.lifecycle_events)?,
            events_max_len: number("EVENTS_MAX_LEN", &self.events_max_len, 1..=100_000_000)?,
            session_channel: boolean("EVENTS_SESSION_CHANNEL", &self.events_session_channel)?,
            query_params,
            presence: boolean("PRESENCE", &self.presence)?,
            heartbeat: seconds(
                "PROCESS_HEARTBEAT_SECS",
                &self.process_heartbeat_secs,
                1..=3600,
            )?,
        })
    }

    /// The Redis Cluster settings, when `REDIS_CLUSTER_NODES` is set.
    fn redis_cluster(&self) -> Result<Option<ClusterConfig>, ConfigError> {
        let pubsub = match self
            .redis_cluster_pubsub
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "sharded" | "" => ClusterPubSub::Sharded,
            "classic" => ClusterPubSub::Classic,
            _ => {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER_PUBSUB",
                    format!(
                        "{:?} is not a pub/sub mode (expected sharded or classic)",
                        self.redis_cluster_pubsub
                    ),
                ));
            }
        };
        let Some(raw) = self.redis_cluster_nodes.as_deref() else {
            return Ok(None);
        };
        let nodes: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                "names no node (expected e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379)",
            ));
        }
        if self.redis_url.trim() != DEFAULT_REDIS_URL {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                "cannot be used with REDIS_URL: set one of them",
            ));
        }
        for node in &nodes {
            use redis::IntoConnectionInfo;
            let bad = |why: String| {
                ConfigError::new(
                    "REDIS_CLUSTER_NODES",
                    format!("{:?} is not a Redis node URL: {why}", redact_url(node)),
                )
            };
            if !node.starts_with("redis://") && !node.starts_with("rediss://") {
                return Err(bad(
                    "expected redis://host:port or rediss://host:port".into()
                ));
            }
            let info = node
                .as_str()
                .into_connection_info()
                .map_err(|e| bad(e.to_string()))?;
            if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER_NODES",
                    format!(
                        "{:?}: #insecure would turn off the checks of Redis's certificate, which \
                         wsproxy never does; trust a private CA with REDIS_CA_FILE instead",
                        redact_url(node)
                    ),
                ));
            }
        }
        // The redis crate gives every node of the cluster the TLS mode of
        // one client, and checks the seeds against it only when it took
        // that mode from the first seed (not once certificates are given):
        // a mixed list would half fail at run time, so it stops start-up.
        if nodes
            .iter()
            .any(|n| n.starts_with("rediss://") != nodes[0].starts_with("rediss://"))
        {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                "mixes redis:// and rediss:// seeds: every node of a cluster is reached \
                 the same way, so use one scheme for all",
            ));
        }
        redis::cluster::ClusterClient::new(nodes.clone()).map_err(|e| {
            ConfigError::new(
                "REDIS_CLUSTER_NODES",
                format!("the seed nodes are refused: {e}"),
            )
        })?;
        Ok(Some(ClusterConfig { nodes, pubsub }))
    }

    /// The JWT settings, when `JWT_SECRET` is set.
    fn jwt(&self) -> Result<Option<JwtConfig>, ConfigError> {
        Ok(match &self.jwt_secret {
            None => None,
            Some(secret) if secret.len() < 32 => {
                return Err(ConfigError::new(
                    "JWT_SECRET",
                    format!(
                        "is {} bytes long; use at least 32 random bytes",
                        secret.len()
                    ),
                ));
            }
            Some(secret) => Some(JwtConfig {
                secret: secret.as_bytes().to_vec(),
                issuer: nonempty("JWT_ISSUER", &self.jwt_issuer)?,
                audience: nonempty("JWT_AUDIENCE", &self.jwt_audience)?,
                ttl: seconds("JWT_TTL_SECS", &self.jwt_ttl_secs, 60..=31_536_000)?,
            }),
        })
    }

    /// The TLS files for Redis. They belong to a `rediss://` URL only, the
    /// certificate and key go together, and `#insecure` (no certificate
    /// checks) is refused. The files themselves are read by
    /// [`crate::redis_tls`] at start-up.
    fn redis_tls(&self, addr: &redis::ConnectionAddr) -> Result<RedisTlsConfig, ConfigError> {
        let tls = RedisTlsConfig {
            ca_file: path(&self.redis_ca_file),
            client_cert: match (
                path(&self.redis_client_cert_file),
                path(&self.redis_client_key_file),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConfigError::new(
                        "REDIS_CLIENT_KEY_FILE",
                        "is required when REDIS_CLIENT_CERT_FILE is set",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        "REDIS_CLIENT_CERT_FILE",
                        "is required when REDIS_CLIENT_KEY_FILE is set",
                    ));
                }
            },
        };
        match addr {
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => Err(ConfigError::new(
                "REDIS_URL",
                format!(
                    "{:?}: #insecure would turn off the checks of Redis's certificate, which \
                     wsproxy never does; trust a private CA with REDIS_CA_FILE instead",
                    redact_url(&self.redis_url)
                ),
            )),
            redis::ConnectionAddr::TcpTls { .. } => Ok(tls),
            _ => {
                // On a cluster the files belong to `rediss://` seeds. One
                // such seed is enough here: a list that mixes schemes is
                // refused by `redis_cluster`, with its own message.
                let nodes = self.redis_cluster_nodes.as_deref();
                if nodes.is_some_and(|n| n.split(',').any(|n| n.trim().starts_with("rediss://"))) {
                    return Ok(tls);
                }
                let set = [
                    ("REDIS_CA_FILE", tls.ca_file.is_some()),
                    ("REDIS_CLIENT_CERT_FILE", tls.client_cert.is_some()),
                ];
                let why = if nodes.is_some() {
                    "is set, but REDIS_CLUSTER_NODES does not use TLS: use rediss://host:port \
                     seeds, or unset it"
                } else {
                    "is set, but REDIS_URL does not use TLS: use rediss://host:port, or unset it"
                };
                match set.iter().find(|(_, is_set)| *is_set) {
                    Some((var, _)) => Err(ConfigError::new(var, why)),
                    None => Ok(tls),
                }
            }
        }
    }

    /// Validates every value and builds the [`Config`].
    pub fn into_config(&self) -> Result<Config, ConfigError> {
        let host: IpAddr = self.host.trim().parse().map_err(|_| {
            ConfigError::new(
                "HOST",
                format!(
                    "{:?} is not an IP address (e.g. 0.0.0.0 or 127.0.0.1)",
                    self.host
                ),
            )
        })?;
        let port: u16 = self.port.trim().parse().map_err(|_| {
            ConfigError::new(
                "PORT",
                format!("{:?} is not a valid port (expected 0-65535)", self.port),
            )
        })?;
        // Parse the URL now so a typo stops start-up instead of surfacing as
        // endless reconnect attempts.
        let redis = redis::Client::open(self.redis_url.as_str()).map_err(|e| {
            ConfigError::new(
                "REDIS_URL",
                format!(
                    "{:?} is not a valid Redis URL: {e}",
                    redact_url(&self.redis_url)
                ),
            )
        })?;
        let redis_tls = self.redis_tls(redis.get_connection_info().addr())?;
        let log_format = match self.log_format.trim().to_ascii_lowercase().as_str() {
            "text" | "pretty" | "" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!(
                        "{:?} is not a log format (expected text or json)",
                        self.log_format
                    ),
                ));
            }
        };
        let config = Config {
            listen: SocketAddr::new(host, port),
            redis_url: self.redis_url.trim().to_owned(),
            redis_tls,
            redis_cluster: self.redis_cluster()?,
            auth_timeout: seconds("AUTH_TIMEOUT_SECS", &self.auth_timeout_secs, 1..=3600)?,
            auth_grace_period: seconds(
                "AUTH_GRACE_PERIOD_SECS",
                &self.auth_grace_period_secs,
                1..=31_536_000,
            )?,
            ping_interval: seconds(
                "WS_PING_INTERVAL_SECS",
                &self.ws_ping_interval_secs,
                1..=86_400,
            )?,
            ping_timeout: seconds(
                "WS_PING_TIMEOUT_SECS",
                &self.ws_ping_timeout_secs,
                1..=86_400,
            )?,
            shutdown_grace_period: seconds(
                "SHUTDOWN_GRACE_PERIOD_SECS",
                &self.shutdown_grace_period_secs,
                0..=3600,
            )?,
            max_message_bytes: number(
                "WS_MAX_MESSAGE_BYTES",
                &self.ws_max_message_bytes,
                64..=(64 << 20),
            )?,
            outbound_queue: number("WS_OUTBOUND_QUEUE", &self.ws_outbound_queue, 1..=65_536)?,
            max_connections: number("MAX_CONNECTIONS", &self.max_connections, 1..=10_000_000)?,
            workers: match self.workers.as_str() {
                "auto" => default_workers(),
                n => number("WORKERS", n, 1..=1024)?,
            },
            log_format,
            pubsub: self.pubsub()?,
            reliable: self.reliable()?,
            lifecycle: self.lifecycle()?,
            jwt: self.jwt()?,
            users_file: self
                .users_file
                .as_deref()
                .filter(|p| !p.trim().is_empty())
                .map(std::path::PathBuf::from),
            cors_origins: self
                .cors_allowed_origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            ws_origins: crate::origin::AllowedOrigins::parse(self.ws_allowed_origins.split(','))
                .map_err(|e| ConfigError::new("WS_ALLOWED_ORIGINS", e))?,
            metrics_token: match self.metrics_token.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(t) if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                    return Err(ConfigError::new(
                        "METRICS_TOKEN",
                        format!(
                            "is {} characters long; use at least 16 printable characters, no spaces",
                            t.len()
                        ),
                    ));
                }
                Some(t) => Some(Secret(t.to_owned())),
            },
            test_echo: boolean("WS_TEST_ECHO", &self.ws_test_echo)?,
            routes_file: None,
            upstream_ca_file: None,
            tls: None,
        };
        let config = Config {
            routes_file: path(&self.routes_file),
            upstream_ca_file: path(&self.upstream_ca_file),
            tls: match (path(&self.tls_cert_file), path(&self.tls_key_file)) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConfigError::new(
                        "TLS_KEY_FILE",
                        "is required when TLS_CERT_FILE is set",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        "TLS_CERT_FILE",
                        "is required when TLS_KEY_FILE is set",
                    ));
                }
            },
            ..config
        };
        for origin in &config.cors_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(ConfigError::new(
                    "CORS_ALLOWED_ORIGINS",
                    format!(
                        "{origin:?} is not an origin (expected e.g. https://app.example.com or *)"
                    ),
                ));
            }
        }
        Ok(config)
    }
}

/// One worker per CPU core the process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["wsproxy"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .map_err(|e| ConfigError::new("CLI", e.to_string()))?
            .into_config()
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = parse(&[]).expect("defaults are valid");
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.auth_timeout, Duration::from_secs(5));
        assert_eq!(c.auth_grace_period, Duration::from_secs(10_800));
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.ping_timeout, Duration::from_secs(10));
        assert_eq!(c.shutdown_grace_period, Duration::from_secs(30));
        assert_eq!(c.max_message_bytes, 1 << 20);
    }

    #[test]
    fn embedding_defaults_equal_the_command_line_defaults() {
        let cli = parse(&[]).expect("defaults are valid");
        let lib = Config::for_redis(cli.redis_url.clone());
        assert_eq!(
            format!(
                "{:?}",
                Config {
                    listen: lib.listen,
                    ..cli
                }
            ),
            format!("{lib:?}")
        );
    }

    #[test]
    fn bad_port_names_the_variable_and_value() {
        let e = parse(&["--port", "abc"]).expect_err("abc is not a port");
        assert_eq!(e.var, "PORT");
        assert!(e.to_string().starts_with("PORT: \"abc\""), "{e}");
        let e = parse(&["--port", "70000"]).expect_err("out of range");
        assert_eq!(e.var, "PORT");
    }

    #[test]
    fn workers_are_one_per_core_or_a_number() {
        assert_eq!(parse(&[]).expect("auto").workers, default_workers());
        assert_eq!(parse(&["--workers", "3"]).expect("3").workers, 3);
        for bad in ["0", "many", "2000"] {
            let e = parse(&["--workers", bad]).expect_err(bad);
            assert_eq!(e.var, "WORKERS");
        }
    }

    #[test]
    fn bad_redis_url_is_refused() {
        let e = parse(&["--redis-url", "http://nope"]).expect_err("not redis");
        assert_eq!(e.var, "REDIS_URL");
        assert!(e.to_string().contains("http://nope"), "{e}");
    }

    #[test]
    fn redis_tls_files_need_a_rediss_url_and_go_in_pairs() {
        let ok = parse(&[
            "--redis-url",
            "rediss://:pw@h:6380",
            "--redis-ca-file",
            "/ca.pem",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect("rediss with both files");
        assert_eq!(ok.redis_tls.ca_file, Some("/ca.pem".into()));
        assert_eq!(
            ok.redis_tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        assert_eq!(
            parse(&[]).expect("defaults").redis_tls,
            RedisTlsConfig::default()
        );
        let e = parse(&["--redis-ca-file", "/ca.pem"]).expect_err("redis:// with a CA");
        assert_eq!(e.var, "REDIS_CA_FILE");
        let e = parse(&[
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect_err("redis:// with a client certificate");
        assert_eq!(e.var, "REDIS_CLIENT_CERT_FILE");
        let e = parse(&[
            "--redis-url",
            "rediss://h",
            "--redis-client-cert-file",
            "/c.pem",
        ])
        .expect_err("no key");
        assert_eq!(e.var, "REDIS_CLIENT_KEY_FILE");
        let e = parse(&[
            "--redis-url",
            "rediss://h",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect_err("no certificate");
        assert_eq!(e.var, "REDIS_CLIENT_CERT_FILE");
        let e = parse(&["--redis-url", "rediss://:pw@h:6380/#insecure"]).expect_err("insecure");
        assert_eq!(e.var, "REDIS_URL");
        assert!(e.to_string().contains("#insecure"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn cluster_nodes_are_validated_and_exclude_redis_url() {
        let c = parse(&[
            "--redis-cluster-nodes",
            "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
        ])
        .expect("valid seeds");
        let cluster = c.redis_cluster.clone().expect("a cluster");
        assert_eq!(
            cluster.nodes,
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(cluster.pubsub, ClusterPubSub::Sharded);
        assert_eq!(c.keys(), crate::keys::Keys::ClusterSharded);
        let c = parse(&[
            "--redis-cluster-nodes",
            "redis://h:7000",
            "--redis-cluster-pubsub",
            "Classic",
        ])
        .expect("classic");
        assert_eq!(c.keys(), crate::keys::Keys::ClusterClassic);
        assert_eq!(
            parse(&[]).expect("default").keys(),
            crate::keys::Keys::Standalone
        );
        for (args, var) in [
            (vec!["--redis-cluster-nodes", " , "], "REDIS_CLUSTER_NODES"),
            (
                vec!["--redis-cluster-nodes", "http://h:1"],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec!["--redis-cluster-nodes", "redis://h:port"],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec![
                    "--redis-cluster-nodes",
                    "redis://h:1",
                    "--redis-url",
                    "redis://o:2",
                ],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec!["--redis-cluster-pubsub", "both"],
                "REDIS_CLUSTER_PUBSUB",
            ),
        ] {
            let e = parse(&args).expect_err(&format!("{args:?}"));
            assert_eq!(e.var, var, "{e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
        let e = parse(&["--redis-cluster-nodes", "redis://:pw@h:notaport"]).expect_err("bad");
        assert!(!e.to_string().contains("pw"), "{e}");
        let c = parse(&["--redis-cluster-nodes", "redis://:pw@h:1"]).expect("with password");
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn cluster_seeds_may_use_tls_with_the_redis_tls_files() {
        let c = parse(&[
            "--redis-cluster-nodes",
            "rediss://:pw@127.0.0.1:7000,rediss://:pw@127.0.0.1:7001",
            "--redis-ca-file",
            "/ca.pem",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect("rediss:// seeds with the TLS files");
        let cluster = c.redis_cluster.clone().expect("a cluster");
        assert_eq!(
            cluster.nodes,
            ["rediss://:pw@127.0.0.1:7000", "rediss://:pw@127.0.0.1:7001"]
        );
        assert_eq!(c.redis_tls.ca_file, Some("/ca.pem".into()));
        assert_eq!(
            c.redis_tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        // The system's roots alone: no file needed.
        parse(&["--redis-cluster-nodes", "rediss://h:7000"]).expect("rediss:// seed alone");
    }

    #[test]
    fn cluster_seeds_that_mix_schemes_are_refused() {
        for nodes in ["redis://h:1,rediss://h:2", "rediss://h:1, redis://h:2"] {
            for extra in [&[][..], &["--redis-ca-file", "/ca.pem"][..]] {
                let mut args = vec!["--redis-cluster-nodes", nodes];
                args.extend_from_slice(extra);
                let e = parse(&args).expect_err(nodes);
                assert_eq!(e.var, "REDIS_CLUSTER_NODES", "{e}");
                let text = e.to_string();
                assert!(text.starts_with("REDIS_CLUSTER_NODES: mixes"), "{text}");
                assert!(!text.contains('\n'), "one line: {text}");
            }
        }
    }

    #[test]
    fn insecure_cluster_seeds_are_refused() {
        let e = parse(&[
            "--redis-cluster-nodes",
            "rediss://:pw@h:1,rediss://:pw@h:2/#insecure",
        ])
        .expect_err("#insecure");
        assert_eq!(e.var, "REDIS_CLUSTER_NODES");
        assert!(e.to_string().contains("#insecure"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }

    #[test]
    fn redis_tls_files_need_tls_cluster_seeds() {
        let e = parse(&[
            "--redis-cluster-nodes",
            "redis://h:1",
            "--redis-ca-file",
            "/ca.pem",
        ])
        .expect_err("redis:// seeds with a CA");
        assert_eq!(e.var, "REDIS_CA_FILE");
        assert!(e.to_string().contains("REDIS_CLUSTER_NODES"), "{e}");
        let e = parse(&[
            "--redis-cluster-nodes",
            "redis://h:1",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect_err("redis:// seeds with a client certificate");
        assert_eq!(e.var, "REDIS_CLIENT_CERT_FILE");
        assert!(e.to_string().contains("REDIS_CLUSTER_NODES"), "{e}");
        // The pairing rule holds on a cluster too.
        let e = parse(&[
            "--redis-cluster-nodes",
            "rediss://h:1",
            "--redis-client-cert-file",
            "/c.pem",
        ])
        .expect_err("no key");
        assert_eq!(e.var, "REDIS_CLIENT_KEY_FILE");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        let e = parse(&["--redis-url", "redis://:pw@h:notaport"]).expect_err("bad port");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn out_of_range_seconds_are_refused() {
        let e = parse(&["--ws-ping-interval-secs", "0"]).expect_err("zero interval");
        assert_eq!(e.var, "WS_PING_INTERVAL_SECS");
        assert_eq!(e.to_string(), "WS_PING_INTERVAL_SECS: 0 is outside 1-86400");
        let e = parse(&["--auth-grace-period-secs=-5"]).expect_err("negative");
        assert_eq!(e.var, "AUTH_GRACE_PERIOD_SECS");
    }

    #[test]
    fn short_jwt_secret_and_bad_origins_are_refused() {
        let e = parse(&["--jwt-secret", "short"]).expect_err("too short");
        assert_eq!(e.var, "JWT_SECRET");
        assert!(
            !e.to_string().contains("short"),
            "the secret must not be echoed: {e}"
        );
        let ok = parse(&["--jwt-secret", &"k".repeat(32)]).expect("32 bytes is enough");
        assert_eq!(ok.jwt.map(|j| j.issuer), Some("wsproxy".to_owned()));
        let e = parse(&["--cors-allowed-origins", "example.com"]).expect_err("no scheme");
        assert_eq!(e.var, "CORS_ALLOWED_ORIGINS");
        let e = parse(&["--ws-allowed-origins", "https://a.example, app.example"])
            .expect_err("no scheme");
        assert_eq!(e.var, "WS_ALLOWED_ORIGINS");
        assert!(e.to_string().contains("app.example"), "{e}");
        let ok = parse(&["--ws-allowed-origins", "https://a.example"]).expect("valid");
        assert_eq!(
            ok.ws_origins,
            crate::origin::AllowedOrigins::List(vec!["https://a.example".into()])
        );
        let e = parse(&["--metrics-token", "short"]).expect_err("too short");
        assert_eq!(e.var, "METRICS_TOKEN");
        assert!(!e.to_string().contains("short"), "not echoed: {e}");
        let e = parse(&["--pubsub-allow-anonymous", "maybe"]).expect_err("not a bool");
        assert_eq!(e.var, "PUBSUB_ALLOW_ANONYMOUS");
    }

    #[test]
    fn lifecycle_settings_are_validated() {
        let c = parse(&[
            "--lifecycle-events",
            "true",
            "--events-query-params",
            "lang, plan",
        ])
        .expect("valid");
        assert!(c.lifecycle.events && !c.lifecycle.presence && c.lifecycle.tracked());
        assert_eq!(c.lifecycle.query_params, ["lang", "plan"]);
        for (flag, value, var) in [
            (
                "--events-query-params",
                "lang,access_token",
                "EVENTS_QUERY_PARAMS",
            ),
            ("--events-query-params", "a b", "EVENTS_QUERY_PARAMS"),
            ("--presence", "maybe", "PRESENCE"),
            ("--process-heartbeat-secs", "0", "PROCESS_HEARTBEAT_SECS"),
            ("--events-max-len", "0", "EVENTS_MAX_LEN"),
        ] {
            let e = parse(&[flag, value]).expect_err(value);
            assert_eq!(e.var, var, "{e}");
        }
    }

    #[test]
    fn log_format_accepts_json() {
        assert_eq!(
            parse(&["--log-format", "JSON"]).map(|c| c.log_format).ok(),
            Some(LogFormat::Json)
        );
        assert_eq!(
            parse(&["--log-format", "xml"]).map_err(|e| e.var).err(),
            Some("LOG_FORMAT")
        );
    }
}
