//! One accepted connection served by hyper, with the router as its
//! service: HTTP/1.1 (with upgrades) or, after TLS's ALPN chose it,
//! HTTP/2. The accept loop (`listener.rs`) and the event streams' own
//! writer (`event_stream.rs`, for what is not an event stream) hand
//! connections here.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt;

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
pub(super) async fn serve_h2<S>(stream: S, slot: ConnectionSlot, router: Router, app: Arc<App>)
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
