//! `soak`: a bounded mixed load against one running wsproxy for a long
//! time (an hour by default), sampled every interval, so that whatever
//! grows without bound (memory, file descriptors, Redis channels or
//! clients) shows as a curve rather than hiding in one short run.
//!
//! The load, all on loopback, a few hundred connections and a few hundred
//! messages per second in total (every figure is a flag):
//!
//! - session-bridge clients (`/soak/ws/{session}`, token set with `SETEX
//!   session:{id}:auth`), a few closed and replaced every second; a third
//!   of the replacements reconnect to a recently closed session with its
//!   old token (the grace-period path), the rest use a new session;
//! - down messages (`PUBLISH session:{id}:down`) to open sessions, each
//!   checked as received by its client;
//! - up messages (client JSON), checked as received on `session:{id}:up`
//!   through one Redis pattern subscription (a pattern is not a channel, so
//!   it does not count in `PUBSUB CHANNELS`);
//! - topic pub/sub over `/ws` (anonymous clients): groups of clients in one
//!   session subscribed to topic `news` (plus a private topic each, so every
//!   replaced client adds and removes a channel), a member publishing with
//!   `publish-json:` and every member checked as receiving it;
//! - optionally, round trips through a reverse-proxy route to a
//!   `wsproxy-bench echo-server` (`--proxy-url`), clients replaced now and
//!   then.
//!
//! Every message carries a sequence number and is expected by exactly the
//! clients (or the up listener) that should get it; one not received within
//! [`LOSS_TIMEOUT`] is lost. A client is only closed once everything it was
//! sent has arrived (or [`RETIRE_WAIT`] has passed), so churn itself loses
//! nothing. Each sample compares the Redis channels of this run with the
//! channels its open (or just closed) connections need.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Sources, Ws};
use crate::scenarios::{hub_subscribe, redis_client, redis_conn};
use crate::stats::{self, Report, histogram, now_us};

/// A message not received this long after it was sent is lost.
const LOSS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client being closed waits for what it was sent.
const RETIRE_WAIT: Duration = Duration::from_secs(5);
/// How long a closed connection's channels still count as needed: wsproxy
/// unsubscribes a moment after the close, not at the same instant.
const CHANNEL_GRACE: Duration = Duration::from_secs(5);
/// The controller's step.
const TICK: Duration = Duration::from_millis(100);
/// Closed sessions kept for reconnecting with their token; older ones have
/// their token deleted.
const RECENT_SESSIONS: usize = 64;
/// Error messages printed to stderr as they happen (all are counted).
const ERRORS_PRINTED: u64 = 20;
/// TTL of the tokens set for new sessions (a connect resets it to wsproxy's
/// grace period).
const TOKEN_TTL_SECS: u64 = 600;

/// `wsproxy-bench soak`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// How long to run: 90s, 2m, 60m, 1h30m (a bare number is seconds).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    pub duration: Duration,
    /// How often to print a sample line.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Process ids to sample (RSS and open fds): wsproxy's, and any other
    /// (the echo backend, Redis).
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// A wsproxy route to a `wsproxy-bench echo-server`, e.g.
    /// ws://127.0.0.1:8090/echo. Without it, no proxied echo.
    #[arg(long)]
    pub proxy_url: Option<String>,
    /// Session-bridge clients kept open.
    #[arg(long, default_value_t = 200)]
    pub sessions: usize,
    /// Session clients closed and replaced each second.
    #[arg(long, default_value_t = 3)]
    pub churn: usize,
    /// Down messages per second (PUBLISH session:{id}:down).
    #[arg(long, default_value_t = 100.0)]
    pub down_rate: f64,
    /// Up messages per second (client JSON to session:{id}:up).
    #[arg(long, default_value_t = 100.0)]
    pub up_rate: f64,
    /// Topic pub/sub sessions on /ws (anonymous clients).
    #[arg(long, default_value_t = 20)]
    pub hub_groups: usize,
    /// /ws clients per topic session, all subscribed to its topic.
    #[arg(long, default_value_t = 3)]
    pub hub_size: usize,
    /// /ws clients closed and replaced each second.
    #[arg(long, default_value_t = 1)]
    pub hub_churn: usize,
    /// Topic messages published per second (each goes to a whole group).
    #[arg(long, default_value_t = 20.0)]
    pub hub_rate: f64,
    /// Clients making round trips through --proxy-url.
    #[arg(long, default_value_t = 10)]
    pub echo_clients: usize,
    /// Round trips per second through --proxy-url, over all its clients.
    #[arg(long, default_value_t = 50.0)]
    pub echo_rate: f64,
    /// One proxied client is closed and replaced every this many seconds
    /// (0: never).
    #[arg(long, default_value_t = 5)]
    pub echo_churn_secs: u64,
}

/// What a soak run found, for `--strict` and `--json`.
pub struct Outcome {
    pub report: Report,
    /// Messages never received.
    pub lost: u64,
    /// Samples where Redis had more of this run's channels than its
    /// connections needed.
    pub channel_excess_samples: usize,
}

/// Parses `90s`, `2m`, `60m`, `1h30m`, `500ms`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?}: expected a number before {rest:?}"));
        }
        let n: u64 = rest[..digits].parse().map_err(|e| format!("{s:?}: {e}"))?;
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let step = match &rest[..unit] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            other => {
                return Err(format!("{s:?}: unknown unit {other:?} (use h, m, s or ms)"));
            }
        };
        total += step;
        rest = &rest[unit..];
    }
    Ok(total)
}

/// `3723 s` as `62m03s`, short durations as `45s`.
fn fmt_elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// One `field:value` line of Redis' INFO output, as a number.
pub fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(field)
            .and_then(|v| v.strip_prefix(':'))
            .and_then(|v| v.parse().ok())
    })
}

/// The kinds of message checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Down = 0,
    Up = 1,
    Hub = 2,
    Echo = 3,
}

