//! The proxy path: named phases over a per-request context, in the order
//! they run (in the spirit of Pingora's `ProxyHttp`):
//!
//! 1. [`admit`]: the page's origin (before anything else), the method, a
//!    real WebSocket upgrade, shutdown, the route's `max_connections`;
//! 2. [`authenticate`]: the route's JWT, when `auth_required`;
//! 3. [`pick`]: the candidate backends, sticky or balanced, healthy ones
//!    only;
//! 4. [`dial`]: connect and do the backend's handshake before answering the
//!    client, next candidate on a failure, the breaker fed;
//! 5. [`answer`]: the 101 with what the backend agreed to;
//! 6. [`pump`]: the tunnel, in a tracked task on a worker's event loop.
//!
//! Each phase reads the [`Ctx`] and returns what the next needs, or the
//! client's refusal.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use super::balance::{BackendState, RouteState};
use super::connect::{self, DialError, Handshake, Upgrade};
use super::handoff::{self, Placed};
use super::routes::{self, StickyKey};
use super::tunnel::{self, Meter};
use super::{Table, Upstream, limits};
use crate::context::{App, ConnectionSlot};
use crate::error::{ApiError, Refusal};

/// What every phase of one proxied request reads.
pub(super) struct Ctx<'a> {
    app: &'a Arc<App>,
    upstream: &'a Upstream,
    table: &'a Table,
    state: Arc<RouteState>,
    /// The route's `external_path`, for metrics and logs.
    name: String,
    headers: HeaderMap,
    query: Option<String>,
    /// The backend path (see `Route::map_path`).
    mapped_path: String,
    /// The client connection's slot (its address, its permit).
    slot: Option<ConnectionSlot>,
}

/// What admission took from the request for later phases.
struct Admitted {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    route_slot: RouteSlot,
}

/// Why admission refused a request: a refusal with a JSON body, or a
/// method other than GET (405 with `Allow: GET`).
enum Refused {
    Api(ApiError),
    Method,
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Api(e) => e.into_response(),
            Self::Method => crate::error::method_not_allowed(),
        }
    }
}

/// The backend connection a dial established.
struct Dialled {
    backend: Arc<BackendState>,
    handshake: Handshake,
    slot: BackendSlot,
}

/// What the tunnel needs once the client has its 101.
struct Tunnel {
    backend: Arc<BackendState>,
    slot: BackendSlot,
    io: (connect::BackendStream, Vec<u8>),
    limits: Option<limits::Limits>,
}

/// Proxies one request that matched `state`'s route; every refusal is a
/// response.
pub(super) async fn proxy(
    app: &Arc<App>,
    upstream: &Upstream,
    table: &Table,
    state: Arc<RouteState>,
    mapped_path: String,
    mut req: Request,
) -> Response {
    let ctx = Ctx {
        app,
        upstream,
        table,
        name: state.route.external_path.clone(),
        state,
        headers: req.headers().clone(),
        query: req.uri().query().map(str::to_owned),
        mapped_path,
        slot: req.extensions().get::<ConnectionSlot>().cloned(),
    };
    let result = async {
        let admitted = admit(&ctx, &mut req).map_err(IntoResponse::into_response)?;
        let subject = authenticate(&ctx).map_err(IntoResponse::into_response)?;
        let candidates = pick(&ctx, subject.as_deref()).map_err(IntoResponse::into_response)?;
        let dialled = dial(&ctx, candidates, subject.as_deref())
            .await
            .map_err(IntoResponse::into_response)?;
        let (response, tunnel) =
            answer(&ctx, &admitted.key, dialled).map_err(IntoResponse::into_response)?;
        pump(&ctx, admitted, tunnel);
        Ok::<_, Response>(response)
    };
    match result.await {
        Ok(r) | Err(r) => r,
    }
}

