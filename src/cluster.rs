//! What wsproxy knows of a Redis Cluster, shared by its two kinds of
//! cluster connections (the command connection, [`crate::redis_conn`], and
//! the broker's sharded pub/sub): where the cluster is reached
//! ([`Seeds`]), which master serves which slots ([`Topology`], read from
//! `CLUSTER SHARDS` by [`Seeds::read_topology`]), a key's slot
//! ([`slot_of`]), and which errors mean the cluster is in motion
//! ([`in_motion`]).
//!
//! Both connections keep their own copy of the map and read it again when
//! Redis tells them it changed; neither uses the redis crate's cluster
//! client (see [`crate::redis_conn`] for why).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo, Value};

/// Where the cluster is reached, and how.
pub struct Seeds {
    /// The seeds' connection settings (one per seed URL that parses).
    infos: Vec<redis::ConnectionInfo>,
    /// For `rediss://` seeds: the certificates of every connection.
    tls: Option<redis::TlsCertificates>,
}

impl std::fmt::Debug for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URLs: they may hold a password.
        f.debug_struct("Seeds")
            .field("seeds", &self.infos.len())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Seeds {
    /// The seeds `urls` (those that parse), with `tls` for `rediss://`.
    pub fn new(urls: &[String], tls: Option<redis::TlsCertificates>) -> Self {
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let infos = urls
            .iter()
            .filter_map(|url| url.as_str().into_connection_info().ok())
            // Nagle's algorithm off, as on every connection of wsproxy's
            // (see `crate::server::redis_client`).
            .map(|info| info.set_tcp_settings(tcp.clone()))
            .collect();
        Self { infos, tls }
    }

    /// How many seeds parsed.
    pub fn count(&self) -> usize {
        self.infos.len()
    }

    /// The seeds are `rediss://`.
    pub fn uses_tls(&self) -> bool {
        self.infos
            .first()
            .is_some_and(|i| matches!(i.addr(), ConnectionAddr::TcpTls { .. }))
    }

    /// A client for the node at `host:port`, with the seeds' credentials
    /// and TLS settings, speaking `protocol`.
    pub fn client(
        &self,
        host: &str,
        port: u16,
        protocol: redis::ProtocolVersion,
    ) -> redis::RedisResult<redis::Client> {
        let Some(seed) = self.infos.first() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no Redis Cluster seed is configured",
            )));
        };
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let settings = seed.redis_settings().clone().set_protocol(protocol);
        let info = seed.clone().set_addr(addr).set_redis_settings(settings);
        match &self.tls {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        }
    }

    /// `host:port` of every seed.
    pub fn addrs(&self) -> Vec<(String, u16)> {
        self.infos
            .iter()
            .filter_map(|i| match i.addr() {
                ConnectionAddr::Tcp(h, p)
                | ConnectionAddr::TcpTls {
                    host: h, port: p, ..
                } => Some((h.clone(), *p)),
                _ => None,
            })
            .collect()
    }
}

/// Which master serves which slots (a `CLUSTER SHARDS` reply, read).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Topology {
    /// `(first slot, last slot, master as host:port)`, sorted.
    pub ranges: Vec<(u16, u16, Arc<str>)>,
}

impl Topology {
    pub fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        let i = self.ranges.partition_point(|(_, last, _)| *last < slot);
        match self.ranges.get(i) {
            Some((first, _, node)) if *first <= slot => Some(node),
            _ => None,
        }
    }

    pub fn masters(&self) -> HashSet<Arc<str>> {
        self.ranges.iter().map(|(_, _, n)| n.clone()).collect()
    }

    /// Reads a `CLUSTER SHARDS` reply (RESP2 arrays of alternating keys
    /// and values, or RESP3 maps): each shard's slot ranges and its
    /// master, if it has a healthy one. `tls`: the master's `tls-port` is
    /// where to connect.
    pub fn from_shards(reply: &Value, tls: bool) -> Option<Topology> {
        let Value::Array(shards) = reply else {
            return None;
        };
        let mut ranges = Vec::new();
        for shard in shards {
            let fields = pairs(shard);
            let slots = fields.iter().find(|(k, _)| *k == "slots").map(|(_, v)| *v);
            let nodes = fields.iter().find(|(k, _)| *k == "nodes").map(|(_, v)| *v);
            let (Some(Value::Array(slots)), Some(Value::Array(nodes))) = (slots, nodes) else {
                continue;
            };
            let master = nodes.iter().find_map(|node| {
                let node = pairs(node);
                let text = |key: &str| {
                    node.iter()
                        .find(|(k, _)| *k == key)
                        .and_then(|(_, v)| text(v))
                };
                let int = |key: &str| {
                    node.iter()
                        .find(|(k, _)| *k == key)
                        .and_then(|(_, v)| int(v))
                };
                if text("role")? != "master" || text("health")? != "online" {
                    return None;
                }
                let host = match text("endpoint") {
                    Some(e) if !e.is_empty() && e != "?" => e,
                    _ => text("ip")?,
                };
                let port = int(if tls { "tls-port" } else { "port" })?;
                let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
                Some(Arc::<str>::from(format!("{host}:{port}")))
            });
            let Some(master) = master else { continue };
            for pair in slots.chunks(2) {
                if let [first, last] = pair
                    && let (Some(first), Some(last)) = (int(first), int(last))
                    && let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last))
                    && first <= last
                {
                    ranges.push((first, last, master.clone()));
                }
            }
        }
        ranges.sort();
        Some(Topology { ranges })
    }
}

