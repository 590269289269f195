//! `chaos`: reliable sessions (the `wsproxy.v1` subprotocol) while things
//! fail, checked message by message. Nothing may be lost, duplicated or
//! reordered, in either direction.
//!
//! It starts everything it needs itself, on loopback, in a temporary
//! directory, so that it can kill it:
//!
//! - a `redis-server` on a free port with `--appendonly yes --appendfsync
//!   always --save ''`: every write is on disk before Redis answers it, so
//!   a SIGKILL loses nothing that was acknowledged;
//! - wsproxy as a child process (`--wsproxy-bin`; the debug build by
//!   default, which is what CI builds: this is about correctness, not
//!   speed) with `RELIABLE_SESSIONS=true` and bounds this run never
//!   reaches (`HISTORY_MAX_LEN`, `UP_STREAM_MAX_LEN`, `UP_DEDUPE_SECS`,
//!   `HISTORY_TTL_SECS`, see [`Procs::start_wsproxy`]), so nothing is
//!   trimmed or forgotten and every resume must succeed.
//!
//! Then, for `--secs`:
//!
//! - **Clients**: `--clients` reliable WebSockets
//!   (`/agent-x/ws/{session}`, token stored with `SETEX
//!   session:{id}:auth`), one session each by default. Each keeps the
//!   welcome's epoch and the last offset it saw, and after every drop
//!   reconnects (capped backoff) with `?epoch=..&offset=..`. A welcome
//!   with `"resumed":false` is a failure: nothing here is ever trimmed.
//! - **Down**: [`PUBLISHERS`] backend tasks publish `{"seq":k}` to each
//!   session in turn with `FCALL wsproxy_publish`, `--down-rate` in total.
//!   A publish that errors (Redis restarting) may or may not have been
//!   applied, so the publisher looks at the history's newest entry once
//!   Redis answers again: if it is `k`, `k` was published; otherwise it
//!   publishes `k` again. Every `k` is thus either confirmed exactly once
//!   or, for the one in flight when the run stops, in doubt ("unconfirmed"
//!   if it arrives: neither lost nor duplicated). Publishing starts once
//!   every client has its first welcome, so each must get every `k` from 1.
//! - **Up**: each client sends `{"type":"message","id":"c<i>-<k>",
//!   "data":{"seq":k}}`, `--up-rate` in total, one at a time: the next
//!   only once the last is acknowledged. (A client with several in flight
//!   could itself reorder them: one refused with `not_stored` and the next
//!   stored while Redis comes back.) The unacknowledged one is resent with
//!   the same id after a `not_stored` and after every reconnect; wsproxy
//!   stores it once. [`WORKERS`] backend workers read `wsproxy:up:0` with
//!   a consumer group (`XREADGROUP`, `XACK`, and `XAUTOCLAIM` for entries
//!   pending longer than [`CLAIM_IDLE`]).
//! - **Chaos**: every `--drop-every-secs`, `--drop-percent` of the open
//!   connections are reset (TCP RST, no close frame), half of them just
//!   after sending a message, before its ack can arrive; at a third of the
//!   run wsproxy is SIGKILLed and started again on the same port a second
//!   later; at two thirds Redis is SIGKILLed and started again on its AOF
//!   (`--redis-down-ms` later).
//!
//! With `--cluster` ([`crate::chaos_cluster`]) it starts a 3+3 Redis
//! Cluster instead (AOF, `appendfsync always` on every node) and wsproxy
//! on it with sharded pub/sub and `UP_STREAM_SHARDS` set so that the up
//! streams (`wsproxy:up:{<n>}`) cover all three masters (the workers read
//! each); sessions (`session:{<id>}:...`) spread over all shards, and the
//! backend talks through a cluster client that never retries by itself
//! (the publishers' in-doubt lookup decides instead). In place of the
//! Redis restart, at two thirds the master serving up stream 0 is
//! SIGKILLed, the run waits for its replica to take over and for wsproxy
//! to be ready, and `--node-down-ms` after the kill the node is started
//! again (it rejoins as a replica). Replication is asynchronous: what the
//! killed master acknowledged in its last instants may be missing on the
//! promoted replica. Such losses are reported apart, "lost in failover",
//! only when proven: the entry the master acknowledged (its offset or
//! stream id is known) is in a slot it served, was written at most
//! [`FAILOVER_WINDOW_MS`] before the kill, and is absent from the stream
//! at the end. Every other loss fails the run as before. `--wait-replica`
//! makes the backend send `WAIT 1 1000` with each publish.
//!
//! At the end, publishing and sending stop, and the run waits (at most
//! `--settle-secs`) until everything confirmed has arrived. Then it counts,
//! per direction:
//!
//! - **down**, per client: `lost` is a confirmed `k` never received;
//!   `duplicated` a `k` received again; `out-of-order` a `k` received
//!   after a greater one;
//! - **up**, from the workers: `lost` is an acknowledged message no worker
//!   got; `duplicated` a second stream entry with the same message id;
//!   `out-of-order` a client's message whose first entry comes after the
//!   entry of a later message of the same client, in stream order (the
//!   order a single reader sees; two workers may handle them in either
//!   order). A worker seeing the *same entry* twice (a lost `XACK` or a
//!   lost reply claimed back) is the consumer group's at-least-once
//!   delivery, reported as `redelivered`, not a duplicate.
//!
//! It exits non-zero unless lost, duplicated and out-of-order are zero in
//! both directions and no resume failed (nor any other check below, see
//! [`Counts::failures`]). The children and the temporary directory go on
//! every way out: success, error, panic, Ctrl-C or SIGTERM ([`Procs`]'s
//! `Drop`); only a SIGKILL of this process itself leaves them behind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::chaos_cluster::{self, ChaosCluster};
use crate::harness::{self, START_TIMEOUT, free_port, lock};
use crate::net::{self, Ws};
use crate::scenarios::redis_client;
use crate::soak::Rng;
use crate::stats::Report;

/// The reliable-session subprotocol.
const PROTOCOL: &str = "wsproxy.v1";
/// The agent id in every client's URL.
const AGENT: &str = "agent-x";
/// The workers' consumer group.
const GROUP: &str = "chaos";
/// Backend tasks publishing down messages (each owns a share of the
/// sessions, so each session's messages go out in order).
const PUBLISHERS: usize = 4;
/// Backend workers reading client messages.
const WORKERS: usize = 2;
/// An entry pending this long is claimed by a worker (`XAUTOCLAIM`).
const CLAIM_IDLE: Duration = Duration::from_secs(2);
/// How often each worker looks for such entries.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// Reconnect backoff of the clients: doubled after each failure, with
/// jitter, up to the cap.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause before resending a message wsproxy could not store.
const RESEND_AFTER: Duration = Duration::from_millis(250);
/// A message with no answer at all this long: the connection is given up
/// (wsproxy answers within AUTH_TIMEOUT_SECS, 5 s, even when Redis is down).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP connect plus WebSocket handshake, and the welcome after it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// wsproxy is started again this long after its SIGKILL.
const WSPROXY_DOWN: Duration = Duration::from_secs(1);
/// Longest wait, at the start, for every client's first welcome.
const FIRST_WELCOME_TIMEOUT: Duration = Duration::from_secs(60);
/// Every Redis command of the backend tasks: long enough that only a dead
/// connection fails one (a timed-out command may still run later, which
/// would make a publish's fate unknowable).
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Token TTL: longer than any run.
const TOKEN_TTL_SECS: u64 = 3600;
/// Errors printed as they happen (all are counted).
const NOTES_PRINTED: u64 = 20;

/// `wsproxy-bench chaos`'s flags. `--wsproxy` and `--redis` are not used:
/// it starts its own.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// The wsproxy binary to start, SIGKILL and start again. The debug
    /// build by default (what CI builds).
    #[arg(long, default_value = "target/debug/wsproxy")]
    pub wsproxy_bin: PathBuf,
    /// The redis-server binary (found in PATH by default).
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// Reliable clients, each one connection.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Sessions the clients are spread over (client i joins session
    /// i mod M); 0: one session per client.
    #[arg(long, default_value_t = 0)]
    pub sessions: usize,
    /// Seconds of load and chaos; settling comes on top.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Longest wait at the end for what was confirmed to arrive.
    #[arg(long, default_value_t = 30)]
    pub settle_secs: u64,
    /// Down messages per second, over all sessions.
    #[arg(long, default_value_t = 150.0)]
    pub down_rate: f64,
    /// Up messages per second, over all clients.
    #[arg(long, default_value_t = 100.0)]
    pub up_rate: f64,
    /// Seconds between two rounds of dropped connections.
    #[arg(long, default_value_t = 3)]
    pub drop_every_secs: u64,
    /// Percentage of the open connections each round resets.
    #[arg(long, default_value_t = 10)]
    pub drop_percent: u64,
    /// Do not SIGKILL wsproxy.
    #[arg(long)]
    pub no_wsproxy_kill: bool,
    /// Do not restart Redis.
    #[arg(long)]
    pub no_redis_restart: bool,
    /// Milliseconds between Redis' SIGKILL and its restart.
    #[arg(long, default_value_t = 500)]
    pub redis_down_ms: u64,
    /// Seed of the random choices (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the temporary directory (Redis' AOF, both logs) and print
    /// where it is.
    #[arg(long)]
    pub keep: bool,
    /// A Redis Cluster (3 masters + 3 replicas, AOF with appendfsync
    /// always, started here) instead of one redis-server; wsproxy uses it
    /// with sharded pub/sub and one up stream per shard. Instead of
    /// restarting Redis, at 2/3 the master that serves up stream 0 is
    /// SIGKILLed, its replica takes over, and the node is started again
    /// `--node-down-ms` later (it rejoins as a replica).
    #[arg(long)]
    pub cluster: bool,
    /// With --cluster: milliseconds between the master's SIGKILL and its
    /// restart.
    #[arg(long, default_value_t = 6000)]
    pub node_down_ms: u64,
    /// With --cluster: the backend sends `WAIT 1 1000` to the session's
    /// master right after each `FCALL wsproxy_publish` (same connection,
    /// one pipeline), so a publish is confirmed only once a replica has it.
    #[arg(long)]
    pub wait_replica: bool,
}

/// What a chaos run found, for `--json` and the exit code.
pub struct Outcome {
    pub report: Report,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
}

/// A stream entry id `<ms>-<seq>` as two numbers: they compare in stream
/// order.
type EntryId = (u64, u64);

fn entry_id(id: &str) -> Option<EntryId> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

// --- the processes -----------------------------------------------------------

/// The children and the temporary directory. Dropping it SIGKILLs both
/// children and removes the directory, so every way out of the run cleans
/// up, a panic included.
struct Procs {
    dir: PathBuf,
    redis_bin: PathBuf,
    wsproxy_bin: PathBuf,
    redis_port: u16,
    ws_port: u16,
    redis: Option<Child>,
    wsproxy: Option<Child>,
    /// Leave the directory (`--keep`).
    keep: bool,
    /// `--cluster`: the cluster, in place of `redis`.
    cluster: Option<ChaosCluster>,
    /// wsproxy's `UP_STREAM_SHARDS`.
    up_shards: usize,
}