/// Phase 1: the origin, the method, the upgrade, room on the route.
fn admit(ctx: &Ctx<'_>, req: &mut Request) -> Result<Admitted, Refused> {
    let (app, route, headers) = (ctx.app, &ctx.state.route, &ctx.headers);
    let origins = route
        .allowed_origins
        .as_ref()
        .unwrap_or(&app.config.ws_origins);
    crate::handshake::admit(headers, origins)?;
    if req.method() != Method::GET {
        return Err(Refused::Method);
    }
    let refuse = Refused::Api;
    let is_upgrade = header_str(headers, header::UPGRADE)
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && header_str(headers, header::CONNECTION).is_some_and(|c| {
            c.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && header_str(headers, header::SEC_WEBSOCKET_VERSION) == Some("13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let (true, Some(key)) = (is_upgrade, key) else {
        return Err(refuse(ApiError::from(Refusal::NotAWebsocket("this route only accepts WebSocket upgrades (GET with Upgrade: websocket, Sec-WebSocket-Version: 13)".into()))));
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(refuse(ApiError::from(Refusal::NotAWebsocket(
            "the connection cannot be upgraded".into(),
        ))));
    };
    if app.shutdown.is_cancelled() {
        return Err(refuse(ApiError::shutting_down()));
    }
    let open = ctx
        .state
        .open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    let gauge = app.metrics.upstream_active(&ctx.name);
    gauge.inc();
    let route_slot = RouteSlot {
        state: ctx.state.clone(),
        gauge,
    };
    if let Some(max) = route.max_connections
        && open > max
    {
        app.metrics.upstream_failure(&ctx.name, "-", "route_full");
        return Err(refuse(ApiError::from(Refusal::RouteFull(
            format!("this route is at its limit of {max} connections; retry later").into(),
        ))));
    }
    Ok(Admitted {
        key,
        on_upgrade,
        route_slot,
    })
}

/// Phase 2: the subject of a valid JWT on an `auth_required` route (401
/// without one, 403 for a bad one); `None` on an open route.
fn authenticate(ctx: &Ctx<'_>) -> Result<Option<String>, ApiError> {
    let (app, route) = (ctx.app, &ctx.state.route);
    if !route.auth_required {
        return Ok(None);
    }
    // Exactly one token: with two, wsproxy would verify one and a backend
    // that gets them (`forward_access_token`) could read the other (many
    // frameworks take the last parameter, or the parameter before the
    // header).
    let (headers, params) = token_copies(&ctx.headers, ctx.query.as_deref());
    if headers + params > 1 {
        app.metrics.upstream_failure(&ctx.name, "-", "unauthorized");
        return Err(ApiError::from(Refusal::AmbiguousToken(
            format!(
                "send exactly one token, in one Authorization header or one access_token parameter (this request has {headers} Authorization headers and {params} access_token parameters)"
            )
            .into(),
        )));
    }
    let token = crate::auth::bearer_token(
        &ctx.headers,
        query_param(ctx.query.as_deref(), "access_token").as_deref(),
    )
    .map(str::to_owned)
    .map_err(|e| {
        app.metrics.upstream_failure(&ctx.name, "-", "unauthorized");
        ApiError::from(Refusal::MissingToken(e.to_string().into()))
    })?;
    let jwt = ctx
        .table
        .routes
        .jwt
        .as_ref()
        .ok_or_else(|| ApiError::from(Refusal::Internal("route needs a jwt section".into())))?;
    let subject = verify_route_token(jwt, &token).map_err(|e| {
        app.metrics.upstream_failure(&ctx.name, "-", "unauthorized");
        ApiError::from(Refusal::InvalidToken(e.to_string().into()))
    })?;
    Ok(Some(subject))
}

/// Phase 3: the backends to try, in order (502 when none is available).
fn pick(ctx: &Ctx<'_>, subject: Option<&str>) -> Result<Vec<Arc<BackendState>>, ApiError> {
    let headers = &ctx.headers;
    let sticky = match &ctx.state.route.sticky {
        None => None,
        Some(StickyKey::Subject) => subject.map(str::to_owned),
        Some(StickyKey::Header(h)) => headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        Some(StickyKey::Cookie(c)) => cookie(headers, c),
        Some(StickyKey::Query(q)) => query_param(ctx.query.as_deref(), q),
    };
    let candidates = ctx.state.candidates(sticky.as_deref());
    if candidates.is_empty() {
        ctx.app
            .metrics
            .upstream_failure(&ctx.name, "-", "no_backend");
        return Err(ApiError::from(Refusal::NoBackend(
            "no backend of this route is available (health checks failing or circuits open)".into(),
        )));
    }
    Ok(candidates)
}

/// The path and query the backend gets: the token the proxy consumed
/// stays here (the backend gets the subject header instead).
fn forwarded_path(ctx: &Ctx<'_>) -> String {
    let route = &ctx.state.route;
    let forwarded = match ctx.query.as_deref() {
        Some(q) if route.auth_required && !route.forward_access_token => {
            Some(without_param(q, "access_token"))
        }
        q => q.map(std::borrow::Cow::Borrowed),
    };
    match forwarded.as_deref() {
        Some(q) if !q.is_empty() => format!("{}?{q}", ctx.mapped_path),
        _ => ctx.mapped_path.clone(),
    }
}

/// Phase 4: the first candidate that completes its handshake. A failure
/// feeds that backend's breaker and the next is tried; a 4xx is the
/// backend's answer to this request and goes to the client as it is.
async fn dial(
    ctx: &Ctx<'_>,
    candidates: Vec<Arc<BackendState>>,
    subject: Option<&str>,
) -> Result<Dialled, ApiError> {
    let (app, route, name) = (ctx.app, &ctx.state.route, &ctx.name);
    let path_and_query = forwarded_path(ctx);
    let peer: Option<SocketAddr> = ctx.slot.as_ref().map(|s| s.peer);
    let up = Upgrade {
        path_and_query: &path_and_query,
        client_headers: &ctx.headers,
        peer,
        client_tls: app.config.tls.is_some(),
        pass_extensions: true,
        subject,
        // The header wsproxy authenticated with is the client's credential
        // for wsproxy, not for the backend (bearer_token takes the header
        // first, so on such a route a present header is the one used).
        strip_authorization: route.auth_required && !route.forward_access_token,
    };
    let mut last: Option<DialError> = None;
    for backend in candidates {
        let trying = BackendSlot::new(backend.clone());
        let dialling = std::time::Instant::now();
        match connect::dial(
            &backend.backend,
            &ctx.upstream.tls,
            &up,
            route.connect_timeout,
        )
        .await
        {
            Ok(handshake) => {
                app.metrics
                    .upstream_connect_duration
                    .observe(dialling.elapsed().as_secs_f64());
                backend.success();
                let mut slot = trying;
                slot.1 = Some(app.metrics.upstream_connect(name, &backend.backend.name));
                return Ok(Dialled {
                    backend,
                    handshake,
                    slot,
                });
            }
            Err(e @ DialError::Rejected { status, .. }) => {
                // The backend is up and said no to this request: another
                // backend would say the same, and the breaker must not
                // count it, either way (any client could open it with a bad
                // path, or keep a failing backend's breaker shut by mixing
                // such requests in).
                app.metrics
                    .upstream_failure(name, &backend.backend.name, "rejected");
                tracing::info!(route = %name, backend = %backend.label, detail = %crate::logsafe::escaped(&e.to_string()), "backend rejected the upgrade");
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                return Err(Refusal::BackendRejected(status).into());
            }
            Err(e) => {
                let reason = match e {
                    DialError::Timeout(_) => "timeout",
                    DialError::Refused(_) | DialError::Rejected { .. } => "refused",
                };
                app.metrics
                    .upstream_failure(name, &backend.backend.name, reason);
                let (threshold, cooldown) = route.breaker;
                if backend.failure(threshold, cooldown) {
                    tracing::warn!(route = %name, backend = %backend.label, ?cooldown, "circuit opened");
                }
                tracing::warn!(route = %name, backend = %backend.label, error = %crate::logsafe::escaped(&e.to_string()), "backend connect failed");
                last = Some(e);
            }
        }
    }
    Err(match last {
        Some(DialError::Timeout(t)) => ApiError::from(Refusal::BackendTimeout(
            format!("the backend did not complete the WebSocket handshake within {t:?}").into(),
        )),
        // What went wrong, and where, is in the log: the client is not
        // told the backends' addresses.
        Some(DialError::Refused(_) | DialError::Rejected { .. }) | None => {
            ApiError::from(Refusal::BackendUnavailable(
                "no backend of this route could be reached or completed the WebSocket handshake"
                    .into(),
            ))
        }
    })
}

/// Phase 5: the client's 101, with the subprotocol and extensions the
/// backend agreed to, and the limits on the client's messages (which must
/// know whether compression was agreed: a compressed message is measured
/// inflated).
fn answer(
    ctx: &Ctx<'_>,
    key: &HeaderValue,
    dialled: Dialled,
) -> Result<(Response, Tunnel), ApiError> {
    let route = &ctx.state.route;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    // Taken apart: only the stream and what came behind the 101 move into
    // the connection's long-lived task.
    let Dialled {
        backend,
        handshake,
        slot,
    } = dialled;
    let Handshake {
        stream,
        leftover,
        protocol,
        extensions,
    } = handshake;
    let limits = route.has_limits().then(|| {
        let max = route
            .max_message_bytes
            .unwrap_or(ctx.app.config.max_message_bytes);
        let deflate =
            limits::Deflate::negotiated(extensions.as_ref().and_then(|x| x.to_str().ok()));
        limits::Limits::new(max as u64, route.rate_limit, deflate)
    });
    if let Some(p) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(x) = extensions {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, x);
    }
    let response = response
        .body(Body::empty())
        .map_err(|e| ApiError::from(Refusal::Internal(e.to_string().into())))?;
    let tunnel = Tunnel {
        backend,
        slot,
        io: (stream, leftover),
        limits,
    };
    Ok((response, tunnel))
}

/// Phase 6: the tunnel, in a tracked task: a plain-TCP tunnel on the next
/// worker's event loop (its sockets join that loop once the client's
/// upgrade is through), a TLS one here. Spawned there at once, so that the
/// task is allocated where it lives.
fn pump(ctx: &Ctx<'_>, admitted: Admitted, tunnel: Tunnel) {
    let app = ctx.app.clone();
    let task = app.tracker.token();
    let slot = ctx.slot.clone();
    let name = ctx.name.clone();
    let Admitted {
        on_upgrade,
        route_slot,
        ..
    } = admitted;
    let Tunnel {
        backend,
        slot: backend_slot,
        io: backend_io,
        limits,
    } = tunnel;
    let plain =
        matches!(backend_io.0, connect::BackendStream::Plain(_)) && app.config.tls.is_none();
    let workers = plain.then(|| app.workers.next().clone());
    let run = async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return;
            }
        };
        let placed = match handoff::detach(upgraded, backend_io) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(route = %name, error = %e, "cannot move a tunnel to its worker");
                return;
            }
        };
        let started = std::time::Instant::now();
        let meter = |direction| {
            let (bytes, frames) =
                app.metrics
                    .upstream_traffic(&name, &backend.backend.name, direction);
            Meter { bytes, frames }
        };
        let (up, down) = (meter("client_to_backend"), meter("backend_to_client"));
        let verdict = tunnel::Verdict::default();
        let checks = (&app.draining, limits, &verdict);
        let (up_bytes, down_bytes) = match placed {
            Placed::Detached(d) => handoff::tunnel_detached(d, (&up, &down), checks).await,
            Placed::Here(client, backend_io) => {
                handoff::tunnel(client, backend_io, (&up, &down), checks).await
            }
        };
        let broke = verdict.get().map(|v| v.label());
        if let Some(reason) = broke {
            app.metrics
                .upstream_failure(&name, &backend.backend.name, reason);
        }
        // The tunnel does not read the close frames it passes on: a code
        // is known only when the proxy wrote the close itself.
        let (reason, code) = match verdict.get() {
            Some(v) => (v.label(), Some(v.close().0)),
            None if app.draining.has_begun() => ("shutdown", Some(crate::close::GOING_AWAY)),
            None => ("ended", None),
        };
        app.closes.record("proxy", reason, code);
        tracing::info!(
            route = %name,
            backend = %backend.label,
            broke_limit = broke.unwrap_or("none"),
            up_bytes,
            down_bytes,
            duration_ms = started.elapsed().as_millis() as u64,
            "proxied connection closed"
        );
        drop((route_slot, backend_slot, task, slot));
    };
    match workers {
        Some(worker) => drop(worker.spawn(run)),
        None => drop(tokio::spawn(run)),
    }
}

