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
//!   changes.
//!
//! Both are cheap to clone (clones share the connection). Code that runs
//! commands takes `&mut C where C: redis::aio::ConnectionLike`, or this
//! type, and never needs to know which one it has. Subscriptions are not
//! made here: they are the broker's.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The process's command connection: a standalone Redis or a cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// One Redis server (`REDIS_URL`).
    Standalone(ConnectionManager),
    /// A Redis Cluster: one multiplexed connection per node.
    Cluster(ClusterConnection),
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

impl From<ClusterConnection> for RedisConn {
    fn from(conn: ClusterConnection) -> Self {
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
