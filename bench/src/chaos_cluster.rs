//! The Redis Cluster of `wsproxy-bench chaos --cluster`: 3 masters and 3
//! replicas on free loopback ports below 32768 (each with its cluster-bus
//! port, +10000, free too), joined with `redis-cli --cluster create ...
//! --cluster-replicas 1`, each node with its own directory and an AOF
//! fsynced on every write (`--appendfsync always`), a short
//! `--cluster-node-timeout` and `--cluster-replica-validity-factor 0` (a
//! replica may take over however long it was cut off), as in
//! `tests/common/cluster.rs`.
//!
//! The chaos run SIGKILLs a master ([`ChaosCluster::kill`]), waits until
//! its replica has taken over its slots ([`ChaosCluster::wait_failover`]),
//! and later starts the killed node again on the same port and node file
//! ([`ChaosCluster::restart`]): it rejoins as a replica of the node that
//! replaced it ([`ChaosCluster::wait_rejoined`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redis::Value;
use tokio::time::sleep;

use crate::harness;
use crate::soak::Rng;

/// Nodes: 3 masters, 3 replicas.
const NODES: usize = 6;
/// `--cluster-node-timeout`: a master unreachable this long is failed
/// over (plus the election, about as long again).
pub const NODE_TIMEOUT_MS: u64 = 3000;
/// Longest wait for the cluster to be whole (start, failover, rejoin).
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The six nodes. Dropping it SIGKILLs them (the directory is the
/// caller's).
pub struct ChaosCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
    redis_bin: PathBuf,
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A free loopback port whose cluster-bus port (+10000) is free too,
/// below the kernel's ephemeral range (32768 and up) so that no outgoing
/// connection takes it while its node is down.
fn free_cluster_port(rng: &mut Rng, taken: &[u16]) -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let port = 12_000 + rng.below(10_700) as u16;
        if taken.contains(&port) || taken.contains(&(port + 10_000)) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no free port pair (p, p+10000) found below 32768")
}

/// One command to one node, or `None` if it does not answer within 1 s.
pub async fn node_query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
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

/// `CLUSTER SLOTS` of one node as (first slot, last slot, master port).
pub async fn slot_map(port: u16) -> Option<Vec<(u16, u16, u16)>> {
    let Value::Array(ranges) =
        node_query::<Value>(port, redis::cmd("CLUSTER").arg("SLOTS")).await?
    else {
        return None;
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(r) = range else { continue };
        if let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(m))) =
            (r.first(), r.get(1), r.get(2))
            && let Some(Value::Int(p)) = m.get(1)
        {
            out.push((*lo as u16, *hi as u16, *p as u16));
        }
    }
    Some(out)
}

/// The master port serving `slot` in `map`.
pub fn owner(map: &[(u16, u16, u16)], slot: u16) -> Option<u16> {
    map.iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
        .map(|(_, _, p)| *p)
}

