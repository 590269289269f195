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
mod auth;
mod ignored;
mod parse;
mod redis;
mod sessions;

pub use self::auth::JwtConfig;
pub use self::redis::{
    ClusterConfig, ClusterPubSub, DEFAULT_REDIS_URL, RedisTlsConfig, redact_url,
};
pub use self::sessions::{LifecycleConfig, PubSubConfig, ReliableConfig};

use self::parse::{boolean, number, path, seconds};

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
    /// How fast one session or topic connection's messages are read;
    /// `None` reads them as fast as they come.
    pub client_pace: Option<Pace>,
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
    /// Origins allowed to call `POST /auth/token` from a browser (`*` any,
    /// `scheme://*.domain` subdomains, as `WS_ALLOWED_ORIGINS`);
    /// [`crate::origin::AllowedOrigins::SameOrigin`] when none is set.
    pub cors_origins: crate::origin::AllowedOrigins,
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

/// A limit on how fast a client's messages are read: one every `interval`
/// on average, with up to `burst` read back to back (the generic cell rate
/// algorithm's emission interval and burst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The time one message uses up.
    pub interval: Duration,
    /// How far ahead of the steady rate a client may get: `burst - 1`
    /// intervals.
    pub tolerance: Duration,
}

impl Pace {
    /// `rate` messages a second after a burst of `burst`; `None` for a rate
    /// of 0 (no limit).
    pub fn new(rate: u32, burst: u32) -> Option<Pace> {
        if rate == 0 {
            return None;
        }
        let interval = Duration::from_secs(1) / rate;
        Some(Pace {
            interval,
            tolerance: interval.saturating_mul(burst.saturating_sub(1)),
        })
    }
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
            client_pace: Pace::new(100, 200),
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
            cors_origins: crate::origin::AllowedOrigins::SameOrigin,
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
    /// Messages a second one session or topic connection may send, after a
    /// burst of WS_CLIENT_MESSAGE_BURST; faster ones wait to be read. 0: no
    /// limit.
    #[arg(long, env = "WS_CLIENT_MESSAGE_RATE", default_value = "100")]
    pub ws_client_message_rate: String,
    /// Messages a session or topic connection may send at once before
    /// WS_CLIENT_MESSAGE_RATE applies.
    #[arg(long, env = "WS_CLIENT_MESSAGE_BURST", default_value = "200")]
    pub ws_client_message_burst: String,
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
    /// a process silent for PROCESS_DEAD_AFTER_SECS is declared dead and its
    /// connections closed in Redis by another.
    #[arg(long, env = "PROCESS_HEARTBEAT_SECS", default_value = "5")]
    pub process_heartbeat_secs: String,
    /// Seconds without a heartbeat after which a process counts as dead
    /// (its connections are closed in Redis by another). Empty: two
    /// heartbeats on one Redis, 30 on a cluster (above a failover at
    /// Redis's default node timeout).
    #[arg(long, env = "PROCESS_DEAD_AFTER_SECS", default_value = "")]
    pub process_dead_after_secs: String,
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
    /// File of "username:<argon2 hash>[:<sessions>]" lines for POST
    /// /auth/token (make them with `wsproxy hash-password --user`); the
    /// optional sessions ("session-alice,team-7-*") limit which sessions
    /// the user may get tokens for.
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
    /// Reverse proxy routes (JSON, the format in docs/src/proxy.md); reloaded on SIGHUP.
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

/// Subcommands besides running the server.
#[derive(Debug, clap::Subcommand)]
#[allow(rustdoc::invalid_html_tags)]
pub enum Command {
    /// Print the argon2 hash of a password, for a USERS_FILE line
    /// ("username:<hash>", or "username:<hash>:<sessions>"); with --user,
    /// the whole line.
    /// Reads the password from stdin when not given.
    HashPassword {
        /// The password (prefer stdin: arguments end up in shell history).
        password: Option<String>,
        /// Print the whole USERS_FILE line for this user, not the hash alone.
        #[arg(long)]
        user: Option<String>,
        /// With --user: the sessions the user may get tokens for, names or
        /// patterns with one '*' ("session-alice,team-7-*"). Left out: any
        /// session.
        #[arg(long, requires = "user")]
        sessions: Option<String>,
    },
}

impl Cli {
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
        let redis = ::redis::Client::open(self.redis_url.as_str()).map_err(|e| {
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
            client_pace: Pace::new(
                number(
                    "WS_CLIENT_MESSAGE_RATE",
                    &self.ws_client_message_rate,
                    0..=1_000_000,
                )?,
                number(
                    "WS_CLIENT_MESSAGE_BURST",
                    &self.ws_client_message_burst,
                    1..=1_000_000,
                )?,
            ),
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
            cors_origins: crate::origin::AllowedOrigins::parse(
                self.cors_allowed_origins.split(','),
            )
            .map_err(|e| ConfigError::new("CORS_ALLOWED_ORIGINS", e))?,
            ws_origins: crate::origin::AllowedOrigins::parse(self.ws_allowed_origins.split(','))
                .map_err(|e| ConfigError::new("WS_ALLOWED_ORIGINS", e))?,
            // Not trimmed: a value of spaces (or one padded with them) is a
            // mistake to report, never a silently open /metrics. Only an
            // empty value (`METRICS_TOKEN=`) means unset.
            metrics_token: match self.metrics_token.as_deref() {
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

    pub(super) fn parse(args: &[&str]) -> Result<Config, ConfigError> {
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
        // A path or a misplaced wildcard never matches a browser's Origin:
        // refused, not accepted to match nothing.
        for never in [
            "https://a.example/app",
            "https://app.*.example",
            "https://*.com",
        ] {
            let e = parse(&["--cors-allowed-origins", never]).expect_err(never);
            assert_eq!(e.var, "CORS_ALLOWED_ORIGINS", "{never}");
            assert!(e.to_string().contains(never), "{e}");
        }
        let ok = parse(&[
            "--cors-allowed-origins",
            "https://*.a.example, https://b.example/",
        ])
        .expect("a subdomain wildcard, and an origin written with its slash");
        assert_eq!(
            ok.cors_origins,
            crate::origin::AllowedOrigins::List(vec![
                "https://*.a.example".into(),
                "https://b.example".into()
            ])
        );
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
        // Issue 22, defect 6: 16 spaces were trimmed to nothing and left
        // /metrics open.
        for bad in [
            " ".repeat(16),
            format!(" {}", "k".repeat(16)),
            "\t".repeat(20),
        ] {
            let e = parse(&["--metrics-token", &bad]).expect_err("not a token");
            assert_eq!(e.var, "METRICS_TOKEN", "{bad:?}");
        }
        assert!(parse(&["--metrics-token", ""]).is_ok_and(|c| c.metrics_token.is_none()));
        let e = parse(&["--pubsub-allow-anonymous", "maybe"]).expect_err("not a bool");
        assert_eq!(e.var, "PUBSUB_ALLOW_ANONYMOUS");
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
