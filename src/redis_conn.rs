//! The command connection to Redis ([`RedisConn`]): one multiplexed
//! connection that the whole process shares for commands (the token check,
//! `PUBLISH`, the history functions, `/ready`'s `PING`), whichever way
//! Redis is deployed.
//!
//! - **Standalone** (`REDIS_URL`): the redis crate's `ConnectionManager`,
//!   one multiplexed connection that reconnects by itself.
//! - **Cluster**: the redis crate's async cluster connection, one
//!   multiplexed connection per node; it routes each command by its key's
//!   slot, follows `MOVED`/`ASK` and refreshes its slot map on topology
//!   changes. A watchdog ([`ClusterConn`]) replaces it with a new one when
//!   it stops answering altogether: the crate's recovery can wedge for good
//!   (see [`ClusterConn`]).
//!
//! Both are cheap to clone (clones share the connection). Code that runs
//! commands takes `&mut C where C: redis::aio::ConnectionLike`, or this
//! type, and never needs to know which one it has. Subscriptions are not
//! made here: they are the broker's.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

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

/// How often the watchdog probes the cluster connection.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe (`PING` to any connected node) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Probes failed in a row after which the connection is replaced: about
/// 3 × (1 + 2) s of no answer at all, longer than any recovery of the
/// crate's that still makes progress (a slot refresh, or a reconnection
/// whose connect times out after 2 s).
const WEDGED_AFTER: u32 = 3;

/// A Redis Cluster's command connection that a watchdog replaces with a
/// new one when it has answered nothing for several seconds.
///
/// Why: the redis crate (1.8) drives every request of a cluster connection
/// from one task, which stops polling its in-flight requests while it
/// recovers (a slot refresh, or a reconnection to the seed nodes after a
/// `ClusterConnectionNotFound`). A recovery needs the write half of the
/// connection map's `tokio::sync::RwLock`; an in-flight request that was
/// queued for the read half when the recovery began is granted it but is
/// never polled again to release it, so the recovery waits for ever and
/// so does every later request, for every shard. Under load (hundreds of
/// requests in flight when a master is killed) this happens at the first
/// failover. Nothing inside the connection can undo it, so it is dropped
/// and a new one made from the same client (the seeds, then the slot map).
///
/// Clones share the current connection; a command takes a clone of it
/// under a read lock held only for that clone (an `Arc` and a channel
/// sender), never across an `.await`.
#[derive(Clone)]
pub struct ClusterConn {
    shared: Arc<ClusterShared>,
}

struct ClusterShared {
    client: ClusterClient,
    current: RwLock<ClusterConnection>,
}

impl ClusterConn {
    /// A connection made in the background (a cluster that is down makes
    /// commands fail, not this), and its watchdog, which ends when the
    /// last clone is dropped. Needs a Tokio runtime.
    pub fn new(client: ClusterClient) -> Self {
        let conn = Self::connect(&client);
        let shared = Arc::new(ClusterShared {
            client,
            current: RwLock::new(conn),
        });
        tokio::spawn(watchdog(Arc::downgrade(&shared)));
        Self { shared }
    }

    fn connect(client: &ClusterClient) -> ClusterConnection {
        client.get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new())
    }

    /// The connection in use now.
    fn current(&self) -> ClusterConnection {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Probes the connection and replaces it when [`WEDGED_AFTER`] probes in
/// a row got no answer.
async fn watchdog(shared: Weak<ClusterShared>) {
    let mut failed = 0u32;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut conn = shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let probe = conn.route_command(
            redis::cmd("PING"),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        );
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => failed = 0,
            Ok(Err(e)) => {
                failed += 1;
                tracing::debug!(error = %e, failed, "redis cluster: probe failed");
            }
            Err(_) => {
                failed += 1;
                tracing::debug!(failed, "redis cluster: probe timed out");
            }
        }
        if failed >= WEDGED_AFTER {
            tracing::warn!(
                probes = failed,
                "redis cluster: the command connection answers nothing; replacing it with a new one"
            );
            let fresh = ClusterConn::connect(&shared.client);
            *shared.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            failed = 0;
        }
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut conn = self.current();
        Box::pin(async move { conn.req_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let mut conn = self.current();
        Box::pin(async move { conn.req_packed_commands(cmd, offset, count).await })
    }

    fn get_db(&self) -> i64 {
        0
    }
}
