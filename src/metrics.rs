//! Prometheus metrics, served on `GET /metrics`.
//!
//! Each server instance owns its own [`Metrics`] (and registry) instead of a
//! process-global recorder, so two wsproxy instances in one test process keep
//! separate counts. Hot-path counters are plain atomics held directly; the
//! labelled families are only touched on rare events (a failed auth, a
//! disconnect).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Declares a label enum whose Prometheus value is a fixed snake_case string.
macro_rules! reason_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, for series that exist at 0 from the start.
            pub const ALL: &[$name] = &[$($name::$variant,)+];

            /// The label value, as it appears on `/metrics` and in logs.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }
    };
}

reason_enum! {
    /// Why a connection attempt was refused before the upgrade.
    AuthFailure {
        /// No usable bearer token in the request.
        MissingToken => "missing_token",
        /// The token did not match, or the session has no (live) token.
        InvalidToken => "invalid_token",
        /// Redis could not be asked in time.
        RedisUnavailable => "redis_unavailable",
    }
}

reason_enum! {
    /// Why an established WebSocket ended.
    CloseReason {
        /// The client closed the connection (or the socket was closed under us).
        Client => "client",
        /// The client stopped reading and its outbound queue filled up.
        SlowConsumer => "slow_consumer",
        /// A ping went unanswered for `WS_PING_TIMEOUT_SECS`.
        HeartbeatTimeout => "heartbeat_timeout",
        /// The client sent a message larger than `WS_MAX_MESSAGE_BYTES`.
        MessageTooBig => "message_too_big",
        /// The server is shutting down.
        Shutdown => "shutdown",
        /// The connection's token expired while it was open.
        TokenExpired => "token_expired",
        /// The client broke the WebSocket protocol (closed with 1002).
        ProtocolError => "protocol_error",
        /// The client sent text that is not UTF-8 (closed with 1007).
        InvalidData => "invalid_data",
        /// A reliable session's live messages stopped: wsproxy's Redis
        /// pub/sub connection dropped (closed with 1013, to resume).
        PubSubLost => "pubsub_lost",
        /// A reliable session's live stream skipped a message (one the
        /// cluster bus lost in classic pub/sub): closed with 1013, to
        /// resume from history.
        LiveGap => "live_gap",
        /// A backend closed the session (`wsproxy_control`), or this
        /// process's registration lapsed and it asked its clients to
        /// register again.
        Backend => "backend",
        /// A socket error.
        Error => "error",
    }
}

