//! Accepting: the accept loop ([`Listener`]), and each connection's HTTP
//! serving (HTTP/1.1 with upgrades, or HTTP/2 after TLS's ALPN), with the
//! router as hyper's service.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::{App, ConnectionSlot, event_stream};

/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept loop.
pub(super) struct Listener {
    pub(super) listener: TcpListener,
    pub(super) router: Router,
    pub(super) limit: Arc<Semaphore>,
    pub(super) app: Arc<App>,
    /// Present when listening with TLS.
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listener {
    /// Accepts until shutdown. Accept errors (e.g. out of file descriptors)
    /// are logged and retried after a pause that doubles with each error in
    /// a row (10 ms to 1 s), instead of ending the server.
    pub(super) async fn run(self) {
        let shutdown = self.app.shutdown.clone();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        // A listener made by `bind` has TCP_NODELAY, which Linux copies to
        // every accepted socket: then no system call per connection. One
        // made elsewhere gets it set on each.
        let inherits_nodelay = socket2::SockRef::from(&self.listener)
            .tcp_nodelay()
            .unwrap_or(false);
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = self.limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return, // the semaphore is never closed
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let slot = ConnectionSlot::new(peer, permit);
                    let router = self.router.clone();
                    let app = self.app.clone();
                    match &self.tls {
                        None => {
                            if !inherits_nodelay {
                                let _ = stream.set_nodelay(true);
                            }
                            self.app.tracker.spawn(async move {
                                // A connection that sends nothing within
                                // AUTH_TIMEOUT_SECS is dropped, as hyper's
                                // header read timeout would.
                                let limit = app.config.auth_timeout;
                                let peeked = tokio::time::timeout(
                                    limit,
                                    event_stream::is_event_stream(&stream),
                                );
                                match peeked.await {
                                    Ok(true) => {
                                        // Boxed: the head and the route are big
                                        // and short; what stays is `Streaming`.
                                        let respond =
                                            event_stream::respond(stream, slot, router, app);
                                        if let Some(streaming) = Box::pin(respond).await {
                                            streaming.await
                                        }
                                    }
                                    Ok(false) => {
                                        Box::pin(serve_connection(stream, slot, router, app)).await
                                    }
                                    Err(_) => {
                                        tracing::debug!("no request within AUTH_TIMEOUT_SECS")
                                    }
                                }
                            });
                        }
                        Some(acceptor) => {
                            let acceptor = acceptor.clone();
                            self.app.tracker.spawn(async move {
                                let _ = stream.set_nodelay(true);
                                let limit = app.config.auth_timeout;
                                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                    Ok(Ok(tls))
                                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") =>
                                    {
                                        serve_h2(tls, slot, router, app).await
                                    }
                                    Ok(Ok(tls)) => serve_connection(tls, slot, router, app).await,
                                    Ok(Err(e)) => {
                                        tracing::debug!(error = %e, "TLS handshake failed")
                                    }
                                    Err(_) => tracing::debug!("TLS handshake timed out"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors, say: each error in a row
                    // waits twice as long (up to a second), so a lasting
                    // condition neither spins nor floods the log.
                    tracing::warn!(error = %e, pause = ?backoff, "accept failed; pausing");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            }
        }
    }
}

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
/// the connection's slot (its peer, its place in `MAX_CONNECTIONS`).
fn service(
    slot: ConnectionSlot,
    router: Router,
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
        async move {
            Ok::<_, Infallible>(
                router
                    .oneshot(req.map(axum::body::Body::new))
                    .await
                    .into_response(),
            )
        }
    })
}

/// Serves HTTP/2 on one TLS connection (negotiated by ALPN) until it
/// closes or the server shuts down (then in-flight streams finish first).
/// Its requests share the connection's slot of `MAX_CONNECTIONS`.
async fn serve_h2<S>(stream: S, slot: ConnectionSlot, router: Router, app: Arc<App>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service(slot, router);
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http/2 connection ended with an error");
            }
        }
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
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
    let service = service(slot, router);
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
