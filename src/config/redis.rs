//! Where Redis is: the TLS files of a `rediss://` URL, or a Redis Cluster in
//! place of `REDIS_URL`.

use super::parse::path;
use super::{Cli, ConfigError};

/// The default `REDIS_URL`: also how "not set" is told when
/// `REDIS_CLUSTER_NODES` is.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Files for TLS to Redis (`rediss://` URLs), read at start-up by
/// [`crate::redis_tls`]. Both empty: the system's roots alone, no client
/// certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTlsConfig {
    /// PEM CA certificates trusted besides the system's roots
    /// (`REDIS_CA_FILE`).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain and private key presented to Redis (mutual
    /// TLS: `REDIS_CLIENT_CERT_FILE`, `REDIS_CLIENT_KEY_FILE`).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// How a Redis Cluster carries wsproxy's channels (`REDIS_CLUSTER_PUBSUB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterPubSub {
    /// `SPUBLISH`/`SSUBSCRIBE` (Redis 7): each channel lives in its slot's
    /// shard, so a message travels to one shard only. The default.
    Sharded,
    /// `PUBLISH`/`SUBSCRIBE`: every message is broadcast to every node, for
    /// backends that keep `PUBLISH`.
    Classic,
}

/// A Redis Cluster (`REDIS_CLUSTER_NODES`), in place of `REDIS_URL`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Seed node URLs (`redis://host:port`, or all `rediss://` for TLS), already parsed; wsproxy learns
    /// the rest of the cluster from them.
    pub nodes: Vec<String>,
    /// Sharded or classic pub/sub.
    pub pubsub: ClusterPubSub,
}

impl std::fmt::Debug for ClusterConfig {
    // The URLs may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(|n| redact_url(n)).collect();
        f.debug_struct("ClusterConfig")
            .field("nodes", &nodes)
            .field("pubsub", &self.pubsub)
            .finish()
    }
}

/// Hides the password of a URL (`redis://user:secret@host` becomes
/// `redis://user:***@host`) so error messages can be logged safely.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