impl Drop for Procs {
    fn drop(&mut self) {
        kill_now(&mut self.wsproxy);
        kill_now(&mut self.redis);
        drop(self.cluster.take());
        if self.keep {
            eprintln!("chaos: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGKILL and reap, blocking (for `Drop`; it takes a moment).
fn kill_now(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGKILL and reap without blocking the runtime.
async fn kill(child: &mut Option<Child>) -> anyhow::Result<()> {
    let Some(mut c) = child.take() else {
        bail!("the process to kill is not running");
    };
    c.kill().context("SIGKILL")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("pid {} still there 10 s after SIGKILL", c.id());
        }
        sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

impl Procs {
    fn new(args: &ChaosArgs, rng: &mut Rng) -> anyhow::Result<Self> {
        // Absolute: wsproxy runs in the temporary directory.
        let wsproxy_bin = std::fs::canonicalize(&args.wsproxy_bin).with_context(|| {
            format!(
                "--wsproxy-bin {}: not found (build it: cargo build --bin wsproxy)",
                args.wsproxy_bin.display()
            )
        })?;
        let dir = harness::temp_dir("chaos")?;
        // From here on, Drop removes the directory.
        let mut procs = Self {
            dir,
            redis_bin: args.redis_bin.clone(),
            wsproxy_bin,
            redis_port: 0,
            ws_port: 0,
            redis: None,
            wsproxy: None,
            keep: args.keep,
            cluster: None,
            up_shards: 1,
        };
        procs.redis_port = free_port(rng, &[])?;
        procs.ws_port = free_port(rng, &[procs.redis_port])?;
        Ok(procs)
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    /// Where the backend tasks connect: the server, or the cluster's seeds.
    fn redis_target(&self) -> RedisTarget {
        match &self.cluster {
            Some(c) => RedisTarget::Cluster(c.urls()),
            None => RedisTarget::Standalone(self.redis_url()),
        }
    }

    fn start_redis(&mut self) -> anyhow::Result<u32> {
        let child = harness::redis_server(&self.redis_bin, self.redis_port, &self.dir)
            .args(harness::AOF_ALWAYS)
            .spawn()
            .with_context(|| format!("starting {}", self.redis_bin.display()))?;
        let pid = child.id();
        self.redis = Some(child);
        Ok(pid)
    }

    /// Starts wsproxy with a clean environment (nothing of this process'
    /// leaks in) in the temporary directory (no stray `.env` is read), its
    /// output appended to `wsproxy.log` there.
    fn start_wsproxy(&mut self) -> anyhow::Result<u32> {
        let log_path = self.dir.join("wsproxy.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(&self.wsproxy_bin);
        cmd.env_clear()
            .current_dir(&self.dir)
            .env("RELIABLE_SESSIONS", "true")
            .env("HOST", "127.0.0.1")
            .env("PORT", self.ws_port.to_string())
            // CHAOS_WSPROXY_LOG overrides the level (e.g. `warn,redis=debug`
            // to see the redis crate's cluster recovery).
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_WSPROXY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Bounds no run reaches: a session gets a few hundred messages,
            // the up stream a few tens of thousands, a run lasts minutes.
            // Nothing is trimmed or expires, so every resume must succeed
            // and every resend is recognised.
            .env("HISTORY_MAX_LEN", "100000")
            .env("HISTORY_TTL_SECS", "3600")
            .env("UP_STREAM_SHARDS", self.up_shards.to_string())
            .env("UP_STREAM_MAX_LEN", "10000000")
            .env("UP_DEDUPE_SECS", "3600")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match &self.cluster {
            Some(c) => cmd
                .env("REDIS_CLUSTER_NODES", c.urls().join(","))
                .env("REDIS_CLUSTER_PUBSUB", "sharded"),
            None => cmd.env("REDIS_URL", self.redis_url()),
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.wsproxy_bin.display()))?;
        let pid = child.id();
        self.wsproxy = Some(child);
        Ok(pid)
    }

    /// Fails if a child exited on its own.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = &mut self.cluster {
            c.check_alive()?;
        }
        for (name, child) in [
            ("wsproxy", &mut self.wsproxy),
            ("redis-server", &mut self.redis),
        ] {
            if let Some(c) = child
                && let Some(status) = c.try_wait()?
            {
                bail!("{name} exited on its own ({status})");
            }
        }
        Ok(())
    }

    /// The last lines of wsproxy's log and how many lines it has.
    fn wsproxy_log_tail(&self, n: usize) -> (usize, Vec<String>) {
        let text = std::fs::read_to_string(self.dir.join("wsproxy.log")).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let total = lines.len();
        (total, lines.into_iter().rev().take(n).rev().collect())
    }
}

/// Waits until wsproxy's `/ready` is 200 (it is 503 until Redis answers
/// and the library is loaded); how long that took.
async fn wait_ready(procs: &mut Procs) -> anyhow::Result<Duration> {
    harness::wait_ready(procs.ws_port, "wsproxy", || procs.check_alive()).await
}

/// Waits until Redis answers PING (not LOADING); how long that took.
async fn wait_redis(procs: &mut Procs) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let url = procs.redis_url();
    loop {
        let ping = async {
            let mut c = redis_client(&url)?
                .get_multiplexed_async_connection()
                .await?;
            let pong: String = redis::cmd("PING").query_async(&mut c).await?;
            anyhow::Ok(pong)
        };
        if let Ok(Ok(pong)) = tokio::time::timeout(Duration::from_secs(2), ping).await
            && pong == "PONG"
        {
            return Ok(start.elapsed());
        }
        procs.check_alive()?;
        if start.elapsed() > START_TIMEOUT {
            bail!("redis-server not answering {START_TIMEOUT:?} after starting");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

// --- shared state ----------------------------------------------------------

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Clients send, publishers publish, connections are dropped.
    Load,
    /// Nothing new is sent; what is unacknowledged is still resent.
    Settle,
    /// Everything stops.
    Stop,
}

/// One session: its id, token and how far its messages are confirmed.
struct Session {
    id: String,
    token: String,
    /// Every `seq` from 1 to this is in the history, exactly once.
    confirmed: AtomicU64,
    /// The offset each confirmed seq got (index seq - 1).
    offsets: Mutex<Vec<String>>,
}

/// What one client saw, checked as it arrives.
#[derive(Debug, Default)]
struct ClientBook {
    /// Down: the seqs received (each counted once), with the offset each
    /// first came with.
    seen: HashMap<u64, String>,
    /// Down: (seq, first offset, offset of the repeat) of each duplicate.
    repeats: Vec<(u64, String, String)>,
    max_seen: u64,
    duplicated: u64,
    out_of_order: u64,
    /// Messages whose offset was not above the one before.
    offset_regressions: u64,
    /// Up: acknowledged message -> the offset the ack gave.
    acked: HashMap<u64, EntryId>,
    /// The message sent and not yet acknowledged.
    pending: Option<u64>,
    /// Got its first welcome.
    welcomed: bool,
}

impl ClientBook {
    fn down(&mut self, seq: u64, offset: &str) {
        if let Some(first) = self.seen.get(&seq) {
            self.duplicated += 1;
            self.repeats.push((seq, first.clone(), offset.to_owned()));
            return;
        }
        self.seen.insert(seq, offset.to_owned());
        if seq < self.max_seen {
            self.out_of_order += 1;
        }
        self.max_seen = self.max_seen.max(seq);
    }

    /// Confirmed seqs (1..=confirmed) not received.
    fn missing(&self, confirmed: u64) -> u64 {
        (1..=confirmed)
            .filter(|k| !self.seen.contains_key(k))
            .count() as u64
    }
}

/// A client's slot: the controller's handle on it, and its book.
#[derive(Default)]
struct ClientSlot {
    /// Notified to reset the connection.
    kill: Notify,
    connected: AtomicBool,
    book: Mutex<ClientBook>,
}

/// What the workers got from the stream.
#[derive(Debug, Default)]
struct UpBook {
    /// Every entry handled: (up stream shard, entry id).
    entries: HashSet<(usize, EntryId)>,
    /// An entry handled again (a lost XACK or reply, claimed back).
    redelivered: u64,
    /// (client, k) -> its first entry.
    first: HashMap<(usize, u64), EntryId>,
    /// A second entry for a (client, k) already stored.
    duplicated: u64,
    /// (client, k, first entry, second entry) of each duplicate.
    repeats: Vec<(usize, u64, EntryId, EntryId)>,
    /// Entries that are not this run's messages.
    malformed: u64,
}

impl UpBook {
    fn record(&mut self, shard: usize, entry: EntryId, client: usize, k: u64) {
        if !self.entries.insert((shard, entry)) {
            self.redelivered += 1;
            return;
        }
        match self.first.entry((client, k)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                self.duplicated += 1;
                self.repeats.push((client, k, *o.get(), entry));
            }
        }
    }
}

/// Event counters.
#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    /// Connections reset on purpose.
    drops: AtomicU64,
    /// Of those, resets with a client message unacknowledged.
    resets_in_flight: AtomicU64,
    /// Connections that ended without our asking (wsproxy killed, ...).
    broken: AtomicU64,
    resumes: AtomicU64,
    replayed: AtomicU64,
    resume_failures: AtomicU64,
    /// Frames that are not what the protocol says (an `error` other than
    /// `not_stored`, an ack for another message, a binary frame, ...).
    protocol_errors: AtomicU64,
    reply_timeouts: AtomicU64,
    up_sent: AtomicU64,
    up_resent: AtomicU64,
    up_duplicate_acks: AtomicU64,
    up_not_stored: AtomicU64,
    publish_errors: AtomicU64,
    /// Publishes that errored but had been applied (seen in the history).
    publish_applied_anyway: AtomicU64,
    xack_failures: AtomicU64,
    worker_errors: AtomicU64,
    notes: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct Shared {
    ws_base: String,
    redis: RedisTarget,
    /// Up streams, by shard (`UP_STREAM_SHARDS`).
    up_streams: Vec<String>,
    /// `--wait-replica`.
    wait_replica: bool,
    /// Publishes a replica did not acknowledge within WAIT's second.
    wait_unreplicated: AtomicU64,
    /// Each failed resume: (client, the offset it asked for, reason, when).
    resume_failed: Mutex<Vec<(usize, String, String, f64)>>,
    sessions: Vec<Session>,
    clients: Vec<ClientSlot>,
    /// Seconds between two messages of one client.
    up_period: Duration,
    down_rate: f64,
    phase: watch::Receiver<Phase>,
    welcomed: AtomicUsize,
    /// Publishers with a message not yet confirmed.
    publishing: AtomicUsize,
    counters: Counters,
    resume_reasons: Mutex<BTreeMap<String, u64>>,
    /// Close frames wsproxy sent, by code (0: none given).
    close_codes: Mutex<BTreeMap<u16, u64>>,
    up: Mutex<UpBook>,
    seed: u64,
    started: Instant,
}

/// A session's key: `session:<id>:<suffix>`, or on a cluster
/// `session:{<id>}:<suffix>` (src/keys.rs).
fn session_key(cluster: bool, id: &str, suffix: &str) -> String {
    if cluster {
        format!("session:{{{id}}}:{suffix}")
    } else {
        format!("session:{id}:{suffix}")
    }
}

/// Up stream `shard`: `wsproxy:up:<n>`, or on a cluster `wsproxy:up:{<n>}`.
fn up_stream(cluster: bool, shard: usize) -> String {
    if cluster {
        format!("wsproxy:up:{{{shard}}}")
    } else {
        format!("wsproxy:up:{shard}")
    }
}

/// The up stream shard of a session: FNV-1a of its id, as wsproxy picks it
/// (src/keys.rs `up_shard`).
fn up_shard(session_id: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards.max(1) as u64) as usize
}

impl Shared {
    fn is_cluster(&self) -> bool {
        matches!(self.redis, RedisTarget::Cluster(_))
    }

    /// Prints the first few noteworthy errors as they happen.
    fn note(&self, what: impl std::fmt::Display) {
        let n = self.counters.notes.fetch_add(1, Ordering::Relaxed);
        if n < NOTES_PRINTED {
            eprintln!(
                "chaos: [{:.1}s] {what}",
                self.started.elapsed().as_secs_f64()
            );
            if n + 1 == NOTES_PRINTED {
                eprintln!("chaos: (further notes are counted, not printed)");
            }
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }
}

/// Waits until the phase is past `phase` (or the run is over).
async fn past(rx: &mut watch::Receiver<Phase>, phase: Phase) {
    let _ = rx
        .wait_for(|p| match phase {
            Phase::Load => *p != Phase::Load,
            Phase::Settle | Phase::Stop => *p == Phase::Stop,
        })
        .await;
}

// --- Redis for the backend tasks -------------------------------------------

/// Where the backend tasks' Redis is.
#[derive(Debug, Clone)]
enum RedisTarget {
    Standalone(String),
    /// A cluster's seed URLs.
    Cluster(Vec<String>),
}

/// A Redis connection that is made again after any error: to one server,
/// or (`--cluster`) a cluster connection, which routes each command to the
/// master of its key's slot. The cluster client never retries on its own
/// (`retries(0)`): a publish whose fate is unknown (a connection error
/// during a failover) must come back here, to be looked up, not be sent
/// twice; a MOVED or CLUSTERDOWN comes back too, and the connection is
/// made again from the seeds (a fresh slot map).
enum Backend {
    Standalone {
        client: redis::Client,
        conn: Option<MultiplexedConnection>,
    },
    Cluster {
        client: redis::cluster::ClusterClient,
        conn: Option<ClusterConnection>,
    },
}

impl Backend {
    fn new(target: &RedisTarget) -> anyhow::Result<Self> {
        Ok(match target {
            RedisTarget::Standalone(url) => Self::Standalone {
                client: redis_client(url)?,
                conn: None,
            },
            RedisTarget::Cluster(seeds) => Self::Cluster {
                client: redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
                    .retries(0)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(REDIS_RESPONSE_TIMEOUT)
                    .build()?,
                conn: None,
            },
        })
    }

    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> anyhow::Result<T> {
        match self {
            Self::Standalone { client, conn } => {
                if conn.is_none() {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(2)))
                        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
                    *conn = Some(
                        client
                            .get_multiplexed_async_connection_with_config(&config)
                            .await?,
                    );
                }
                let Some(c) = conn.as_mut() else {
                    unreachable!("connected above");
                };
                match cmd.query_async(c).await {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        *conn = None;
                        Err(e.into())
                    }
                }
            }
            Self::Cluster { client, conn } => {
                let c = Self::cluster_conn(client, conn).await?;
                match cmd.query_async(c).await {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        *conn = None;
                        Err(e.into())
                    }
                }
            }
        }
    }

