//! TLS for `wss://` backends: the client configuration (the system's
//! roots plus an optional CA file) and the stream, plain or TLS.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