const KIND_NAMES: [&str; 4] = ["down", "up", "hub", "echo"];

/// The kinds of client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Session = 0,
    Hub = 1,
    Echo = 2,
}

impl Conn {
    fn name(self) -> &'static str {
        ["session", "hub", "echo"][self as usize]
    }
}

/// Messages on their way: (sequence number, receiving connection) -> kind
/// and send time. A topic message is expected once per group member.
struct Tracker {
    pending: HashMap<(u64, u32), (Kind, u64)>,
    sent: [u64; 4],
    delivered: [u64; 4],
    lost: [u64; 4],
    /// Latencies since the last sample, and over the whole run.
    interval: Histogram<u64>,
    total: Histogram<u64>,
}

impl Tracker {
    fn new() -> Self {
        Self {
            pending: HashMap::new(),
            sent: [0; 4],
            delivered: [0; 4],
            lost: [0; 4],
            interval: histogram(),
            total: histogram(),
        }
    }

    fn expect(&mut self, seq: u64, conn: u32, kind: Kind, t_us: u64) {
        self.pending.insert((seq, conn), (kind, t_us));
        self.sent[kind as usize] += 1;
    }

    /// Takes back an expectation whose message could not be sent.
    fn cancel(&mut self, seq: u64, conn: u32) {
        if let Some((kind, _)) = self.pending.remove(&(seq, conn)) {
            self.sent[kind as usize] -= 1;
        }
    }

    /// Records an arrival; false if nothing was expecting it (a duplicate,
    /// one already counted lost, or one for another connection).
    fn arrived(&mut self, seq: u64, conn: u32, now: u64) -> bool {
        let Some((kind, t)) = self.pending.remove(&(seq, conn)) else {
            return false;
        };
        self.delivered[kind as usize] += 1;
        let lat = now.saturating_sub(t).max(1);
        let _ = self.interval.record(lat);
        let _ = self.total.record(lat);
        true
    }

    /// Counts as lost whatever was sent more than `timeout` before `now`.
    fn sweep(&mut self, now: u64, timeout: Duration) {
        let limit = now.saturating_sub(timeout.as_micros() as u64);
        let lost = &mut self.lost;
        self.pending.retain(|_, (kind, t)| {
            let keep = *t > limit;
            if !keep {
                lost[*kind as usize] += 1;
            }
            keep
        });
    }

    fn pending_for(&self, conn: u32) -> usize {
        self.pending.keys().filter(|(_, c)| *c == conn).count()
    }
}

/// What a received text frame is.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// One of ours, with its sequence number.
    Seq(u64),
    /// A refusal from wsproxy (`{"type":"error",...}`).
    Refusal,
    /// Anything else (`subscribed`/`unsubscribed` replies).
    Other,
}

fn classify(conn: Conn, text: &str) -> Seen {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return Seen::Other;
    };
    if v["type"] == "error" {
        return Seen::Refusal;
    }
    let seq = match conn {
        Conn::Hub => v["payload"]["s"].as_u64(),
        Conn::Session | Conn::Echo => v["s"].as_u64(),
    };
    seq.map_or(Seen::Other, Seen::Seq)
}