    async fn cluster_conn<'a>(
        client: &redis::cluster::ClusterClient,
        conn: &'a mut Option<ClusterConnection>,
    ) -> anyhow::Result<&'a mut ClusterConnection> {
        if conn.is_none() {
            *conn = Some(client.get_async_connection().await?);
        }
        let Some(c) = conn.as_mut() else {
            unreachable!("connected above");
        };
        Ok(c)
    }

    /// `FCALL wsproxy_publish` and then `WAIT 1 1000`, as one pipeline to
    /// the master of `history`'s slot (cluster only): the offset, and how
    /// many replicas acknowledged it.
    async fn publish_and_wait(
        &mut self,
        publish: &redis::Cmd,
        history: &str,
    ) -> anyhow::Result<(String, i64)> {
        let Self::Cluster { client, conn } = self else {
            bail!("--wait-replica needs --cluster");
        };
        let c = Self::cluster_conn(client, conn).await?;
        let mut pipe = redis::pipe();
        pipe.add_command(publish.clone());
        pipe.cmd("WAIT").arg(1).arg(1000);
        let route = redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(
            redis::cluster_routing::Route::new(
                chaos_cluster::slot_of(history),
                redis::cluster_routing::SlotAddr::Master,
            ),
        );
        let result = c.route_pipeline(pipe, 0, 2, route).await;
        let values = match result {
            Ok(v) => v,
            Err(e) => {
                *conn = None;
                return Err(e.into());
            }
        };
        let [offset, replicas] = <[redis::Value; 2]>::try_from(values)
            .map_err(|v| anyhow::anyhow!("FCALL+WAIT: {} replies", v.len()))?;
        Ok((
            redis::from_redis_value(offset)?,
            redis::from_redis_value(replicas)?,
        ))
    }
}

// --- clients ---------------------------------------------------------------

/// A client's position in its session's history.
#[derive(Default)]
struct Position {
    epoch: Option<String>,
    offset: Option<String>,
}

/// How one connection ended.
enum End {
    /// Reset on purpose.
    Dropped,
    /// Ended by the other side or an error.
    Broken(String),
    /// The run is over.
    Stop,
}

async fn open(url: &str, token: &str) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    let headers = req.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    headers.insert("sec-websocket-protocol", HeaderValue::from_static(PROTOCOL));
    let handshake = async {
        let stream = TcpStream::connect(net::addr_of(url)?).await?;
        stream.set_nodelay(true)?;
        let (ws, response) = tokio_tungstenite::client_async(req, stream).await?;
        if response
            .headers()
            .get("sec-websocket-protocol")
            .is_none_or(|p| p != PROTOCOL)
        {
            bail!("wsproxy did not select {PROTOCOL} (is RELIABLE_SESSIONS on?)");
        }
        anyhow::Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .context("connect timed out")?
}

