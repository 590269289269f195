//! A private Redis Cluster for a test: 3 masters and 3 replicas on free
//! loopback ports (each with its cluster-bus port, +10000), made with
//! `redis-cli --cluster create`, killed on drop. A short node timeout
//! (1 s) makes a failover take seconds, not the default 15 s;
//! [`Cluster::start_with_node_timeout`] sets a realistic one. Clusters of
//! one test binary start one at a time (each waits for the last to drop).
//!
//! [`Cluster::start_tls`] makes the same cluster speaking TLS only: clients,
//! the cluster bus and replication (`--port 0 --tls-port P --tls-cluster yes
//! --tls-replication yes`), with certificates from [`Pki`].

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;

use super::pki::Pki;
use super::unique;

/// Nodes of the test cluster.
const NODES: usize = 6;

pub struct Cluster {
    /// Every node's port, masters first as created (replicas may be
    /// promoted later: see [`Cluster::master_ports`]).
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: std::path::PathBuf,
    /// With TLS: the certificates, and whether the nodes require a client
    /// certificate (`tls-auth-clients`).
    tls: Option<(Pki, bool)>,
    /// `cluster-node-timeout`, in milliseconds.
    node_timeout_ms: u64,
    /// One cluster at a time per test binary: six nodes and their
    /// failovers on a loaded 2-core machine made the short node timeout
    /// fire by itself when several ran at once.
    _one_at_a_time: tokio::sync::SemaphorePermit<'static>,
}

static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

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

/// The node timeout of [`Cluster::start`].
pub const REALISTIC_NODE_TIMEOUT_MS: u64 = 3000;

impl Cluster {
    /// A cluster at a realistic `cluster-node-timeout` of 3000 ms (a
    /// failover takes 4–6 s; Redis's default of 15000 is
    /// `tests/cluster_failover.rs`'s CI step). At 1000 ms, which these tests
    /// used before, a failover ends before much of what goes wrong in one
    /// has begun.
    pub async fn start() -> Cluster {
        Self::start_with(None, REALISTIC_NODE_TIMEOUT_MS).await
    }

    /// A cluster whose nodes take `node_timeout_ms` to notice a failed
    /// node (Redis's default is 15000): failovers at realistic speed.
    pub async fn start_with_node_timeout(node_timeout_ms: u64) -> Cluster {
        Self::start_with(None, node_timeout_ms).await
    }

