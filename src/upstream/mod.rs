//! Reverse proxy from client WebSockets to backend WebSocket servers.
//!
//! A request whose path matches a route of `ROUTES_FILE` goes through these
//! phases, in order:
//! 1. **match** the route (longest `external_path` first, segments compared
//!    decoded and without `;` parameters, as a backend reads them) and map
//!    the path, in RFC 3986 normal form, to `internal_path`, keeping the
//!    query string;
//! 2. **check** it is a WebSocket upgrade (400) and the route has room
//!    (`max_connections`, 503);
//! 3. **authenticate** when `auth_required`: a JWT from the header or
//!    `access_token` (401 missing, 403 invalid);
//! 4. **pick** a backend: sticky routes hash their key onto the backends,
//!    others use smooth weighted round robin; backends whose health check
//!    failed or whose circuit breaker is open are skipped;
//! 5. **dial** it and do the backend handshake *before* answering the client,
//!    retrying the next candidate if a connect fails or the backend answers
//!    wrongly: all failed 502, timed out 504; a backend's 4xx is passed on
//!    (it is up and has judged this request);
//! 6. **answer** 101 with what the backend negotiated (subprotocol,
//!    extensions);
//! 7. **pump**: a byte tunnel (nothing is decoded or re-framed, so every
//!    frame type, close code and compressed message passes untouched) that
//!    follows frame headers, to count frames, close on shutdown at a frame
//!    boundary, and check a route's message rate and size (close 1008 /
//!    1009) before a frame goes on.
//!
//! The routes are reloaded on SIGHUP ([`Upstream::reload`]); open
//! connections keep the route state they started with.

pub mod balance;
pub mod connect;
pub mod frame;
pub mod handoff;
pub mod limits;
mod proxy;
pub mod routes;
pub mod tunnel;

pub use proxy::{query_param, without_param};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use crate::context::App;
use crate::error::{ApiError, Refusal};
use balance::RouteState;
use routes::{Routes, RoutesError};

/// The loaded routes and their live state.
struct Table {
    routes: Routes,
    states: Vec<Arc<RouteState>>,
    /// Stops this table's health checks when it is replaced.
    checks: CancellationToken,
}

/// The reverse proxy: current routes, TLS client config, health checks.
pub struct Upstream {
    path: PathBuf,
    table: RwLock<Arc<Table>>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Errors loading the proxy at start-up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The routes file is unusable.
    #[error(transparent)]
    Routes(#[from] RoutesError),
    /// The CA file is unusable.
    #[error(transparent)]
    Ca(#[from] connect::CaError),
}

/// Builds the live state for `routes`, carrying over from `previous` (on
/// reload) whatever still applies; see [`RouteState::new`].
fn build_table(routes: Routes, previous: Option<&Table>) -> Arc<Table> {
    let states = routes
        .routes
        .iter()
        .cloned()
        .map(|r| {
            let before = previous.and_then(|t| {
                t.states
                    .iter()
                    .find(|s| s.route.external_path == r.external_path)
            });
            Arc::new(RouteState::new(r, before.map(|s| &**s)))
        })
        .collect();
    Arc::new(Table {
        routes,
        states,
        checks: CancellationToken::new(),
    })
}

impl Upstream {
    /// Loads and validates the routes file; `ca_file` adds trusted roots for
    /// `wss://` backends.
    pub fn load(path: &Path, ca_file: Option<&Path>) -> Result<Self, UpstreamError> {
        let routes = Routes::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            table: RwLock::new(build_table(routes, None)),
            tls: connect::tls_connector(ca_file)?,
        })
    }