impl Cli {
    /// The Redis Cluster settings, when `REDIS_CLUSTER_NODES` is set.
    pub(super) fn redis_cluster(&self) -> Result<Option<ClusterConfig>, ConfigError> {
        let pubsub = match self
            .redis_cluster_pubsub
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "sharded" | "" => ClusterPubSub::Sharded,
            "classic" => ClusterPubSub::Classic,
            _ => {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER_PUBSUB",
                    format!(
                        "{:?} is not a pub/sub mode (expected sharded or classic)",
                        self.redis_cluster_pubsub
                    ),
                ));
            }
        };
        let Some(raw) = self.redis_cluster_nodes.as_deref() else {
            return Ok(None);
        };
        let nodes: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                "names no node (expected e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379)",
            ));
        }
        if self.redis_url.trim() != DEFAULT_REDIS_URL {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                "cannot be used with REDIS_URL: set one of them",
            ));
        }
        for node in &nodes {
            use redis::IntoConnectionInfo;
            let bad = |why: String| {
                ConfigError::new(
                    "REDIS_CLUSTER_NODES",
                    format!("{:?} is not a Redis node URL: {why}", redact_url(node)),
                )
            };
            if !node.starts_with("redis://") && !node.starts_with("rediss://") {
                return Err(bad(
                    "expected redis://host:port or rediss://host:port".into()
                ));
            }
            let info = node
                .as_str()
                .into_connection_info()
                .map_err(|e| bad(e.to_string()))?;
            if let ::redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER_NODES",
                    format!(
                        "{:?}: #insecure would turn off the checks of Redis's certificate, which \
                         wsproxy never does; trust a private CA with REDIS_CA_FILE instead",
                        redact_url(node)
                    ),
                ));
            }
        }
        // The redis crate gives every node of the cluster the TLS mode of
        // one client, and checks the seeds against it only when it took
        // that mode from the first seed (not once certificates are given):
        // a mixed list would half fail at run time, so it stops start-up.
        let tls = |n: &String| n.starts_with("rediss://");
        if nodes.iter().any(tls) && !nodes.iter().all(tls) {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_NODES",
                "mixes redis:// and rediss:// seeds: every node of a cluster is reached \
                 the same way, so use one scheme for all",
            ));
        }
        redis::cluster::ClusterClient::new(nodes.clone()).map_err(|e| {
            ConfigError::new(
                "REDIS_CLUSTER_NODES",
                format!("the seed nodes are refused: {e}"),
            )
        })?;
        Ok(Some(ClusterConfig { nodes, pubsub }))
    }

    /// The TLS files for Redis. They belong to a `rediss://` URL only, the
    /// certificate and key go together, and `#insecure` (no certificate
    /// checks) is refused. The files themselves are read by
    /// [`crate::redis_tls`] at start-up.
    pub(super) fn redis_tls(
        &self,
        addr: &redis::ConnectionAddr,
    ) -> Result<RedisTlsConfig, ConfigError> {
        let tls = RedisTlsConfig {
            ca_file: path(&self.redis_ca_file),
            client_cert: match (
                path(&self.redis_client_cert_file),
                path(&self.redis_client_key_file),
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConfigError::new(
                        "REDIS_CLIENT_KEY_FILE",
                        "is required when REDIS_CLIENT_CERT_FILE is set",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        "REDIS_CLIENT_CERT_FILE",
                        "is required when REDIS_CLIENT_KEY_FILE is set",
                    ));
                }
            },
        };
        match addr {
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => Err(ConfigError::new(
                "REDIS_URL",
                format!(
                    "{:?}: #insecure would turn off the checks of Redis's certificate, which \
                     wsproxy never does; trust a private CA with REDIS_CA_FILE instead",
                    redact_url(&self.redis_url)
                ),
            )),
            redis::ConnectionAddr::TcpTls { .. } => Ok(tls),
            _ => {
                // On a cluster the files belong to `rediss://` seeds. One
                // such seed is enough here: a list that mixes schemes is
                // refused by `redis_cluster`, with its own message.
                let nodes = self.redis_cluster_nodes.as_deref();
                if nodes.is_some_and(|n| n.split(',').any(|n| n.trim().starts_with("rediss://"))) {
                    return Ok(tls);
                }
                let set = [
                    ("REDIS_CA_FILE", tls.ca_file.is_some()),
                    ("REDIS_CLIENT_CERT_FILE", tls.client_cert.is_some()),
                ];
                let why = if nodes.is_some() {
                    "is set, but REDIS_CLUSTER_NODES does not use TLS: use rediss://host:port \
                     seeds, or unset it"
                } else {
                    "is set, but REDIS_URL does not use TLS: use rediss://host:port, or unset it"
                };
                match set.iter().find(|(_, is_set)| *is_set) {
                    Some((var, _)) => Err(ConfigError::new(var, why)),
                    None => Ok(tls),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn bad_redis_url_is_refused() {
        let e = parse(&["--redis-url", "http://nope"]).expect_err("not redis");
        assert_eq!(e.var, "REDIS_URL");
        assert!(e.to_string().contains("http://nope"), "{e}");
    }

    #[test]
    fn redis_tls_files_need_a_rediss_url_and_go_in_pairs() {
        let ok = parse(&[
            "--redis-url",
            "rediss://:pw@h:6380",
            "--redis-ca-file",
            "/ca.pem",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect("rediss with both files");
        assert_eq!(ok.redis_tls.ca_file, Some("/ca.pem".into()));
        assert_eq!(
            ok.redis_tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        assert_eq!(
            parse(&[]).expect("defaults").redis_tls,
            RedisTlsConfig::default()
        );
        let e = parse(&["--redis-ca-file", "/ca.pem"]).expect_err("redis:// with a CA");
        assert_eq!(e.var, "REDIS_CA_FILE");
        let e = parse(&[
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect_err("redis:// with a client certificate");
        assert_eq!(e.var, "REDIS_CLIENT_CERT_FILE");
        let e = parse(&[
            "--redis-url",
            "rediss://h",
            "--redis-client-cert-file",
            "/c.pem",
        ])
        .expect_err("no key");
        assert_eq!(e.var, "REDIS_CLIENT_KEY_FILE");
        let e = parse(&[
            "--redis-url",
            "rediss://h",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect_err("no certificate");
        assert_eq!(e.var, "REDIS_CLIENT_CERT_FILE");
        let e = parse(&["--redis-url", "rediss://:pw@h:6380/#insecure"]).expect_err("insecure");
        assert_eq!(e.var, "REDIS_URL");
        assert!(e.to_string().contains("#insecure"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn cluster_nodes_are_validated_and_exclude_redis_url() {
        let c = parse(&[
            "--redis-cluster-nodes",
            "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
        ])
        .expect("valid seeds");
        let cluster = c.redis_cluster.clone().expect("a cluster");
        assert_eq!(
            cluster.nodes,
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(cluster.pubsub, ClusterPubSub::Sharded);
        assert_eq!(c.keys(), crate::keys::Keys::ClusterSharded);
        let c = parse(&[
            "--redis-cluster-nodes",
            "redis://h:7000",
            "--redis-cluster-pubsub",
            "Classic",
        ])
        .expect("classic");
        assert_eq!(c.keys(), crate::keys::Keys::ClusterClassic);
        assert_eq!(
            parse(&[]).expect("default").keys(),
            crate::keys::Keys::Standalone
        );
        for (args, var) in [
            (vec!["--redis-cluster-nodes", " , "], "REDIS_CLUSTER_NODES"),
            (
                vec!["--redis-cluster-nodes", "http://h:1"],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec!["--redis-cluster-nodes", "redis://h:port"],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec![
                    "--redis-cluster-nodes",
                    "redis://h:1",
                    "--redis-url",
                    "redis://o:2",
                ],
                "REDIS_CLUSTER_NODES",
            ),
            (
                vec!["--redis-cluster-pubsub", "both"],
                "REDIS_CLUSTER_PUBSUB",
            ),
        ] {
            let e = parse(&args).expect_err(&format!("{args:?}"));
            assert_eq!(e.var, var, "{e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
        let e = parse(&["--redis-cluster-nodes", "redis://:pw@h:notaport"]).expect_err("bad");
        assert!(!e.to_string().contains("pw"), "{e}");
        let c = parse(&["--redis-cluster-nodes", "redis://:pw@h:1"]).expect("with password");
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn cluster_seeds_may_use_tls_with_the_redis_tls_files() {
        let c = parse(&[
            "--redis-cluster-nodes",
            "rediss://:pw@127.0.0.1:7000,rediss://:pw@127.0.0.1:7001",
            "--redis-ca-file",
            "/ca.pem",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect("rediss:// seeds with the TLS files");
        let cluster = c.redis_cluster.clone().expect("a cluster");
        assert_eq!(
            cluster.nodes,
            ["rediss://:pw@127.0.0.1:7000", "rediss://:pw@127.0.0.1:7001"]
        );
        assert_eq!(c.redis_tls.ca_file, Some("/ca.pem".into()));
        assert_eq!(
            c.redis_tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        // The system's roots alone: no file needed.
        parse(&["--redis-cluster-nodes", "rediss://h:7000"]).expect("rediss:// seed alone");
    }

    #[test]
    fn cluster_seeds_that_mix_schemes_are_refused() {
        for nodes in ["redis://h:1,rediss://h:2", "rediss://h:1, redis://h:2"] {
            for extra in [&[][..], &["--redis-ca-file", "/ca.pem"][..]] {
                let mut args = vec!["--redis-cluster-nodes", nodes];
                args.extend_from_slice(extra);
                let e = parse(&args).expect_err(nodes);
                assert_eq!(e.var, "REDIS_CLUSTER_NODES", "{e}");
                let text = e.to_string();
                assert!(text.starts_with("REDIS_CLUSTER_NODES: mixes"), "{text}");
                assert!(!text.contains('\n'), "one line: {text}");
            }
        }
    }

    #[test]
    fn insecure_cluster_seeds_are_refused() {
        let e = parse(&[
            "--redis-cluster-nodes",
            "rediss://:pw@h:1,rediss://:pw@h:2/#insecure",
        ])
        .expect_err("#insecure");
        assert_eq!(e.var, "REDIS_CLUSTER_NODES");
        assert!(e.to_string().contains("#insecure"), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }

    #[test]
    fn redis_tls_files_need_tls_cluster_seeds() {
        let e = parse(&[
            "--redis-cluster-nodes",
            "redis://h:1",
            "--redis-ca-file",
            "/ca.pem",
        ])
        .expect_err("redis:// seeds with a CA");
        assert_eq!(e.var, "REDIS_CA_FILE");
        assert!(e.to_string().contains("REDIS_CLUSTER_NODES"), "{e}");
        let e = parse(&[
            "--redis-cluster-nodes",
            "redis://h:1",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect_err("redis:// seeds with a client certificate");
        assert_eq!(e.var, "REDIS_CLIENT_CERT_FILE");
        assert!(e.to_string().contains("REDIS_CLUSTER_NODES"), "{e}");
        // The pairing rule holds on a cluster too.
        let e = parse(&[
            "--redis-cluster-nodes",
            "rediss://h:1",
            "--redis-client-cert-file",
            "/c.pem",
        ])
        .expect_err("no key");
        assert_eq!(e.var, "REDIS_CLIENT_KEY_FILE");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        let e = parse(&["--redis-url", "redis://:pw@h:notaport"]).expect_err("bad port");
        assert!(!e.to_string().contains("pw"), "{e}");
    }
}
