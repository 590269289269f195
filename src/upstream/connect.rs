//! Dialing a backend: TCP, TLS for `wss://` (rustls, the system's roots
//! plus an optional CA file), and the WebSocket handshake written by hand so
//! that every header is ours to choose: the client's subprotocols,
//! extensions and origin go through, hop-by-hop headers do not, and
//! `X-Forwarded-*` and the token subject are added.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::routes::{Backend, Probe};

/// Largest backend handshake response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

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

/// A CA file (`UPSTREAM_CA_FILE`) that cannot be used, or a TLS client
/// configuration that cannot be built. The error under it is in the
/// message, not a `source` (`main` prints the chain).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The file cannot be read.
    #[error("UPSTREAM_CA_FILE: cannot read {}: {error}", path.display())]
    Read {
        /// The configured path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file holds something that is not a PEM certificate.
    #[error("UPSTREAM_CA_FILE: {}: {error}", path.display())]
    Pem {
        /// The configured path.
        path: PathBuf,
        /// Why.
        error: rustls_pki_types::pem::Error,
    },
    /// A certificate that cannot be a trusted root.
    #[error("UPSTREAM_CA_FILE: {}: {error}", path.display())]
    Certificate {
        /// The configured path.
        path: PathBuf,
        /// Why.
        error: rustls::Error,
    },
    /// The file holds no certificate at all.
    #[error("UPSTREAM_CA_FILE: {} holds no PEM certificate", path.display())]
    Empty {
        /// The configured path.
        path: PathBuf,
    },
    /// The TLS client configuration cannot be built (the crypto provider
    /// supports none of the protocol versions).
    #[error("UPSTREAM_CA_FILE: {0}")]
    Config(rustls::Error),
}

