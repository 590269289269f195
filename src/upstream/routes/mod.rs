//! The routes file (`ROUTES_FILE`): which client paths are proxied to
//! which backend WebSocket servers, in the JSON format of the seed
//! (`version`, `jwt`, `routers[]`), plus wsproxy's additions for balancing,
//! stickiness, health checks and limits.
//!
//! Every rule is checked when the file is loaded (at start-up and on
//! SIGHUP), and each error names its place, e.g.
//! `routers[2].backends[0].port: 70000 is outside 1-65535`.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

mod matching;
mod validate;

pub use matching::normalized;

use validate::{
    check_router_head, validate_backends, validate_connecting, validate_health_check,
    validate_limits, validate_picking,
};

/// A routes file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The file could not be read.
    #[error("ROUTES_FILE: cannot read {path}: {source}")]
    Read {
        /// The configured path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not JSON of the expected shape.
    #[error("ROUTES_FILE: {path}: {message}")]
    Parse {
        /// The configured path.
        path: String,
        /// serde's message, with line and column.
        message: String,
    },
    /// A value breaks a rule; `field` says where.
    #[error("ROUTES_FILE: {field}: {message}")]
    Invalid {
        /// e.g. `routers[2].backends[0].port`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> RoutesError {
    RoutesError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    version: u32,
    #[serde(default)]
    jwt: Option<JwtSection>,
    routers: Vec<RouterEntry>,
}

/// The routes file's own JWT settings (for `auth_required` routes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// HS256 secret.
    pub secret: String,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterEntry {
    protocol: String,
    backends: Vec<BackendEntry>,
    external_path: String,
    internal_path: String,
    methods: Vec<String>,
    #[serde(default)]
    auth_required: bool,
    #[serde(default)]
    sticky: Option<StickyEntry>,
    /// "round_robin" (default) or "least_connections".
    #[serde(default)]
    balance: Option<String>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_message_bytes: Option<usize>,
    #[serde(default)]
    rate_limit: Option<RateEntry>,
    #[serde(default)]
    health_check: Option<HealthEntry>,
    #[serde(default)]
    circuit_breaker: Option<BreakerEntry>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    /// Browser origins allowed on this route (instead of
    /// `WS_ALLOWED_ORIGINS`); `["*"]` allows any.
    #[serde(default)]
    allowed_origins: Option<Vec<String>>,
    /// Keep `access_token` in the query forwarded to the backend (it is
    /// removed by default on `auth_required` routes).
    #[serde(default)]
    forward_access_token: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendEntry {
    /// Names the backend in metrics (default: its position, "0", "1"...).
    #[serde(default)]
    name: Option<String>,
    host: String,
    port: i64,
    #[serde(default = "one")]
    weight: i64,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StickyEntry {
    by: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateEntry {
    messages_per_sec: f64,
    #[serde(default)]
    burst: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthEntry {
    #[serde(default = "default_interval")]
    interval_ms: u64,
    #[serde(default = "default_health_timeout")]
    timeout_ms: u64,
    /// "websocket" (default) or "tcp".
    #[serde(default, rename = "type")]
    kind: Option<String>,
    /// Backend path for WebSocket checks (default: the route's internal_path).
    #[serde(default)]
    path: Option<String>,
}

fn default_interval() -> u64 {
    5000
}
fn default_health_timeout() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerEntry {
    #[serde(default = "default_failures")]
    failures: u32,
    #[serde(default = "default_cooldown")]
    cooldown_ms: u64,
}

fn default_failures() -> u32 {
    3
}
fn default_cooldown() -> u64 {
    10_000
}

/// How a route without `sticky` spreads new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin.
    RoundRobin,
    /// The backend with the fewest open connections for its weight (ties
    /// by round robin): evens out long-lived connections, e.g. after a
    /// backend restarts.
    LeastConnections,
}

/// Where a sticky route takes its key from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// The JWT subject (needs `auth_required`).
    Subject,
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query parameter.
    Query(String),
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `wss://` (TLS) or `ws://`.
    pub tls: bool,
    /// Host name or address (no scheme).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Relative share of new connections.
    pub weight: u32,
    /// What metrics call it: the file's `name`, or its position. Never
    /// its address, which `/metrics` must not tell.
    pub name: String,
}

impl Backend {
    /// `host:port`, for logs and metric labels.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Client-facing path (exact, or a prefix followed by `/`), compared
    /// decoded and segment by segment (see [`Route::map_path`]).
    pub external_path: String,
    /// Backend path replacing `external_path`.
    pub internal_path: String,
    /// Backends, in file order.
    pub backends: Vec<Backend>,
    /// Require a JWT (checked with the file's `jwt` section).
    pub auth_required: bool,
    /// Consistent-hashing key, if the route is sticky.
    pub sticky: Option<StickyKey>,
    /// How connections are spread when the route is not sticky.
    pub balance: Balance,
    /// Most open connections through this route (503 past it).
    pub max_connections: Option<usize>,
    /// Largest client message (close 1009 past it); frame mode.
    pub max_message_bytes: Option<usize>,
    /// Client messages per second and burst (close 1008 past it); frame mode.
    pub rate_limit: Option<(f64, f64)>,
    /// Active health check, if configured.
    pub health_check: Option<HealthCheck>,
    /// Consecutive failures that open the breaker, and its cool-down.
    pub breaker: (u32, Duration),
    /// Bound on connecting plus the backend's handshake (504 past it).
    pub connect_timeout: Duration,
    /// Browser origins allowed, when the route sets its own.
    pub allowed_origins: Option<crate::origin::AllowedOrigins>,
    /// Forward the `access_token` query parameter to the backend.
    pub forward_access_token: bool,
}

/// An active health check of every backend of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between two checks of a backend.
    pub interval: Duration,
    /// Bound on one check.
    pub timeout: Duration,
    /// What a check does.
    pub probe: Probe,
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Open a TCP connection (and TLS for `wss://`) and close it.
    Tcp,
    /// Complete a WebSocket handshake on this backend path (101 expected),
    /// then close with 1000.
    WebSocket(String),
}

impl Route {
    /// True when the client's frames must be checked against limits.
    pub fn has_limits(&self) -> bool {
        self.max_message_bytes.is_some() || self.rate_limit.is_some()
    }
}

/// The whole validated file.
#[derive(Debug, Clone)]
pub struct Routes {
    /// JWT settings for `auth_required` routes.
    pub jwt: Option<JwtSection>,
    /// Routes, longest `external_path` (decoded) first so the most
    /// specific wins.
    pub routes: Vec<Route>,
}

impl Routes {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, RoutesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RoutesError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates the file's text.
    pub fn parse(text: &str, shown: &str) -> Result<Self, RoutesError> {
        // Through serde_path_to_error, so that a wrong type or a missing
        // field is named like the rules below name theirs
        // (`routers[2].backends[0].port: invalid type ...`).
        let file: FileV1 =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| {
                    let at = e.path().to_string();
                    let inner = e.into_inner();
                    // Not JSON: the line and column say where.
                    let message = if inner.is_syntax() || inner.is_eof() || at == "." {
                        inner.to_string()
                    } else {
                        format!("{at}: {inner}")
                    };
                    RoutesError::Parse {
                        path: shown.to_owned(),
                        message,
                    }
                })?;
        if file.version != 1 {
            return Err(invalid(
                "version",
                format!("{} is not supported (expected 1)", file.version),
            ));
        }
        if let Some(jwt) = &file.jwt {
            if jwt.secret.len() < 32 {
                return Err(invalid("jwt.secret", "use at least 32 bytes"));
            }
            if jwt.issuer.trim().is_empty() {
                return Err(invalid("jwt.issuer", "must not be empty"));
            }
            if jwt.audience.trim().is_empty() {
                return Err(invalid("jwt.audience", "must not be empty"));
            }
        }
        if file.routers.is_empty() {
            return Err(invalid("routers", "lists no routes"));
        }
        let mut seen = HashSet::new();
        let mut routes = Vec::with_capacity(file.routers.len());
        for (i, r) in file.routers.into_iter().enumerate() {
            check_router_head(i, &r, &mut seen)?;
            let backends = validate_backends(i, &r)?;
            let (sticky, balance) = validate_picking(i, &r, file.jwt.is_some())?;
            let rate_limit = validate_limits(i, &r)?;
            let health_check = validate_health_check(i, &r)?;
            let (breaker, connect_timeout, allowed_origins) = validate_connecting(i, &r)?;
            routes.push(Route {
                external_path: r.external_path,
                internal_path: r.internal_path,
                backends,
                auth_required: r.auth_required,
                sticky,
                balance,
                max_connections: r.max_connections,
                max_message_bytes: r.max_message_bytes,
                rate_limit,
                health_check,
                breaker,
                connect_timeout,
                allowed_origins,
                forward_access_token: r.forward_access_token,
            });
        }
        // Longest first as a backend reads them (decoded): a route whose
        // segments go on from another's comes before it.
        routes.sort_by_key(|r| std::cmp::Reverse(matching::decoded(&r.external_path).count()));
        Ok(Routes {
            jwt: file.jwt,
            routes,
        })
    }
}