/// Counts an open proxied connection against its route until dropped.
struct RouteSlot {
    state: Arc<RouteState>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        self.state
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// Counts a connection against a backend until dropped: from the moment
/// the backend is tried (so that least-connections sees a burst of
/// connects in flight), and in the metrics once it is established.
struct BackendSlot(
    Arc<BackendState>,
    Option<prometheus_client::metrics::gauge::Gauge>,
);

impl BackendSlot {
    fn new(backend: Arc<BackendState>) -> Self {
        backend
            .open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(backend, None)
    }
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(gauge) = &self.1 {
            gauge.dec();
        }
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The query parameter `name`, decoded as a form would be (`+` is a space,
/// `%XX` a byte; bytes that are not UTF-8 become U+FFFD, never a panic).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// How many `Authorization` headers and `access_token` query parameters
/// (names compared decoded, as `without_param` and backends read them) a
/// request carries. Parameters are counted split on `;` as well as `&`:
/// some backends' query parsers split on both, and would read an
/// `access_token` after a `;` that wsproxy had not seen.
pub(super) fn token_copies(headers: &HeaderMap, query: Option<&str>) -> (usize, usize) {
    let params = query.map_or(0, |q| {
        q.split(['&', ';'])
            .filter(|pair| names(pair, "access_token"))
            .count()
    });
    (
        headers.get_all(header::AUTHORIZATION).iter().count(),
        params,
    )
}

/// `query` without its `name` parameters (matched as decoded, so that
/// `access%5Ftoken` goes too); every other parameter is kept byte for byte,
/// in order.
pub fn without_param<'a>(query: &'a str, name: &str) -> std::borrow::Cow<'a, str> {
    let is_name = |pair: &str| names(pair, name);
    if !query.split('&').any(is_name) {
        return std::borrow::Cow::Borrowed(query);
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_name(p)).collect();
    std::borrow::Cow::Owned(kept.join("&"))
}

/// Whether the query parameter `pair` (`key=value`, or a bare key) is
/// `name`, its key decoded.
fn names(pair: &str, name: &str) -> bool {
    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
    form_urlencoded::parse(key.as_bytes()).any(|(k, _)| k == name)
}

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
}

