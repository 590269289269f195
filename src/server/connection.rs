//! One accepted connection served by hyper, with the router as its
//! service: HTTP/1.1 (with upgrades) or, after TLS's ALPN chose it,
//! HTTP/2. The accept loop (`listener.rs`) and the event streams' own
//! writer (`event_stream.rs`, for what is not an event stream) hand
//! connections here.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::error::{ApiError, Refusal};

use super::{App, ConnectionSlot};

/// An HTTP/2 request names its host in `:authority` (the URI's), never in
/// a `Host` header: copied into one, as RFC 9113 (8.3.1) asks of anything
/// that treats it as HTTP/1.1, so that what reads `Host` (the same-origin
/// check, forwarded headers) sees the host the request was sent to.
/// Without it every same-origin request over h2 that carried `Origin` (a
/// browser's POST) was refused `403 origin_not_allowed`.
fn host_from_authority<B>(req: &mut Request<B>) {
    if req.headers().contains_key(axum::http::header::HOST) {
        return;
    }
    let Some(authority) = req.uri().authority() else {
        return;
    };
    let host = match authority.port_u16() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    if let Ok(value) = axum::http::HeaderValue::from_str(&host) {
        req.headers_mut().insert(axum::http::header::HOST, value);
    }
}

/// The router as hyper's service for one connection: each request carries
/// the connection's slot (its peer, its place in `MAX_CONNECTIONS`). On
/// HTTP/2 (`streams`), each request is one of the connection's open
/// streams until its response body is done.
fn service(
    slot: ConnectionSlot,
    router: Router,
    streams: Option<Arc<Streams>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(slot.clone());
        host_from_authority(&mut req);
        let router = router.clone();
        let stream = streams.as_ref().map(Streams::open);
        async move {
            let answer = |req: Request<Incoming>| router.oneshot(req.map(axum::body::Body::new));
            let response = match stream {
                None => answer(req).await.into_response(),
                Some(Some(guard)) => answer(req).await.into_response().map(|body| {
                    axum::body::Body::new(Guarded {
                        body,
                        _guard: guard,
                    })
                }),
                Some(None) => ApiError::from(Refusal::ServerFull(
                    "the server holds MAX_CONNECTIONS connections and streams; try again later"
                        .into(),
                ))
                .into_response(),
            };
            Ok::<_, Infallible>(response)
        }
    })
}

/// Most streams one HTTP/2 connection may have open at once (RFC 9113
/// asks for no fewer than 100; browsers open at most that).
const MAX_STREAMS: u32 = 100;

/// The open streams of one HTTP/2 connection. Its first open stream rides
/// on the connection's own place in `MAX_CONNECTIONS`; each further one
/// takes a place of its own, or is refused (`503 server_full`): one
/// connection's streams cost what as many connections would, and
/// `MAX_CONNECTIONS` bounds them all.
struct Streams {
    open: AtomicUsize,
    changed: Notify,
    limit: Arc<Semaphore>,
}

/// One open stream: released when its response body is dropped.
struct StreamGuard {
    streams: Arc<Streams>,
    _place: Option<OwnedSemaphorePermit>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.open.fetch_sub(1, Ordering::SeqCst);
        self.streams.changed.notify_waiters();
    }
}

impl Streams {
    fn new(limit: Arc<Semaphore>) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            changed: Notify::new(),
            limit,
        })
    }

    /// A new stream, or `None` when it would need a place and none is free.
    fn open(self: &Arc<Self>) -> Option<StreamGuard> {
        let place = if self.open.fetch_add(1, Ordering::SeqCst) == 0 {
            None
        } else {
            match self.limit.clone().try_acquire_owned() {
                Ok(place) => Some(place),
                Err(_) => {
                    self.open.fetch_sub(1, Ordering::SeqCst);
                    return None;
                }
            }
        };
        self.changed.notify_waiters();
        Some(StreamGuard {
            streams: self.clone(),
            _place: place,
        })
    }

    /// Resolves once no stream has been open for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(limit) => return,
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// A response body that holds its stream open until it is dropped.
struct Guarded {
    body: axum::body::Body,
    _guard: StreamGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves HTTP/2 on one TLS connection (negotiated by ALPN) until it
/// closes or the server shuts down (then in-flight streams finish first).
/// Its first open stream shares the connection's slot of
/// `MAX_CONNECTIONS`, each further one takes a place of its own
/// ([`Streams`]). A connection with no stream open for `AUTH_TIMEOUT_SECS`
/// (from its start too: one that never sends its preface) is closed, as
/// an idle HTTP/1 connection is; a peer that stops answering HTTP/2 pings
/// (every `WS_PING_INTERVAL_SECS`, `WS_PING_TIMEOUT_SECS` to answer) is
/// dropped.
pub(super) async fn serve_h2<S>(
    stream: S,
    slot: ConnectionSlot,
    router: Router,
    app: Arc<App>,
    limit: Arc<Semaphore>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let streams = Streams::new(limit);
    let service = service(slot, router, Some(streams.clone()));
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(app.config.ping_interval))
        .keep_alive_timeout(app.config.ping_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let idle = app.config.auth_timeout;
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http/2 connection ended with an error");
            }
            return;
        }
        _ = app.shutdown.cancelled() => {}
        _ = streams.idle_for(idle) => {
            tracing::debug!("http/2 connection idle for AUTH_TIMEOUT_SECS; closing it");
        }
    }
    // GOAWAY; the streams that are open finish first. With none open (an
    // idle connection, or one still owing its preface) the connection is
    // dropped after a second if it has not closed by then.
    conn.as_mut().graceful_shutdown();
    if streams.open.load(Ordering::SeqCst) == 0 {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
    } else {
        let _ = conn.await;
    }
}

/// Serves HTTP/1 on one TCP connection until it closes, upgrades, or the
/// server shuts down (then in-flight requests finish first).
pub(super) async fn serve_connection<S>(
    stream: S,
    slot: ConnectionSlot,
    router: Router,
    app: Arc<App>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service(slot, router, None);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.auth_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http2_authority_becomes_the_host_header() {
        let host = |uri: &str, header: Option<&str>| {
            let mut req = Request::builder().uri(uri);
            if let Some(h) = header {
                req = req.header("host", h);
            }
            let mut req = req.body(()).expect("request");
            host_from_authority(&mut req);
            req.headers()
                .get("host")
                .map(|h| h.to_str().expect("ascii").to_owned())
        };
        assert_eq!(
            host("https://gw.example:8443/a/sse/s", None).as_deref(),
            Some("gw.example:8443")
        );
        assert_eq!(
            host("https://gw.example/x", None).as_deref(),
            Some("gw.example")
        );
        assert_eq!(host("https://[::1]:9/x", None).as_deref(), Some("[::1]:9"));
        // A Host header (HTTP/1.1) is the client's word: kept.
        assert_eq!(
            host("https://other.example/x", Some("gw.example")).as_deref(),
            Some("gw.example")
        );
        assert_eq!(host("/x", None), None);
    }
}