    fn current(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True when a route takes `path` although it has the shape of a
    /// session path (`/{agent_id}/ws/{session_id}`): a route names its
    /// paths, so it wins over the bridge, unless it is the catch-all `/`,
    /// which only gets what no endpoint of wsproxy's own takes.
    pub fn claims(&self, path: &str) -> bool {
        self.current()
            .routes
            .routes
            .iter()
            .any(|r| r.external_path != "/" && r.map_path(&routes::normalized(path)).is_some())
    }

    /// Number of routes loaded.
    pub fn route_count(&self) -> usize {
        self.current().routes.routes.len()
    }

    /// Re-reads the routes file. A bad file is refused (and logged by the
    /// caller); the routes in use stay. Open connections are not touched.
    pub fn reload(&self, app: &Arc<App>) -> Result<usize, RoutesError> {
        let routes = Routes::load(&self.path)?;
        let n = routes.routes.len();
        let table = build_table(routes, Some(&self.current()));
        let old = {
            let mut slot = self.table.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *slot, table.clone())
        };
        old.checks.cancel();
        // Gauges of backends the new file no longer has (or no longer
        // checks) would otherwise stay at their last value for good.
        for state in &old.states {
            let route = &state.route.external_path;
            let now = table
                .states
                .iter()
                .find(|s| &s.route.external_path == route);
            for b in &state.backends {
                let kept = now.and_then(|s| {
                    s.backends
                        .iter()
                        .find(|n| n.label == b.label && n.backend.name == b.backend.name)
                });
                match kept {
                    None => app.metrics.forget_backend(route, &b.backend.name, false),
                    Some(_) if now.is_some_and(|s| s.route.health_check.is_none()) => {
                        app.metrics.forget_backend(route, &b.backend.name, true)
                    }
                    Some(_) => {}
                }
            }
        }
        start_health_checks(app, &self.tls, &table);
        Ok(n)
    }

    /// Sets the circuit and health gauges from the current table's
    /// backends as they are now; `/metrics` calls this first. (Written at
    /// scrape time only: a cool-down ends without an event, and a dial or a
    /// check still running on a table a reload replaced would otherwise
    /// bring back the gauges of a backend it removed.)
    pub fn refresh_metrics(&self, metrics: &crate::metrics::Metrics) {
        for state in &self.current().states {
            let route = &state.route.external_path;
            for b in &state.backends {
                metrics.upstream_circuit(route, &b.backend.name, b.circuit_open());
                if state.route.health_check.is_some() {
                    let healthy = b.healthy.load(std::sync::atomic::Ordering::Relaxed);
                    metrics.upstream_healthy(route, &b.backend.name, healthy);
                }
            }
        }
    }

    /// The current routes' live state, for the status page.
    pub fn route_states(&self) -> Vec<Arc<RouteState>> {
        self.current().states.clone()
    }

    /// Starts the health checks of the current routes.
    pub fn start(&self, app: &Arc<App>) {
        start_health_checks(app, &self.tls, &self.current());
    }

    /// Stops the health checks.
    pub fn stop(&self) {
        self.current().checks.cancel();
    }
}

