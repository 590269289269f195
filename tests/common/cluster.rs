//! A private Redis Cluster for a test: 3 masters and 3 replicas on free
//! loopback ports (each with its cluster-bus port, +10000), made with
//! `redis-cli --cluster create`, killed on drop. A short node timeout
//! (1 s) makes a failover take seconds, not the default 15 s.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;

use super::unique;

/// Nodes of the test cluster.
const NODES: usize = 6;

pub struct Cluster {
    /// Every node's port, masters first as created (replicas may be
    /// promoted later: see [`Cluster::master_ports`]).
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: std::path::PathBuf,
}

/// A free loopback port whose cluster-bus port (+10000) is free too. Both
/// lie below Linux's ephemeral range (32768 and up), where the other
/// tests' servers and every outgoing connection take theirs.
fn free_cluster_port(taken: &[u16]) -> u16 {
    use rand::Rng;
    loop {
        let port = rand::rng().random_range(20_000..22_700);
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        // A port found free can be taken before the node binds it: then
        // the whole set starts again on other ports.
        for _ in 0..5 {
            let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("cluster"));
            std::fs::create_dir_all(&dir).expect("cluster dir");
            let mut ports = Vec::new();
            for _ in 0..NODES {
                let p = free_cluster_port(&ports);
                ports.push(p);
            }
            let mut cluster = Cluster {
                children: ports.iter().map(|_| None).collect(),
                ports,
                dir,
            };
            for i in 0..NODES {
                cluster.spawn(i);
            }
            let mut up = true;
            for &port in &cluster.ports {
                up &= wait_ping(port).await;
            }
            if up {
                cluster.create().await;
                return cluster;
            }
        }
        panic!("no 6 redis-servers could be started in 5 tries");
    }

    /// `redis-cli --cluster create`, then waits for the cluster to be ok.
    async fn create(&self) {
        let cluster = self;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok().await;
    }

    fn spawn(&mut self, i: usize) {
        let port = self.ports[i];
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &self
                    .dir
                    .join(format!("nodes-{port}.conf"))
                    .display()
                    .to_string(),
                "--cluster-node-timeout",
                "1000",
                // A replica may take over however long it was cut off
                // (the default refuses one that lost its master long ago).
                "--cluster-replica-validity-factor",
                "0",
                "--dir",
                &self.dir.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        self.children[i] = Some(child);
    }

    /// Seed URLs for wsproxy: every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok` with all slots
    /// served, and every live replica has synced with its master.
    pub async fn wait_ok(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        'wait: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            for (i, port) in self.ports.iter().enumerate() {
                if self.children[i].is_none() {
                    continue;
                }
                let Some(info) =
                    node_query::<String>(*port, redis::cmd("CLUSTER").arg("INFO")).await
                else {
                    continue 'wait;
                };
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    continue 'wait;
                }
                // A replica must have synced before its master may fail.
                let Some(repl) =
                    node_query::<String>(*port, redis::cmd("INFO").arg("replication")).await
                else {
                    continue 'wait;
                };
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    continue 'wait;
                }
            }
            return;
        }
    }

    /// A cluster connection for the test's own commands (the backend's
    /// part).
    pub async fn conn(&self) -> ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("seeds")
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }

    /// `SETEX session:{<session>}:auth`.
    pub async fn set_token(&self, session: &str, token: &str, ttl: u64) {
        let mut c = self.conn().await;
        let _: () = redis::cmd("SETEX")
            .arg(format!("session:{{{session}}}:auth"))
            .arg(ttl)
            .arg(token)
            .query_async(&mut c)
            .await
            .expect("SETEX");
    }

    /// `PUBLISH` or `SPUBLISH` (routed to the channel's slot); the number
    /// of receivers.
    pub async fn publish(&self, command: &str, channel: &str, payload: &str) -> i64 {
        let mut c = self.conn().await;
        redis::cmd(command)
            .arg(channel)
            .arg(payload)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{command} {channel}: {e}"))
    }

    /// The port of the master that serves `key`'s slot now.
    pub async fn master_of(&self, key: &str) -> u16 {
        for (i, port) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("KEYSLOT").arg(key);
            let Some(slot) = node_query::<u16>(*port, &cmd).await else {
                continue;
            };
            let Some(slots) =
                node_query::<redis::Value>(*port, redis::cmd("CLUSTER").arg("SLOTS")).await
            else {
                continue;
            };
            if let redis::Value::Array(ranges) = slots {
                for range in ranges {
                    let redis::Value::Array(r) = range else {
                        continue;
                    };
                    let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                        (r.first(), r.get(1))
                    else {
                        continue;
                    };
                    if (*lo..=*hi).contains(&i64::from(slot))
                        && let Some(redis::Value::Array(master)) = r.get(2)
                        && let Some(redis::Value::Int(p)) = master.get(1)
                    {
                        return *p as u16;
                    }
                }
            }
        }
        panic!("no live node knows the master of {key}");
    }

    /// True while a live node's slot map names `port` as a master.
    pub async fn is_master(&self, port: u16) -> bool {
        for (i, node) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            let Some(redis::Value::Array(ranges)) =
                node_query::<redis::Value>(*node, redis::cmd("CLUSTER").arg("SLOTS")).await
            else {
                continue;
            };
            return ranges.iter().any(|range| {
                matches!(range, redis::Value::Array(r)
                    if matches!(r.get(2), Some(redis::Value::Array(m))
                        if m.get(1) == Some(&redis::Value::Int(i64::from(port)))))
            });
        }
        panic!("no live node answers CLUSTER SLOTS");
    }

    /// The masters' ports, as the cluster names them now.
    pub async fn master_ports(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for port in &self.ports {
            if self.is_master(*port).await {
                masters.push(*port);
            }
        }
        masters
    }

    /// Moves `key`'s slot, with its keys, from its master to the master on
    /// `to` (resharding, as `redis-cli --cluster reshard` does it).
    pub async fn move_slot_of(&self, key: &str, to: u16) {
        let from = self.master_of(key).await;
        let slot: u16 = node_query(from, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .expect("KEYSLOT");
        let id = |port| async move {
            node_query::<String>(port, &redis::cmd("CLUSTER").arg("MYID").clone())
                .await
                .expect("MYID")
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let set = |port: u16, args: Vec<String>| async move {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(args);
            node_query::<String>(port, &cmd)
                .await
                .unwrap_or_else(|| panic!("CLUSTER SETSLOT on {port}"));
        };
        set(to, vec!["IMPORTING".into(), from_id.clone()]).await;
        set(from, vec!["MIGRATING".into(), to_id.clone()]).await;
        let keys: Vec<String> = node_query(
            from,
            redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1000),
        )
        .await
        .expect("GETKEYSINSLOT");
        if !keys.is_empty() {
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys);
            node_query::<String>(from, &migrate).await.expect("MIGRATE");
        }
        for port in self.master_ports().await {
            set(port, vec!["NODE".into(), to_id.clone()]).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.master_of(key).await != to {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot did not move"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ports of the replicas of the master on `port`.
    pub async fn replicas_of(&self, port: u16) -> Vec<u16> {
        let Some(nodes) = node_query::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await
        else {
            panic!("the master on {port} does not answer");
        };
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split(' ').next())
            .expect("its own line")
            .to_owned();
        nodes
            .lines()
            .filter(|l| l.split(' ').nth(3) == Some(id.as_str()))
            .filter_map(|l| l.split(' ').nth(1))
            .filter_map(|addr| addr.split(['@', ':']).nth(1)?.parse().ok())
            .collect()
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a node's port");
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut() {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command to one node, or `None` if it does not answer.
async fn node_query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut c = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    tokio::time::timeout(Duration::from_secs(1), cmd.query_async(&mut c))
        .await
        .ok()?
        .ok()
}

/// True once the node on `port` answers PING (false after 5 s).
async fn wait_ping(port: u16) -> bool {
    for _ in 0..200 {
        if node_query::<String>(port, &redis::cmd("PING"))
            .await
            .is_some()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}
