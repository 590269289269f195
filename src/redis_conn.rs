//! The command connection to Redis ([`RedisConn`]): one multiplexed
//! connection that the whole process shares for commands (the token check,
//! `PUBLISH`, the history functions, `/ready`'s `PING`), whichever way
//! Redis is deployed.
//!
//! - **Standalone** (`REDIS_URL`): the redis crate's `ConnectionManager`,
//!   one multiplexed connection that reconnects by itself.
//! - **Cluster**: [`ClusterConn`], wsproxy's own router over one
//!   multiplexed connection per master (the redis crate's plain
//!   connections, named `wsproxy-cmd`): each command goes to its key's
//!   master by wsproxy's slot map ([`crate::cluster`]). A failover touches
//!   only the commands of the failed shard: they fail fast (or go to the
//!   new master once the map names it), and the other shards' commands
//!   never wait on them.
//!
//! Both are cheap to clone (clones share the connection). Code that runs
//! commands takes `&mut C where C: redis::aio::ConnectionLike`, or this
//! type, and never needs to know which one it has. Subscriptions are not
//! made here: they are the broker's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::cluster::{Seeds, Topology, in_motion, slot_of};

/// The process's command connection: a standalone Redis or a cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// One Redis server (`REDIS_URL`).
    Standalone(ConnectionManager),
    /// A Redis Cluster: one multiplexed connection per node.
    Cluster(ClusterConn),
}

impl RedisConn {
    /// True for a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(_) => f.write_str("RedisConn::Standalone"),
            Self::Cluster(_) => f.write_str("RedisConn::Cluster"),
        }
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        Self::Standalone(conn)
    }
}

impl From<ClusterConn> for RedisConn {
    fn from(conn: ClusterConn) -> Self {
        Self::Cluster(conn)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How long connecting to a master, or reading the slot map from one
/// node, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may wait for its answer before its connection is
/// dropped (callers bound their own waits, most of them shorter).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of one command: the first, and those after a redirect (`MOVED`,
/// `ASK`) or a master that could not be reached.
const ATTEMPTS: u32 = 4;
/// First pause before retrying a command the cluster refused while in
/// motion (doubled each time, up to [`IN_MOTION_PAUSE_MAX`]).
const IN_MOTION_PAUSE: Duration = Duration::from_millis(50);
const IN_MOTION_PAUSE_MAX: Duration = Duration::from_millis(400);
/// How long a command refused with `CLUSTERDOWN`, `TRYAGAIN`, `LOADING`
/// or `MASTERDOWN` is retried. With Redis's default
/// `cluster-require-full-coverage yes`, every master answers `CLUSTERDOWN`
/// from the moment a failed master is marked as failed until its replica
/// is promoted: about a second (the election's delay, whatever the node
/// timeout). Commands of the healthy shards wait that out instead of
/// failing.
const IN_MOTION_BUDGET: Duration = Duration::from_millis(1500);
/// The slot map is read at most this often (many commands may fail at
/// once, and one read serves them all).
const REREAD_AFTER: Duration = Duration::from_millis(100);
/// The name of the command connections (`CLIENT LIST` shows it).
const CONNECTION_NAME: &str = "wsproxy-cmd";

/// A Redis Cluster's command connection: wsproxy's own router over one
/// multiplexed connection per master.
///
/// - Each command goes to the master of its key's slot (the first key;
///   wsproxy's keys of one command share a hash tag), by wsproxy's own
///   slot map, read with `CLUSTER SHARDS`; keyless commands go to any
///   master, and those that change what every master must hold
///   (`FUNCTION LOAD`, `SCRIPT LOAD`...) to all of them.
/// - `MOVED` and `ASK` are followed (and `MOVED` has the map read again);
///   `TRYAGAIN`, `CLUSTERDOWN`, `LOADING` and `MASTERDOWN` are retried
///   for up to 1.5 s: Redis did not run the command.
/// - A master that cannot be reached, or a connection that drops under a
///   command, fails that command at once (it may have run: it is not sent
///   again) and has the map read again; the next command for that shard
///   goes to whichever master the map names then. So during a failover
///   the failed shard's commands fail fast, and once the replica is
///   promoted they go to it; the other masters' connections, and their
///   commands, are never touched.
///
/// Why not the redis crate's cluster connection: it drives every request
/// from one task that stops polling its in-flight requests while it
/// recovers, and its recovery waits for a lock such a request holds, so a
/// failover under load wedged it for every shard (it needed a watchdog
/// that replaced it after seconds of silence; `tests/cluster_recovery.rs`
/// keeps the crate's case as an ignored test). Here each master's
/// connection is independent, and no lock is held across an `.await`.
///
/// Clones share the connections.
#[derive(Clone)]
pub struct ClusterConn {
    router: Arc<Router>,
}

impl std::fmt::Debug for ClusterConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConn")
            .field("seeds", &self.router.seeds)
            .finish()
    }
}