/// One task per backend of every route with a `health_check`: a probe
/// every interval (a WebSocket handshake, or a TCP connect); a failure
/// takes the backend out until a check succeeds.
fn start_health_checks(app: &Arc<App>, tls: &tokio_rustls::TlsConnector, table: &Arc<Table>) {
    for state in &table.states {
        let Some(check) = state.route.health_check.clone() else {
            continue;
        };
        for backend in &state.backends {
            let (backend, stop, app, route, check, tls) = (
                backend.clone(),
                table.checks.clone(),
                app.clone(),
                state.route.external_path.clone(),
                check.clone(),
                tls.clone(),
            );
            tokio::spawn(async move {
                loop {
                    // A reload cancels this task, possibly mid-probe; its
                    // result must not land on a state the new table owns.
                    let probe = connect::probe(&backend.backend, &tls, &check.probe, check.timeout);
                    let result = tokio::select! {
                        r = probe => r,
                        _ = stop.cancelled() => return,
                    };
                    if stop.is_cancelled() {
                        return;
                    }
                    let ok = result.is_ok();
                    let was = backend
                        .healthy
                        .swap(ok, std::sync::atomic::Ordering::Relaxed);
                    if was != ok {
                        match result {
                            Ok(()) => {
                                tracing::warn!(%route, backend = %backend.label, "health check passes again")
                            }
                            Err(e) => {
                                tracing::warn!(%route, backend = %backend.label, error = %crate::logsafe::escaped(&e.to_string()), "health check failed; backend taken out");
                                app.metrics.upstream_failure(
                                    &route,
                                    &backend.backend.name,
                                    "health_check",
                                );
                            }
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(check.interval) => {}
                    }
                }
            });
        }
    }
}

/// Looks up the route for the request's path (the router's fallback calls
/// this): the path in normal form (RFC 3986 section 6.2.2, see
/// [`routes::normalized`]) is what the route is matched on and what the
/// backend gets, after the route's prefix.
pub async fn handle(app: Arc<App>, upstream: &Upstream, req: Request) -> Response {
    let table = upstream.current();
    let path = req.uri().path();
    let Some((index, mapped)) = table.routes.find(&routes::normalized(path)) else {
        return not_found();
    };
    let mapped = match check_path(path).and(mapped) {
        Ok(mapped) => mapped,
        Err(why) => return ApiError::from(Refusal::BadPath(why.into())).into_response(),
    };
    let state = table.states[index].clone();
    proxy::proxy(&app, upstream, &table, state, mapped, req).await
}

/// Refuses a path that a backend could read as another path than the one
/// the route matched: an empty segment (`/good//secret` matches the route
/// `/good`, and a backend that folds slashes serves it as `/good/secret`,
/// past that route's `auth_required`), a `.` or `..` segment, plain or percent-encoded
/// (`/public/%2e%2e/admin` would reach `/admin` past the route's
/// `auth_required`), an encoded slash or backslash, or a backslash.
///
/// Backends differ in what else they strip before resolving a segment, so
/// the check reads a segment as the most lenient of them would: decoded, a
/// path parameter cut off (`..;x` and `..%3bx` are `..` to a servlet
/// container), trailing spaces trimmed (`..%20`), and a percent-encoded `%`
/// (`%252e`, decoded twice by some) or NUL refused outright, as is a `%`
/// that starts no escape (`%2%65` is `%2e` to a lenient decoder, so `.`
/// when decoded twice). A segment that is only a parameter (`/public/;x/admin`)
/// is empty to a servlet container, which then folds `//`: refused too.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("the path must start with /");
    }
    if path.contains("//") {
        return Err("the path may not contain empty segments (//)");
    }
    for segment in path.split('/') {
        let lower = segment.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
            return Err("the path may not contain an encoded slash or a backslash");
        }
        if lower.contains("%25") || lower.contains("%00") {
            return Err("the path may not contain an encoded % or NUL");
        }
        let Some(decoded) = percent_decoded(segment.as_bytes()) else {
            return Err("the path may not contain a % that starts no %XX escape");
        };
        let decoded = String::from_utf8_lossy(&decoded);
        let name = decoded.split(';').next().unwrap_or("");
        let dots = name.trim_end();
        if dots == "." || dots == ".." {
            return Err("the path may not contain . or .. segments");
        }
        if name.is_empty() && !segment.is_empty() {
            return Err("the path may not contain a segment that is only a ;parameter");
        }
    }
    Ok(())
}

