//! Sharded mode: which masters' connections changed, so that only the
//! channels of their slots count as interrupted.
//!
//! The redis crate's cluster connection keeps one connection per node and
//! reconnects it by itself, but its pushes do not say *which* node's
//! connection dropped. Redis does know: `CLIENT INFO` names the connection
//! it is asked on (its `id`, the server's own address `laddr`, its `age`
//! in seconds). So after a drop, and at every keepalive, the broker asks
//! each master's first slot, over the cluster connection (routed as its
//! `SSUBSCRIBE`s are), and compares with what it saw last:
//!
//! - the same server, the same id, and at least as old as the time since
//!   the last look says (so not a restarted server's new connection that
//!   happened to get the same id): the connection, and every
//!   subscription on it, lived through; nothing was missed on that shard;
//! - anything else, or no answer: the subscriptions of that master's slots
//!   may have missed messages in between. Those channels alone are lost to
//!   gapless subscribers (reliable sessions resume from history) and are
//!   subscribed again.
//!
//! (Routing by slot, not by address, on purpose: a request for an address
//! the crate has no connection to makes it rebuild every connection from
//! the seeds, which would interrupt every shard.)
//!
//! A slot no master claims counts as changed too. Nothing is ever assumed
//! unchanged that was not seen unchanged: an extra resume is cheap, a
//! silent gap is not.

use std::collections::{HashMap, HashSet};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{RedisResult, Value};

/// Hash slots in a Redis Cluster.
const SLOTS: u16 = 16_384;

/// The broker's connections per master, as last seen.
#[derive(Debug, Default)]
pub(super) struct Nodes {
    /// `host:port` of a master -> our connection to it, as `CLIENT INFO`
    /// told it.
    seen: HashMap<String, Seen>,
}

/// One look at one connection.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    /// The server's address (`laddr`) and the connection's `id`.
    who: (String, i64),
    /// The connection's `age`, in seconds.
    age: u64,
    /// When it was asked.
    at: tokio::time::Instant,
}

impl Seen {
    /// From `CLIENT INFO`'s line (`id=7 addr=.. laddr=.. fd=.. name= age=3 ..`).
    fn parse(info: &str, at: tokio::time::Instant) -> Option<Seen> {
        let field = |name: &str| {
            info.split_ascii_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        Some(Seen {
            who: (field("laddr")?.to_owned(), field("id")?.parse().ok()?),
            age: field("age")?.parse().ok()?,
            at,
        })
    }

    /// True if `now` is the same connection as `self`, seen earlier: the
    /// same server and id, and aged (give or take the rounding of whole
    /// seconds) by the time between the looks.
    fn lived_to(&self, now: &Seen) -> bool {
        let elapsed = now.at.saturating_duration_since(self.at).as_secs();
        self.who == now.who && now.age.saturating_add(1) >= self.age.saturating_add(elapsed)
    }
}

/// The slots whose subscriptions may have missed messages since the last
/// check (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Changed {
    slots: HashSet<Slot>,
}

impl Changed {
    /// True if `channel`'s subscription may have missed messages.
    pub(super) fn touches(&self, channel: &str) -> bool {
        !self.slots.is_empty() && self.slots.contains(&Slot::for_key(channel.as_bytes()))
    }