/// A master's connection, connected or being connected (every command
/// that needs it waits on the same attempt).
type Connecting = Shared<BoxFuture<'static, Result<Node, Arc<str>>>>;

#[derive(Clone)]
struct Node {
    conn: MultiplexedConnection,
}

struct Router {
    seeds: Arc<Seeds>,
    /// The slot map in use (`None` until first read).
    map: RwLock<Option<Arc<Topology>>>,
    /// Bumped by every read of the map: a command that failed under an
    /// older map has it read again; one that failed under this one waits
    /// for the read under way instead.
    generation: AtomicU64,
    /// One read of the map at a time; when the last one was.
    reading: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// Master `host:port` -> its connection.
    nodes: Mutex<HashMap<Arc<str>, Connecting>>,
}

/// Where a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The master of this slot.
    Slot(u16),
    /// Any master (a keyless command).
    AnyMaster,
    /// Every master (what each must hold: functions, scripts).
    AllMasters,
}

impl ClusterConn {
    /// A router for the cluster reached through `seeds` (`redis://` or
    /// `rediss://` URLs; `tls`: the certificates of every connection, for
    /// `rediss://`). Nothing is connected until the first command: a
    /// cluster that is down makes commands fail, not this.
    pub fn new(seeds: &[String], tls: Option<redis::TlsCertificates>) -> Self {
        Self {
            router: Arc::new(Router {
                seeds: Arc::new(Seeds::new(seeds, tls)),
                map: RwLock::new(None),
                generation: AtomicU64::new(0),
                reading: tokio::sync::Mutex::new(None),
                nodes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// How many master connections are open or opening (for tests and
    /// `/status`).
    pub fn connections(&self) -> usize {
        self.router
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Where `cmd` goes: the slot of its first key, as Redis reads the keys
/// of the commands wsproxy sends.
fn target(cmd: &Cmd) -> Target {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        _ => None,
    });
    let Some(name) = args.next() else {
        return Target::AnyMaster;
    };
    let is = |b: &[u8], names: &[&str]| names.iter().any(|n| b.eq_ignore_ascii_case(n.as_bytes()));
    let key = if is(
        name,
        &[
            "FCALL",
            "FCALL_RO",
            "EVAL",
            "EVALSHA",
            "EVAL_RO",
            "EVALSHA_RO",
        ],
    ) {
        // FCALL function numkeys key...: keyless when numkeys is 0.
        let _function = args.next();
        let keys = args
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        if keys == 0 { None } else { args.next() }
    } else if is(name, &["FUNCTION", "SCRIPT"]) {
        return match args.next() {
            Some(sub) if is(sub, &["LOAD", "FLUSH", "DELETE", "RESTORE"]) => Target::AllMasters,
            _ => Target::AnyMaster,
        };
    } else if is(name, &["XREAD", "XREADGROUP"]) {
        args.find(|a| a.eq_ignore_ascii_case(b"STREAMS"))
            .and_then(|_| args.next())
    } else if is(name, &["XINFO", "OBJECT", "MEMORY"]) {
        args.nth(1)
    } else if is(
        name,
        &[
            "PING", "ECHO", "CLUSTER", "CLIENT", "TIME", "INFO", "HELLO", "COMMAND", "CONFIG",
            "DBSIZE", "WAIT",
        ],
    ) {
        None
    } else {
        args.next()
    };
    key.map_or(Target::AnyMaster, |k| Target::Slot(slot_of(k)))
}

/// Where a pipeline goes: where its first command with a key does.
fn pipeline_target(pipeline: &Pipeline) -> Target {
    pipeline
        .cmd_iter()
        .map(target)
        .find(|t| matches!(t, Target::Slot(_)))
        .unwrap_or(Target::AnyMaster)
}

fn no_master(what: String) -> RedisError {
    RedisError::from((ErrorKind::ClusterConnectionNotFound, "no master", what))
}

impl Router {
    fn map(&self) -> Option<Arc<Topology>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the slot map again, unless it was read since `seen` (the
    /// generation the caller failed under) or very recently.
    async fn reread(&self, seen: u64) {
        let mut last = self.reading.lock().await;
        if self.generation.load(Ordering::Acquire) != seen
            || last.is_some_and(|at| at.elapsed() < REREAD_AFTER)
        {
            return;
        }
        let known = self.map();
        let read = self
            .seeds
            .read_topology(known.as_deref(), CONNECT_TIMEOUT)
            .await;
        match read {
            Some((topology, complete)) => {
                if known.as_deref() != Some(&topology) {
                    tracing::info!(
                        masters = topology.masters().len(),
                        complete,
                        "redis cluster slot map read (commands)"
                    );
                }
                // Connections to nodes that are no longer masters go.
                let masters = topology.masters();
                self.nodes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|addr, _| masters.contains(addr));
                *self.map.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(topology));
            }
            None => tracing::warn!("redis cluster: no node answered CLUSTER SHARDS"),
        }
        *last = Some(tokio::time::Instant::now());
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The masters `target` goes to now, and the map's generation.
    async fn masters(&self, target: Target, attempt: u32) -> RedisResult<(u64, Vec<Arc<str>>)> {
        for _ in 0..2 {
            let generation = self.generation.load(Ordering::Acquire);
            if let Some(map) = self.map() {
                let found: Vec<Arc<str>> = match target {
                    Target::Slot(slot) => map.owner(slot).cloned().into_iter().collect(),
                    Target::AnyMaster => {
                        let mut all: Vec<_> = map.masters().into_iter().collect();
                        all.sort();
                        let n = all.len();
                        // A different one each attempt.
                        let pick = usize::try_from(attempt).unwrap_or(0).checked_rem(n);
                        pick.and_then(|i| all.get(i).cloned()).into_iter().collect()
                    }
                    Target::AllMasters => map.masters().into_iter().collect(),
                };
                if !found.is_empty() {
                    return Ok((generation, found));
                }
            }
            self.reread(generation).await;
        }
        Err(match target {
            Target::Slot(slot) => no_master(format!("slot {slot} has no master now")),
            _ => no_master("no master is known".into()),
        })
    }

    /// The connection to the master at `addr`, made if need be.
    async fn node(&self, addr: &Arc<str>) -> Result<Node, Arc<str>> {
        let connecting = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            // A failed attempt is not kept (forgotten by its command, but
            // another may come first): it is made again.
            if let Some(c) = nodes.get(addr)
                && !matches!(c.peek(), Some(Err(_)))
            {
                c.clone()
            } else {
                let c = connect(self.seeds.clone(), addr.clone()).boxed().shared();
                nodes.insert(addr.clone(), c.clone());
                c
            }
        };
        connecting.await
    }

    /// Forgets the connection to `addr` (it failed): the next command
    /// makes a new one.
    fn forget(&self, addr: &Arc<str>) {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
    }

    /// Runs `send` on the master `target` goes to, following redirects.
    async fn run<'a, T: Send + 'a>(
        &self,
        target: Target,
        send: impl Fn(MultiplexedConnection, bool) -> BoxFuture<'a, RedisResult<T>>,
    ) -> RedisResult<T> {
        if target == Target::AllMasters {
            return self.run_everywhere(&send).await;
        }
        // Set by a redirect: (where, with ASKING).
        let mut redirect: Option<(Arc<str>, bool)> = None;
        let mut pause = IN_MOTION_PAUSE;
        let mut last = None;
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        while attempt < ATTEMPTS {
            attempt += 1;
            let generation = self.generation.load(Ordering::Acquire);
            let (addr, asking) = match redirect.take() {
                Some(r) => r,
                None => {
                    let (_, masters) = self.masters(target, attempt).await?;
                    let Some(addr) = masters.into_iter().next() else {
                        break;
                    };
                    (addr, false)
                }
            };
            let node = match self.node(&addr).await {
                Ok(node) => node,
                Err(e) => {
                    // Not sent: if the map names another master now, try
                    // it; if not, the shard is down, and this fails fast.
                    self.forget(&addr);
                    self.reread(generation).await;
                    let now = self.masters(target, attempt).await.ok();
                    let moved = now.is_some_and(|(_, m)| m.first() != Some(&addr));
                    let error = no_master(format!("{addr}: {e}"));
                    // Any master will do for a keyless command: the next.
                    let retry = match target {
                        Target::AnyMaster => attempt < ATTEMPTS,
                        _ => moved,
                    };
                    if !retry {
                        return Err(error);
                    }
                    last = Some(error);
                    continue;
                }
            };
            match send(node.conn.clone(), asking).await {
                Ok(value) => return Ok(value),
                Err(e) if matches!(e.kind(), ErrorKind::Server(redis::ServerErrorKind::Moved)) => {
                    redirect = e.redirect_node().and_then(|(to, _)| {
                        Some((Arc::<str>::from(to), false)).filter(|_| !to.is_empty())
                    });
                    self.reread(generation).await;
                    last = Some(e);
                }
                Err(e) if matches!(e.kind(), ErrorKind::Server(redis::ServerErrorKind::Ask)) => {
                    redirect = e
                        .redirect_node()
                        .map(|(to, _)| (Arc::<str>::from(to), true));
                    last = Some(e);
                }
                Err(e) if in_motion(&e) => {
                    if started.elapsed() + pause > IN_MOTION_BUDGET {
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2).min(IN_MOTION_PAUSE_MAX);
                    // Waiting is not a try.
                    attempt -= 1;
                    self.reread(generation).await;
                    last = Some(e);
                }
                Err(e) => {
                    if e.is_io_error() || e.is_unrecoverable_error() || e.is_timeout() {
                        // It may have run: not sent again. The shard's next
                        // command goes where the map says then.
                        tracing::debug!(node = %addr, error = %e, "redis cluster command connection failed");
                        self.forget(&addr);
                        let router_seen = generation;
                        self.reread(router_seen).await;
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| no_master("the cluster kept redirecting".into())))
    }

    /// Runs `send` on every master; the first answer, or the first error.
    async fn run_everywhere<'a, T: Send + 'a>(
        &self,
        send: &impl Fn(MultiplexedConnection, bool) -> BoxFuture<'a, RedisResult<T>>,
    ) -> RedisResult<T> {
        let (generation, masters) = self.masters(Target::AllMasters, 0).await?;
        let calls = masters.iter().map(|addr| async move {
            let node = self
                .node(addr)
                .await
                .map_err(|e| no_master(format!("{addr}: {e}")))?;
            send(node.conn, false).await
        });
        let mut first = None;
        let mut failed = None;
        for (addr, answer) in masters
            .iter()
            .zip(futures_util::future::join_all(calls).await)
        {
            match answer {
                Ok(v) => {
                    first.get_or_insert(v);
                }
                Err(e) => {
                    self.forget(addr);
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            self.reread(generation).await;
            return Err(e);
        }
        first.ok_or_else(|| no_master("no master is known".into()))
    }
}

/// Opens and names the command connection to the master at `addr`.
async fn connect(seeds: Arc<Seeds>, addr: Arc<str>) -> Result<Node, Arc<str>> {
    let fail = |e: String| Arc::<str>::from(e);
    let (host, port) = crate::cluster::split_addr(&addr)
        .ok_or_else(|| fail(format!("bad node address {addr}")))?;
    let client = seeds
        .client(host, port, redis::ProtocolVersion::RESP2)
        .map_err(|e| fail(e.to_string()))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let connecting = client.get_multiplexed_async_connection_with_config(&config);
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => return Err(fail("connecting timed out".into())),
    };
    let mut setname = redis::cmd("CLIENT");
    setname.arg("SETNAME").arg(CONNECTION_NAME);
    match tokio::time::timeout(CONNECT_TIMEOUT, setname.query_async::<()>(&mut conn)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => return Err(fail("CLIENT SETNAME timed out".into())),
    }
    tracing::debug!(node = %addr, "redis cluster command connection opened");
    Ok(Node { conn })
}

/// A server's error answer as the error it is (the multiplexed connection
/// hands it over as a value).
fn server_error(value: Value) -> RedisResult<Value> {
    match value {
        Value::ServerError(e) => Err(e.into()),
        other => Ok(other),
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let router = self.router.clone();
        Box::pin(async move {
            router
                .run(target(cmd), |mut conn, asking| {
                    Box::pin(async move {
                        if asking {
                            let mut pipe = redis::pipe();
                            pipe.cmd("ASKING").ignore().add_command(cmd.clone());
                            let mut answers: Vec<Value> = pipe.query_async(&mut conn).await?;
                            return server_error(answers.pop().unwrap_or(Value::Nil));
                        }
                        server_error(conn.req_packed_command(cmd).await?)
                    })
                })
                .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let router = self.router.clone();
        Box::pin(async move {
            router
                .run(pipeline_target(cmd), |mut conn, _asking| {
                    Box::pin(async move { conn.req_packed_commands(cmd, offset, count).await })
                })
                .await
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_where_their_first_key_lives() {
        let slot = |k: &str| Target::Slot(slot_of(k));
        let mut get = redis::cmd("GET");
        get.arg("session:{abc}:token");
        assert_eq!(target(&get), slot("session:{abc}:token"));
        let mut fcall = redis::cmd("FCALL");
        fcall
            .arg("wsproxy_publish")
            .arg(1)
            .arg("session:{s}:history")
            .arg("m");
        assert_eq!(target(&fcall), slot("session:{s}:history"));
        let mut keyless = redis::cmd("FCALL");
        keyless.arg("wsproxy_control").arg(0).arg("x");
        assert_eq!(target(&keyless), Target::AnyMaster);
        let mut evalsha = redis::cmd("evalsha");
        evalsha.arg("abc123").arg(2).arg("k{1}").arg("j{1}");
        assert_eq!(target(&evalsha), slot("k{1}"));
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg("wsproxy:control")
            .arg("0-0");
        assert_eq!(target(&xread), slot("wsproxy:control"));
        let mut xinfo = redis::cmd("XINFO");
        xinfo.arg("STREAM").arg("wsproxy:control");
        assert_eq!(target(&xinfo), slot("wsproxy:control"));
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg("#!lua name=x");
        assert_eq!(target(&load), Target::AllMasters);
        let mut script = redis::cmd("SCRIPT");
        script.arg("load").arg("return 1");
        assert_eq!(target(&script), Target::AllMasters);
        for keyless in ["PING", "TIME", "DBSIZE"] {
            assert_eq!(target(&redis::cmd(keyless)), Target::AnyMaster, "{keyless}");
        }
        let mut nodes = redis::cmd("CLUSTER");
        nodes.arg("SHARDS");
        assert_eq!(target(&nodes), Target::AnyMaster);
        let mut pipe = redis::pipe();
        pipe.cmd("PING")
            .cmd("HSET")
            .arg("presence:{a}")
            .arg("f")
            .arg("v");
        assert_eq!(pipeline_target(&pipe), slot("presence:{a}"));
    }
}