/// Every message's body: send time, sequence number, sending or receiving
/// connection.
fn body(t_us: u64, seq: u64, conn: u32) -> String {
    format!("{{\"t\":{t_us},\"s\":{seq},\"c\":{conn}}}")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// State shared by the controller, the clients and the up listener.
struct Shared {
    tracker: Mutex<Tracker>,
    /// Channel -> connections that need it (connecting, open, or closed
    /// less than [`CHANNEL_GRACE`] ago).
    claims: Mutex<HashMap<String, u32>>,
    opened: [AtomicU64; 3],
    closed: [AtomicU64; 3],
    connect_errors: AtomicU64,
    /// Connections that ended without our asking.
    dropped: AtomicU64,
    /// Refusals wsproxy sent (`{"type":"error"}` frames).
    refused: AtomicU64,
    /// Messages that could not be handed to Redis or a client.
    send_errors: AtomicU64,
    /// Arrivals nothing was waiting for (not counted for clients being
    /// closed, which may get messages meant for their successor).
    unexpected: AtomicU64,
    errors_seen: AtomicU64,
    first_error: Mutex<Option<String>>,
    started: Instant,
}

impl Shared {
    fn new() -> Self {
        Self {
            tracker: Mutex::new(Tracker::new()),
            claims: Mutex::new(HashMap::new()),
            opened: Default::default(),
            closed: Default::default(),
            connect_errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            errors_seen: AtomicU64::new(0),
            first_error: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// Keeps the first error, prints the first few as they happen.
    fn note(&self, what: String) {
        let n = self.errors_seen.fetch_add(1, Ordering::Relaxed);
        if n < ERRORS_PRINTED {
            eprintln!("soak: [{}] {what}", fmt_elapsed(self.started.elapsed()));
            if n + 1 == ERRORS_PRINTED {
                eprintln!("soak: (further errors are counted, not printed)");
            }
        }
        lock(&self.first_error).get_or_insert(what);
    }

    fn claim(&self, channels: &[String]) {
        let mut claims = lock(&self.claims);
        for ch in channels {
            *claims.entry(ch.clone()).or_insert(0) += 1;
        }
    }

    fn release(&self, channels: &[String]) {
        let mut claims = lock(&self.claims);
        for ch in channels {
            if let Some(n) = claims.get_mut(ch) {
                *n -= 1;
                if *n == 0 {
                    claims.remove(ch);
                }
            }
        }
    }

    fn release_later(self: &Arc<Self>, channels: Vec<String>) {
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CHANNEL_GRACE).await;
            shared.release(&channels);
        });
    }

    fn needed_channels(&self) -> usize {
        lock(&self.claims).len()
    }

    /// Checks off what client `id` received. Arrivals nothing waits for
    /// are counted unless the client is being closed (it may get what is
    /// meant for its session's next connection) or the message was sent
    /// before the client joined (`joined_at`: the last sequence number
    /// then), which a topic client gets between its subscription and its
    /// joining the group.
    fn seen(&self, conn: Conn, id: u32, text: &str, retiring: bool, joined_at: u64) {
        match classify(conn, text) {
            Seen::Seq(seq) => {
                let expected = lock(&self.tracker).arrived(seq, id, now_us());
                if !expected && !retiring && seq > joined_at {
                    self.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Seen::Refusal => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.note(format!("{} client {id}: refused: {text}", conn.name()));
            }
            Seen::Other => {}
        }
    }
}

enum Cmd {
    Text(String),
    Close,
}

/// One open client connection, as the controller sees it.
struct Client {
    id: u32,
    conn: Conn,
    /// The session (session clients) or the topic session (hub clients).
    session: String,
    channels: Vec<String>,
    tx: mpsc::Sender<Cmd>,
    dead: Arc<AtomicBool>,
    retiring: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the task that owns `ws`: it reads (checking what arrives) and
/// sends what the controller hands it, until told to close or the
/// connection ends.
fn spawn_client(
    mut ws: Ws,
    id: u32,
    conn: Conn,
    session: String,
    channels: Vec<String>,
    joined_at: u64,
    shared: &Arc<Shared>,
) -> Client {
    let (tx, mut rx) = mpsc::channel::<Cmd>(64);
    let dead = Arc::new(AtomicBool::new(false));
    let retiring = Arc::new(AtomicBool::new(false));
    let (shared, d, r) = (shared.clone(), dead.clone(), retiring.clone());
    let task = tokio::spawn(async move {
        let ended: Option<String> = loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        shared.seen(conn, id, t.as_str(), r.load(Ordering::Relaxed), joined_at);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break Some(format!("closed by the server: {frame:?}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Some(format!("read: {e}")),
                    None => break Some("connection ended".into()),
                },
                c = rx.recv() => match c {
                    Some(Cmd::Text(s)) => {
                        if let Err(e) = ws.send(Message::text(s)).await {
                            break Some(format!("send: {e}"));
                        }
                    }
                    Some(Cmd::Close) | None => break None,
                },
            }
        };
        match ended {
            Some(why) => {
                d.store(true, Ordering::Relaxed);
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                shared.note(format!("{} client {id} dropped: {why}", conn.name()));
            }
            None => {
                // Our close, then read until the server's answers it.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let _ = ws.close(None).await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
            }
        }
    });
    Client {
        id,
        conn,
        session,
        channels,
        tx,
        dead,
        retiring,
        task,
    }
}

/// Closes `client` once it has received what it was sent (or
/// [`RETIRE_WAIT`] passed); its channels stay needed for [`CHANNEL_GRACE`].
/// Hub clients with an odd id unsubscribe from their private topic first,
/// so both ways of leaving a topic are exercised.
fn retire(client: Client, shared: &Arc<Shared>) {
    client.retiring.store(true, Ordering::Relaxed);
    let shared = shared.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + RETIRE_WAIT;
        while lock(&shared.tracker).pending_for(client.id) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if client.conn == Conn::Hub && client.id % 2 == 1 {
            let cmd = format!("unsubscribe:m{}|{}", client.id, client.session);
            let _ = client.tx.send(Cmd::Text(cmd)).await;
        }
        let _ = client.tx.send(Cmd::Close).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), client.task).await;
        shared.closed[client.conn as usize].fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(CHANNEL_GRACE).await;
        shared.release(&client.channels);
    });
}

/// A connect attempt's result, sent back to the controller.
struct Joined {
    id: u32,
    conn: Conn,
    group: usize,
    session: String,
    channels: Vec<String>,
    result: anyhow::Result<Ws>,
}

/// xorshift64*: enough randomness to pick clients, no dependency. The
/// seed must not be 0.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// One sample line's figures.
#[derive(Debug, Clone, Default)]
struct Sample {
    label: String,
    /// (pid, VmRSS KiB, open fds); None once a process is gone.
    procs: Vec<(u32, Option<u64>, Option<usize>)>,
    bench_rss: Option<u64>,
    channels_total: Option<usize>,
    channels_ours: Option<usize>,
    channels_needed: usize,
    redis_clients: Option<u64>,
    redis_keys: Option<u64>,
    live: [u64; 3],
    opened: u64,
    closed: u64,
    sent: [u64; 4],
    delivered: [u64; 4],
    lost: [u64; 4],
    pending: usize,
    unexpected: u64,
    connect_errors: u64,
    dropped: u64,
    refused: u64,
    send_errors: u64,
    p99_us: u64,
    max_us: u64,
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

impl Sample {
    fn excess(&self) -> bool {
        self.channels_ours.is_some_and(|c| c > self.channels_needed)
    }

    fn lost(&self) -> u64 {
        self.lost.iter().sum()
    }

