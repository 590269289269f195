//! Accepting: the accept loop ([`Listener`]). Each connection goes to the
//! event streams' own writer (`event_stream.rs`) when it opens with an
//! event stream's request, else to hyper (`connection.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::connection::{serve_connection, serve_h2};
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
                            let places = self.limit.clone();
                            self.app.tracker.spawn(async move {
                                let _ = stream.set_nodelay(true);
                                let limit = app.config.auth_timeout;
                                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                    Ok(Ok(tls))
                                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") =>
                                    {
                                        serve_h2(tls, slot, router, app, places).await
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
