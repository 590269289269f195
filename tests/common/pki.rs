//! Certificates for tests of TLS to Redis: a CA, a certificate for Redis
//! (127.0.0.1 and localhost) and one for wsproxy as a client, made with
//! rcgen as PEM files in a directory of their own, removed on drop.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use wsproxy::config::RedisTlsConfig;

use super::unique;

/// A CA and the certificates it signed: `ca.pem`, `server.pem`/`server.key`
/// and `client.pem`/`client.key`.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("redis-tls"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "wsproxy test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        let leaf = |names: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>, name: &str| {
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = usages;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("signed");
            (cert.pem(), key.serialize_pem())
        };
        // Redis's certificate is a client's too: the nodes of a cluster
        // present it to each other (cluster bus, replication), which
        // `tls-auth-clients yes` checks for client use.
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            "redis",
        );
        let (client_cert, client_key) =
            leaf(vec![], vec![ExtendedKeyUsagePurpose::ClientAuth], "wsproxy");
        let pki = Pki { dir };
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server_cert),
            ("server.key", server_key),
            ("client.pem", client_cert),
            ("client.key", client_key),
        ] {
            std::fs::write(pki.path(name), pem).expect("write pem");
        }
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read pem")
    }

    /// What wsproxy is given: the CA, and the client certificate if asked.
    pub fn config(&self, client_cert: bool) -> RedisTlsConfig {
        RedisTlsConfig {
            ca_file: Some(self.path("ca.pem")),
            client_cert: client_cert.then(|| (self.path("client.pem"), self.path("client.key"))),
        }
    }

    /// The tests' own Redis clients: trust the CA, present the client
    /// certificate (Redis ignores it unless it asks for one).
    pub fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: self.read("client.pem"),
                client_key: self.read("client.key"),
            }),
            root_cert: Some(self.read("ca.pem")),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
