//! Talking to a Redis Cluster as a backend would (`--redis-cluster`):
//! tokens with `SETEX session:{<id>}:auth`, messages with `SPUBLISH
//! session:{<id>}:down` (or `PUBLISH` with `--cluster-pubsub classic`),
//! through the redis crate's cluster client.
//!
//! Redis refuses a pipeline whose commands fall in several slots, and
//! sessions spread over all 16,384 slots, so a pipeline per slot would
//! hold about one command. Like a cluster-aware client's pipeline
//! (redis-py's `ClusterPipeline`), [`ClusterBackend`] groups each batch by
//! the master that serves its slots (read once with `CLUSTER SLOTS`) and
//! sends one pipeline per master, all at once: a master runs commands of
//! several of its own slots in one pipeline, since a pipeline is not a
//! transaction. A slot that moves during a run makes its commands fail
//! (counted as errors); a benchmark does not follow it.

use std::collections::HashMap;

use anyhow::{Context, bail};
use redis::Value;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};

/// How a cluster's channels are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PubSub {
    /// `SPUBLISH` (wsproxy's `REDIS_CLUSTER_PUBSUB=sharded`, the default).
    Sharded,
    /// `PUBLISH` (`REDIS_CLUSTER_PUBSUB=classic`).
    Classic,
}

impl PubSub {
    pub fn command(self) -> &'static str {
        match self {
            Self::Sharded => "SPUBLISH",
            Self::Classic => "PUBLISH",
        }
    }
}

/// A session's names on a cluster: its id as a hash tag.
pub fn auth_key(session: &str) -> String {
    format!("session:{{{session}}}:auth")
}

pub fn down_channel(session: &str) -> String {
    format!("session:{{{session}}}:down")
}

/// A cluster connection and which master serves each slot.
pub struct ClusterBackend {
    conn: ClusterConnection,
    /// One route per master (a slot it serves): where its pipeline goes.
    routes: Vec<Route>,
    /// "host:port" of each master, in the order of `routes`.
    pub masters: Vec<String>,
    owner: HashMap<Slot, usize>,
}

impl ClusterBackend {
    pub async fn connect(nodes: &[String]) -> anyhow::Result<Self> {
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        // No retries: a retried pipeline could publish twice.
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .tcp_settings(tcp)
            .retries(0)
            .build()?;
        let mut conn = client
            .get_async_connection()
            .await
            .with_context(|| format!("connecting to the Redis Cluster at {}", nodes.join(",")))?;
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .context("CLUSTER SLOTS")?;
        let Value::Array(ranges) = slots else {
            bail!("CLUSTER SLOTS: unexpected reply {slots:?}");
        };
        let mut masters: Vec<String> = Vec::new();
        let mut routes = Vec::new();
        let mut owner = HashMap::new();
        for range in ranges {
            let Value::Array(r) = range else {
                bail!("CLUSTER SLOTS: unexpected range {range:?}");
            };
            let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(master))) =
                (r.first(), r.get(1), r.get(2))
            else {
                bail!("CLUSTER SLOTS: unexpected range {r:?}");
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                other => bail!("CLUSTER SLOTS: unexpected host {other:?}"),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                bail!("CLUSTER SLOTS: unexpected master {master:?}");
            };
            let addr = format!("{host}:{port}");
            let index = match masters.iter().position(|m| *m == addr) {
                Some(i) => i,
                None => {
                    masters.push(addr);
                    routes.push(Route::new(*lo as u16, SlotAddr::Master));
                    masters.len() - 1
                }
            };
            for slot in *lo..=*hi {
                let slot = Slot::new(slot as u16).context("slot out of range")?;
                owner.insert(slot, index);
            }
        }
        if owner.len() != 16_384 {
            bail!("the cluster serves {} of 16384 slots", owner.len());
        }
        Ok(Self {
            conn,
            routes,
            masters,
            owner,
        })
    }

    /// The index (into `masters`) of the master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> usize {
        self.owner
            .get(&Slot::for_key(key))
            .copied()
            .unwrap_or_default()
    }

    /// One empty pipeline per master.
    pub fn pipelines(&self) -> Vec<redis::Pipeline> {
        self.routes.iter().map(|_| redis::pipe()).collect()
    }

    /// Sends each master its pipeline, all at once; returns how many
    /// commands failed (a whole pipeline that failed counts all of its).
    pub async fn send(&self, pipes: Vec<redis::Pipeline>) -> u64 {
        let calls = pipes
            .into_iter()
            .zip(&self.routes)
            .filter(|(p, _)| !p.is_empty())
            .map(|(pipe, route)| {
                let mut conn = self.conn.clone();
                let route = SingleNodeRoutingInfo::SpecificNode(*route);
                async move {
                    let len = pipe.len();
                    match conn.route_pipeline(pipe, 0, len, route).await {
                        Ok(values) => values
                            .iter()
                            .filter(|v| matches!(v, Value::ServerError(_)))
                            .count() as u64,
                        Err(_) => len as u64,
                    }
                }
            });
        futures_util::future::join_all(calls).await.iter().sum()
    }
}