    fn line(&self) -> String {
        let mut s = format!("soak {:>7}", self.label);
        for (pid, rss, fds) in &self.procs {
            s.push_str(&format!(
                " | pid {pid} rss={}KB fds={}",
                opt(*rss),
                opt(*fds)
            ));
        }
        s.push_str(&format!(
            " | redis channels={} (ours {}, need<={}) clients={} keys={}",
            opt(self.channels_total),
            opt(self.channels_ours),
            self.channels_needed,
            opt(self.redis_clients),
            opt(self.redis_keys),
        ));
        s.push_str(&format!(
            " | conns session={} hub={} echo={} opened={} closed={}",
            self.live[0], self.live[1], self.live[2], self.opened, self.closed
        ));
        s.push_str(" | recv/sent");
        for (k, name) in KIND_NAMES.iter().enumerate() {
            s.push_str(&format!(" {name}={}/{}", self.delivered[k], self.sent[k]));
        }
        s.push_str(&format!(
            " pending={} lost={} unexpected={}",
            self.pending,
            self.lost(),
            self.unexpected
        ));
        s.push_str(&format!(
            " | errors connect={} dropped={} refused={} send={}",
            self.connect_errors, self.dropped, self.refused, self.send_errors
        ));
        if self.max_us > 0 {
            s.push_str(&format!(
                " | p99={} max={}",
                stats::us(self.p99_us),
                stats::us(self.max_us)
            ));
        }
        s.push_str(&format!(" | bench rss={}KB", opt(self.bench_rss)));
        if self.excess() {
            s.push_str("  [MORE CHANNELS THAN NEEDED]");
        }
        s
    }
}

/// Everything the controller owns.
struct Soak {
    args: SoakArgs,
    ws: String,
    shared: Arc<Shared>,
    sources: Arc<Sources>,
    redis: redis::aio::MultiplexedConnection,
    rng: Rng,
    /// Names of this run: sessions `soak{run}-{n}`, topic sessions
    /// `soakh{run}-{g}`.
    run: u64,
    sessions: Vec<Client>,
    hub: Vec<Vec<Client>>,
    echo: Vec<Client>,
    connecting: [usize; 3],
    hub_connecting: Vec<usize>,
    joined_tx: mpsc::UnboundedSender<Joined>,
    joined_rx: mpsc::UnboundedReceiver<Joined>,
    /// Recently closed sessions whose tokens still work.
    recent: VecDeque<String>,
    /// Session tokens to delete.
    expired: Vec<String>,
    next_id: u32,
    next_session: u64,
    seq: u64,
    credit: [f64; 4],
}

impl Soak {
    fn session_prefix(&self) -> String {
        format!("soak{}-", self.run)
    }

    fn hub_session(&self, group: usize) -> String {
        format!("soakh{}-{group}", self.run)
    }

    fn ours(&self, channel: &str) -> bool {
        channel.starts_with(&format!("session:{}", self.session_prefix()))
            || channel.starts_with(&format!("pubsub:soakh{}-", self.run))
    }