/// `s` with its `%XX` escapes decoded; `None` if a `%` starts none.
fn percent_decoded(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: Option<&u8>| char::from(*b?).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if b == b'%' {
            let byte = hex(s.get(i + 1))? << 4 | hex(s.get(i + 2))?;
            out.push(byte as u8);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// 404 for a path that is neither wsproxy's own nor a route's.
pub fn not_found() -> Response {
    ApiError::from(Refusal::NotFound(
        "no such endpoint; sessions connect to /{agent_id}/ws/{session_id}, topic clients to /ws"
            .into(),
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use axum::http::{HeaderMap, header};
    use proxy::{cookie, verify_route_token};

    #[test]
    fn a_subject_with_control_characters_is_refused() {
        let jwt = routes::JwtSection {
            secret: "0123456789abcdef0123456789abcdef!!".into(),
            issuer: "iss".into(),
            audience: "aud".into(),
        };
        let token = |sub: &str| {
            let exp = jsonwebtoken::get_current_timestamp() + 60;
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"sub": sub, "exp": exp, "iss": "iss", "aud": "aud"}),
                &jsonwebtoken::EncodingKey::from_secret(jwt.secret.as_bytes()),
            )
            .expect("token")
        };
        assert_eq!(
            verify_route_token(&jwt, &token("alice")),
            Ok("alice".into())
        );
        assert_eq!(verify_route_token(&jwt, &token("Zoë")), Ok("Zoë".into()));
        assert!(verify_route_token(&jwt, &token("alice\r\nX-Admin: 1")).is_err());
        assert_eq!(
            verify_route_token(&jwt, &token("alice\r\nX-Admin: 1")),
            Err(proxy::RouteTokenError::ControlCharacters)
        );
        assert!(matches!(
            verify_route_token(&jwt, "not.a.token"),
            Err(proxy::RouteTokenError::Token(_))
        ));
    }

    #[test]
    fn paths_that_could_leave_the_route_are_refused() {
        for bad in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/.%2E/admin",
            "/public/%2E.",
            "/public/./x",
            "/public/..%2fadmin",
            "/public/..%5Cadmin",
            "/public/..\\admin",
            "/public/..;/admin",
            "/public/%2e%2e;jsessionid=1/admin",
            "/public/.%2e;x=1",
            "/public/%252e%252e/admin",
            "/public/..%20/admin",
            "/public/..%00/admin",
            "/public/;x/admin",
            "/public/%3bx/admin",
            "/;x",
            "/good//secret",
            "/good///secret/x",
            "//private/data",
            "/x//",
            "private",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "/public",
            "/public/a.b/..c/...",
            "/public/%2e%2e%2e",
            "/",
            "/x/",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    /// Found by fuzzing (fuzz/fuzz_targets/path_mapping.rs): dots that a
    /// lenient decoder makes of a `%` starting no escape, once decoded
    /// twice, or that an encoded `;` hides, passed.
    #[test]
    fn dots_behind_a_stray_percent_or_an_encoded_semicolon_are_refused() {
        for bad in [
            "/public/%2%65%2%65/admin", // %2e%2e once decoded, .. twice
            "/public/%%32%65/admin",    // %2e once decoded
            "/public/..%3b/admin",
            "/public/%2e%2E%3Bjsessionid=1/admin",
            "/public/..%09",
            "/public/%",
            "/public/a%2",
            "/public/%zz",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "/public/%41%62c",
            "/public/...%3bx/",
            "/public/a%3bb",
            "/%e2%82%ac",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn the_token_parameter_is_taken_out_of_the_query_and_nothing_else() {
        assert_eq!(
            without_param("a=1&access_token=x&b=%20", "access_token"),
            "a=1&b=%20"
        );
        assert_eq!(without_param("access_token=x", "access_token"), "");
        assert_eq!(without_param("access%5Ftoken=x&k", "access_token"), "k");
        assert_eq!(
            without_param("access_token&x=1&access_token=2", "access_token"),
            "x=1"
        );
        assert!(matches!(
            without_param("x=access_token&y=1", "access_token"),
            std::borrow::Cow::Borrowed("x=access_token&y=1")
        ));
        assert_eq!(
            without_param("my_access_token=1", "access_token"),
            "my_access_token=1"
        );
    }

    #[test]
    fn every_copy_of_a_token_is_counted() {
        let mut h = HeaderMap::new();
        assert_eq!(proxy::token_copies(&h, None), (0, 0));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        assert_eq!(proxy::token_copies(&h, Some("x=1")), (1, 0));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(
            proxy::token_copies(
                &h,
                Some("access_token=a&access%5Ftoken=b&access_token&my_access_token=c")
            ),
            (2, 3)
        );
        assert_eq!(
            proxy::token_copies(&h, Some("x=1;access_token=c;y&access%5ftoken=d")),
            (2, 2)
        );
    }

    #[test]
    fn query_parameters_and_cookies_are_read() {
        assert_eq!(
            query_param(Some("a=1&access_token=x%2By&b"), "access_token"),
            Some("x+y".into())
        );
        assert_eq!(query_param(Some("a=1"), "b"), None);
        // A `%` before a character of several bytes, or bytes that are not
        // UTF-8: read without panicking.
        assert_eq!(
            query_param(Some("access_token=%a\u{e9}"), "access_token"),
            Some("%a\u{e9}".into())
        );
        assert_eq!(
            query_param(Some("k=%ff%e9x&access_token=a%20b+c"), "k"),
            Some("\u{fffd}\u{fffd}x".into())
        );
        assert_eq!(
            query_param(Some("k=1&access_token=a%20b+c"), "access_token"),
            Some("a b c".into())
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; sid=abc; y=2"),
        );
        assert_eq!(cookie(&h, "sid"), Some("abc".into()));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
