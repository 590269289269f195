//! Dialing a backend: TCP, TLS for `wss://` (rustls, the system's roots
//! plus an optional CA file), and the WebSocket handshake written by hand so
//! that every header is ours to choose: the client's subprotocols,
//! extensions and origin go through, hop-by-hop headers do not, and
//! `X-Forwarded-*` and the token subject are added.

mod handshake;
mod tls;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::routes::{Backend, Probe};
pub use handshake::{Agreed, Upgrade, check_response};
use handshake::{read_response, request_head};
pub use tls::{BackendStream, CaError, tls_connector};

/// Why a backend could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect or TLS failed, or the backend answered the upgrade
    /// wrongly (a 5xx or other status, a bad handshake): counted against
    /// the backend, the next one is tried, 502 in the end.
    #[error(transparent)]
    Refused(#[from] DialFailure),
    /// The backend answered the upgrade with a 4xx status: it is up and has
    /// decided about this request, so the client gets that status and no
    /// other backend is tried.
    #[error("{backend} answered the upgrade with HTTP {status}")]
    Rejected {
        /// The backend's `host:port`.
        backend: String,
        /// The status it answered with.
        status: u16,
    },
    /// The backend did not finish in time: 504.
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
}

/// What went wrong with a backend that refused a dial
/// ([`DialError::Refused`]), one variant per cause. Each names the backend
/// by `host:port` (for the log: the client is never told) and carries the
/// error under it, which its message includes (so it is no `source`: a
/// report of the chain would say it twice).
#[derive(Debug, thiserror::Error)]
pub enum DialFailure {
    /// The TCP connect failed.
    #[error("cannot connect to {backend}: {error}")]
    Connect {
        /// The backend's `host:port`.
        backend: String,
        /// Why.
        error: std::io::Error,
    },
    /// The backend's host is no name TLS can check a certificate against.
    #[error("bad TLS name for {backend}: {error}")]
    TlsName {
        /// The backend's `host:port`.
        backend: String,
        /// Why.
        error: rustls_pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake failed with {backend}: {error}")]
    Tls {
        /// The backend's `host:port`.
        backend: String,
        /// Why.
        error: std::io::Error,
    },
    /// The upgrade request could not be written.
    #[error("cannot write to {backend}: {error}")]
    Write {
        /// The backend's `host:port`.
        backend: String,
        /// Why.
        error: std::io::Error,
    },
    /// The response could not be read.
    #[error("cannot read from {backend}: {error}")]
    Read {
        /// The backend's `host:port`.
        backend: String,
        /// Why.
        error: std::io::Error,
    },
    /// The backend closed before its response head was complete.
    #[error("{backend} closed the connection during the handshake")]
    Closed {
        /// The backend's `host:port`.
        backend: String,
    },
    /// The response head went past 16 KiB.
    #[error("{backend} sent an oversized handshake response")]
    Oversized {
        /// The backend's `host:port`.
        backend: String,
    },
    /// The response head is not HTTP.
    #[error("bad handshake response from {backend}: {error}")]
    BadResponse {
        /// The backend's `host:port`.
        backend: String,
        /// Why.
        error: httparse::Error,
    },
    /// A status other than 101 and 4xx.
    #[error("{backend} answered the upgrade with HTTP {status}")]
    Status {
        /// The backend's `host:port`.
        backend: String,
        /// The status (0 if the response had none).
        status: u16,
    },
    /// `Sec-WebSocket-Accept` is not the one for the key sent.
    #[error("{backend} sent a wrong Sec-WebSocket-Accept")]
    WrongAccept {
        /// The backend's `host:port`.
        backend: String,
    },
    /// The backend chose a subprotocol the client did not offer.
    #[error("{backend} chose the subprotocol {chosen:?}, which the client did not offer")]
    Subprotocol {
        /// The backend's `host:port`.
        backend: String,
        /// What it chose.
        chosen: String,
    },
    /// The backend agreed to an extension the client did not offer.
    #[error("{backend} agreed to the extension {name:?}, which the client did not offer")]
    Extension {
        /// The backend's `host:port`.
        backend: String,
        /// The extension's name.
        name: String,
    },
}

/// Why a health check failed ([`probe`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A TCP check's connect failed.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// A TCP check of a `wss://` backend: its host is no TLS name.
    #[error("cannot connect: {0}")]
    TlsName(rustls_pki_types::InvalidDnsNameError),
    /// A TCP check of a `wss://` backend: the TLS handshake failed.
    #[error("cannot connect: {0}")]
    Tls(std::io::Error),
    /// A TCP check did not connect in time.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// A WebSocket check's handshake failed.
    #[error(transparent)]
    Dial(#[from] DialError),
}

/// What the backend agreed to.
pub struct Handshake {
    /// The connection, positioned after the backend's response head.
    pub stream: BackendStream,
    /// Bytes the backend sent after its 101 (frames), to forward first.
    pub leftover: Vec<u8>,
    /// The backend's `Sec-WebSocket-Protocol`, if any.
    pub protocol: Option<HeaderValue>,
    /// The backend's `Sec-WebSocket-Extensions`, if any.
    pub extensions: Option<HeaderValue>,
}

/// Connects to `backend` and performs the WebSocket handshake, all within
/// `limit`.
pub async fn dial(
    backend: &Backend,
    tls: &TlsConnector,
    up: &Upgrade<'_>,
    limit: Duration,
) -> Result<Handshake, DialError> {
    match tokio::time::timeout(limit, dial_inner(backend, tls, up)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout(limit)),
    }
}