/// The key/value pairs of a map (RESP3) or of a flat array of alternating
/// keys and values (RESP2).
fn pairs(v: &Value) -> Vec<(&str, &Value)> {
    match v {
        Value::Map(m) => m.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
        Value::Array(a) => a
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((text(k)?, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A bulk or simple string as text.
pub fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// The hash slot of `key` (CRC16 of its hash tag, or of all of it, modulo
/// 16384), as Redis Cluster computes it (the redis crate keeps the number
/// to itself).
pub fn slot_of(key: impl AsRef<[u8]>) -> u16 {
    let key = key.as_ref();
    let tag = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = key.get(open + 1..)?;
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
}

/// `host:port` split (the port after the last colon).
pub fn split_addr(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

impl Seeds {
    /// The slot map, read with `CLUSTER SHARDS` from a master of `known`
    /// (the map in use), else from a seed, each given `limit` to answer;
    /// with whether it covers every slot (a node that lost its view of
    /// the cluster may report a map with holes: a complete one from
    /// another node is preferred). `None` when no node answered.
    pub async fn read_topology(
        &self,
        known: Option<&Topology>,
        limit: Duration,
    ) -> Option<(Topology, bool)> {
        let tls = self.uses_tls();
        let mut candidates: Vec<(String, u16)> = Vec::new();
        if let Some(t) = known {
            for m in t.masters() {
                if let Some((h, p)) = split_addr(&m) {
                    candidates.push((h.to_owned(), p));
                }
            }
        }
        for seed in self.addrs() {
            if !candidates.contains(&seed) {
                candidates.push(seed);
            }
        }
        let mut partial = None;
        for (host, port) in candidates {
            let Ok(client) = self.client(&host, port, redis::ProtocolVersion::RESP2) else {
                continue;
            };
            let read = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("CLUSTER")
                    .arg("SHARDS")
                    .query_async::<Value>(&mut conn)
                    .await
            };
            let reply = match tokio::time::timeout(limit, read).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => {
                    tracing::debug!(node = %format!("{host}:{port}"), error = %e, "CLUSTER SHARDS failed");
                    continue;
                }
                Err(_) => continue,
            };
            let Some(topology) = Topology::from_shards(&reply, tls) else {
                continue;
            };
            if topology.is_complete() {
                return Some((topology, true));
            }
            partial.get_or_insert(topology);
        }
        partial.map(|t| (t, false))
    }
}

impl Topology {
    /// Every slot has a master.
    pub fn is_complete(&self) -> bool {
        let covered: u32 = self
            .ranges
            .iter()
            .map(|(f, l, _)| u32::from(*l) - u32::from(*f) + 1)
            .sum();
        covered == 16384
    }
}

/// An error that means the cluster is in motion: the slot is served
/// elsewhere (`MOVED`, `ASK`) or not served right now (`CLUSTERDOWN`,
/// `TRYAGAIN`, `LOADING`, `MASTERDOWN`). Redis did not run the command;
/// reading the map again and retrying is safe. (By kind: the error's text
/// reads `ClusterDown: ...`, not the code Redis sent.)
pub fn in_motion(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as K};
    matches!(
        error.kind(),
        ErrorKind::Server(
            K::Moved | K::Ask | K::ClusterDown | K::TryAgain | K::BusyLoading | K::MasterDown
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(role: &str, port: i64, health: &str) -> Value {
        Value::Array(vec![
            bulk("id"),
            bulk("abc"),
            bulk("port"),
            Value::Int(port),
            bulk("tls-port"),
            Value::Int(port + 1000),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("health"),
            bulk(health),
        ])
    }

    fn shard(slots: &[i64], nodes: Vec<Value>) -> Value {
        Value::Array(vec![
            bulk("slots"),
            Value::Array(slots.iter().map(|s| Value::Int(*s)).collect()),
            bulk("nodes"),
            Value::Array(nodes),
        ])
    }

    #[test]
    fn a_shards_reply_gives_each_slot_its_healthy_master() {
        let reply = Value::Array(vec![
            shard(
                &[0, 5460, 10923, 10999],
                vec![
                    node("replica", 7004, "online"),
                    node("master", 7001, "online"),
                ],
            ),
            shard(&[5461, 10922], vec![node("master", 7002, "online")]),
            // A failed master: its slots have no owner until a promotion.
            shard(&[11000, 16383], vec![node("master", 7003, "fail")]),
        ]);
        let t = Topology::from_shards(&reply, false).expect("parsed");
        assert_eq!(t.owner(0).map(|n| &**n), Some("127.0.0.1:7001"));
        assert_eq!(t.owner(5460).map(|n| &**n), Some("127.0.0.1:7001"));
        assert_eq!(t.owner(5461).map(|n| &**n), Some("127.0.0.1:7002"));
        assert_eq!(t.owner(10999).map(|n| &**n), Some("127.0.0.1:7001"));
        assert_eq!(t.owner(11000), None);
        assert_eq!(t.owner(16383), None);
        assert_eq!(t.masters().len(), 2);
        assert!(!t.is_complete());
        let tls = Topology::from_shards(&reply, true).expect("parsed");
        assert_eq!(tls.owner(0).map(|n| &**n), Some("127.0.0.1:8001"));
        let whole = Value::Array(vec![shard(
            &[0, 16383],
            vec![node("master", 7001, "online")],
        )]);
        assert!(
            Topology::from_shards(&whole, false)
                .expect("parsed")
                .is_complete()
        );
    }

    #[test]
    fn resp3_maps_read_as_arrays_do() {
        let map = |v: Value| match v {
            Value::Array(a) => Value::Map(
                a.chunks(2)
                    .map(|kv| (kv[0].clone(), kv[1].clone()))
                    .collect(),
            ),
            other => other,
        };
        let n = map(node("master", 7001, "online"));
        let s = map(shard(&[0, 16383], vec![n]));
        let t = Topology::from_shards(&Value::Array(vec![s]), false).expect("parsed");
        assert_eq!(t.owner(9000).map(|n| &**n), Some("127.0.0.1:7001"));
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Known values (CLUSTER KEYSLOT): hash tags count, an empty tag
        // does not.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("foo{}{bar}"), slot_of("foo{}{bar}"));
        assert_ne!(slot_of("foo{}{bar}"), slot_of("bar"));
        for key in ["session:{abc}:down", "wsproxy:control", "x", ""] {
            assert_eq!(
                redis::cluster_routing::Slot::for_key(key.as_bytes()),
                redis::cluster_routing::Slot::new(slot_of(key)).expect("in range"),
                "{key}"
            );
        }
    }

    #[test]
    fn errors_of_a_cluster_in_motion_are_told_apart() {
        let error = |wire: &str| -> redis::RedisError {
            match redis::parse_redis_value(wire.as_bytes()) {
                Ok(Value::ServerError(e)) => e.into(),
                other => panic!("{wire:?}: {other:?}"),
            }
        };
        for e in [
            "-MOVED 3999 127.0.0.1:6381\r\n",
            "-ASK 3999 127.0.0.1:6381\r\n",
            "-CLUSTERDOWN The cluster is down\r\n",
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-MASTERDOWN Link with MASTER is down\r\n",
        ] {
            assert!(in_motion(&error(e)), "{e}");
        }
        for e in [
            "-NOPERM no\r\n",
            "-ERR unknown command\r\n",
            "-NOSCRIPT x\r\n",
        ] {
            assert!(!in_motion(&error(e)), "{e}");
        }
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!in_motion(&io));
    }
}