/// The slot of a key: CRC16 (XMODEM) of its hash tag (the part between
/// the first `{` and the next `}`, if not empty) or of the whole key, mod
/// 16384, as Redis computes it.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let len = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (len > 0).then(|| &bytes[open + 1..open + 1 + len])
    });
    let mut crc: u16 = 0;
    for b in tagged.unwrap_or(bytes) {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

impl ChaosCluster {
    /// Starts six nodes and makes them a cluster (another set of ports if
    /// one was taken in between; 5 tries).
    pub async fn start(
        dir: &Path,
        redis_bin: &Path,
        rng: &mut Rng,
        taken: &[u16],
    ) -> anyhow::Result<Self> {
        let mut last_error = None;
        for attempt in 0..5 {
            let mut ports: Vec<u16> = Vec::new();
            for _ in 0..NODES {
                let avoid: Vec<u16> = ports.iter().chain(taken).copied().collect();
                let p = free_cluster_port(rng, &avoid)?;
                ports.push(p);
            }
            let mut cluster = Self {
                children: ports.iter().map(|_| None).collect(),
                ports,
                dir: dir.join(format!("cluster-{attempt}")),
                redis_bin: redis_bin.to_owned(),
            };
            std::fs::create_dir_all(&cluster.dir)?;
            for i in 0..NODES {
                cluster.spawn(i)?;
            }
            let mut up = true;
            for &port in &cluster.ports {
                up &= wait_ping(port).await;
            }
            if !up {
                last_error = Some(anyhow::anyhow!("a node did not answer PING"));
                continue;
            }
            cluster.create()?;
            cluster.wait_whole().await?;
            return Ok(cluster);
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no cluster")))
            .context("starting 6 redis-servers in 5 tries")
    }

    fn node_dir(&self, port: u16) -> PathBuf {
        self.dir.join(format!("node-{port}"))
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<u32> {
        let port = self.ports[i];
        let dir = self.node_dir(port);
        std::fs::create_dir_all(&dir)?;
        let child = harness::redis_server(&self.redis_bin, port, &dir)
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(harness::AOF_ALWAYS)
            .spawn()
            .with_context(|| format!("starting {}", self.redis_bin.display()))?;
        let pid = child.id();
        self.children[i] = Some(child);
        Ok(pid)
    }

    fn create(&self) -> anyhow::Result<()> {
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &self.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("redis-cli --cluster create (is redis-cli on PATH?)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(())
    }

    /// Seed URLs: every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// The slot map as a live node sees it.
    pub async fn slot_map(&self) -> anyhow::Result<Vec<(u16, u16, u16)>> {
        for port in self.live_ports() {
            if let Some(map) = slot_map(port).await
                && !map.is_empty()
            {
                return Ok(map);
            }
        }
        bail!("no live node answers CLUSTER SLOTS")
    }

    /// True when every live node says `cluster_state:ok` with every slot
    /// served by a live master, and every live replica is synced.
    async fn whole(&self) -> bool {
        let live = self.live_ports();
        for &port in &live {
            let Some(info) = node_query::<String>(port, redis::cmd("CLUSTER").arg("INFO")).await
            else {
                return false;
            };
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return false;
            }
            let Some(map) = slot_map(port).await else {
                return false;
            };
            if map.iter().any(|(_, _, m)| !live.contains(m)) {
                return false;
            }
            let Some(repl) =
                node_query::<String>(port, redis::cmd("INFO").arg("replication")).await
            else {
                return false;
            };
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                return false;
            }
        }
        true
    }

    /// Waits until [`Self::whole`]; how long that took.
    pub async fn wait_whole(&self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while !self.whole().await {
            if start.elapsed() > CLUSTER_TIMEOUT {
                bail!(
                    "the cluster was not whole (state ok, slots on live masters, replicas synced) in {CLUSTER_TIMEOUT:?}"
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
        Ok(start.elapsed())
    }

    /// Waits until no live node's slot map names `killed` any more (its
    /// replica took over): how long that took.
    pub async fn wait_failover(&self, killed: u16) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let mut done = true;
            for port in self.live_ports() {
                match slot_map(port).await {
                    Some(map) if !map.iter().any(|(_, _, m)| *m == killed) => {}
                    _ => done = false,
                }
            }
            if done {
                return Ok(start.elapsed());
            }
            if start.elapsed() > CLUSTER_TIMEOUT {
                bail!("the master on {killed} was not failed over in {CLUSTER_TIMEOUT:?}");
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The replicas of the master on `port`, as it says.
    pub async fn replicas_of(&self, port: u16) -> Vec<u16> {
        let Some(nodes) = node_query::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await
        else {
            return Vec::new();
        };
        let Some(id) = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split(' ').next())
        else {
            return Vec::new();
        };
        nodes
            .lines()
            .filter(|l| l.split(' ').nth(3) == Some(id))
            .filter_map(|l| l.split(' ').nth(1))
            .filter_map(|addr| addr.split(['@', ':']).nth(1)?.parse().ok())
            .collect()
    }

    /// SIGKILLs the node on `port` (and reaps it).
    pub async fn kill(&mut self, port: u16) -> anyhow::Result<u32> {
        let i = self.index(port)?;
        let Some(mut c) = self.children[i].take() else {
            bail!("the node on {port} is not running");
        };
        let pid = c.id();
        c.kill().context("SIGKILL")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("node pid {pid} still there 10 s after SIGKILL");
            }
            sleep(Duration::from_millis(5)).await;
        }
        Ok(pid)
    }

    /// Starts the node on `port` again (same node file and AOF).
    pub async fn restart(&mut self, port: u16) -> anyhow::Result<u32> {
        let i = self.index(port)?;
        let pid = self.spawn(i)?;
        if !wait_ping(port).await {
            bail!("the restarted node on {port} does not answer PING");
        }
        Ok(pid)
    }

    /// Waits until the node on `port` is a replica with its link up: how
    /// long that took, and its master's port.
    pub async fn wait_rejoined(&self, port: u16) -> anyhow::Result<(Duration, u16)> {
        let start = Instant::now();
        loop {
            if let Some(repl) =
                node_query::<String>(port, redis::cmd("INFO").arg("replication")).await
                && repl.contains("role:slave")
                && repl.contains("master_link_status:up")
            {
                let master = repl
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("master_port:")?.parse().ok())
                    .unwrap_or(0);
                return Ok((start.elapsed(), master));
            }
            if start.elapsed() > CLUSTER_TIMEOUT {
                bail!(
                    "the node on {port} did not rejoin as a synced replica in {CLUSTER_TIMEOUT:?}"
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    fn index(&self, port: u16) -> anyhow::Result<usize> {
        self.ports
            .iter()
            .position(|p| *p == port)
            .with_context(|| format!("{port} is not a node's port"))
    }

    /// Fails if a node exited on its own.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (port, child) in self.ports.iter().zip(&mut self.children) {
            if let Some(c) = child
                && let Some(status) = c.try_wait()?
            {
                bail!("the cluster node on {port} exited on its own ({status})");
            }
        }
        Ok(())
    }
}

/// True once the node on `port` answers PING (false after 10 s).
async fn wait_ping(port: u16) -> bool {
    for _ in 0..400 {
        if node_query::<String>(port, &redis::cmd("PING"))
            .await
            .is_some()
        {
            return true;
        }
        sleep(Duration::from_millis(25)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::{Route, SlotAddr};

    #[test]
    fn slots_are_the_redis_crates() {
        for key in [
            "foo",
            "{user1000}.following",
            "foo{}{bar}",
            "a{b",
            "wsproxy:up:{0}",
            "session:{chaos1-7}:history",
        ] {
            assert_eq!(
                Route::with_key(key, SlotAddr::Master),
                Route::new(super::slot_of(key), SlotAddr::Master),
                "{key}"
            );
        }
    }
}