    /// True if no slot changed.
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A master and the slot ranges it serves.
#[derive(Debug, PartialEq)]
struct Master {
    host: String,
    port: u16,
    ranges: Vec<(u16, u16)>,
}

impl Nodes {
    /// Asks every master about the broker's connection to it and
    /// remembers the answers. Returns the slots of the masters whose
    /// connection changed (see the module doc), or an error when no node
    /// tells the slot map.
    pub(super) async fn check(&mut self, conn: &mut ClusterConnection) -> RedisResult<Changed> {
        let masters = slot_map(conn).await?;
        let asks = masters.iter().map(|m| {
            let mut conn = conn.clone();
            let first = m.ranges.first().map_or(0, |r| r.0);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                first,
                SlotAddr::Master,
            )));
            async move {
                let info = conn
                    .route_command(redis::cmd("CLIENT").arg("INFO").clone(), routing)
                    .await;
                let at = tokio::time::Instant::now();
                match info {
                    Ok(Value::BulkString(b)) => Seen::parse(&String::from_utf8_lossy(&b), at),
                    Ok(Value::VerbatimString { text, .. }) => Seen::parse(&text, at),
                    Ok(Value::SimpleString(s)) => Seen::parse(&s, at),
                    _ => None,
                }
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut seen = HashMap::with_capacity(masters.len());
        let mut changed = Changed::default();
        let mut covered = vec![false; usize::from(SLOTS)];
        for (master, now) in masters.iter().zip(answers) {
            let addr = format!("{}:{}", master.host, master.port);
            let same = match (self.seen.get(&addr), &now) {
                (Some(before), Some(now)) => before.lived_to(now),
                _ => false,
            };
            for &(first, last) in &master.ranges {
                for slot in first..=last.min(SLOTS - 1) {
                    if let Some(c) = covered.get_mut(usize::from(slot)) {
                        *c = true;
                    }
                    if !same && let Some(slot) = Slot::new(slot) {
                        changed.slots.insert(slot);
                    }
                }
            }
            if let Some(now) = now {
                seen.insert(addr, now);
            }
        }
        for (slot, covered) in (0..SLOTS).zip(covered) {
            if !covered && let Some(slot) = Slot::new(slot) {
                changed.slots.insert(slot);
            }
        }
        self.seen = seen;
        Ok(changed)
    }
}

/// The masters and their slots, from `CLUSTER SLOTS` on any node that
/// answers (a node of the cluster connection's choice, up to three).
async fn slot_map(conn: &mut ClusterConnection) -> RedisResult<Vec<Master>> {
    let mut last = None;
    for _ in 0..3 {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        match conn
            .route_command(redis::cmd("CLUSTER").arg("SLOTS").clone(), routing)
            .await
        {
            Ok(reply) => return Ok(parse_slots(&reply)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no answer"))))
}

/// `CLUSTER SLOTS`' reply: `[[first, last, [host, port, id, ..], replicas..], ..]`.
/// Entries that do not read as such are skipped (their slots then count
/// as uncovered, so as changed).
fn parse_slots(reply: &Value) -> Vec<Master> {
    let mut masters: Vec<Master> = Vec::new();
    let Value::Array(entries) = reply else {
        return masters;
    };
    for entry in entries {
        let Value::Array(entry) = entry else { continue };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(node))) =
            (entry.first(), entry.get(1), entry.get(2))
        else {
            continue;
        };
        let (Some(host), Some(Value::Int(port))) = (node.first(), node.get(1)) else {
            continue;
        };
        let host = match host {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => continue,
        };
        let (Ok(first), Ok(last), Ok(port)) = (
            u16::try_from(*first),
            u16::try_from(*last),
            u16::try_from(*port),
        ) else {
            continue;
        };
        match masters
            .iter_mut()
            .find(|m| m.host == host && m.port == port)
        {
            Some(m) => m.ranges.push((first, last)),
            None => masters.push(Master {
                host,
                port,
                ranges: vec![(first, last)],
            }),
        }
    }
    masters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn cluster_slots_become_masters_with_their_ranges() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                node("10.0.0.1", 7000),
            ]),
            // Not a slot range: skipped.
            Value::Array(vec![Value::Int(-1), Value::Int(3), node("10.0.0.9", 1)]),
            Value::Int(7),
        ]);
        assert_eq!(
            parse_slots(&reply),
            vec![
                Master {
                    host: "10.0.0.1".into(),
                    port: 7000,
                    ranges: vec![(0, 5460), (10923, 16383)],
                },
                Master {
                    host: "10.0.0.2".into(),
                    port: 7001,
                    ranges: vec![(5461, 10922)],
                },
            ]
        );
    }

    #[test]
    fn a_connection_is_the_same_only_if_it_aged_with_the_clock() {
        let t0 = tokio::time::Instant::now();
        let info = |id: i64, laddr: &str, age: u64| {
            format!("id={id} addr=127.0.0.1:5000 laddr={laddr} fd=8 name= age={age} idle=0 flags=N")
        };
        let before = Seen::parse(&info(7, "10.0.0.1:7000", 3), t0).expect("parsed");
        let later = |secs| t0 + std::time::Duration::from_secs(secs);
        let at =
            |id, laddr, age, secs| Seen::parse(&info(id, laddr, age), later(secs)).expect("parsed");
        assert!(before.lived_to(&at(7, "10.0.0.1:7000", 8, 5)));
        // Whole seconds round down on both sides.
        assert!(before.lived_to(&at(7, "10.0.0.1:7000", 7, 5)));
        // Another connection, another server, or a restarted server's new
        // connection that got the same id.
        assert!(!before.lived_to(&at(8, "10.0.0.1:7000", 8, 5)));
        assert!(!before.lived_to(&at(7, "10.0.0.2:7000", 8, 5)));
        assert!(!before.lived_to(&at(7, "10.0.0.1:7000", 2, 5)));
        assert_eq!(Seen::parse("id=x laddr=a age=1", t0), None);
        assert_eq!(Seen::parse("id=1 age=1", t0), None);
    }

    #[test]
    fn only_the_changed_slots_touch_a_channel() {
        let channel = "session:{abc}:down";
        let mut changed = Changed::default();
        assert!(!changed.touches(channel));
        changed.slots.insert(Slot::for_key(b"{abc}"));
        assert!(changed.touches(channel));
        assert!(
            !changed.touches("session:{other}:down") || {
                Slot::for_key(b"{other}") == Slot::for_key(b"{abc}")
            }
        );
    }
}