/// One client, connecting again after every drop until the run stops.
async fn client(shared: Arc<Shared>, i: usize) {
    let slot = &shared.clients[i];
    let session = &shared.sessions[i % shared.sessions.len()];
    let mut rng = harness::client_rng(shared.seed, i);
    let mut phase = shared.phase.clone();
    let mut pos = Position::default();
    let mut next_k = 1;
    let mut backoff = BACKOFF_MIN;
    loop {
        if shared.phase() == Phase::Stop {
            return;
        }
        let mut url = format!("{}/{AGENT}/ws/{}", shared.ws_base, session.id);
        if let (Some(epoch), Some(offset)) = (&pos.epoch, &pos.offset) {
            url.push_str(&format!("?epoch={epoch}&offset={offset}"));
        }
        let ws = tokio::select! {
            r = open(&url, &session.token) => r,
            () = past(&mut phase, Phase::Settle) => return,
        };
        match ws {
            Ok(ws) => {
                bump(&shared.counters.connects);
                backoff = BACKOFF_MIN;
                slot.connected.store(true, Ordering::Relaxed);
                let end = connected(&shared, i, ws, &mut pos, &mut next_k, &mut rng).await;
                slot.connected.store(false, Ordering::Relaxed);
                match end {
                    End::Dropped => bump(&shared.counters.drops),
                    End::Broken(why) => {
                        bump(&shared.counters.broken);
                        if get(&shared.counters.broken) <= 3 {
                            shared.note(format_args!("client {i}: connection ended: {why}"));
                        }
                    }
                    End::Stop => return,
                }
            }
            Err(e) => {
                bump(&shared.counters.connect_failures);
                if get(&shared.counters.connect_failures) <= 3 {
                    shared.note(format_args!("client {i}: connect failed: {e:#}"));
                }
                // Jitter: between half and all of the backoff.
                let ms = backoff.as_millis() as usize;
                let pause = Duration::from_millis((ms / 2 + rng.below(ms / 2 + 1)) as u64);
                tokio::select! {
                    () = sleep(pause) => {}
                    () = past(&mut phase, Phase::Settle) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn up_frame(i: usize, k: u64) -> Message {
    Message::text(format!(
        r#"{{"type":"message","id":"c{i}-{k}","data":{{"seq":{k}}}}}"#
    ))
}

/// Reads the welcome and moves `pos` on as it says: a first welcome
/// gives the offset to start from, a resumed one keeps it, a failed resume
/// goes on from the welcome's offset. Counted in `shared`.
async fn welcome(shared: &Shared, i: usize, ws: &mut Ws, pos: &mut Position) -> Result<(), End> {
    let welcome = match tokio::time::timeout(CONNECT_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(other) => return Err(End::Broken(format!("no welcome: {other:?}"))),
        Err(_) => return Err(End::Broken("no welcome in time".into())),
    };
    let w: serde_json::Value = serde_json::from_str(welcome.as_str()).unwrap_or_default();
    let (Some(epoch), Some(offset)) = (w["epoch"].as_str(), w["offset"].as_str()) else {
        bump(&shared.counters.protocol_errors);
        shared.note(format_args!("client {i}: not a welcome: {welcome}"));
        return Err(End::Broken("not a welcome".into()));
    };
    match (pos.epoch.is_some(), w["resumed"].as_bool()) {
        (false, _) => pos.offset = Some(offset.to_owned()),
        (true, Some(true)) => {
            bump(&shared.counters.resumes);
            shared
                .counters
                .replayed
                .fetch_add(w["replayed"].as_u64().unwrap_or(0), Ordering::Relaxed);
        }
        (true, _) => {
            bump(&shared.counters.resume_failures);
            let reason = w["reason"].as_str().unwrap_or("?").to_owned();
            shared.note(format_args!("client {i}: resume failed: {welcome}"));
            lock(&shared.resume_failed).push((
                i,
                pos.offset.clone().unwrap_or_default(),
                reason.clone(),
                shared.started.elapsed().as_secs_f64(),
            ));
            *lock(&shared.resume_reasons).entry(reason).or_insert(0) += 1;
            // As the protocol says: go on from the welcome's offset.
            pos.offset = Some(offset.to_owned());
        }
    }
    pos.epoch = Some(epoch.to_owned());
    {
        let mut book = lock(&shared.clients[i].book);
        if !book.welcomed {
            book.welcomed = true;
            shared.welcomed.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Reads the welcome, then moves messages until the connection ends.
async fn connected(
    shared: &Shared,
    i: usize,
    mut ws: Ws,
    pos: &mut Position,
    next_k: &mut u64,
    rng: &mut Rng,
) -> End {
    let slot = &shared.clients[i];
    let mut phase = shared.phase.clone();
    if let Err(end) = welcome(shared, i, &mut ws, pos).await {
        return end;
    }

    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    // Resend what the last connection left unacknowledged.
    let pending = lock(&slot.book).pending;
    let mut reply_by = far();
    let mut resend_at = far();
    if let Some(k) = pending {
        if ws.send(up_frame(i, k)).await.is_err() {
            return End::Broken("send failed".into());
        }
        bump(&shared.counters.up_resent);
        reply_by = tokio::time::Instant::now() + REPLY_TIMEOUT;
    }
    // A random phase, so that the clients' sends spread out.
    let first = shared.up_period.mul_f64(rng.below(1000) as f64 / 1000.0);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, shared.up_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let mut send = None;
        tokio::select! {
            () = slot.kill.notified() => {
                // Half of the resets come right after a message went out,
                // before its ack: whether wsproxy stored it, the client
                // cannot know, and resends it on the next connection.
                let idle = lock(&slot.book).pending.is_none();
                if idle && shared.phase() == Phase::Load && rng.below(2) == 0 {
                    let k = *next_k;
                    *next_k += 1;
                    lock(&slot.book).pending = Some(k);
                    if ws.send(up_frame(i, k)).await.is_ok() {
                        bump(&shared.counters.up_sent);
                    }
                }
                if lock(&slot.book).pending.is_some() {
                    bump(&shared.counters.resets_in_flight);
                }
                // RST, no close frame: the abrupt end of a lost network.
                let _ = ws.get_ref().set_zero_linger();
                drop(ws);
                return End::Dropped;
            }
            () = past(&mut phase, Phase::Settle) => {
                let _ = ws.close(None).await;
                return End::Stop;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    match on_text(shared, i, text.as_str(), pos) {
                        Reply::None => {}
                        Reply::Acked => reply_by = far(),
                        Reply::NotStored => {
                            reply_by = far();
                            resend_at = tokio::time::Instant::now() + RESEND_AFTER;
                        }
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    let code = c.as_ref().map_or(0, |f| u16::from(f.code));
                    *lock(&shared.close_codes).entry(code).or_insert(0) += 1;
                    return End::Broken(format!("closed by wsproxy: {c:?}"));
                }
                Some(Ok(Message::Binary(_))) => {
                    bump(&shared.counters.protocol_errors);
                    shared.note(format_args!("client {i}: a binary frame"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return End::Broken(e.to_string()),
                None => return End::Broken("end of stream".into()),
            },
            _ = tick.tick() => {
                let mut book = lock(&slot.book);
                if book.pending.is_none() && shared.phase() == Phase::Load {
                    let k = *next_k;
                    *next_k += 1;
                    book.pending = Some(k);
                    send = Some((k, false));
                }
            }
            () = tokio::time::sleep_until(resend_at) => {
                resend_at = far();
                send = lock(&slot.book).pending.map(|k| (k, true));
            }
            () = tokio::time::sleep_until(reply_by) => {
                bump(&shared.counters.reply_timeouts);
                shared.note(format_args!("client {i}: no answer to a message in {REPLY_TIMEOUT:?}"));
                let _ = ws.get_ref().set_zero_linger();
                return End::Broken("no answer".into());
            }
        }
        if let Some((k, again)) = send {
            if ws.send(up_frame(i, k)).await.is_err() {
                return End::Broken("send failed".into());
            }
            bump(if again {
                &shared.counters.up_resent
            } else {
                &shared.counters.up_sent
            });
            reply_by = tokio::time::Instant::now() + REPLY_TIMEOUT;
        }
    }
}

/// What a text frame meant for the client's message in flight.
enum Reply {
    None,
    Acked,
    NotStored,
}

fn on_text(shared: &Shared, i: usize, text: &str, pos: &mut Position) -> Reply {
    let slot = &shared.clients[i];
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let protocol_error = |why: &str| {
        bump(&shared.counters.protocol_errors);
        shared.note(format_args!("client {i}: {why}: {text}"));
        Reply::None
    };
    match v["type"].as_str() {
        Some("message") => {
            let (Some(seq), Some(offset)) = (v["data"]["seq"].as_u64(), v["offset"].as_str())
            else {
                return protocol_error("a message without seq or offset");
            };
            let mut book = lock(&slot.book);
            book.down(seq, offset);
            let last = pos.offset.as_deref().and_then(entry_id);
            if entry_id(offset).is_none() || entry_id(offset) <= last {
                book.offset_regressions += 1;
            }
            pos.offset = Some(offset.to_owned());
            Reply::None
        }
        Some("ack") => {
            let mut book = lock(&slot.book);
            let want = book.pending.map(|k| format!("c{i}-{k}"));
            let (Some(k), Some(offset)) = (book.pending, v["offset"].as_str().and_then(entry_id))
            else {
                drop(book);
                return protocol_error("an ack with nothing in flight or no offset");
            };
            if v["id"].as_str() != want.as_deref() {
                drop(book);
                return protocol_error("an ack for another message");
            }
            book.acked.insert(k, offset);
            book.pending = None;
            if v["duplicate"] == true {
                bump(&shared.counters.up_duplicate_acks);
            }
            Reply::Acked
        }
        Some("error") if v["error"] == "not_stored" => {
            bump(&shared.counters.up_not_stored);
            Reply::NotStored
        }
        _ => protocol_error("an unexpected frame"),
    }
}

// --- the backend -------------------------------------------------------------

/// Publishes to its share of the sessions, in turn, until the load ends.
async fn publisher(shared: Arc<Shared>, t: usize) {
    let mine: Vec<usize> = (0..shared.sessions.len())
        .filter(|j| j % PUBLISHERS == t)
        .collect();
    if mine.is_empty() || shared.down_rate <= 0.0 {
        return;
    }
    let mut backend = match Backend::new(&shared.redis) {
        Ok(b) => b,
        Err(e) => {
            shared.note(format_args!("publisher {t}: {e:#}"));
            return;
        }
    };
    let share = mine.len() as f64 / shared.sessions.len() as f64;
    let period = Duration::from_secs_f64(1.0 / (shared.down_rate * share));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut phase = shared.phase.clone();
    for &j in mine.iter().cycle() {
        tokio::select! {
            _ = tick.tick() => {}
            () = past(&mut phase, Phase::Load) => return,
        }
        // Counted as publishing before the phase is looked at again: the
        // settle check (phase set, then this count read) can no longer run
        // between the tick and the count and call the run settled while a
        // publish is about to be confirmed (which then counted as lost:
        // "0.0 s settling ... down: 1 lost", seed 1796604122661548808).
        shared.publishing.fetch_add(1, Ordering::SeqCst);
        if shared.phase() != Phase::Load {
            shared.publishing.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        publish_next(&shared, &mut backend, j).await;
        shared.publishing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Publishes session `j`'s next seq until it is in its history exactly
/// once (or the run stops with it in doubt).
async fn publish_next(shared: &Shared, backend: &mut Backend, j: usize) {
    let session = &shared.sessions[j];
    let k = session.confirmed.load(Ordering::SeqCst) + 1;
    let payload = format!(r#"{{"seq":{k}}}"#);
    let history = session_key(shared.is_cluster(), &session.id, "history");
    let mut publish = redis::cmd("FCALL");
    publish
        .arg("wsproxy_publish")
        .arg(1)
        .arg(&history)
        .arg(&payload);
    let mut newest = redis::cmd("XREVRANGE");
    newest.arg(&history).arg("+").arg("-").arg("COUNT").arg(1);
    let confirm = |offset: String| {
        lock(&session.offsets).push(offset);
        session.confirmed.store(k, Ordering::SeqCst);
    };
    loop {
        let result = if shared.wait_replica {
            backend
                .publish_and_wait(&publish, &history)
                .await
                .map(|(offset, replicas)| {
                    if replicas < 1 {
                        bump(&shared.wait_unreplicated);
                    }
                    offset
                })
        } else {
            backend.query::<String>(&publish).await
        };
        match result {
            Ok(offset) => {
                confirm(offset);
                return;
            }
            Err(e) => {
                if get(&shared.counters.publish_errors) < 3 {
                    shared.note(format_args!("publish to {}: {e:#}", session.id));
                }
                bump(&shared.counters.publish_errors);
            }
        }
        // Applied or not? The history's newest entry says, once Redis
        // answers: only this task publishes to this session.
        let mut pause = Duration::from_millis(50);
        loop {
            if shared.phase() == Phase::Stop {
                return;
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            let Ok(entries) = backend.query::<Vec<(String, Vec<String>)>>(&newest).await else {
                continue;
            };
            if let Some((offset, fields)) = entries.first()
                && fields.get(1) == Some(&payload)
            {
                bump(&shared.counters.publish_applied_anyway);
                confirm(offset.clone());
                return;
            }
            break;
        }
    }
}

/// A stream entry as Redis gives it: its id and its fields, flat.
type Entry = (String, Vec<String>);

/// Reads client messages of up stream `shard` with the consumer group
/// until the run stops.
async fn worker(shared: Arc<Shared>, w: usize, shard: usize) {
    let name = format!("worker-{shard}-{w}");
    let stream = shared.up_streams[shard].as_str();
    let mut backend = match Backend::new(&shared.redis) {
        Ok(b) => b,
        Err(e) => {
            shared.note(format_args!("{name}: {e:#}"));
            return;
        }
    };
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(GROUP)
        .arg(&name)
        .arg("COUNT")
        .arg(100)
        .arg("BLOCK")
        .arg(200)
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    let mut last_claim = Instant::now();
    while shared.phase() != Phase::Stop {
        let mut entries: Vec<Entry> = Vec::new();
        let got = if last_claim.elapsed() >= CLAIM_EVERY {
            last_claim = Instant::now();
            claim(&mut backend, stream, &name, &mut entries).await
        } else {
            backend
                .query::<Option<Vec<(String, Vec<Entry>)>>>(&read)
                .await
                .map(|r| {
                    entries.extend(r.into_iter().flatten().flat_map(|(_, e)| e));
                })
        };
        if let Err(e) = got {
            bump(&shared.counters.worker_errors);
            if get(&shared.counters.worker_errors) <= 3 {
                shared.note(format_args!("{name}: {e:#}"));
            }
            sleep(Duration::from_millis(200)).await;
            continue;
        }
        if entries.is_empty() {
            continue;
        }
        {
            let mut up = lock(&shared.up);
            for (id, fields) in &entries {
                match parse_up(id, fields) {
                    Some((entry, client, k)) if client < shared.clients.len() => {
                        up.record(shard, entry, client, k);
                    }
                    _ => up.malformed += 1,
                }
            }
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(GROUP);
        for (id, _) in &entries {
            ack.arg(id);
        }
        if backend.query::<i64>(&ack).await.is_err() {
            // They stay pending and are claimed again: redelivered.
            bump(&shared.counters.xack_failures);
        }
    }
}

/// Claims entries pending longer than [`CLAIM_IDLE`] (delivered to a
/// worker that never acknowledged them).
async fn claim(
    backend: &mut Backend,
    stream: &str,
    name: &str,
    into: &mut Vec<Entry>,
) -> anyhow::Result<()> {
    let mut cursor = "0-0".to_owned();
    // Bounded: a claim round must not starve reading.
    for _ in 0..10 {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(stream)
            .arg(GROUP)
            .arg(name)
            .arg(CLAIM_IDLE.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(100);
        let (next, entries, _deleted): (String, Vec<Entry>, Vec<String>) =
            backend.query(&cmd).await?;
        into.extend(entries);
        if next == "0-0" {
            break;
        }
        cursor = next;
    }
    Ok(())
}

/// A client message's entry: its id in the stream, client and seq, checked
/// against its data.
fn parse_up(id: &str, fields: &[String]) -> Option<(EntryId, usize, u64)> {
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|kv| kv.first().map(String::as_str) == Some(name))
            .and_then(|kv| kv.get(1))
    };
    let (client, k) = field("id")?.strip_prefix('c')?.split_once('-')?;
    let (client, k): (usize, u64) = (client.parse().ok()?, k.parse().ok()?);
    let data: serde_json::Value = serde_json::from_str(field("data")?).ok()?;
    (data["seq"].as_u64() == Some(k) && field("agent")? == AGENT).then_some(())?;
    Some((entry_id(id)?, client, k))
}

// --- counting ----------------------------------------------------------------

/// One direction's figures.
#[derive(Debug, Default, Clone, Serialize)]
struct Direction {
    /// Down: deliveries expected (confirmed publishes times the clients of
    /// their session); up: messages acknowledged.
    sent: u64,
    /// Distinct messages that arrived.
    delivered: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    /// Arrived, but never confirmed as sent (in doubt when the run
    /// stopped): neither lost nor duplicated.
    unconfirmed: u64,
}

impl Direction {
    fn line(&self) -> String {
        format!(
            "sent {} delivered {} lost {} duplicated {} out-of-order {} (unconfirmed {})",
            self.sent,
            self.delivered,
            self.lost,
            self.duplicated,
            self.out_of_order,
            self.unconfirmed
        )
    }
}

/// Everything a run counted.
#[derive(Debug, Default, Clone, Serialize)]
struct Counts {
    down: Direction,
    up: Direction,
    /// `--cluster`: the losses the failover explains (see [`FailoverLoss`]);
    /// they are counted in `down`, `up` and the rest too, and do not fail
    /// the run.
    failover: Option<FailoverLoss>,
    /// `--wait-replica`: publishes no replica acknowledged within WAIT's
    /// second.
    wait_unreplicated: u64,
    published: u64,
    publish_errors: u64,
    publish_applied_anyway: u64,
    offset_regressions: u64,
    up_sent: u64,
    up_resent: u64,
    up_duplicate_acks: u64,
    up_not_stored: u64,
    up_redelivered: u64,
    up_ack_mismatches: u64,
    up_malformed: u64,
    xack_failures: u64,
    worker_errors: u64,
    connects: u64,
    connect_failures: u64,
    drops: u64,
    resets_in_flight: u64,
    broken: u64,
    resumes: u64,
    replayed: u64,
    resume_failures: u64,
    resume_failure_reasons: BTreeMap<String, u64>,
    /// Of the connections that ended otherwise, those wsproxy closed, by
    /// close code (1013: it lost Redis).
    close_codes: BTreeMap<u16, u64>,
    protocol_errors: u64,
    reply_timeouts: u64,
    wsproxy_restarts: u64,
    redis_restarts: u64,
    settled: bool,
    load_secs: f64,
    settle_secs: f64,
    seed: u64,
}

impl Counts {
    /// What makes the run fail.
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let f = self.failover.clone().unwrap_or_default();
        for (name, d, lost, duplicated) in [
            ("down", &self.down, f.down_lost, f.down_duplicated),
            ("up", &self.up, f.up_lost, f.up_duplicated),
        ] {
            for (what, n) in [
                ("lost", d.lost.saturating_sub(lost)),
                ("duplicated", d.duplicated.saturating_sub(duplicated)),
                ("out of order", d.out_of_order),
            ] {
                if n > 0 {
                    out.push(format!("{name}: {n} {what}"));
                }
            }
        }
        for (what, n) in [
            (
                "resume failures",
                self.resume_failures.saturating_sub(f.resume_failures),
            ),
            (
                "down messages with an offset not above the last",
                self.offset_regressions,
            ),
            (
                "acks whose offset is not the stored entry's",
                self.up_ack_mismatches.saturating_sub(f.up_ack_mismatches),
            ),
            (
                "stream entries that are not this run's messages",
                self.up_malformed,
            ),
            ("frames outside the protocol", self.protocol_errors),
        ] {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        }
        if !self.settled && out.is_empty() {
            out.push("did not settle in time".into());
        }
        out
    }
}

/// Counts what arrived against what was confirmed.
fn count(shared: &Shared) -> Counts {
    let c = &shared.counters;
    let mut counts = Counts {
        published: shared
            .sessions
            .iter()
            .map(|s| s.confirmed.load(Ordering::SeqCst))
            .sum(),
        publish_errors: get(&c.publish_errors),
        publish_applied_anyway: get(&c.publish_applied_anyway),
        up_sent: get(&c.up_sent),
        up_resent: get(&c.up_resent),
        up_duplicate_acks: get(&c.up_duplicate_acks),
        up_not_stored: get(&c.up_not_stored),
        xack_failures: get(&c.xack_failures),
        worker_errors: get(&c.worker_errors),
        connects: get(&c.connects),
        connect_failures: get(&c.connect_failures),
        drops: get(&c.drops),
        resets_in_flight: get(&c.resets_in_flight),
        broken: get(&c.broken),
        resumes: get(&c.resumes),
        replayed: get(&c.replayed),
        resume_failures: get(&c.resume_failures),
        resume_failure_reasons: lock(&shared.resume_reasons).clone(),
        close_codes: lock(&shared.close_codes).clone(),
        protocol_errors: get(&c.protocol_errors),
        reply_timeouts: get(&c.reply_timeouts),
        seed: shared.seed,
        ..Counts::default()
    };
    let up = lock(&shared.up);
    counts.up.duplicated = up.duplicated;
    counts.up_redelivered = up.redelivered;
    counts.up_malformed = up.malformed;
    // Each client's messages in stream order, first copies only.
    let mut by_client: HashMap<usize, Vec<(EntryId, u64)>> = HashMap::new();
    for (&(client, k), &entry) in &up.first {
        by_client.entry(client).or_default().push((entry, k));
    }
    for (i, slot) in shared.clients.iter().enumerate() {
        let book = lock(&slot.book);
        let confirmed = shared.sessions[i % shared.sessions.len()]
            .confirmed
            .load(Ordering::SeqCst);
        let d = &mut counts.down;
        d.sent += confirmed;
        d.delivered += book.seen.len() as u64;
        d.lost += book.missing(confirmed);
        d.duplicated += book.duplicated;
        d.out_of_order += book.out_of_order;
        d.unconfirmed += book.seen.keys().filter(|&&k| k > confirmed).count() as u64;
        counts.offset_regressions += book.offset_regressions;

        let u = &mut counts.up;
        u.sent += book.acked.len() as u64;
        for (k, offset) in &book.acked {
            match up.first.get(&(i, *k)) {
                None => u.lost += 1,
                Some(entry) if entry != offset => counts.up_ack_mismatches += 1,
                Some(_) => {}
            }
        }
        let mut stored = by_client.remove(&i).unwrap_or_default();
        u.delivered += stored.len() as u64;
        u.unconfirmed += stored
            .iter()
            .filter(|(_, k)| !book.acked.contains_key(k))
            .count() as u64;
        stored.sort_unstable();
        let mut max = 0;
        for (_, k) in stored {
            if k < max {
                u.out_of_order += 1;
            }
            max = max.max(k);
        }
    }
    counts
}

/// True when nothing is in flight any more: every confirmed publish has
/// reached its clients, every message is acknowledged and in the workers'
/// hands.
fn settled(shared: &Shared, excused: &FailoverLoss) -> bool {
    if shared.publishing.load(Ordering::SeqCst) > 0 {
        return false;
    }
    let up = lock(&shared.up);
    shared.clients.iter().enumerate().all(|(i, slot)| {
        let book = lock(&slot.book);
        let confirmed = shared.sessions[i % shared.sessions.len()]
            .confirmed
            .load(Ordering::SeqCst);
        let j = i % shared.sessions.len();
        book.pending.is_none()
            && (1..=confirmed)
                .all(|k| book.seen.contains_key(&k) || excused.excused_down.contains(&(j, k)))
            && book
                .acked
                .keys()
                .all(|k| up.first.contains_key(&(i, *k)) || excused.excused_up.contains(&(i, *k)))
    })
}

// --- the failover (--cluster) ----------------------------------------------

/// An entry the killed master acknowledged and its promoted replica lacks
/// is put down to the failover only if it was written at most this long
/// before the kill (by its id's time): replication on loopback lags by
/// far less. An older one missing is a failure like any other loss.
const FAILOVER_WINDOW_MS: u64 = 1000;

/// The master SIGKILLed on purpose, and what it served.
struct Failover {
    port: u16,
    /// Its slot ranges when it was killed.
    slots: Vec<(u16, u16)>,
    killed_unix_ms: u64,
    restart_due: Instant,
    restarted: bool,
}

impl Failover {
    fn served(&self, key: &str) -> bool {
        let slot = chaos_cluster::slot_of(key);
        self.slots
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&slot))
    }

    /// How long before the kill an entry was written, if it was within
    /// [`FAILOVER_WINDOW_MS`] before it.
    fn age(&self, entry: EntryId) -> Option<u64> {
        let age = self.killed_unix_ms.checked_sub(entry.0)?;
        (age <= FAILOVER_WINDOW_MS).then_some(age)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// SIGKILLs the master of up stream 0 (it serves sessions too), waits for
/// its replica to take over and for wsproxy to be ready again.
async fn fail_over(
    procs: &mut Procs,
    shared: &Shared,
    args: &ChaosArgs,
    started: Instant,
) -> anyhow::Result<Failover> {
    let Some(cluster) = procs.cluster.as_mut() else {
        bail!("no cluster");
    };
    let map = cluster.slot_map().await?;
    let stream0 = &shared.up_streams[0];
    let victim = chaos_cluster::owner(&map, chaos_cluster::slot_of(stream0))
        .context("no master serves up stream 0")?;
    let slots: Vec<(u16, u16)> = map
        .iter()
        .filter(|r| r.2 == victim)
        .map(|r| (r.0, r.1))
        .collect();
    let replicas = cluster.replicas_of(victim).await;
    let sessions = shared
        .sessions
        .iter()
        .filter(|s| {
            let slot = chaos_cluster::slot_of(&session_key(true, &s.id, "history"));
            slots.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot))
        })
        .count();
    let pid = cluster.kill(victim).await?;
    let killed_unix_ms = unix_ms();
    let killed = Instant::now();
    let took = cluster.wait_failover(victim).await?;
    let after = cluster.slot_map().await?;
    let promoted = chaos_cluster::owner(&after, slots.first().map_or(0, |r| r.0)).unwrap_or(0);
    let ready = wait_ready(procs)
        .await
        .with_context(|| format!("after the master on {victim} was failed over to {promoted}"))?;
    println!(
        "chaos: [{:.1}s] SIGKILLed the master on {victim} (pid {pid}; {sessions} sessions, up stream 0; \
         replicas {replicas:?}); its slots were served by {promoted} {:.1} s later, wsproxy ready {:.1} s after that",
        killed.duration_since(started).as_secs_f64(),
        took.as_secs_f64(),
        ready.as_secs_f64()
    );
    Ok(Failover {
        port: victim,
        slots,
        killed_unix_ms,
        restart_due: killed + Duration::from_millis(args.node_down_ms),
        restarted: false,
    })
}

/// Starts the killed node again; it rejoins as a replica.
async fn restart_node(procs: &mut Procs, f: &mut Failover, started: Instant) -> anyhow::Result<()> {
    let Some(cluster) = procs.cluster.as_mut() else {
        bail!("no cluster");
    };
    let at = Instant::now();
    let pid = cluster.restart(f.port).await?;
    f.restarted = true;
    let (took, master) = cluster.wait_rejoined(f.port).await?;
    println!(
        "chaos: [{:.1}s] started the killed node on {} again (pid {pid}); a synced replica of {master} {:.1} s later",
        at.duration_since(started).as_secs_f64(),
        f.port,
        took.as_secs_f64()
    );
    Ok(())
}

/// What the failover provably lost: entries that the killed master
/// acknowledged (to the backend's publish or to wsproxy's store), in a
/// slot it served, written at most [`FAILOVER_WINDOW_MS`] before the kill
/// by their ids, that the stream on the promoted master does not hold at
/// the end: asynchronous replication's window. Each loss below is one the
/// run counted, explained by such an entry; the rest stay failures.
#[derive(Debug, Default, Clone, Serialize)]
struct FailoverLoss {
    /// Confirmed down seqs a client never got: their entry is gone and no
    /// other entry carries the seq.
    down_lost: u64,
    /// Down seqs a client got twice, once from a gone entry (the backend
    /// published again what the promoted master did not have).
    down_duplicated: u64,
    /// Resumes refused `unknown_offset` from an offset whose entry is gone.
    resume_failures: u64,
    /// Acknowledged client messages whose entry is gone.
    up_lost: u64,
    /// Client messages stored twice, the first entry gone.
    up_duplicated: u64,
    /// Acks for a resend's entry after a worker had got the gone first one.
    up_ack_mismatches: u64,
    /// Distinct gone entries (history and up streams).
    entries: u64,
    /// How long before the kill they were written (ms), least and most.
    ms_before_kill: Option<(u64, u64)>,
    #[serde(skip)]
    excused_down: HashSet<(usize, u64)>,
    #[serde(skip)]
    excused_up: HashSet<(usize, u64)>,
}

impl FailoverLoss {
    fn any(&self) -> bool {
        self.down_lost
            + self.down_duplicated
            + self.resume_failures
            + self.up_lost
            + self.up_duplicated
            + self.up_ack_mismatches
            > 0
    }
}

/// Looks up which of the run's losses the failover explains (see
/// [`FailoverLoss`]), reading the streams of the killed master's slots as
/// they are now.
async fn attribute(shared: &Shared, f: &Failover) -> anyhow::Result<FailoverLoss> {
    let mut backend = Backend::new(&shared.redis)?;
    let read = |key: &str| {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(key).arg("-").arg("+");
        cmd
    };
    // Histories of the sessions it served: entry ids, and seqs present.
    let mut histories: HashMap<usize, (HashSet<EntryId>, HashSet<u64>)> = HashMap::new();
    for (j, s) in shared.sessions.iter().enumerate() {
        let key = session_key(true, &s.id, "history");
        if !f.served(&key) {
            continue;
        }
        let entries: Vec<Entry> = backend.query(&read(&key)).await?;
        let mut ids = HashSet::new();
        let mut seqs = HashSet::new();
        for (id, fields) in entries {
            ids.extend(entry_id(&id));
            if let Some(d) = fields.get(1)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(d)
                && let Some(k) = v["seq"].as_u64()
            {
                seqs.insert(k);
            }
        }
        histories.insert(j, (ids, seqs));
    }
    let mut streams: HashMap<usize, HashSet<EntryId>> = HashMap::new();
    for (n, key) in shared.up_streams.iter().enumerate() {
        if f.served(key) {
            let entries: Vec<Entry> = backend.query(&read(key)).await?;
            streams.insert(
                n,
                entries.iter().filter_map(|(id, _)| entry_id(id)).collect(),
            );
        }
    }

    let mut loss = FailoverLoss::default();
    let mut gone: HashSet<(String, EntryId)> = HashSet::new();
    let mut ages: Vec<u64> = Vec::new();
    // An entry of `key` that is gone, written just before the kill.
    let mut lost_entry = |key: &str, have: &HashSet<EntryId>, entry: Option<EntryId>| -> bool {
        let Some(entry) = entry else { return false };
        if have.contains(&entry) {
            return false;
        }
        let Some(age) = f.age(entry) else {
            return false;
        };
        if gone.insert((key.to_owned(), entry)) {
            ages.push(age);
        }
        true
    };
    let shards = shared.up_streams.len();
    let up = lock(&shared.up);
    for (i, slot) in shared.clients.iter().enumerate() {
        let j = i % shared.sessions.len();
        let session = &shared.sessions[j];
        let book = lock(&slot.book);
        if let Some((ids, seqs)) = histories.get(&j) {
            let key = session_key(true, &session.id, "history");
            let confirmed = session.confirmed.load(Ordering::SeqCst);
            let offsets = lock(&session.offsets);
            for k in 1..=confirmed {
                if book.seen.contains_key(&k) || seqs.contains(&k) {
                    continue;
                }
                let offset = offsets.get(k as usize - 1).and_then(|o| entry_id(o));
                if lost_entry(&key, ids, offset) {
                    loss.down_lost += 1;
                    loss.excused_down.insert((j, k));
                }
            }
            for (_, first, again) in &book.repeats {
                if first != again
                    && (lost_entry(&key, ids, entry_id(first))
                        || lost_entry(&key, ids, entry_id(again)))
                {
                    loss.down_duplicated += 1;
                }
            }
            for (client, offset, reason, _) in lock(&shared.resume_failed).iter() {
                if *client == i
                    && reason == "unknown_offset"
                    && lost_entry(&key, ids, entry_id(offset))
                {
                    loss.resume_failures += 1;
                }
            }
        }
        let shard = up_shard(&session.id, shards);
        if let Some(have) = streams.get(&shard) {
            let key = &shared.up_streams[shard];
            for (k, offset) in &book.acked {
                match up.first.get(&(i, *k)) {
                    None => {
                        if lost_entry(key, have, Some(*offset)) {
                            loss.up_lost += 1;
                            loss.excused_up.insert((i, *k));
                        }
                    }
                    Some(first) if first != offset => {
                        if lost_entry(key, have, Some(*first)) {
                            loss.up_ack_mismatches += 1;
                        }
                    }
                    Some(_) => {}
                }
            }
            for (client, _, first, _) in &up.repeats {
                if *client == i && lost_entry(key, have, Some(*first)) {
                    loss.up_duplicated += 1;
                }
            }
        }
    }
    loss.entries = gone.len() as u64;
    loss.ms_before_kill = ages.iter().min().copied().zip(ages.iter().max().copied());
    Ok(loss)
}

// --- the run -----------------------------------------------------------------

/// Runs the chaos test and prints what it found.
pub async fn chaos(args: ChaosArgs) -> anyhow::Result<Outcome> {
    if args.clients == 0 || args.secs < 6 {
        bail!("chaos needs at least 1 client and 6 seconds (--clients, --secs)");
    }
    if args.drop_every_secs == 0 || args.drop_percent > 100 {
        bail!("--drop-every-secs must be at least 1 and --drop-percent at most 100");
    }
    net::check_fd_budget(args.clients + 100)?;
    let seed = args.seed.unwrap_or_else(harness::clock_seed);
    let mut rng = Rng(seed | 1);
    // Dropped last: whatever happens below, the children and the
    // directory go.
    let mut procs = Procs::new(&args, &mut rng)?;
    let interrupted = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = run(&args, &mut procs, &mut rng, seed) => r,
        r = interrupted => match r {
            Ok(()) => Err(anyhow::anyhow!("interrupted")),
            Err(e) => Err(e),
        },
    };
    if result.is_err() {
        print_log_tail(&procs);
    }
    result
}

fn print_log_tail(procs: &Procs) {
    let (total, tail) = procs.wsproxy_log_tail(30);
    if total == 0 {
        eprintln!("chaos: wsproxy's log is empty (RUST_LOG=warn)");
        return;
    }
    eprintln!(
        "chaos: wsproxy's log ({total} lines at RUST_LOG=warn), the last {}:",
        tail.len()
    );
    for line in tail {
        eprintln!("  {line}");
    }
}

async fn run(
    args: &ChaosArgs,
    procs: &mut Procs,
    rng: &mut Rng,
    seed: u64,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let (redis_pid, ws_pid) = start_processes(args, procs, rng).await?;
    let sessions = if args.sessions == 0 {
        args.clients
    } else {
        args.sessions.min(args.clients)
    };
    let up_streams: Vec<String> = (0..procs.up_shards)
        .map(|n| up_stream(args.cluster, n))
        .collect();
    announce(
        args,
        procs,
        (sessions, seed),
        (redis_pid, ws_pid),
        &up_streams,
    )
    .await?;
    let redis = procs.redis_target();
    let sessions_v = set_up_redis(args, procs, &redis, (rng, seed), sessions, &up_streams).await?;

    let (phase_tx, phase_rx) = watch::channel(Phase::Load);
    let up_period = if args.up_rate > 0.0 {
        Duration::from_secs_f64(args.clients as f64 / args.up_rate)
    } else {
        Duration::from_secs(86_400)
    };
    let shared = Arc::new(Shared {
        ws_base: format!("ws://127.0.0.1:{}", procs.ws_port),
        redis,
        up_streams,
        wait_replica: args.wait_replica,
        wait_unreplicated: AtomicU64::new(0),
        resume_failed: Mutex::new(Vec::new()),
        sessions: sessions_v,
        clients: (0..args.clients).map(|_| ClientSlot::default()).collect(),
        up_period,
        down_rate: args.down_rate,
        phase: phase_rx,
        welcomed: AtomicUsize::new(0),
        publishing: AtomicUsize::new(0),
        counters: Counters::default(),
        resume_reasons: Mutex::new(BTreeMap::new()),
        close_codes: Mutex::new(BTreeMap::new()),
        up: Mutex::new(UpBook::default()),
        seed,
        started,
    });
    let tasks = start_tasks(args, procs, &shared, &phase_tx).await?;
    let load = load_and_chaos(args, procs, &shared, rng).await?;
    let (is_settled, settle_secs) = settle(args, procs, &shared, &load, &phase_tx, tasks).await?;

    let mut counts = count(&shared);
    if let Some(f) = &load.failover {
        // Now that nothing moves any more: the final word.
        counts.failover = Some(
            attribute(&shared, f)
                .await
                .context("looking up the failover's losses")?,
        );
        counts.wait_unreplicated = shared.wait_unreplicated.load(Ordering::Relaxed);
    }
    counts.settled = is_settled;
    counts.load_secs = load.secs;
    counts.settle_secs = settle_secs;
    counts.wsproxy_restarts = load.wsproxy_restarts;
    counts.redis_restarts = load.redis_restarts;
    let failures = counts.failures();
    summarize(&counts, &failures, started.elapsed());
    if !failures.is_empty() {
        print_log_tail(procs);
    }
    let report = report(args, &counts)?;
    Ok(Outcome { report, failures })
}

/// Starts Redis (one server, or the cluster, choosing how many up stream
/// shards cover its masters) and wsproxy, and waits for both; their pids
/// (Redis's 0 for a cluster).
async fn start_processes(
    args: &ChaosArgs,
    procs: &mut Procs,
    rng: &mut Rng,
) -> anyhow::Result<(u32, u32)> {
    let mut redis_pid = 0;
    if args.cluster {
        let cluster =
            ChaosCluster::start(&procs.dir, &procs.redis_bin, rng, &[procs.ws_port]).await?;
        // The fewest up stream shards that put a stream on every master.
        let map = cluster.slot_map().await?;
        let masters: HashSet<u16> = map.iter().map(|r| r.2).collect();
        let mut covered = HashSet::new();
        let mut shards = 0;
        while covered.len() < masters.len() && shards < 64 {
            covered.insert(chaos_cluster::owner(
                &map,
                chaos_cluster::slot_of(&up_stream(true, shards)),
            ));
            shards += 1;
        }
        procs.up_shards = shards;
        procs.cluster = Some(cluster);
    } else {
        redis_pid = procs.start_redis()?;
        wait_redis(procs).await?;
    }
    let ws_pid = procs.start_wsproxy()?;
    wait_ready(procs).await?;
    Ok((redis_pid, ws_pid))
}

/// Prints what the run does and what it runs on.
async fn announce(
    args: &ChaosArgs,
    procs: &Procs,
    (sessions, seed): (usize, u64),
    (redis_pid, ws_pid): (u32, u32),
    up_streams: &[String],
) -> anyhow::Result<()> {
    println!(
        "chaos: {} reliable clients over {sessions} sessions for {} s (+ up to {} s settling), \
         down {}/s, up {}/s, {}% of connections reset every {} s{}{}; seed {seed}",
        args.clients,
        args.secs,
        args.settle_secs,
        args.down_rate,
        args.up_rate,
        args.drop_percent,
        args.drop_every_secs,
        if args.no_wsproxy_kill {
            ""
        } else {
            ", wsproxy SIGKILLed at 1/3"
        },
        match (args.no_redis_restart, args.cluster) {
            (true, _) => String::new(),
            (false, false) => ", Redis SIGKILLed at 2/3".into(),
            (false, true) => format!(
                ", the master of up stream 0 SIGKILLed at 2/3 (failover) and restarted {:.1} s later{}",
                args.node_down_ms as f64 / 1000.0,
                if args.wait_replica {
                    "; WAIT 1 1000 after each publish"
                } else {
                    ""
                }
            ),
        },
    );
    if let Some(c) = &procs.cluster {
        let map = c.slot_map().await?;
        let streams: Vec<String> = up_streams
            .iter()
            .map(|s| {
                let m = chaos_cluster::owner(&map, chaos_cluster::slot_of(s)).unwrap_or(0);
                format!("{s} on {m}")
            })
            .collect();
        println!(
            "chaos: Redis Cluster (3 masters + 3 replicas, AOF appendfsync always, node timeout {} ms) \
             on 127.0.0.1 ports {:?}, masters {:?}; {}; wsproxy {} pid {ws_pid} on 127.0.0.1:{} \
             (sharded pub/sub, UP_STREAM_SHARDS={}), in {}",
            chaos_cluster::NODE_TIMEOUT_MS,
            c.ports,
            map.iter()
                .map(|r| r.2)
                .collect::<std::collections::BTreeSet<_>>(),
            streams.join(", "),
            procs.wsproxy_bin.display(),
            procs.ws_port,
            procs.up_shards,
            procs.dir.display()
        );
    } else {
        println!(
            "chaos: redis-server (AOF, appendfsync always) pid {redis_pid} on 127.0.0.1:{}, \
             wsproxy {} pid {ws_pid} on 127.0.0.1:{}, in {}",
            procs.redis_port,
            procs.wsproxy_bin.display(),
            procs.ws_port,
            procs.dir.display()
        );
    }
    Ok(())
}

/// Stores every session's token and creates the workers' consumer groups;
/// the sessions.
async fn set_up_redis(
    args: &ChaosArgs,
    procs: &Procs,
    redis: &RedisTarget,
    (rng, seed): (&mut Rng, u64),
    sessions: usize,
    up_streams: &[String],
) -> anyhow::Result<Vec<Session>> {
    let cluster = args.cluster;
    let run_id = seed % 1_000_000;
    let mut setup = Backend::new(redis)?;
    let mut sessions_v = Vec::with_capacity(sessions);
    for j in 0..sessions {
        let id = format!("chaos{run_id}-{j}");
        let token = format!("token-{run_id}-{j}-{}", rng.below(1_000_000_000));
        let mut setex = redis::cmd("SETEX");
        setex
            .arg(session_key(cluster, &id, "auth"))
            .arg(TOKEN_TTL_SECS)
            .arg(&token);
        let () = setup.query(&setex).await.context("SETEX")?;
        sessions_v.push(Session {
            id,
            token,
            confirmed: AtomicU64::new(0),
            offsets: Mutex::new(Vec::new()),
        });
    }
    for stream in up_streams {
        let mut group = redis::cmd("XGROUP");
        group
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        let () = setup.query(&group).await.context("XGROUP CREATE")?;
    }
    if let Some(c) = &procs.cluster {
        let map = c.slot_map().await?;
        let mut per_master: BTreeMap<u16, usize> = BTreeMap::new();
        for s in &sessions_v {
            let slot = chaos_cluster::slot_of(&session_key(true, &s.id, "history"));
            *per_master
                .entry(chaos_cluster::owner(&map, slot).unwrap_or(0))
                .or_insert(0) += 1;
        }
        println!("chaos: sessions per master: {per_master:?}");
    }
    Ok(sessions_v)
}

/// Starts the workers and the clients, waits for every client's first
/// welcome, then starts the publishers; all their tasks.
async fn start_tasks(
    args: &ChaosArgs,
    procs: &mut Procs,
    shared: &Arc<Shared>,
    phase_tx: &watch::Sender<Phase>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for shard in 0..shared.up_streams.len() {
        for w in 1..=WORKERS {
            tasks.push(tokio::spawn(worker(shared.clone(), w, shard)));
        }
    }
    for i in 0..args.clients {
        tasks.push(tokio::spawn(client(shared.clone(), i)));
    }
    // Publishing starts once everyone is there: a fresh connection does not
    // get what was published before it.
    let wait_start = Instant::now();
    while shared.welcomed.load(Ordering::Relaxed) < args.clients {
        procs.check_alive()?;
        if wait_start.elapsed() > FIRST_WELCOME_TIMEOUT {
            let _ = phase_tx.send(Phase::Stop);
            bail!(
                "only {} of {} clients connected in {FIRST_WELCOME_TIMEOUT:?}",
                shared.welcomed.load(Ordering::Relaxed),
                args.clients
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
    println!(
        "chaos: [{:.1}s] all {} clients connected; load and chaos for {} s",
        shared.started.elapsed().as_secs_f64(),
        args.clients,
        args.secs
    );
    for t in 0..PUBLISHERS {
        tasks.push(tokio::spawn(publisher(shared.clone(), t)));
    }
    Ok(tasks)
}

/// What the load phase did.
struct Load {
    secs: f64,
    wsproxy_restarts: u64,
    redis_restarts: u64,
    failover: Option<Failover>,
}

/// `[<s>s]` since the run started.
fn stamp(started: Instant, t: Instant) -> String {
    format!("[{:.1}s]", t.duration_since(started).as_secs_f64())
}

/// `--secs` of load with connections reset, wsproxy killed at a third and
/// Redis (or a cluster master) at two thirds; the failed-over node is
/// started again by the end of it.
async fn load_and_chaos(
    args: &ChaosArgs,
    procs: &mut Procs,
    shared: &Shared,
    rng: &mut Rng,
) -> anyhow::Result<Load> {
    let started = shared.started;
    let load = Duration::from_secs(args.secs);
    let kill_at = load / 3;
    let restart_at = load * 2 / 3;
    let drop_every = Duration::from_secs(args.drop_every_secs);
    let redis_down = Duration::from_millis(args.redis_down_ms);
    let mut next_drop = drop_every;
    let mut next_progress = Duration::from_secs(10);
    let mut wsproxy_restarts = 0;
    let mut redis_restarts = 0;
    let mut failover: Option<Failover> = None;
    let load_start = Instant::now();
    loop {
        let t = load_start.elapsed();
        if t >= load {
            break;
        }
        procs.check_alive()?;
        if t >= next_drop {
            next_drop += drop_every;
            drop_connections(args, shared, rng);
        }
        if !args.no_wsproxy_kill && wsproxy_restarts == 0 && t >= kill_at {
            let pid = procs.wsproxy.as_ref().map_or(0, Child::id);
            kill(&mut procs.wsproxy).await?;
            let killed = Instant::now();
            sleep(WSPROXY_DOWN).await;
            let new_pid = procs.start_wsproxy()?;
            let ready = wait_ready(procs).await?;
            wsproxy_restarts += 1;
            println!(
                "chaos: {} SIGKILLed wsproxy (pid {pid}); started again (pid {new_pid}) {:.1} s later, ready {:.1} s after that",
                stamp(started, killed),
                WSPROXY_DOWN.as_secs_f64(),
                ready.as_secs_f64()
            );
        }
        if !args.no_redis_restart && redis_restarts == 0 && t >= restart_at && args.cluster {
            failover = Some(fail_over(procs, shared, args, started).await?);
            redis_restarts += 1;
        }
        if let Some(f) = &mut failover
            && !f.restarted
            && Instant::now() >= f.restart_due
        {
            restart_node(procs, f, started).await?;
        }
        if !args.no_redis_restart && redis_restarts == 0 && t >= restart_at {
            let pid = procs.redis.as_ref().map_or(0, Child::id);
            kill(&mut procs.redis).await?;
            let killed = Instant::now();
            sleep(redis_down).await;
            let new_pid = procs.start_redis()?;
            let back = wait_redis(procs).await?;
            let ready = wait_ready(procs).await?;
            redis_restarts += 1;
            println!(
                "chaos: {} SIGKILLed redis-server (pid {pid}); started again (pid {new_pid}) {:.1} s later, \
                 answering {:.1} s after that, wsproxy ready again {:.1} s later",
                stamp(started, killed),
                redis_down.as_secs_f64(),
                back.as_secs_f64(),
                ready.as_secs_f64()
            );
        }
        if t >= next_progress {
            next_progress += Duration::from_secs(10);
            print_progress(args, shared);
        }
        sleep(Duration::from_millis(100)).await;
    }
    let secs = load_start.elapsed().as_secs_f64();
    if let Some(f) = &mut failover
        && !f.restarted
    {
        restart_node(procs, f, started).await?;
    }
    Ok(Load {
        secs,
        wsproxy_restarts,
        redis_restarts,
        failover,
    })
}

/// Resets `--drop-percent` of the open connections, picked at random.
fn drop_connections(args: &ChaosArgs, shared: &Shared, rng: &mut Rng) {
    let open: Vec<usize> = (0..args.clients)
        .filter(|&i| shared.clients[i].connected.load(Ordering::Relaxed))
        .collect();
    let n = (open.len() as u64 * args.drop_percent).div_ceil(100) as usize;
    let mut pick = open;
    for x in 0..n.min(pick.len()) {
        let y = x + rng.below(pick.len() - x);
        pick.swap(x, y);
        shared.clients[pick[x]].kill.notify_one();
    }
}

/// The line printed every 10 s of load.
fn print_progress(args: &ChaosArgs, shared: &Shared) {
    let c = &shared.counters;
    let open = (0..args.clients)
        .filter(|&i| shared.clients[i].connected.load(Ordering::Relaxed))
        .count();
    let published: u64 = shared
        .sessions
        .iter()
        .map(|s| s.confirmed.load(Ordering::SeqCst))
        .sum();
    println!(
        "chaos: {} {open} open, {} reset, {} broken, {} resumed; {published} published, {} up sent",
        stamp(shared.started, Instant::now()),
        get(&c.drops),
        get(&c.broken),
        get(&c.resumes),
        get(&c.up_sent),
    );
}

/// Stops the load and waits (at most `--settle-secs`) for what is on its
/// way, not for what the failover provably lost; then stops every task.
/// Whether all arrived, and how long the wait took (s).
async fn settle(
    args: &ChaosArgs,
    procs: &mut Procs,
    shared: &Shared,
    load: &Load,
    phase_tx: &watch::Sender<Phase>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<(bool, f64)> {
    // Nothing new; wait for what is on its way.
    let _ = phase_tx.send(Phase::Settle);
    let settle_start = Instant::now();
    let settle_limit = Duration::from_secs(args.settle_secs);
    let mut is_settled = false;
    // What the failover provably lost is not waited for (looked up once
    // the rest has had time to arrive, then every second).
    let mut excused = FailoverLoss::default();
    let mut next_lookup = Duration::from_secs(3);
    while settle_start.elapsed() < settle_limit {
        procs.check_alive()?;
        if settled(shared, &excused) {
            is_settled = true;
            break;
        }
        if let Some(f) = &load.failover
            && settle_start.elapsed() >= next_lookup
        {
            next_lookup = settle_start.elapsed() + Duration::from_secs(1);
            match attribute(shared, f).await {
                Ok(loss) => excused = loss,
                Err(e) => shared.note(format_args!("looking up the failover's losses: {e:#}")),
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
    let settle_secs = settle_start.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Stop);
    for task in tasks {
        // Every task watches the phase; a stuck one is not waited for.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok((is_settled, settle_secs))
}

/// The report for `--json`.
fn report(args: &ChaosArgs, counts: &Counts) -> anyhow::Result<Report> {
    let (load_secs, settle_secs) = (counts.load_secs, counts.settle_secs);
    Ok(Report {
        scenario: "chaos".into(),
        target: "wsproxy".into(),
        connections: args.clients,
        sent: counts.down.sent + counts.up.sent,
        delivered: counts.down.delivered + counts.up.delivered
            - counts.down.unconfirmed
            - counts.up.unconfirmed,
        errors: counts.down.duplicated
            + counts.down.out_of_order
            + counts.up.duplicated
            + counts.up.out_of_order
            + counts.resume_failures,
        seconds: load_secs + settle_secs,
        rate: (counts.down.delivered + counts.up.delivered) as f64
            / (load_secs + settle_secs).max(1e-9),
        note: format!(
            "down: {}; up: {}; {} resets, {} resumes, {} resume failures, {} wsproxy and {} Redis restarts",
            counts.down.line(),
            counts.up.line(),
            counts.drops,
            counts.resumes,
            counts.resume_failures,
            counts.wsproxy_restarts,
            counts.redis_restarts
        ),
        detail: Some(serde_json::to_value(counts)?),
        ..Report::default()
    })
}

fn summarize(c: &Counts, failures: &[String], took: Duration) {
    println!(
        "chaos summary ({:.1} s of load, {:.1} s settling{}, {:.1} s in all):",
        c.load_secs,
        c.settle_secs,
        if c.settled { "" } else { ", NOT settled" },
        took.as_secs_f64()
    );
    println!("  down: {}", c.down.line());
    println!(
        "        {} published; {} publishes errored, of which {} had been applied",
        c.published, c.publish_errors, c.publish_applied_anyway
    );
    println!("  up  : {}", c.up.line());
    println!(
        "        {} sent, {} resent ({} acknowledged as duplicates), {} not_stored, \
         {} redelivered to a worker ({} XACK failures), {} ack offset mismatches",
        c.up_sent,
        c.up_resent,
        c.up_duplicate_acks,
        c.up_not_stored,
        c.up_redelivered,
        c.xack_failures,
        c.up_ack_mismatches
    );
    println!(
        "  connections: {} opened, {} connect failures; {} reset by the test ({} with a message \
         unacknowledged), {} ended otherwise (closed by wsproxy, by code: {:?}); {} resumes \
         ({} messages replayed), {} resume failures {:?}",
        c.connects,
        c.connect_failures,
        c.drops,
        c.resets_in_flight,
        c.broken,
        c.close_codes,
        c.resumes,
        c.replayed,
        c.resume_failures,
        c.resume_failure_reasons
    );
    println!(
        "  restarts: wsproxy {}, Redis {}; protocol errors {}, reply timeouts {}, worker errors {}",
        c.wsproxy_restarts, c.redis_restarts, c.protocol_errors, c.reply_timeouts, c.worker_errors
    );
    if let Some(f) = &c.failover {
        let when = f.ms_before_kill.map_or(String::new(), |(lo, hi)| {
            format!(", written {lo}..{hi} ms before the kill")
        });
        println!(
            "  lost in failover (acknowledged by the killed master, missing on its promoted replica{when}; \
             {} entries; counted above, not failures): down lost {}, duplicated {}, resume failures {}; \
             up lost {}, duplicated {}, ack mismatches {}{}",
            f.entries,
            f.down_lost,
            f.down_duplicated,
            f.resume_failures,
            f.up_lost,
            f.up_duplicated,
            f.up_ack_mismatches,
            if f.any() { "" } else { " (none)" }
        );
        if c.wait_unreplicated > 0 {
            println!(
                "  WAIT: {} publishes not acknowledged by a replica within 1 s",
                c.wait_unreplicated
            );
        }
    }
    if failures.is_empty() {
        println!("chaos: PASS (seed {})", c.seed);
    } else {
        println!("chaos: FAIL (seed {}): {}", c.seed, failures.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_arrivals_are_checked_for_gaps_repeats_and_order() {
        let mut b = ClientBook::default();
        for k in [1, 2, 4, 3, 3, 5] {
            b.down(k, &format!("{k}-0"));
        }
        assert_eq!(b.repeats, vec![(3, "3-0".into(), "3-0".into())]);
        assert_eq!((b.duplicated, b.out_of_order), (1, 1));
        assert_eq!(b.missing(5), 0);
        assert_eq!(b.missing(7), 2);
    }

    #[test]
    fn up_entries_tell_redeliveries_from_duplicates() {
        let mut up = UpBook::default();
        up.record(0, (1, 0), 3, 1);
        up.record(0, (1, 0), 3, 1); // the same entry again: redelivered
        up.record(0, (2, 0), 3, 1); // another entry, same message: duplicate
        up.record(0, (3, 0), 3, 2);
        up.record(1, (3, 0), 4, 1); // the same id in another shard's stream
        assert_eq!((up.redelivered, up.duplicated), (1, 1));
        assert_eq!(up.first.get(&(3, 1)), Some(&(1, 0)));
    }

    #[test]
    fn stream_entries_are_parsed_and_checked() {
        let fields = |id: &str, data: &str| -> Vec<String> {
            ["session", "s", "agent", AGENT, "id", id, "data", data]
                .map(str::to_owned)
                .to_vec()
        };
        assert_eq!(
            parse_up("17-2", &fields("c12-7", r#"{"seq":7}"#)),
            Some(((17, 2), 12, 7))
        );
        assert_eq!(parse_up("17-2", &fields("c12-7", r#"{"seq":8}"#)), None);
        assert_eq!(parse_up("17-2", &fields("x12-7", r#"{"seq":7}"#)), None);
        assert_eq!(parse_up("17", &fields("c12-7", r#"{"seq":7}"#)), None);
    }

    #[test]
    fn failures_name_every_nonzero_count() {
        let mut c = Counts {
            settled: true,
            ..Counts::default()
        };
        assert!(c.failures().is_empty());
        c.up.lost = 2;
        c.resume_failures = 1;
        assert_eq!(c.failures(), vec!["up: 2 lost", "1 resume failures"]);
        let unsettled = Counts::default();
        assert_eq!(unsettled.failures(), vec!["did not settle in time"]);
    }
}
