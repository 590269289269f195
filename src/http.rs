//! The HTTP face of wsproxy: the router and the small handlers (`/health`,
//! `/ready`, `/metrics`, `/status` and `/status.json`, `POST /auth/token`,
//! 405s, the fallback).
//!
//! The router sends each request to its endpoint: a session path to the
//! bridge (unless a proxy route claims it), `/ws` to topic pub/sub, the
//! token endpoint to [`crate::auth::issue`], and everything else to the
//! reverse proxy or a 404. It sits above every endpoint and below only the
//! [`crate::server`], which serves it on each accepted connection.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;

use crate::config::Config;
use crate::context::App;
use crate::error::{ApiError, Refusal, method_not_allowed, not_allowed};

/// What the router's handlers share: the connection context, and the
/// reverse proxy (which sits above the context, so the context cannot hold
/// it).
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Shared state of every connection.
    pub app: Arc<App>,
    /// The reverse proxy, when `ROUTES_FILE` is set.
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
}

impl axum::extract::FromRef<Gateway> for Arc<App> {
    fn from_ref(gateway: &Gateway) -> Self {
        gateway.app.clone()
    }
}

/// All HTTP routes.
pub fn router(gateway: Gateway) -> Router {
    let app = &gateway.app;
    let router = if app.config.test_echo {
        Router::new().route("/_test/echo", get(crate::echo::handler))
    } else {
        Router::new()
    };
    router
        .route("/health", get(health).fallback(only_get))
        .route("/ready", get(ready).fallback(only_get))
        .route("/metrics", get(metrics).fallback(only_get))
        .route("/status", get(status_page).fallback(only_get))
        .route("/status.json", get(status_json).fallback(only_get))
        .route("/{agent_id}/ws/{session_id}", any(session_or_route))
        .route("/{agent_id}/sse/{session_id}", any(stream_or_route))
        .route("/ws", get(crate::pubsub::handler).fallback(only_get))
        .route("/auth/token", token_route(&app.config))
        .fallback(fallback)
        .with_state(gateway)
}

/// `POST /auth/token`, with a small body limit and CORS for the configured
/// browser origins.
fn token_route(config: &Config) -> axum::routing::MethodRouter<Gateway> {
    use crate::origin::AllowedOrigins;
    use tower_http::cors::{AllowOrigin, CorsLayer};
    // The fallback before the layer, so that CORS preflights (OPTIONS)
    // still get their answer from the layer.
    let route = axum::routing::post(issue_token).fallback(only_post);
    let origins = match &config.cors_origins {
        AllowedOrigins::SameOrigin => return route,
        AllowedOrigins::Any => AllowOrigin::any(),
        listed @ AllowedOrigins::List(_) => {
            let listed = listed.clone();
            AllowOrigin::predicate(move |origin, _| {
                origin.to_str().is_ok_and(|origin| listed.lists(origin))
            })
        }
    };
    route.layer(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([axum::http::Method::POST])
            .allow_headers([header::CONTENT_TYPE]),
    )
}

async fn health() -> Response {
    axum::Json(json!({ "status": "healthy" })).into_response()
}

/// Ready means: not shutting down, the shared pub/sub connection is up (and
/// has resubscribed), the Redis libraries backends call are loaded
/// (`wsproxy_control`, and `wsproxy` with reliable sessions), and Redis
/// answers a PING on the command connection.
async fn ready(State(app): State<Arc<App>>) -> Response {
    let not_ready = |reason: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "not_ready", "reason": reason })),
        )
            .into_response()
    };
    if app.shutdown.is_cancelled() {
        return not_ready("shutting down");
    }
    if !app.broker.is_connected() {
        return not_ready("redis pub/sub connection is down");
    }
    if !app.history_ready() {
        return not_ready("the wsproxy Redis libraries are not loaded yet");
    }
    let mut redis = app.redis.clone();
    let cmd = redis::cmd("PING");
    let ping = cmd.query_async::<String>(&mut redis);
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => axum::Json(json!({ "status": "ready" })).into_response(),
        _ => not_ready("redis does not answer"),
    }
}