async fn dial_inner(
    backend: &Backend,
    tls: &TlsConnector,
    up: &Upgrade<'_>,
) -> Result<Handshake, DialError> {
    let authority = || backend.authority();
    let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
        .await
        .map_err(|error| DialFailure::Connect {
            backend: authority(),
            error,
        })?;
    crate::net::tune_socket(&tcp);
    let mut stream = if backend.tls {
        let name =
            ServerName::try_from(backend.host.clone()).map_err(|error| DialFailure::TlsName {
                backend: authority(),
                error,
            })?;
        let tls = tls
            .connect(name, tcp)
            .await
            .map_err(|error| DialFailure::Tls {
                backend: authority(),
                error,
            })?;
        BackendStream::Tls(Box::new(tls))
    } else {
        BackendStream::Plain(tcp)
    };
    let key = tungstenite::handshake::client::generate_key();
    let head = request_head(backend, up, &key);
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|error| DialFailure::Write {
            backend: authority(),
            error,
        })?;

    let (agreed, leftover) = read_response(&mut stream, backend, &key, up).await?;
    Ok(Handshake {
        protocol: agreed.protocol,
        extensions: agreed.extensions,
        leftover,
        stream,
    })
}

/// One health check of `backend` within `limit`: `Err` says what failed.
///
/// A WebSocket check sends the handshake a client would (no client
/// headers; `User-Agent: wsproxy-health-check`), wants 101, then closes
/// with 1000 so the backend sees an orderly visit.
pub async fn probe(
    backend: &Backend,
    tls: &TlsConnector,
    probe: &Probe,
    limit: Duration,
) -> Result<(), ProbeError> {
    match probe {
        Probe::Tcp => {
            let check = async {
                let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
                    .await
                    .map_err(ProbeError::Connect)?;
                if backend.tls {
                    let name =
                        ServerName::try_from(backend.host.clone()).map_err(ProbeError::TlsName)?;
                    tls.connect(name, tcp).await.map_err(ProbeError::Tls)?;
                }
                Ok(())
            };
            match tokio::time::timeout(limit, check).await {
                Ok(result) => result,
                Err(_) => Err(ProbeError::Timeout(limit)),
            }
        }
        Probe::WebSocket(path) => {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::USER_AGENT,
                HeaderValue::from_static("wsproxy-health-check"),
            );
            let up = Upgrade {
                path_and_query: path,
                client_headers: &headers,
                peer: None,
                client_tls: false,
                pass_extensions: false,
                subject: None,
                strip_authorization: false,
            };
            let mut shake = dial(backend, tls, &up, limit).await?;
            // Close 1000, masked (a client's frames always are; the key
            // may be any value).
            let close = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];
            let _ = tokio::time::timeout(limit, async {
                shake.stream.write_all(&close).await?;
                shake.stream.shutdown().await
            })
            .await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages the log shows, word for word as when they were strings.
    #[test]
    fn dial_and_probe_errors_say_what_failed_and_where() {
        let b = || "10.0.0.7:3000".to_owned();
        let io = || std::io::Error::other("boom");
        let bad_name = || ServerName::try_from("a b".to_owned()).expect_err("no DNS name");
        for (e, text) in [
            (
                DialFailure::Connect {
                    backend: b(),
                    error: io(),
                }
                .into(),
                "cannot connect to 10.0.0.7:3000: boom",
            ),
            (
                DialFailure::Tls {
                    backend: b(),
                    error: io(),
                }
                .into(),
                "TLS handshake failed with 10.0.0.7:3000: boom",
            ),
            (
                DialFailure::Closed { backend: b() }.into(),
                "10.0.0.7:3000 closed the connection during the handshake",
            ),
            (
                DialFailure::Status {
                    backend: b(),
                    status: 502,
                }
                .into(),
                "10.0.0.7:3000 answered the upgrade with HTTP 502",
            ),
            (
                DialFailure::Subprotocol {
                    backend: b(),
                    chosen: "chat".into(),
                }
                .into(),
                "10.0.0.7:3000 chose the subprotocol \"chat\", which the client did not offer",
            ),
            (
                DialError::Rejected {
                    backend: b(),
                    status: 403,
                },
                "10.0.0.7:3000 answered the upgrade with HTTP 403",
            ),
            (
                DialError::Timeout(Duration::from_secs(5)),
                "backend did not answer within 5s",
            ),
        ] {
            assert_eq!(e.to_string(), text);
        }
        assert_eq!(
            DialFailure::TlsName {
                backend: b(),
                error: bad_name(),
            }
            .to_string(),
            format!("bad TLS name for 10.0.0.7:3000: {}", bad_name())
        );
        assert_eq!(
            ProbeError::Connect(io()).to_string(),
            "cannot connect: boom"
        );
        assert_eq!(
            ProbeError::TlsName(bad_name()).to_string(),
            format!("cannot connect: {}", bad_name())
        );
        assert_eq!(
            ProbeError::Timeout(Duration::from_millis(1500)).to_string(),
            "no connection within 1.5s"
        );
        assert_eq!(
            ProbeError::from(DialError::Timeout(Duration::from_secs(2))).to_string(),
            "backend did not answer within 2s"
        );
    }
}