    fn new_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    fn launch_session(&mut self) {
        let id = self.new_id();
        let reuse = self.recent.len() >= 8 && self.rng.below(3) == 0;
        let session = match reuse.then(|| self.recent.pop_front()).flatten() {
            Some(s) => s,
            None => {
                self.next_session += 1;
                format!("{}{}", self.session_prefix(), self.next_session)
            }
        };
        let channels = vec![format!("session:{session}:down")];
        self.shared.claim(&channels);
        self.connecting[Conn::Session as usize] += 1;
        let url = format!("{}/soak/ws/{session}", self.ws);
        let (sources, mut redis, tx) = (
            self.sources.clone(),
            self.redis.clone(),
            self.joined_tx.clone(),
        );
        tokio::spawn(async move {
            let token = format!("soak-token-{session}");
            let result = tokio::time::timeout(Duration::from_secs(15), async {
                if !reuse {
                    let () = redis::cmd("SETEX")
                        .arg(format!("session:{session}:auth"))
                        .arg(TOKEN_TTL_SECS)
                        .arg(&token)
                        .query_async(&mut redis)
                        .await
                        .context("SETEX")?;
                }
                net::connect(&sources, &url, Some(&token)).await
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out after 15 s")));
            let _ = tx.send(Joined {
                id,
                conn: Conn::Session,
                group: 0,
                session,
                channels,
                result,
            });
        });
    }

    fn launch_hub(&mut self) {
        let id = self.new_id();
        // The group with the fewest members (open or connecting).
        let group = (0..self.hub.len())
            .min_by_key(|&g| self.hub[g].len() + self.hub_connecting[g])
            .unwrap_or(0);
        let session = self.hub_session(group);
        let channels = vec![
            format!("pubsub:{session}:news"),
            format!("pubsub:{session}:m{id}"),
        ];
        self.shared.claim(&channels);
        self.connecting[Conn::Hub as usize] += 1;
        self.hub_connecting[group] += 1;
        let url = format!("{}/ws", self.ws);
        let (sources, tx) = (self.sources.clone(), self.joined_tx.clone());
        tokio::spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(15), async {
                let mut ws = net::connect(&sources, &url, None).await?;
                // The private topic first: once subscribed to the group's
                // topic, its messages may come before a confirmation.
                hub_subscribe(&mut ws, format!("subscribe:m{id}|{session}")).await?;
                hub_subscribe(&mut ws, format!("subscribe:news|{session}")).await?;
                Ok(ws)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out after 15 s")));
            let _ = tx.send(Joined {
                id,
                conn: Conn::Hub,
                group,
                session,
                channels,
                result,
            });
        });
    }

    fn launch_echo(&mut self) {
        let Some(url) = self.args.proxy_url.clone() else {
            return;
        };
        let id = self.new_id();
        self.connecting[Conn::Echo as usize] += 1;
        let (sources, tx) = (self.sources.clone(), self.joined_tx.clone());
        tokio::spawn(async move {
            let result =
                tokio::time::timeout(Duration::from_secs(15), net::connect(&sources, &url, None))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out after 15 s")));
            let _ = tx.send(Joined {
                id,
                conn: Conn::Echo,
                group: 0,
                session: String::new(),
                channels: Vec::new(),
                result,
            });
        });
    }

    /// Takes in finished connects.
    fn join(&mut self) {
        while let Ok(j) = self.joined_rx.try_recv() {
            self.connecting[j.conn as usize] -= 1;
            if j.conn == Conn::Hub {
                self.hub_connecting[j.group] -= 1;
            }
            match j.result {
                Ok(ws) => {
                    self.shared.opened[j.conn as usize].fetch_add(1, Ordering::Relaxed);
                    let c = spawn_client(
                        ws,
                        j.id,
                        j.conn,
                        j.session,
                        j.channels,
                        self.seq,
                        &self.shared,
                    );
                    match j.conn {
                        Conn::Session => self.sessions.push(c),
                        Conn::Hub => self.hub[j.group].push(c),
                        Conn::Echo => self.echo.push(c),
                    }
                }
                Err(e) => {
                    self.shared.connect_errors.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .note(format!("{} connect failed: {e:#}", j.conn.name()));
                    if j.conn == Conn::Session {
                        self.expired.push(j.session);
                    }
                    self.shared.release_later(j.channels);
                }
            }
        }
    }

    /// Removes connections that ended on their own.
    fn reap(&mut self) {
        let mut gone = Vec::new();
        let mut take = |list: &mut Vec<Client>| {
            let mut i = 0;
            while i < list.len() {
                if list[i].dead.load(Ordering::Relaxed) {
                    gone.push(list.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        };
        take(&mut self.sessions);
        for g in &mut self.hub {
            take(g);
        }
        take(&mut self.echo);
        for c in gone {
            self.shared.closed[c.conn as usize].fetch_add(1, Ordering::Relaxed);
            if c.conn == Conn::Session {
                self.expired.push(c.session.clone());
            }
            self.shared.release_later(c.channels);
        }
    }

    /// Once a second: replace some clients, refill to the targets.
    fn churn(&mut self, second: u64) {
        for _ in 0..self.args.churn.min(self.sessions.len()) {
            let i = self.rng.below(self.sessions.len());
            let c = self.sessions.swap_remove(i);
            self.recent.push_back(c.session.clone());
            retire(c, &self.shared);
        }
        while self.recent.len() > RECENT_SESSIONS {
            if let Some(s) = self.recent.pop_front() {
                self.expired.push(s);
            }
        }
        for _ in 0..self.args.hub_churn {
            let members: usize = self.hub.iter().map(Vec::len).sum();
            if members == 0 {
                break;
            }
            let mut k = self.rng.below(members);
            for g in &mut self.hub {
                if k < g.len() {
                    retire(g.swap_remove(k), &self.shared);
                    break;
                }
                k -= g.len();
            }
        }
        let every = self.args.echo_churn_secs;
        if every > 0 && second.is_multiple_of(every) && !self.echo.is_empty() {
            let i = self.rng.below(self.echo.len());
            retire(self.echo.swap_remove(i), &self.shared);
        }
        // Refill, at most 50 connects of each kind a second (the ramp-up).
        let want = self
            .args
            .sessions
            .saturating_sub(self.sessions.len() + self.connecting[Conn::Session as usize]);
        for _ in 0..want.min(50.max(self.args.churn)) {
            self.launch_session();
        }
        let members: usize = self.hub.iter().map(Vec::len).sum();
        let want = (self.args.hub_groups * self.args.hub_size)
            .saturating_sub(members + self.connecting[Conn::Hub as usize]);
        for _ in 0..want.min(50.max(self.args.hub_churn)) {
            self.launch_hub();
        }
        if self.args.proxy_url.is_some() {
            let want = self
                .args
                .echo_clients
                .saturating_sub(self.echo.len() + self.connecting[Conn::Echo as usize]);
            for _ in 0..want.min(50) {
                self.launch_echo();
            }
        }
    }

    /// Messages due in this step: `rate * dt`, the fraction carried over.
    fn due(&mut self, kind: Kind, rate: f64, dt: f64) -> usize {
        let c = &mut self.credit[kind as usize];
        *c += rate * dt;
        let n = c.floor().max(0.0);
        *c -= n;
        n as usize
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Hands `text` to a client, or takes the expectations back.
    fn hand(&self, client: &Client, text: String, expected: &[(u64, u32)]) {
        if client.tx.try_send(Cmd::Text(text)).is_err() {
            let mut t = lock(&self.shared.tracker);
            for (seq, conn) in expected {
                t.cancel(*seq, *conn);
            }
            drop(t);
            self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
            self.shared.note(format!(
                "{} client {}: could not queue a message",
                client.conn.name(),
                client.id
            ));
        }
    }

    async fn send(&mut self, dt: f64) {
        // Down: one pipelined PUBLISH batch a step.
        let n = self.due(Kind::Down, self.args.down_rate, dt);
        if n > 0 && !self.sessions.is_empty() {
            let mut pipe = redis::pipe();
            let mut expected = Vec::with_capacity(n);
            {
                let mut t = lock(&self.shared.tracker);
                for _ in 0..n {
                    self.seq += 1;
                    let seq = self.seq;
                    let c = &self.sessions[self.rng.below(self.sessions.len())];
                    let now = now_us();
                    t.expect(seq, c.id, Kind::Down, now);
                    expected.push((seq, c.id));
                    pipe.cmd("PUBLISH")
                        .arg(format!("session:{}:down", c.session))
                        .arg(body(now, seq, c.id))
                        .ignore();
                }
            }
            if let Err(e) = pipe.query_async::<()>(&mut self.redis).await {
                let mut t = lock(&self.shared.tracker);
                for (seq, conn) in &expected {
                    t.cancel(*seq, *conn);
                }
                drop(t);
                self.shared
                    .send_errors
                    .fetch_add(expected.len() as u64, Ordering::Relaxed);
                self.shared.note(format!("PUBLISH down: {e}"));
            }
        }
        // Up: a session client sends JSON.
        let n = self.due(Kind::Up, self.args.up_rate, dt);
        for _ in 0..n {
            if self.sessions.is_empty() {
                break;
            }
            let seq = self.next_seq();
            let i = self.rng.below(self.sessions.len());
            let c = &self.sessions[i];
            let now = now_us();
            lock(&self.shared.tracker).expect(seq, c.id, Kind::Up, now);
            self.hand(c, body(now, seq, c.id), &[(seq, c.id)]);
        }
        // Topic: a member publishes, every member (itself too) receives.
        let n = self.due(Kind::Hub, self.args.hub_rate, dt);
        for _ in 0..n {
            let groups: Vec<usize> = (0..self.hub.len())
                .filter(|&g| !self.hub[g].is_empty())
                .collect();
            if groups.is_empty() {
                break;
            }
            let g = groups[self.rng.below(groups.len())];
            let seq = self.next_seq();
            let now = now_us();
            let members = &self.hub[g];
            let expected: Vec<(u64, u32)> = members.iter().map(|m| (seq, m.id)).collect();
            {
                let mut t = lock(&self.shared.tracker);
                for (seq, conn) in &expected {
                    t.expect(*seq, *conn, Kind::Hub, now);
                }
            }
            let publisher = &members[self.rng.below(members.len())];
            let cmd = format!(
                "publish-json:{{\"topic\":\"news\",\"payload\":{}}}",
                body(now, seq, publisher.id)
            );
            self.hand(publisher, cmd, &expected);
        }
        // Echo through the proxy route.
        let n = self.due(Kind::Echo, self.args.echo_rate, dt);
        for _ in 0..n {
            if self.echo.is_empty() {
                break;
            }
            let seq = self.next_seq();
            let c = &self.echo[self.rng.below(self.echo.len())];
            let now = now_us();
            lock(&self.shared.tracker).expect(seq, c.id, Kind::Echo, now);
            self.hand(c, body(now, seq, c.id), &[(seq, c.id)]);
        }
    }

    /// Deletes the tokens of sessions that will not reconnect.
    async fn delete_expired(&mut self) {
        if self.expired.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for s in self.expired.drain(..) {
            pipe.cmd("DEL").arg(format!("session:{s}:auth")).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut self.redis).await {
            self.shared.note(format!("DEL tokens: {e}"));
        }
    }

    async fn sample(&mut self, label: &str) -> Sample {
        let shared = &self.shared;
        let before = shared.needed_channels();
        let channels: Option<Vec<String>> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("*")
            .query_async(&mut self.redis)
            .await
            .ok();
        let after = shared.needed_channels();
        let info: Option<String> = redis::cmd("INFO")
            .arg("clients")
            .query_async(&mut self.redis)
            .await
            .ok();
        let keys: Option<u64> = redis::cmd("DBSIZE").query_async(&mut self.redis).await.ok();
        let mut t = lock(&shared.tracker);
        let (p99_us, max_us) = if t.interval.is_empty() {
            (0, 0)
        } else {
            (t.interval.value_at_quantile(0.99), t.interval.max())
        };
        t.interval.reset();
        let load = |a: &[AtomicU64; 3]| -> [u64; 3] {
            std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
        };
        let (opened, closed) = (load(&shared.opened), load(&shared.closed));
        Sample {
            label: label.to_owned(),
            procs: self
                .args
                .pids
                .iter()
                .map(|&p| (p, net::vm_rss_kib(p), net::open_fds(p)))
                .collect(),
            bench_rss: net::vm_rss_kib(std::process::id()),
            channels_total: channels.as_ref().map(Vec::len),
            channels_ours: channels
                .as_ref()
                .map(|c| c.iter().filter(|ch| self.ours(ch)).count()),
            channels_needed: before.max(after),
            redis_clients: info
                .as_deref()
                .and_then(|i| info_field(i, "connected_clients")),
            redis_keys: keys,
            live: std::array::from_fn(|i| opened[i].saturating_sub(closed[i])),
            opened: opened.iter().sum(),
            closed: closed.iter().sum(),
            sent: t.sent,
            delivered: t.delivered,
            lost: t.lost,
            pending: t.pending.len(),
            unexpected: shared.unexpected.load(Ordering::Relaxed),
            connect_errors: shared.connect_errors.load(Ordering::Relaxed),
            dropped: shared.dropped.load(Ordering::Relaxed),
            refused: shared.refused.load(Ordering::Relaxed),
            send_errors: shared.send_errors.load(Ordering::Relaxed),
            p99_us,
            max_us,
        }
    }

    /// Closes every client (each once its messages are in) and waits.
    async fn close_all(&mut self) {
        let mut all: Vec<Client> = self.sessions.drain(..).collect();
        for g in &mut self.hub {
            all.append(g);
        }
        all.append(&mut self.echo);
        for c in all {
            if c.conn == Conn::Session {
                self.expired.push(c.session.clone());
            }
            retire(c, &self.shared);
        }
        self.expired.extend(self.recent.drain(..));
        // Connects still in flight: take them in and close them too.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.connecting.iter().sum::<usize>() > 0 && Instant::now() < deadline {
            tokio::time::sleep(TICK).await;
            self.join();
            let mut late: Vec<Client> = self.sessions.drain(..).collect();
            for g in &mut self.hub {
                late.append(g);
            }
            late.append(&mut self.echo);
            for c in late {
                if c.conn == Conn::Session {
                    self.expired.push(c.session.clone());
                }
                retire(c, &self.shared);
            }
        }
        self.delete_expired().await;
        // Retiring clients close within RETIRE_WAIT + 10 s; their channels
        // stop counting CHANNEL_GRACE later.
        let deadline = Instant::now() + RETIRE_WAIT + Duration::from_secs(10) + CHANNEL_GRACE;
        loop {
            let opened: u64 = self
                .shared
                .opened
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum();
            let closed: u64 = self
                .shared
                .closed
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum();
            if (opened == closed && self.shared.needed_channels() == 0) || Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        // wsproxy's UNSUBSCRIBE follows a close by a moment.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads every up message of this run from one pattern subscription
/// (reconnecting if it ends) and checks them off.
async fn up_listener(
    redis_url: String,
    pattern: String,
    shared: Arc<Shared>,
    first: redis::aio::PubSub,
) {
    let mut pubsub = Some(first);
    loop {
        if let Some(p) = pubsub.take() {
            let mut stream = p.into_on_message();
            while let Some(msg) = stream.next().await {
                let v: Option<serde_json::Value> =
                    serde_json::from_slice(msg.get_payload_bytes()).ok();
                let ids = v
                    .as_ref()
                    .and_then(|v| Some((v["s"].as_u64()?, v["c"].as_u64()?)));
                let expected = ids.is_some_and(|(seq, conn)| {
                    lock(&shared.tracker).arrived(seq, conn as u32, now_us())
                });
                if !expected {
                    shared.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
            shared.note("the up subscription ended; resubscribing".into());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let again = async {
            let mut p = redis_client(&redis_url)?.get_async_pubsub().await?;
            p.psubscribe(&pattern).await?;
            anyhow::Ok(p)
        };
        match again.await {
            Ok(p) => pubsub = Some(p),
            Err(e) => shared.note(format!("up subscription: {e:#}")),
        }
    }
}

/// Runs the soak and prints a line every `--interval`, then a summary.
pub async fn soak(
    ws: &str,
    redis_url: &str,
    sources: &Arc<Sources>,
    args: SoakArgs,
) -> anyhow::Result<Outcome> {
    if args.interval.is_zero() {
        bail!("--interval must be more than 0");
    }
    let conns = args.sessions
        + args.hub_groups * args.hub_size
        + if args.proxy_url.is_some() {
            args.echo_clients
        } else {
            0
        };
    net::check_fd_budget(conns + 100)?;
    for pid in &args.pids {
        if net::vm_rss_kib(*pid).is_none() {
            bail!("--pids: no process {pid} (or its /proc/{pid}/status is unreadable)");
        }
    }
    if let Some(url) = &args.proxy_url {
        net::addr_of(url)?;
    }
    let run = std::process::id() as u64 * 1_000 + (now_us() % 1_000);
    let shared = Arc::new(Shared::new());
    let mut redis = redis_conn(redis_url).await?;
    // The default 500 ms would turn a busy moment of a shared machine into
    // errors; a soak is about what is lost, not about what is slow.
    redis.set_response_timeout(Duration::from_secs(10));
    let pattern = format!("session:soak{run}-*:up");
    let mut pubsub = redis_client(redis_url)?.get_async_pubsub().await?;
    pubsub.psubscribe(&pattern).await?;
    tokio::spawn(up_listener(
        redis_url.to_owned(),
        pattern,
        shared.clone(),
        pubsub,
    ));

    let (joined_tx, joined_rx) = mpsc::unbounded_channel();
    let mut s = Soak {
        ws: ws.trim_end_matches('/').to_owned(),
        shared: shared.clone(),
        sources: sources.clone(),
        redis,
        rng: Rng(0x9E37_79B9_7F4A_7C15 ^ run),
        run,
        sessions: Vec::new(),
        hub: (0..args.hub_groups).map(|_| Vec::new()).collect(),
        echo: Vec::new(),
        connecting: [0; 3],
        hub_connecting: vec![0; args.hub_groups],
        joined_tx,
        joined_rx,
        recent: VecDeque::new(),
        expired: Vec::new(),
        next_id: 0,
        next_session: 0,
        seq: 0,
        credit: [0.0; 4],
        args,
    };
    println!(
        "soak: {} against {ws} (Redis {redis_url}), sample every {}: {} sessions ({}/s replaced), \
         down {}/s, up {}/s, {} topic groups of {} ({}/s replaced, {} publishes/s), {}",
        fmt_elapsed(s.args.duration),
        fmt_elapsed(s.args.interval),
        s.args.sessions,
        s.args.churn,
        s.args.down_rate,
        s.args.up_rate,
        s.args.hub_groups,
        s.args.hub_size,
        s.args.hub_churn,
        s.args.hub_rate,
        match &s.args.proxy_url {
            Some(u) => format!(
                "{} echo clients through {u} ({} round trips/s)",
                s.args.echo_clients, s.args.echo_rate
            ),
            None => "no proxied echo (no --proxy-url)".into(),
        }
    );
    let mut samples = vec![s.sample("before").await];
    println!("{}", samples[0].line());

    let start = Instant::now();
    let mut next_sample = start + s.args.interval;
    let mut next_second = start;
    let mut second = 0u64;
    let mut last = start;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while start.elapsed() < s.args.duration {
        tick.tick().await;
        let now = Instant::now();
        let dt = (now - last).as_secs_f64();
        last = now;
        s.join();
        s.reap();
        if now >= next_second {
            s.churn(second);
            second += 1;
            next_second += Duration::from_secs(1);
            lock(&shared.tracker).sweep(now_us(), LOSS_TIMEOUT);
            s.delete_expired().await;
        }
        s.send(dt).await;
        if now >= next_sample {
            let sm = s.sample(&fmt_elapsed(start.elapsed())).await;
            println!("{}", sm.line());
            samples.push(sm);
            next_sample += s.args.interval;
        }
    }
    // Let what is on its way arrive, then count the rest lost.
    let deadline = Instant::now() + LOSS_TIMEOUT;
    while !lock(&shared.tracker).pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(TICK).await;
    }
    lock(&shared.tracker).sweep(u64::MAX, Duration::ZERO);
    s.join();
    s.reap();
    let end = s.sample(&fmt_elapsed(start.elapsed())).await;
    println!("{}", end.line());
    samples.push(end);
    s.close_all().await;
    let closed = s.sample("closed").await;
    println!("{}", closed.line());
    samples.push(closed);

    Ok(summarize(&s, &samples, start.elapsed()))
}

/// Prints the summary and builds the outcome.
fn summarize(s: &Soak, samples: &[Sample], took: Duration) -> Outcome {
    // before, the interval samples, the last one under load, after closing.
    let n = samples.len();
    let (first, last, after) = (&samples[1], &samples[n - 2], &samples[n - 1]);
    println!("soak summary ({} of load):", fmt_elapsed(took));
    println!("  before : {}", samples[0].line());
    println!("  first  : {}", first.line());
    println!("  last   : {}", last.line());
    println!("  closed : {}", after.line());
    let mut growth = Vec::new();
    for (i, (pid, rss, fds)) in first.procs.iter().enumerate() {
        let (lrss, lfds) = last.procs.get(i).map_or((None, None), |(_, r, f)| (*r, *f));
        let max_rss = samples.iter().filter_map(|x| x.procs.get(i)?.1).max();
        let max_fds = samples.iter().filter_map(|x| x.procs.get(i)?.2).max();
        let line = format!(
            "pid {pid}: rss {}KB -> {}KB (max {}KB, {}KB after closing), fds {} -> {} (max {}, {} after closing)",
            opt(*rss),
            opt(lrss),
            opt(max_rss),
            opt(after.procs.get(i).and_then(|p| p.1)),
            opt(*fds),
            opt(lfds),
            opt(max_fds),
            opt(after.procs.get(i).and_then(|p| p.2)),
        );
        println!("  {line}");
        growth.push(line);
    }
    let t = lock(&s.shared.tracker);
    let sent: u64 = t.sent.iter().sum();
    let delivered: u64 = t.delivered.iter().sum();
    let lost: u64 = t.lost.iter().sum();
    for (k, name) in KIND_NAMES.iter().enumerate() {
        println!(
            "  {name:<5}: sent {} received {} lost {}",
            t.sent[k], t.delivered[k], t.lost[k]
        );
    }
    let excess: Vec<&Sample> = samples.iter().filter(|x| x.excess()).collect();
    let max_chan = samples.iter().filter_map(|x| x.channels_ours).max();
    println!(
        "  channels: at most {} of this run's in Redis; {} of {} samples had more than their connections needed{}",
        opt(max_chan),
        excess.len(),
        samples.len(),
        excess
            .first()
            .map_or(String::new(), |x| format!(" (first at {})", x.label))
    );
    let errors = after.connect_errors + after.dropped + after.refused + after.send_errors;
    println!(
        "  connections opened {} closed {}; errors: connect {} dropped {} refused {} send {}; unexpected arrivals {}",
        after.opened,
        after.closed,
        after.connect_errors,
        after.dropped,
        after.refused,
        after.send_errors,
        after.unexpected
    );
    if let Some(e) = lock(&s.shared.first_error).as_ref() {
        println!("  first error: {e}");
    }
    let secs = took.as_secs_f64();
    let report = Report {
        scenario: "soak".into(),
        target: "wsproxy".into(),
        connections: s.args.sessions
            + s.args.hub_groups * s.args.hub_size
            + if s.args.proxy_url.is_some() {
                s.args.echo_clients
            } else {
                0
            },
        sent,
        delivered,
        errors,
        seconds: secs,
        rate: delivered as f64 / secs.max(1e-9),
        note: format!(
            "{}; {} connections opened; channel excess in {} samples",
            growth.join("; "),
            after.opened,
            excess.len()
        ),
        ..Report::default()
    }
    .with_latency(&t.total);
    Outcome {
        report,
        lost,
        channel_excess_samples: excess.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60m"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2m5s"), Ok(Duration::from_secs(125)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(fmt_elapsed(Duration::from_secs(3723)), "62m03s");
        assert_eq!(fmt_elapsed(Duration::from_secs(45)), "45s");
    }

    #[test]
    fn redis_info_fields() {
        let info =
            "# Clients\r\nconnected_clients:7\r\ncluster_connections:0\r\nmaxclients:10000\r\n";
        assert_eq!(info_field(info, "connected_clients"), Some(7));
        assert_eq!(info_field(info, "maxclients"), Some(10000));
        assert_eq!(info_field(info, "blocked_clients"), None);
        // A field is not matched by a longer one that starts with it.
        assert_eq!(
            info_field("connected_clients_x:3\n", "connected_clients"),
            None
        );
    }

    #[test]
    fn frames_are_classified() {
        let down = body(5, 42, 7);
        assert_eq!(classify(Conn::Session, &down), Seen::Seq(42));
        assert_eq!(classify(Conn::Echo, &down), Seen::Seq(42));
        let topic = format!(
            "{{\"publisher_name\":\"anonymous\",\"topic\":\"news\",\"payload\":{},\"timestamp\":\"2026-01-01T00:00:00Z\",\"session_id\":\"s\"}}",
            body(5, 43, 7)
        );
        assert_eq!(classify(Conn::Hub, &topic), Seen::Seq(43));
        let refusal = r#"{"type":"error","error":"invalid_json","message":"x"}"#;
        assert_eq!(classify(Conn::Session, refusal), Seen::Refusal);
        assert_eq!(classify(Conn::Hub, refusal), Seen::Refusal);
        let reply = r#"{"type":"unsubscribed","topic":"m1","session_id":"s"}"#;
        assert_eq!(classify(Conn::Hub, reply), Seen::Other);
        assert_eq!(classify(Conn::Session, "not json"), Seen::Other);
    }

    #[test]
    fn tracker_counts_arrivals_losses_and_pending() {
        let mut t = Tracker::new();
        t.expect(1, 10, Kind::Down, 1_000);
        t.expect(2, 10, Kind::Up, 2_000);
        t.expect(3, 11, Kind::Hub, 2_000);
        t.expect(3, 12, Kind::Hub, 2_000);
        assert_eq!(t.pending_for(10), 2);
        assert!(t.arrived(1, 10, 1_500));
        assert!(!t.arrived(1, 10, 1_600), "a duplicate is not expected");
        assert!(!t.arrived(3, 13, 2_100), "nor one for another connection");
        assert!(t.arrived(3, 11, 2_100));
        t.cancel(2, 10);
        assert_eq!(t.pending_for(10), 0);
        assert_eq!(t.sent, [1, 0, 2, 0]);
        // (3, 12) was sent at 2 ms: not lost 5 ms later with a 10 ms timeout,
        // lost 20 ms later.
        t.sweep(7_000, Duration::from_millis(10));
        assert_eq!(t.lost, [0; 4]);
        t.sweep(22_000, Duration::from_millis(10));
        assert_eq!(t.lost, [0, 0, 1, 0]);
        assert_eq!(t.delivered, [1, 0, 1, 0]);
        assert!(t.pending.is_empty());
        assert_eq!(t.total.len(), 2);
    }
}