/// Builds the TLS client configuration for `wss://` backends: the
/// system's trusted roots, plus the certificates of `ca_file` for private
/// backends.
pub fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, CaError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|error| CaError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|error| CaError::Pem {
                path: path.to_owned(),
                error,
            })?;
            roots.add(cert).map_err(|error| CaError::Certificate {
                path: path.to_owned(),
                error,
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(CaError::Empty {
                path: path.to_owned(),
            });
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(CaError::Config)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connection to a backend, plain or TLS.
pub enum BackendStream {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
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

/// The request line and headers sent to the backend.
pub struct Upgrade<'a> {
    /// Path and query on the backend.
    pub path_and_query: &'a str,
    /// The client's request headers.
    pub client_headers: &'a HeaderMap,
    /// The client's address (for X-Forwarded-For).
    pub peer: Option<SocketAddr>,
    /// The client connected over TLS.
    pub client_tls: bool,
    /// A client's upgrade (a health check's is not): pass
    /// `Sec-WebSocket-Extensions`, and hold the backend's answer to what the
    /// client offered.
    pub pass_extensions: bool,
    /// The verified token subject, sent as `X-Auth-Subject`.
    pub subject: Option<&'a str>,
    /// Leave out the client's `Authorization` header: wsproxy consumed it
    /// to authenticate, and the route does not forward the token.
    pub strip_authorization: bool,
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and the handshake headers
/// the proxy generates itself for the backend.
fn not_forwarded(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-accept"
            | "sec-websocket-extensions"
            | "x-auth-subject"
            | "content-length"
    )
}

/// Builds the backend request head.
fn request_head(backend: &Backend, up: &Upgrade<'_>, key: &str) -> String {
    let mut head = String::with_capacity(512);
    let host = if backend.host.contains(':') {
        format!("[{}]", backend.host)
    } else {
        backend.host.clone()
    };
    let default_port = if backend.tls { 443 } else { 80 };
    head.push_str(&format!("GET {} HTTP/1.1\r\n", up.path_and_query));
    if backend.port == default_port {
        head.push_str(&format!("Host: {host}\r\n"));
    } else {
        head.push_str(&format!("Host: {host}:{}\r\n", backend.port));
    }
    head.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n");
    head.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
    // Headers the client listed in Connection are hop-by-hop too.
    let listed: Vec<String> = up
        .client_headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut forwarded_for = None;
    for (name, value) in up.client_headers {
        let n = name.as_str();
        if not_forwarded(n)
            || listed.iter().any(|l| l == n)
            || (up.strip_authorization && n == "authorization")
        {
            continue;
        }
        let Ok(v) = value.to_str() else { continue };
        if n == "x-forwarded-for" {
            forwarded_for = Some(v.to_owned());
            continue;
        }
        if n == "x-forwarded-proto" || n == "x-forwarded-host" {
            continue; // replaced below
        }
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if up.pass_extensions {
        for v in up.client_headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
            if let Ok(v) = v.to_str() {
                head.push_str(&format!("Sec-WebSocket-Extensions: {v}\r\n"));
            }
        }
    }
    if let Some(peer) = up.peer {
        let xff = match forwarded_for {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        head.push_str(&format!("X-Forwarded-For: {xff}\r\n"));
    }
    head.push_str(&format!(
        "X-Forwarded-Proto: {}\r\n",
        if up.client_tls { "https" } else { "http" }
    ));
    if let Some(h) = up
        .client_headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        head.push_str(&format!("X-Forwarded-Host: {h}\r\n"));
    }
    if let Some(sub) = up.subject {
        head.push_str(&format!("X-Auth-Subject: {sub}\r\n"));
    }
    head.push_str("\r\n");
    head
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

/// Reads the backend's response head and checks it ([`check_response`]),
/// reading until the head is complete.
async fn read_response(
    stream: &mut BackendStream,
    backend: &Backend,
    key: &str,
    up: &Upgrade<'_>,
) -> Result<(Agreed, Vec<u8>), DialError> {
    let name = backend.authority();
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|error| DialFailure::Read {
                backend: name.clone(),
                error,
            })?;
        if n == 0 {
            return Err(DialFailure::Closed { backend: name }.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(agreed) = check_response(&buf, key, up, &name)? {
            let leftover = buf.get(agreed.head_len..).unwrap_or_default().to_vec();
            return Ok((agreed, leftover));
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(DialFailure::Oversized { backend: name }.into());
        }
    }
}

/// What a backend's 101 agreed to ([`check_response`]).
#[doc(hidden)]
#[derive(Debug)]
pub struct Agreed {
    /// Length of the response head: what follows it is frames.
    pub head_len: usize,
    /// The backend's `Sec-WebSocket-Protocol`, if any.
    pub protocol: Option<HeaderValue>,
    /// The backend's `Sec-WebSocket-Extensions`, if any (only when
    /// `up.pass_extensions`).
    pub extensions: Option<HeaderValue>,
}

/// Checks what a backend sent so far (`buf`) in answer to the upgrade
/// `up` sent with `key`: `Ok(None)` while its response head is
/// incomplete, or what the 101 agreed to, or why it is refused
/// (`backend` names it in errors). Public for the fuzz target.
#[doc(hidden)]
pub fn check_response(
    buf: &[u8],
    key: &str,
    up: &Upgrade<'_>,
    backend: &str,
) -> Result<Option<Agreed>, DialError> {
    let authority = || backend.to_owned();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    // The head ends where httparse says (it takes bare LF line ends too):
    // the frames start there.
    let end = match response
        .parse(buf)
        .map_err(|error| DialFailure::BadResponse {
            backend: authority(),
            error,
        })? {
        httparse::Status::Complete(end) => end,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    if status != 101 {
        return Err(if (400..500).contains(&status) {
            DialError::Rejected {
                backend: authority(),
                status,
            }
        } else {
            DialFailure::Status {
                backend: authority(),
                status,
            }
            .into()
        });
    }
    let find = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if find("sec-websocket-accept") != Some(expected.as_bytes()) {
        return Err(DialFailure::WrongAccept {
            backend: authority(),
        }
        .into());
    }
    // What the backend agreed to must be among what the client offered, or
    // the client would fail its own handshake check after our 101. (Not for
    // a health check, which offers nothing: a backend that always names its
    // subprotocol is still up.)
    // (Subprotocol names compare exactly and whole: a subprotocol has no
    // parameters, so `chat; x` offers nothing called `chat`. Extension
    // names compare without case and without their parameters.)
    let offered = |name: header::HeaderName| {
        let parameters = name == header::SEC_WEBSOCKET_EXTENSIONS;
        up.client_headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| match t.split_once(';') {
                Some((name, _)) if parameters => name.trim().to_owned(),
                _ => t.trim().to_owned(),
            })
            .collect::<Vec<_>>()
    };
    // Every line counts: extensions may be split over several (RFC 6455
    // 9.1), and the client can be told only one subprotocol.
    let all = |name: &str| -> Vec<&[u8]> {
        response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let protocols = all("sec-websocket-protocol");
    if up.pass_extensions && !protocols.is_empty() {
        let chosen = protocols
            .iter()
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
            .collect::<Vec<_>>()
            .join(", ");
        if protocols.len() > 1 || !offered(header::SEC_WEBSOCKET_PROTOCOL).contains(&chosen) {
            return Err(DialFailure::Subprotocol {
                backend: authority(),
                chosen,
            }
            .into());
        }
    }
    let mut extensions = None;
    if up.pass_extensions {
        let agreed = all("sec-websocket-extensions").join(&b", "[..]);
        let client = offered(header::SEC_WEBSOCKET_EXTENSIONS);
        for ext in String::from_utf8_lossy(&agreed).split(',') {
            let name = ext.split(';').next().unwrap_or("").trim();
            if !name.is_empty() && !client.iter().any(|c| c.eq_ignore_ascii_case(name)) {
                return Err(DialFailure::Extension {
                    backend: authority(),
                    name: name.to_owned(),
                }
                .into());
            }
        }
        if !agreed.is_empty() {
            extensions = HeaderValue::from_bytes(&agreed).ok();
        }
    }
    Ok(Some(Agreed {
        head_len: end,
        protocol: find("sec-websocket-protocol").and_then(|v| HeaderValue::from_bytes(v).ok()),
        extensions,
    }))
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

    #[test]
    fn an_unusable_ca_file_is_named() {
        let dir = std::env::temp_dir().join(format!("wsproxy-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing.pem");
        let Err(err) = tls_connector(Some(&missing)) else {
            panic!("a missing file is refused")
        };
        assert!(matches!(err, CaError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "UPSTREAM_CA_FILE: cannot read {}: ",
                missing.display()
            )),
            "{err}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let Err(err) = tls_connector(Some(&empty)) else {
            panic!("a file without certificates is refused")
        };
        assert_eq!(
            err.to_string(),
            format!(
                "UPSTREAM_CA_FILE: {} holds no PEM certificate",
                empty.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn client_upgrade(headers: &HeaderMap) -> Upgrade<'_> {
        Upgrade {
            path_and_query: "/",
            client_headers: headers,
            peer: None,
            client_tls: false,
            pass_extensions: true,
            subject: None,
            strip_authorization: false,
        }
    }

    /// Found by the upgrade_response fuzz target: a head with bare LF line
    /// ends (which httparse reads, as RFC 9112 allows) was taken to end at
    /// the first CRLFCRLF, inside the frames after it, which were lost.
    #[test]
    fn the_frames_start_where_the_head_ends() {
        let headers = HeaderMap::new();
        let up = client_upgrade(&headers);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade\nSec-WebSocket-Accept: {ACCEPT}\n\n"
        );
        let frame = b"\x81\x04\r\n\r\n";
        let buf = [head.as_bytes(), frame].concat();
        let agreed = check_response(&buf, KEY, &up, "b:1")
            .expect("a 101")
            .expect("complete");
        assert_eq!(&buf[agreed.head_len..], frame);
        // Without frames after it, such a head is complete too.
        let agreed = check_response(head.as_bytes(), KEY, &up, "b:1")
            .expect("a 101")
            .expect("complete");
        assert_eq!(agreed.head_len, head.len());
        // And a CRLF head still ends at its blank line.
        let crlf = head.replace('\n', "\r\n");
        let buf = [crlf.as_bytes(), frame].concat();
        let agreed = check_response(&buf, KEY, &up, "b:1")
            .expect("a 101")
            .expect("complete");
        assert_eq!(agreed.head_len, crlf.len());
        assert!(matches!(
            check_response(&buf[..crlf.len() - 1], KEY, &up, "b:1"),
            Ok(None)
        ));
    }

    /// Found by the upgrade_response fuzz target: only the first
    /// `Sec-WebSocket-Extensions` line of a 101 was checked and passed on,
    /// so an extension the backend agreed to on a second line (RFC 6455
    /// 9.1 lets it split them) was unknown to the client, or not offered.
    #[test]
    fn every_line_of_what_the_backend_agreed_to_counts() {
        let answer = |lines: &[&str]| {
            let mut head =
                format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {ACCEPT}\r\n");
            for l in lines {
                head.push_str(l);
                head.push_str("\r\n");
            }
            head + "\r\n"
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate, x-foo"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, superchat"),
        );
        let up = client_upgrade(&headers);
        let two = answer(&[
            "Sec-WebSocket-Extensions: x-foo",
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover",
        ]);
        let agreed = check_response(two.as_bytes(), KEY, &up, "b:1")
            .expect("both offered")
            .expect("complete");
        assert_eq!(
            agreed.extensions.expect("passed on"),
            "x-foo, permessage-deflate; server_no_context_takeover"
        );
        let mut only_foo = HeaderMap::new();
        only_foo.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("x-foo"),
        );
        let err = check_response(two.as_bytes(), KEY, &client_upgrade(&only_foo), "b:1")
            .expect_err("permessage-deflate was not offered");
        assert!(
            matches!(&err, DialError::Refused(DialFailure::Extension { name, .. }) if name == "permessage-deflate"),
            "{err}"
        );
        // Two subprotocols: the client could only be told one.
        let both = answer(&[
            "Sec-WebSocket-Protocol: chat",
            "Sec-WebSocket-Protocol: superchat",
        ]);
        let err = check_response(both.as_bytes(), KEY, &up, "b:1").expect_err("two subprotocols");
        assert!(
            matches!(&err, DialError::Refused(DialFailure::Subprotocol { .. })),
            "{err}"
        );
        // A subprotocol has no parameters: `superchat; x` (not a token)
        // does not offer `superchat` (found by the upgrade_response fuzzer).
        let mut odd = HeaderMap::new();
        odd.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, superchat; server_no_context_takeover"),
        );
        let superchat = answer(&["Sec-WebSocket-Protocol: superchat"]);
        let err = check_response(superchat.as_bytes(), KEY, &client_upgrade(&odd), "b:1")
            .expect_err("superchat was not offered as such");
        assert!(
            matches!(&err, DialError::Refused(DialFailure::Subprotocol { chosen, .. }) if chosen == "superchat"),
            "{err}"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_forwarding_headers_added() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("gw.example"));
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("origin", HeaderValue::from_static("https://app.example"));
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("chat, superchat"),
        );
        h.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let backend = Backend {
            tls: false,
            host: "127.0.0.1".into(),
            port: 3000,
            weight: 1,
            name: "0".into(),
        };
        let up = Upgrade {
            path_and_query: "/ws?room=1",
            client_headers: &h,
            peer: Some("192.0.2.7:5555".parse().expect("addr")),
            client_tls: false,
            pass_extensions: true,
            subject: Some("alice"),
            strip_authorization: false,
        };
        let head = request_head(&backend, &up, "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(
            head.starts_with("GET /ws?room=1 HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"),
            "{head}"
        );
        for present in [
            "origin: https://app.example",
            "sec-websocket-protocol: chat, superchat",
            "Sec-WebSocket-Extensions: permessage-deflate",
            "X-Forwarded-For: 10.0.0.1, 192.0.2.7",
            "X-Forwarded-Proto: http",
            "X-Forwarded-Host: gw.example",
            "X-Auth-Subject: alice",
        ] {
            assert!(head.contains(present), "{present} missing:\n{head}");
        }
        for absent in ["x-secret-hop", "keep-alive", "gw.example\r\nHost"] {
            assert!(!head.contains(absent), "{absent} leaked:\n{head}");
        }
    }
}