/// Why a route's JWT was refused (403).
#[derive(Debug, thiserror::Error)]
pub(super) enum RouteTokenError {
    /// The token itself: its signature, claims or expiry.
    #[error(transparent)]
    Token(#[from] crate::auth::jwt::TokenError),
    /// Its subject, which goes to the backend as a header, holds a line
    /// break or another control character.
    #[error("the token's subject contains control characters")]
    ControlCharacters,
}

/// Equal when the same check refused for the same reason (a token error
/// compares by its message: `TokenError` is not comparable).
impl PartialEq for RouteTokenError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Token(a), Self::Token(b)) => a.to_string() == b.to_string(),
            (Self::ControlCharacters, Self::ControlCharacters) => true,
            _ => false,
        }
    }
}

/// The subject of `token`, a valid JWT by the routes file's `jwt` section.
pub(super) fn verify_route_token(
    jwt: &routes::JwtSection,
    token: &str,
) -> Result<String, RouteTokenError> {
    #[derive(serde::Deserialize)]
    struct Subject {
        sub: String,
    }
    let sub = crate::auth::jwt::verify_as::<Subject>(
        jwt.secret.as_bytes(),
        &jwt.issuer,
        &jwt.audience,
        token,
    )?
    .sub;
    // It goes to the backend as a header: no line breaks or other controls.
    if sub.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(RouteTokenError::ControlCharacters);
    }
    Ok(sub)
}