reason_enum! {
    /// Why a client message was not published.
    InvalidMessage {
        /// A text frame that is not JSON.
        InvalidJson => "invalid_json",
        /// A binary frame (the bridge carries JSON text only).
        Binary => "binary",
        /// A reliable client message whose id was stored with other data.
        IdConflict => "id_conflict",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    route: String,
    backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabel {
    route: String,
    backend: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    route: String,
    backend: String,
    direction: &'static str,
}

/// All metrics of one server instance.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Session-bridge WebSockets currently open.
    pub connections_active: Gauge,
    /// Session-bridge WebSockets accepted since start.
    pub connections_opened: Counter,
    /// Session event streams (Server-Sent Events) currently open.
    pub sse_connections_active: Gauge,
    /// Session event streams accepted since start.
    pub sse_connections_opened: Counter,
    /// Client messages POSTed to sessions, by outcome.
    sse_posts: Family<OutcomeLabel, Counter>,
    /// Messages written to clients (Redis -> client).
    pub messages_down: Counter,
    /// Client messages published to Redis (client -> Redis).
    pub messages_up: Counter,
    /// Client messages that could not be published because Redis failed.
    pub publish_failures: Counter,
    /// Times a connection's reading was paused by WS_CLIENT_MESSAGE_RATE.
    pub client_reads_held: Counter,
    /// Times the shared pub/sub connection was re-established.
    pub redis_reconnects: Counter,
    /// 1 while the shared pub/sub connection is up.
    pub redis_connected: Gauge,
    /// Redis channels the process is subscribed to.
    pub broker_channels: Gauge,
    /// Topic pub/sub WebSockets currently open.
    pub pubsub_connections_active: Gauge,
    /// Topic pub/sub WebSockets accepted.
    pub pubsub_connections: Counter,
    /// Topic subscriptions currently held by clients.
    pub pubsub_subscriptions: Gauge,
    /// Topic messages published.
    pub pubsub_published: Counter,
    /// Topic messages written to subscribers.
    pub pubsub_delivered: Counter,
    pubsub_refused: Family<ReasonLabel, Counter>,
    /// Reliable session connections accepted (`wsproxy.v1`).
    pub reliable_connections: Counter,
    /// Messages replayed to reliable clients on resume.
    pub reliable_replayed: Counter,
    /// Client messages of reliable sessions stored and acknowledged.
    pub reliable_acks: Counter,
    /// Resent client messages acknowledged without being stored again.
    pub reliable_duplicates: Counter,
    /// Client messages of reliable sessions Redis could not store.
    pub reliable_store_failures: Counter,
    resume_failures: Family<ReasonLabel, Counter>,
    /// Lifecycle registrations, removals, heartbeats or reaps Redis did
    /// not take.
    pub lifecycle_failures: Counter,
    /// Times this process found its heartbeat lapsed and had its session
    /// connections register again.
    pub lifecycle_lapses: Counter,
    /// Connections of dead processes this process reaped.
    pub reaped_connections: Counter,
    control_messages: Family<ReasonLabel, Counter>,
    upstream_active: Family<RouteLabel, Gauge>,
    upstream_connects: Family<BackendLabel, Counter>,
    upstream_backend_active: Family<BackendLabel, Gauge>,
    upstream_failures: Family<FailureLabel, Counter>,
    upstream_bytes: Family<DirectionLabel, Counter>,
    upstream_frames: Family<DirectionLabel, Counter>,
    upstream_circuit_open: Family<BackendLabel, Gauge>,
    upstream_healthy: Family<BackendLabel, Gauge>,
    invalid_messages: Family<ReasonLabel, Counter>,
    auth_failures: Family<ReasonLabel, Counter>,
    disconnects: Family<ReasonLabel, Counter>,
    /// Seconds from a session's token check to its subscription confirmed
    /// (and, for a reliable session, its history joined).
    pub session_attach: Histogram,
    /// Seconds to dial a backend and complete its handshake (successful
    /// connects).
    pub upstream_connect_duration: Histogram,
}

/// The resume failures' reasons (see `reliable`), for series at 0.
const RESUME_FAILURES: [&str; 4] = ["epoch_changed", "trimmed", "expired", "unknown_offset"];

/// Latency buckets: 0.5 ms to about 4 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 14)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics and registers them under the `wsproxy_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsproxy");
        let m = Metrics {
            connections_active: Gauge::default(),
            connections_opened: Counter::default(),
            sse_connections_active: Gauge::default(),
            sse_connections_opened: Counter::default(),
            sse_posts: Family::default(),
            messages_down: Counter::default(),
            messages_up: Counter::default(),
            publish_failures: Counter::default(),
            client_reads_held: Counter::default(),
            redis_reconnects: Counter::default(),
            redis_connected: Gauge::default(),
            broker_channels: Gauge::default(),
            pubsub_connections_active: Gauge::default(),
            pubsub_connections: Counter::default(),
            pubsub_subscriptions: Gauge::default(),
            pubsub_published: Counter::default(),
            pubsub_delivered: Counter::default(),
            pubsub_refused: Family::default(),
            reliable_connections: Counter::default(),
            reliable_replayed: Counter::default(),
            reliable_acks: Counter::default(),
            reliable_duplicates: Counter::default(),
            reliable_store_failures: Counter::default(),
            lifecycle_failures: Counter::default(),
            lifecycle_lapses: Counter::default(),
            reaped_connections: Counter::default(),
            control_messages: Family::default(),
            resume_failures: Family::default(),
            upstream_active: Family::default(),
            upstream_connects: Family::default(),
            upstream_backend_active: Family::default(),
            upstream_failures: Family::default(),
            upstream_bytes: Family::default(),
            upstream_frames: Family::default(),
            upstream_circuit_open: Family::default(),
            upstream_healthy: Family::default(),
            invalid_messages: Family::default(),
            auth_failures: Family::default(),
            disconnects: Family::default(),
            session_attach: Histogram::new(latency_buckets()),
            upstream_connect_duration: Histogram::new(latency_buckets()),
            registry: Registry::default(),
        };
        m.seed_reasons();
        m.register_sessions(&mut registry);
        m.register_redis(&mut registry);
        m.register_pubsub(&mut registry);
        m.register_upstream(&mut registry);
        m.register_reliable(&mut registry);
        m.register_lifecycle(&mut registry);
        Metrics { registry, ..m }
    }

    /// The reasons known in advance exist at 0 from the start, so that a
    /// rate or an alert sees the first event as an increase.
    fn seed_reasons(&self) {
        for reason in CloseReason::ALL {
            drop(self.disconnects.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        for reason in AuthFailure::ALL {
            drop(self.auth_failures.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        for reason in InvalidMessage::ALL {
            drop(self.invalid_messages.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        for reason in RESUME_FAILURES {
            drop(self.resume_failures.get_or_create(&ReasonLabel { reason }));
        }
    }

    /// Session connections (both transports), their messages and failures.
    fn register_sessions(&self, registry: &mut Registry) {
        registry.register(
            "session_attach_duration_seconds",
            "Seconds from a session's token check to its subscription confirmed (and a reliable session's history joined)",
            self.session_attach.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Seconds to dial a backend and complete its WebSocket handshake (successful connects)",
            self.upstream_connect_duration.clone(),
        );
        registry.register(
            "connections_active",
            "Session WebSocket connections currently open",
            self.connections_active.clone(),
        );
        registry.register(
            "connections",
            "Session WebSocket connections accepted",
            self.connections_opened.clone(),
        );
        registry.register(
            "sse_connections_active",
            "Session event streams (Server-Sent Events) currently open",
            self.sse_connections_active.clone(),
        );
        registry.register(
            "sse_connections",
            "Session event streams (Server-Sent Events) accepted",
            self.sse_connections_opened.clone(),
        );
        registry.register(
            "session_posts",
            "Client messages POSTed to sessions (the HTTP transport), by outcome",
            self.sse_posts.clone(),
        );
        registry.register(
            "messages_down",
            "Messages delivered from Redis to clients",
            self.messages_down.clone(),
        );
        registry.register(
            "messages_up",
            "Client messages published to Redis",
            self.messages_up.clone(),
        );
        registry.register(
            "publish_failures",
            "Client messages not published because Redis failed",
            self.publish_failures.clone(),
        );
        registry.register(
            "client_reads_held",
            "Times a session or topic connection's reading paused for its message rate limit",
            self.client_reads_held.clone(),
        );
        registry.register(
            "invalid_messages",
            "Client messages refused, by reason",
            self.invalid_messages.clone(),
        );
        registry.register(
            "auth_failures",
            "Connection attempts refused, by reason",
            self.auth_failures.clone(),
        );
        registry.register(
            "disconnects",
            "WebSocket connections closed, by reason (slow_consumer = slow clients cut off)",
            self.disconnects.clone(),
        );
    }

    /// The shared Redis pub/sub connection.
    fn register_redis(&self, registry: &mut Registry) {
        registry.register(
            "redis_reconnects",
            "Times the shared Redis pub/sub connection was re-established",
            self.redis_reconnects.clone(),
        );
        registry.register(
            "redis_connected",
            "1 while the shared Redis pub/sub connection is up",
            self.redis_connected.clone(),
        );
        registry.register(
            "broker_channels",
            "Redis channels this process is subscribed to",
            self.broker_channels.clone(),
        );
    }

    /// Topic pub/sub.
    fn register_pubsub(&self, registry: &mut Registry) {
        registry.register(
            "pubsub_connections_active",
            "Topic pub/sub WebSocket connections currently open",
            self.pubsub_connections_active.clone(),
        );
        registry.register(
            "pubsub_connections",
            "Topic pub/sub WebSocket connections accepted",
            self.pubsub_connections.clone(),
        );
        registry.register(
            "pubsub_subscriptions",
            "Topic subscriptions currently held by clients",
            self.pubsub_subscriptions.clone(),
        );
        registry.register(
            "pubsub_published",
            "Topic messages published",
            self.pubsub_published.clone(),
        );
        registry.register(
            "pubsub_delivered",
            "Topic messages delivered to subscribers",
            self.pubsub_delivered.clone(),
        );
        registry.register(
            "pubsub_refused",
            "Topic pub/sub commands refused, by error code",
            self.pubsub_refused.clone(),
        );
    }

    /// Reliable sessions' counters.
    fn register_reliable(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "reliable_connections",
            "Reliable session connections accepted (wsproxy.v1)",
            m.reliable_connections.clone(),
        );
        registry.register(
            "reliable_replayed",
            "Messages replayed to reliable clients on resume",
            m.reliable_replayed.clone(),
        );
        registry.register(
            "resume_failures",
            "Resumes that could not be honoured, by reason (epoch_changed, trimmed, expired, unknown_offset, unreplayable)",
            m.resume_failures.clone(),
        );
        registry.register(
            "reliable_acks",
            "Client messages of reliable sessions stored and acknowledged",
            m.reliable_acks.clone(),
        );
        registry.register(
            "reliable_duplicates",
            "Resent client messages acknowledged without being stored again",
            m.reliable_duplicates.clone(),
        );
        registry.register(
            "reliable_store_failures",
            "Client messages of reliable sessions that Redis could not store",
            m.reliable_store_failures.clone(),
        );
    }

    /// Lifecycle tracking and control.
    fn register_lifecycle(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "lifecycle_failures",
            "Lifecycle registrations, removals, heartbeats or reaps Redis did not take",
            m.lifecycle_failures.clone(),
        );
        registry.register(
            "lifecycle_lapses",
            "Times this process found its heartbeat lapsed and had its session connections register again",
            m.lifecycle_lapses.clone(),
        );
        registry.register(
            "reaped_connections",
            "Connections of dead processes this process reaped (disconnect events with reason process_lost)",
            m.reaped_connections.clone(),
        );
        registry.register(
            "control_messages",
            "Control commands, by reason: applied (from the control stream), legacy (a command PUBLISHed on wsproxy:control, deprecated), malformed, overflow (wake-ups came faster than taken; the stream is read instead), missed (unread commands were trimmed from the stream)",
            m.control_messages.clone(),
        );
    }

    /// Counts a control message by what became of it.
    pub fn control_message(&self, result: &'static str) {
        self.control_messages
            .get_or_create(&ReasonLabel { reason: result })
            .inc();
    }

    /// Counts a client message POSTed to a session: `published`, `stored`,
    /// `duplicate`, `id_conflict`, `not_stored`, `publish_failed`,
    /// `invalid`.
    pub fn session_post(&self, outcome: &'static str) {
        self.sse_posts
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts a resume that could not be honoured.
    pub fn resume_failure(&self, reason: &'static str) {
        self.resume_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The reverse proxy's families, registered beside the rest.
    fn register_upstream(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "upstream_connections_active",
            "Proxied connections open, by route",
            m.upstream_active.clone(),
        );
        registry.register(
            "upstream_connects",
            "Proxied connections established, by route and backend",
            m.upstream_connects.clone(),
        );
        registry.register(
            "upstream_backend_connections_active",
            "Proxied connections open, by route and backend",
            m.upstream_backend_active.clone(),
        );
        registry.register(
            "upstream_failures",
            "Proxy failures by route, backend and reason (refused, rejected, timeout, no_backend, route_full, unauthorized, health_check, too_big, too_fast, bad_compression)",
            m.upstream_failures.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Bytes proxied, by route and direction",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "upstream_frames",
            "Frames proxied, by route and direction",
            m.upstream_frames.clone(),
        );
        registry.register(
            "upstream_circuit_open",
            "1 while a backend's circuit breaker is open (read when scraped, so it falls back to 0 when the cool-down ends)",
            m.upstream_circuit_open.clone(),
        );
        registry.register(
            "upstream_backend_healthy",
            "Last active health check of a backend: 1 passed, 0 failed (routes with health_check)",
            m.upstream_healthy.clone(),
        );
    }

    /// Counts a refused connection attempt.
    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failures
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a closed WebSocket.
    pub fn disconnect(&self, reason: CloseReason) {
        self.disconnects
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a refused pub/sub command by its error code.
    pub fn pubsub_refused(&self, code: &'static str) {
        self.pubsub_refused
            .get_or_create(&ReasonLabel { reason: code })
            .inc();
    }

    /// Open proxied connections of a route.
    pub fn upstream_active(&self, route: &str) -> Gauge {
        self.upstream_active
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .clone()
    }

    /// Counts an established proxied connection; returns the backend's
    /// open-connections gauge, already raised, for the caller to lower when
    /// the connection ends.
    pub fn upstream_connect(&self, route: &str, backend: &str) -> Gauge {
        let label = BackendLabel {
            route: route.to_owned(),
            backend: backend.to_owned(),
        };
        self.upstream_connects.get_or_create(&label).inc();
        let open = self.upstream_backend_active.get_or_create(&label).clone();
        open.inc();
        open
    }

    /// Counts a proxy failure.
    pub fn upstream_failure(&self, route: &str, backend: &str, reason: &'static str) {
        self.upstream_failures
            .get_or_create(&FailureLabel {
                route: route.to_owned(),
                backend: backend.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counters of bytes and frames for a route's backend in a direction
    /// (`client_to_backend`, `backend_to_client`): looked up once per
    /// connection, then added to as the bytes pass.
    pub fn upstream_traffic(
        &self,
        route: &str,
        backend: &str,
        direction: &'static str,
    ) -> (Counter, Counter) {
        let label = DirectionLabel {
            route: route.to_owned(),
            backend: backend.to_owned(),
            direction,
        };
        (
            self.upstream_bytes.get_or_create(&label).clone(),
            self.upstream_frames.get_or_create(&label).clone(),
        )
    }

    /// Records a backend's breaker state.
    pub fn upstream_circuit(&self, route: &str, backend: &str, open: bool) {
        self.upstream_circuit_open
            .get_or_create(&BackendLabel {
                route: route.to_owned(),
                backend: backend.to_owned(),
            })
            .set(i64::from(open));
    }

    /// Records a backend's last health check.
    pub fn upstream_healthy(&self, route: &str, backend: &str, healthy: bool) {
        self.upstream_healthy
            .get_or_create(&BackendLabel {
                route: route.to_owned(),
                backend: backend.to_owned(),
            })
            .set(i64::from(healthy));
    }

    /// Drops a backend's gauges (circuit, health) when a reload removed it
    /// (or, with `health_only`, only its route's health check).
    pub fn forget_backend(&self, route: &str, backend: &str, health_only: bool) {
        let label = BackendLabel {
            route: route.to_owned(),
            backend: backend.to_owned(),
        };
        self.upstream_healthy.remove(&label);
        if !health_only {
            self.upstream_circuit_open.remove(&label);
        }
    }

    /// Counts a refused client message.
    pub fn invalid_message(&self, reason: InvalidMessage) {
        self.invalid_messages
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.messages_down.inc_by(3);
        m.auth_failure(AuthFailure::InvalidToken);
        m.disconnect(CloseReason::SlowConsumer);
        let text = m.render();
        assert!(text.contains("wsproxy_messages_down_total 3"), "{text}");
        assert!(
            text.contains("wsproxy_auth_failures_total{reason=\"invalid_token\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_disconnects_total{reason=\"slow_consumer\"} 1"),
            "{text}"
        );
    }
}