/// With `METRICS_TOKEN` set, the refusal of a request without
/// `Authorization: Bearer <token>` (compared in constant time).
fn metrics_token_refusal(
    app: &App,
    headers: &axum::http::HeaderMap,
    what: &'static str,
) -> Option<Response> {
    use subtle::ConstantTimeEq;
    let expected = app.config.metrics_token.as_ref()?;
    let given = crate::auth::bearer_token(headers, None).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
        return None;
    }
    let mut response = ApiError::from(Refusal::MetricsTokenRequired(what.into())).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    Some(response)
}

/// `/metrics`; with `METRICS_TOKEN` set, only for `Authorization: Bearer
/// <token>`.
async fn metrics(State(gateway): State<Gateway>, headers: axum::http::HeaderMap) -> Response {
    let app = &gateway.app;
    if let Some(refusal) = metrics_token_refusal(
        app,
        &headers,
        "/metrics needs Authorization: Bearer <METRICS_TOKEN>",
    ) {
        return refusal;
    }
    if let Some(upstream) = &gateway.upstream {
        upstream.refresh_metrics(&app.metrics);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `/status`: the status page. It holds no data (it reads
/// `/status.json`), so it needs no token; see [`crate::status`].
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        crate::status::PAGE,
    )
        .into_response()
}

/// `/status.json`: what the status page shows; with `METRICS_TOKEN` set,
/// only for `Authorization: Bearer <token>`, as `/metrics`.
async fn status_json(State(gateway): State<Gateway>, headers: axum::http::HeaderMap) -> Response {
    let app = &gateway.app;
    if let Some(refusal) = metrics_token_refusal(
        app,
        &headers,
        "/status.json needs Authorization: Bearer <METRICS_TOKEN>",
    ) {
        return refusal;
    }
    let status = crate::status::collect(app, gateway.upstream.as_deref()).await;
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(status)).into_response()
}

/// A session path, unless a proxy route claims it (see
/// [`crate::upstream::Upstream::claims`]).
async fn session_or_route(State(gateway): State<Gateway>, req: Request) -> Response {
    if let Some(upstream) = &gateway.upstream
        && upstream.claims(req.uri().path())
    {
        return crate::upstream::handle(gateway.app.clone(), upstream, req).await;
    }
    if req.method() != axum::http::Method::GET {
        return method_not_allowed();
    }
    axum::handler::Handler::call(crate::session::bridge::handler, req, gateway).await
}

/// The session's event stream (GET), client messages (POST) and their
/// CORS preflight (OPTIONS), unless a proxy route claims the path.
async fn stream_or_route(State(gateway): State<Gateway>, req: Request) -> Response {
    if let Some(upstream) = &gateway.upstream
        && upstream.claims(req.uri().path())
    {
        return crate::upstream::handle(gateway.app.clone(), upstream, req).await;
    }
    let app = gateway.app.clone();
    match *req.method() {
        axum::http::Method::GET => {
            axum::handler::Handler::call(crate::session::sse::stream, req, app).await
        }
        axum::http::Method::POST => {
            axum::handler::Handler::call(crate::session::sse::post, req, app).await
        }
        axum::http::Method::OPTIONS => {
            axum::handler::Handler::call(crate::session::sse::preflight, req, app).await
        }
        _ => not_allowed(
            "GET, POST, OPTIONS",
            "this endpoint answers GET (the event stream) and POST (a client message)",
        ),
    }
}

async fn only_get() -> Response {
    not_allowed("GET", "this endpoint answers GET only")
}

async fn only_post() -> Response {
    not_allowed(
        "POST",
        "POST a JSON body {\"username\", \"password\", \"session_id\"?}",
    )
}

/// Everything else: a reverse-proxy route, or 404.
async fn fallback(State(gateway): State<Gateway>, req: Request) -> Response {
    match &gateway.upstream {
        Some(upstream) => crate::upstream::handle(gateway.app.clone(), upstream, req).await,
        None => crate::upstream::not_found(),
    }
}

/// `POST /auth/token` (see [`crate::auth::issue`]).
async fn issue_token(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    let issuer = crate::auth::issue::Issuer {
        jwt: app.config.jwt.as_ref(),
        users: app.users.as_ref(),
        timeout: app.config.auth_timeout,
        metrics: &app.metrics,
    };
    crate::auth::issue::issue_token(issuer, request).await
}
