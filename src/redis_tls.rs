//! TLS to Redis (`rediss://`): the certificates the Redis client trusts and
//! presents, read and checked once at start-up so that a bad file stops
//! wsproxy with one line naming its variable instead of failing every
//! reconnection.
//!
//! Redis's certificate is always checked: against the system's roots plus
//! the CA certificates of `REDIS_CA_FILE`, and for the host name of the URL
//! (on a cluster, of each node's address as the cluster announces it).
//! (`#insecure` URLs are refused by [`crate::config`].) With
//! `REDIS_CLIENT_CERT_FILE` and `REDIS_CLIENT_KEY_FILE` wsproxy presents a
//! client certificate (Redis's `tls-auth-clients yes`).
//!
//! The redis crate takes its roots as one PEM bundle that replaces the
//! system's, so the bundle holds both. Its TLS is rustls with the process's
//! default crypto provider; [`certificates`] installs `ring`, the provider
//! the rest of wsproxy uses, unless the process has one already.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::RedisTlsConfig;

/// A TLS file for Redis that cannot be used. Each message starts with the
/// variable that names the file.
#[derive(Debug, thiserror::Error)]
pub enum RedisTlsError {
    /// The file could not be read.
    #[error("{var}: cannot read {}: {source}", path.display())]
    Read {
        /// The variable that names the file.
        var: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not valid PEM, or holds no item of the kind expected.
    #[error("{var}: {} holds no valid PEM {what}: {source}", path.display())]
    Pem {
        /// The variable that names the file.
        var: &'static str,
        /// The configured path.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// What the PEM parser found wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate of the CA file cannot be a trust anchor.
    #[error("REDIS_CA_FILE: {} holds a certificate that cannot be a trusted CA: {source}", path.display())]
    Anchor {
        /// The configured path.
        path: PathBuf,
        /// Why rustls refused it.
        source: rustls::Error,
    },
    /// The client key is unusable or does not match the certificate.
    #[error("REDIS_CLIENT_KEY_FILE: {} cannot be used with REDIS_CLIENT_CERT_FILE {}: {source}", key.display(), cert.display())]
    ClientKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls refused them.
        source: rustls::Error,
    },
    /// Nothing to check Redis's certificate against.
    #[error(
        "REDIS_CA_FILE: Redis is reached with rediss:// but the system has no trusted CA \
         certificates; set REDIS_CA_FILE to the CA that signed Redis's certificate"
    )]
    NoRoots,
}

/// What [`certificates`] reads: the trusted roots as one PEM bundle, and
/// the client certificate and key as the files hold them.
pub fn certificates(config: &RedisTlsConfig) -> Result<redis::TlsCertificates, RedisTlsError> {
    // The redis crate builds its rustls configuration with the process's
    // default provider; without one installed, rustls picks it from its
    // crate features and panics if that is ambiguous. An error means the
    // process installed one already, which is then used.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let mut bundle = Vec::new();
    // The system's roots, as the reverse proxy takes them: one unreadable
    // store or certificate does not stop start-up.
    for cert in rustls_native_certs::load_native_certs().certs {
        if roots.add(cert.clone()).is_ok() {
            push_pem(&mut bundle, &cert);
        }
    }
    if let Some(path) = &config.ca_file {
        let pem = read("REDIS_CA_FILE", path)?;
        for cert in certs("REDIS_CA_FILE", path, &pem)? {
            roots
                .add(cert.clone())
                .map_err(|source| RedisTlsError::Anchor {
                    path: path.clone(),
                    source,
                })?;
            push_pem(&mut bundle, &cert);
        }
    }
    if roots.is_empty() {
        return Err(RedisTlsError::NoRoots);
    }
    let client_tls = match &config.client_cert {
        None => None,
        Some((cert_path, key_path)) => {
            let client_cert = read("REDIS_CLIENT_CERT_FILE", cert_path)?;
            let chain = certs("REDIS_CLIENT_CERT_FILE", cert_path, &client_cert)?;
            let client_key = read("REDIS_CLIENT_KEY_FILE", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&client_key).map_err(|source| {
                RedisTlsError::Pem {
                    var: "REDIS_CLIENT_KEY_FILE",
                    path: key_path.clone(),
                    what: "private key",
                    source,
                }
            })?;
            // The key parses with the provider and matches the certificate.
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|source| {
                RedisTlsError::ClientKey {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    source,
                }
            })?;
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert: Some(bundle),
    })
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, RedisTlsError> {
    std::fs::read(path).map_err(|source| RedisTlsError::Read {
        var,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate of a PEM file; at least one.
fn certs(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, RedisTlsError> {
    let error = |source| RedisTlsError::Pem {
        var,
        path: path.to_owned(),
        what: "certificate",
        source,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    if certs.is_empty() {
        return Err(error(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// Appends `cert` to a PEM bundle.
fn push_pem(bundle: &mut Vec<u8>, cert: &CertificateDer<'_>) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        bundle.extend_from_slice(line);
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_is_pem_that_parses_back() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let mut bundle = Vec::new();
        push_pem(&mut bundle, cert.cert.der());
        push_pem(&mut bundle, cert.cert.der());
        let back = certs("REDIS_CA_FILE", Path::new("x"), &bundle).expect("parses");
        assert_eq!(back, vec![cert.cert.der().clone(), cert.cert.der().clone()]);
        assert_eq!(String::from_utf8_lossy(&bundle), cert.cert.pem().repeat(2));
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let e = certs("REDIS_CA_FILE", Path::new("ca.pem"), b"hello\n").expect_err("no PEM");
        assert!(
            e.to_string()
                .starts_with("REDIS_CA_FILE: ca.pem holds no valid PEM certificate"),
            "{e}"
        );
    }
}