    /// `cluster-node-timeout` of this cluster.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.node_timeout_ms)
    }

    /// A cluster that speaks TLS only, with the certificates of
    /// [`Cluster::pki`]; `auth_clients`: the nodes require a client
    /// certificate (`tls-auth-clients yes`).
    pub async fn start_tls(auth_clients: bool) -> Cluster {
        // The test's own clients use rustls with the process's default
        // provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self::start_with(Some(auth_clients), 1000).await
    }

    /// The certificates of a TLS cluster.
    pub fn pki(&self) -> &Pki {
        &self.tls.as_ref().expect("a TLS cluster").0
    }

    async fn start_with(tls: Option<bool>, node_timeout_ms: u64) -> Cluster {
        // A port found free can be taken before the node binds it: then
        // the whole set starts again on other ports.
        for _ in 0..5 {
            // (A failed try drops its cluster, and the permit with it.)
            let permit = ONE_AT_A_TIME.acquire().await.expect("never closed");
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
                tls: tls.map(|auth_clients| (Pki::new(), auth_clients)),
                node_timeout_ms,
                _one_at_a_time: permit,
            };
            for i in 0..NODES {
                cluster.spawn(i);
            }
            let mut up = true;
            for &port in &cluster.ports {
                up &= cluster.wait_ping(port).await;
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
        if let Some((pki, _)) = &self.tls {
            let path = |name| pki.path(name).display().to_string();
            create
                .arg("--tls")
                .args(["--cacert", &path("ca.pem")])
                .args(["--cert", &path("client.pem")])
                .args(["--key", &path("client.key")]);
        }
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
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &port.to_string()]),
            // TLS only: no plain port; the cluster bus (on the TLS port
            // +10000) and replication use TLS too.
            Some((pki, auth_clients)) => {
                let path = |name| pki.path(name).display().to_string();
                command
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(["--tls-cert-file", &path("server.pem")])
                    .args(["--tls-key-file", &path("server.key")])
                    .args(["--tls-ca-cert-file", &path("ca.pem")])
                    .args([
                        "--tls-auth-clients",
                        if *auth_clients { "yes" } else { "no" },
                    ])
            }
        };
        let child = command
            .args([
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
                &self.node_timeout_ms.to_string(),
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

    /// Seed URLs for wsproxy: every node (`rediss://` with TLS).
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// A cluster client builder for the test's own connections: with TLS,
    /// trusting the test CA and presenting the client certificate.
    pub fn client_builder(&self) -> redis::cluster::ClusterClientBuilder {
        let builder = redis::cluster::ClusterClientBuilder::new(self.urls());
        match &self.tls {
            Some((pki, _)) => builder.certs(pki.certificates()),
            None => builder,
        }
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
                let Some(info) = self
                    .node_query::<String>(*port, redis::cmd("CLUSTER").arg("INFO"))
                    .await
                else {
                    continue 'wait;
                };
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    continue 'wait;
                }
                // A replica must have synced before its master may fail.
                let Some(repl) = self
                    .node_query::<String>(*port, redis::cmd("INFO").arg("replication"))
                    .await
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
        self.client_builder()
            .build()
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
            let Some(slot) = self.node_query::<u16>(*port, &cmd).await else {
                continue;
            };
            let Some(slots) = self
                .node_query::<redis::Value>(*port, redis::cmd("CLUSTER").arg("SLOTS"))
                .await
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
            let Some(redis::Value::Array(ranges)) = self
                .node_query::<redis::Value>(*node, redis::cmd("CLUSTER").arg("SLOTS"))
                .await
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
        let slot: u16 = self
            .node_query(from, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await
            .expect("KEYSLOT");
        let id = |port| async move {
            self.node_query::<String>(port, &redis::cmd("CLUSTER").arg("MYID").clone())
                .await
                .expect("MYID")
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let set = |port: u16, args: Vec<String>| async move {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(args);
            self.node_query::<String>(port, &cmd)
                .await
                .unwrap_or_else(|| panic!("CLUSTER SETSLOT on {port}"));
        };
        set(to, vec!["IMPORTING".into(), from_id.clone()]).await;
        set(from, vec!["MIGRATING".into(), to_id.clone()]).await;
        let keys: Vec<String> = self
            .node_query(
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
            self.node_query::<String>(from, &migrate)
                .await
                .expect("MIGRATE");
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
        let Some(nodes) = self
            .node_query::<String>(port, redis::cmd("CLUSTER").arg("NODES"))
            .await
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

    /// Waits (at most 10 s) until every replica of the master on `port`
    /// has what the master had written when this was called. Replication is
    /// asynchronous: on a loaded machine a replica can lag, and if it takes
    /// over then, writes the master acknowledged are gone (a test that
    /// kills a master to see wsproxy recover, not to lose data, waits
    /// first).
    pub async fn wait_replicated(&self, port: u16) {
        let offset = |info: &str, field: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        let info = |port| async move {
            self.node_query::<String>(port, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default()
        };
        let target = offset(&info(port).await, "master_repl_offset:").expect("the master's offset");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for replica in self.replicas_of(port).await {
            while offset(&info(replica).await, "slave_repl_offset:").is_none_or(|o| o < target) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the replica on {replica} did not catch up with its master on {port}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
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

impl Cluster {
    /// Sends `signal` (`-STOP`, `-CONT`) to the node on `port`.
    fn signal(&self, port: u16, signal: &str) {
        let i = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a node's port");
        let pid = self.children[i].as_ref().expect("the node runs").id();
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// SIGSTOP: the node holds still, as a host that lost power or its
    /// network does. Its sockets stay open (no FIN, no RST) and the kernel
    /// keeps taking bytes for it; nothing is answered.
    pub fn freeze(&self, port: u16) {
        self.signal(port, "-STOP");
    }

    /// SIGCONT after [`Cluster::freeze`].
    pub fn thaw(&self, port: u16) {
        self.signal(port, "-CONT");
    }
}

impl Cluster {
    /// Starts the node on `port` again, after [`Cluster::kill`], with its
    /// cluster config: it rejoins (a master that was failed over comes back
    /// as a replica of its replacement).
    pub async fn restart(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a node's port");
        assert!(self.children[i].is_none(), "the node on {port} is running");
        self.spawn(i);
        assert!(
            self.wait_ping(port).await,
            "the node on {port} did not start again"
        );
    }

    /// One command to the node on `port`, or `None` if it does not answer.
    pub async fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> Option<T> {
        self.node_query(port, cmd).await
    }

    /// The shard channels that have subscribers on the node on `port`
    /// (`PUBSUB SHARDCHANNELS`), or `None` if it does not answer.
    pub async fn shard_channels(&self, port: u16) -> Option<Vec<String>> {
        self.node_query(port, redis::cmd("PUBSUB").arg("SHARDCHANNELS"))
            .await
    }

    /// How many of the node's client connections are named `name`
    /// (`CLIENT LIST`), or `None` if it does not answer.
    pub async fn clients_named(&self, port: u16, name: &str) -> Option<usize> {
        let list: String = self
            .node_query(port, redis::cmd("CLIENT").arg("LIST"))
            .await?;
        let field = format!(" name={name} ");
        Some(list.lines().filter(|l| l.contains(&field)).count())
    }

    /// True while the node on `port` runs.
    pub fn is_running(&self, port: u16) -> bool {
        self.ports
            .iter()
            .position(|p| *p == port)
            .is_some_and(|i| self.children[i].is_some())
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

impl Cluster {
    /// One command to one node, or `None` if it does not answer.
    async fn node_query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> Option<T> {
        let client = match &self.tls {
            None => redis::Client::open(format!("redis://127.0.0.1:{port}")),
            Some((pki, _)) => redis::Client::build_with_tls(
                format!("rediss://127.0.0.1:{port}"),
                pki.certificates(),
            ),
        }
        .ok()?;
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
    async fn wait_ping(&self, port: u16) -> bool {
        for _ in 0..200 {
            if self
                .node_query::<String>(port, &redis::cmd("PING"))
                .await
                .is_some()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}
