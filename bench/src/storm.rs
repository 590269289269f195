//! `storm`: a deploy's reconnect storm (issue 25 item 5). Every reliable
//! client of one wsproxy process moves to another while the backend keeps
//! publishing, and must miss nothing.
//!
//! It starts what it needs on loopback, in a temporary directory: a
//! `redis-server` on a free port (no persistence: nothing is restarted),
//! and two wsproxy processes on it, A and B (`--wsproxy-bin`, the release
//! build by default; `RELIABLE_SESSIONS=true`, every other setting at its
//! default). Then:
//!
//! 1. `--clients` reliable clients (`wsproxy.v1`, one session each, token
//!    stored with `SETEX session:<id>:auth`) connect to A and get their
//!    welcome (at most `--connect-concurrency` handshakes at once).
//! 2. Publishers ([`PUBLISHERS`] tasks, `--rate` messages a second in
//!    total, round robin over the sessions) send `{"seq":k}` with `FCALL
//!    wsproxy_publish`, from before the storm to after it. A publish is
//!    confirmed once Redis answered it; the publishers never stop during
//!    the storm.
//! 3. Once every client has received at least one message and
//!    `--before-secs` more have passed (the steady state whose Redis CPU
//!    is the baseline), A gets SIGTERM: it stops accepting, sends each
//!    client what is queued for it and closes it with 1001.
//! 4. Each client, on its close (the close frame, or the end of the stream
//!    if there is none), waits a random pause of 0 to `--jitter-ms` (what a
//!    real client's reconnect backoff does; 0: every client at once, the
//!    worst case) and connects to B with `?epoch=..&offset=..` of the last
//!    message it saw. B is already running: in a deploy it is the
//!    process the load balancer sends the clients to. A failed attempt (a
//!    refused or timed-out connect, a 503) is retried after 100 ms, doubled
//!    up to 1 s, counted as a retry.
//! 5. The run waits until every client has resumed, publishes
//!    `--after-secs` more, stops publishing and waits (at most
//!    [`SETTLE`]) until every confirmed message has arrived.
//!
//! What it measures, per client and over all of them:
//!
//! - **resume latency**: from the start of the client's reconnect (after
//!   its pause) to the moment it is caught up: the last replayed message
//!   (the welcome says how many, `"replayed":n`), or the welcome itself
//!   when nothing was missed. TCP connect, upgrade, token check,
//!   subscription, history read and replay are in it; the pause is not.
//! - **downtime**: from the close the client saw on A to the same moment:
//!   the pause and the resume latency together.
//! - **all resumed**: from the SIGTERM to the last client caught up.
//! - **lost / duplicated / out of order**: a confirmed `k` a client never
//!   got; a `k` it got twice; a `k` that came after a greater one. All
//!   must be 0, and every resume must say `"resumed":true`.
//! - **CPU**: Redis's (`/proc/PID/stat` of redis-server: user + system,
//!   every thread) and B's, from the SIGTERM to all resumed, beside
//!   Redis's rate in the steady state before it (the publishers' own
//!   cost).
//!
//! It exits non-zero when a message was lost, duplicated or reordered, a
//! resume failed, or a client had not resumed within `--timeout-secs`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{self, free_port, lock};
use crate::net::{self, Sources, Ws};
use crate::scenarios::{RELIABLE_PROTOCOL, redis_client, redis_conn, token_for};
use crate::soak::Rng;
use crate::stats::{self, Report, histogram, now_us};

/// Backend tasks publishing (each owns every PUBLISHERS-th session, so a
/// session's messages go out in order).
const PUBLISHERS: usize = 4;
/// How often a publisher sends what has fallen due (one pipeline).
const PUBLISH_TICK: Duration = Duration::from_millis(5);
/// TCP connect plus upgrade, and the welcome after it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A failed reconnect is tried again after this, doubled up to the cap.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Longest wait at the end for what was confirmed to arrive.
const SETTLE: Duration = Duration::from_secs(15);
/// Agent id in every client's URL.
const AGENT: &str = "storm";

/// `wsproxy-bench storm`'s flags. `--wsproxy` and `--redis` are not used:
/// it starts its own.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    /// The wsproxy binary, started twice (A and B).
    #[arg(long, default_value = "target/release/wsproxy")]
    pub wsproxy_bin: PathBuf,
    /// The redis-server binary (found in PATH by default).
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// Reliable clients, one session each.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Messages published per second, over all sessions, before, during
    /// and after the storm.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Each client waits a random 0..JITTER_MS after its close before it
    /// reconnects (a real client's backoff); 0: all at once.
    #[arg(long, default_value_t = 1000)]
    pub jitter_ms: u64,
    /// Seconds of steady load before the SIGTERM (once every client has a
    /// message).
    #[arg(long, default_value_t = 5)]
    pub before_secs: u64,
    /// Seconds of publishing after every client resumed.
    #[arg(long, default_value_t = 3)]
    pub after_secs: u64,
    /// Longest wait, from the SIGTERM, for every client to resume.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Handshakes in flight at once while the clients first connect to A
    /// (the reconnects to B are not limited: each client goes on its own).
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Seed of the pauses and ports (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the temporary directory (the logs) and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// What a storm found, for `--json` and the exit code.
pub struct Outcome {
    pub report: Report,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
}

// --- the processes -----------------------------------------------------------

/// redis-server, wsproxy A and B, and the temporary directory; dropping it
/// SIGKILLs what still runs and removes the directory.
struct Procs {
    dir: PathBuf,
    keep: bool,
    redis: Option<Child>,
    a: Option<Child>,
    b: Option<Child>,
    redis_port: u16,
    a_port: u16,
    b_port: u16,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for child in [&mut self.a, &mut self.b, &mut self.redis] {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if self.keep {
            eprintln!("storm: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Procs {
    fn start(args: &StormArgs, rng: &mut Rng) -> anyhow::Result<Self> {
        let wsproxy_bin = std::fs::canonicalize(&args.wsproxy_bin).with_context(|| {
            format!(
                "--wsproxy-bin {}: not found (build it: cargo build --release --bin wsproxy)",
                args.wsproxy_bin.display()
            )
        })?;
        let dir = harness::temp_dir("storm")?;
        let mut procs = Self {
            dir,
            keep: args.keep,
            redis: None,
            a: None,
            b: None,
            redis_port: 0,
            a_port: 0,
            b_port: 0,
        };
        procs.redis_port = free_port(rng, &[])?;
        procs.a_port = free_port(rng, &[procs.redis_port])?;
        procs.b_port = free_port(rng, &[procs.redis_port, procs.a_port])?;
        procs.redis = Some(
            harness::redis_server(&args.redis_bin, procs.redis_port, &procs.dir)
                .args(["--save", "", "--appendonly", "no"])
                .spawn()
                .with_context(|| format!("starting {}", args.redis_bin.display()))?,
        );
        procs.a = Some(procs.wsproxy(&wsproxy_bin, procs.a_port, "a")?);
        procs.b = Some(procs.wsproxy(&wsproxy_bin, procs.b_port, "b")?);
        Ok(procs)
    }

    /// One wsproxy with a clean environment in the temporary directory (no
    /// stray `.env`), its output in `wsproxy-<name>.log` there.
    fn wsproxy(&self, bin: &std::path::Path, port: u16, name: &str) -> anyhow::Result<Child> {
        let log_path = self.dir.join(format!("wsproxy-{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        Command::new(bin)
            .env_clear()
            .current_dir(&self.dir)
            .env("RELIABLE_SESSIONS", "true")
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("REDIS_URL", self.redis_url())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn pid(child: &Option<Child>) -> u32 {
        child.as_ref().map_or(0, Child::id)
    }

    /// Fails if a child exited on its own (A may, after its SIGTERM).
    fn check_alive(&mut self, a_too: bool) -> anyhow::Result<()> {
        let mut children = vec![
            ("wsproxy B", &mut self.b),
            ("redis-server", &mut self.redis),
        ];
        if a_too {
            children.push(("wsproxy A", &mut self.a));
        }
        for (name, child) in children {
            if let Some(c) = child
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "{name} exited on its own ({status}); logs in {}",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }
}

async fn wait_ready(procs: &mut Procs, port: u16) -> anyhow::Result<()> {
    harness::wait_ready(port, &format!("wsproxy on {port}"), || {
        procs.check_alive(true)
    })
    .await?;
    Ok(())
}

// --- shared state ------------------------------------------------------------

/// One client's book, checked as messages arrive.
#[derive(Debug, Default)]
struct Book {
    /// `seen[k]` for each seq k received (index 0 unused).
    seen: Vec<bool>,
    max_seen: u64,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    /// Received a message on A (the storm waits for every client to).
    has_message: bool,
    /// The close code A sent (0: the stream ended without one).
    close_code: Option<u16>,
    /// now_us() of the close on A, of the reconnect's start (after the
    /// pause), of the resumed welcome and of the moment caught up.
    t_close: Option<u64>,
    t_reconnect: Option<u64>,
    t_welcome: Option<u64>,
    t_caught_up: Option<u64>,
    replayed: u64,
    /// Failed reconnect attempts before the one that worked.
    retries: u64,
    /// A welcome with `"resumed":false`: its reason.
    resume_failed: Option<String>,
    /// Connections after the resumed one (a drop on B: should be none).
    later_connections: u64,
}

impl Book {
    /// Books seq `seq`; false if it came before.
    fn down(&mut self, seq: u64) -> bool {
        let k = seq as usize;
        if self.seen.len() <= k {
            self.seen.resize(k + 1, false);
        }
        if self.seen[k] {
            self.duplicated += 1;
            return false;
        }
        self.seen[k] = true;
        self.received += 1;
        if seq < self.max_seen {
            self.out_of_order += 1;
        }
        self.max_seen = self.max_seen.max(seq);
        self.has_message = true;
        true
    }

    fn missing(&self, confirmed: u64) -> u64 {
        (1..=confirmed as usize)
            .filter(|&k| !self.seen.get(k).copied().unwrap_or(false))
            .count() as u64
    }
}

struct Shared {
    a_base: String,
    b_base: String,
    sources: Arc<Sources>,
    ids: Vec<String>,
    /// Per session: every seq from 1 to this was answered by Redis.
    confirmed: Vec<AtomicU64>,
    books: Vec<Mutex<Book>>,
    /// Clients with their first welcome from A.
    welcomed: AtomicUsize,
    /// Clients with at least one message.
    with_message: AtomicUsize,
    /// Clients caught up on B.
    resumed: AtomicUsize,
    /// Messages received in all.
    received: AtomicU64,
    publish_errors: AtomicU64,
    publishing: AtomicBool,
    /// True: every client closes and returns.
    stop: watch::Receiver<bool>,
    jitter_ms: u64,
    seed: u64,
    first_connects: Semaphore,
    /// The first few errors, printed.
    notes: AtomicU64,
}

impl Shared {
    fn note(&self, what: impl std::fmt::Display) {
        if self.notes.fetch_add(1, Ordering::Relaxed) < 10 {
            eprintln!("storm: {what}");
        }
    }
}

// --- clients -----------------------------------------------------------------

/// Opens a reliable connection and reads its welcome.
async fn open(sh: &Shared, url: &str, token: &str) -> anyhow::Result<(Ws, serde_json::Value)> {
    let go = async {
        let mut ws =
            net::connect_with(&sh.sources, url, Some(token), Some(RELIABLE_PROTOCOL)).await?;
        let first = ws.next().await;
        let Some(Ok(Message::Text(t))) = first else {
            bail!("expected a welcome, got {first:?}");
        };
        let w: serde_json::Value = serde_json::from_str(t.as_str())?;
        if w["type"] != "welcome" {
            bail!("expected a welcome, got {t}");
        }
        anyhow::Ok((ws, w))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, go)
        .await
        .context("connect timed out")?
}

/// What ended a connection.
enum End {
    /// The close code (0: a close frame without one; None: no close
    /// frame) and when it came.
    Closed(Option<u16>, u64),
    Stop,
}

/// Resolves once the run tells the clients to stop.
async fn stopped(rx: &watch::Receiver<bool>) {
    let mut rx = rx.clone();
    let _ = rx.wait_for(|s| *s).await;
}

/// Reads messages until the connection ends or the run stops. `replay`:
/// messages still to come from the resume's replay; when it reaches 0 the
/// client is caught up.
async fn read(sh: &Shared, i: usize, ws: &mut Ws, pos: &mut String, mut replay: u64) -> End {
    loop {
        let frame = tokio::select! {
            () = stopped(&sh.stop) => return End::Stop,
            f = ws.next() => f,
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                let (Some(seq), Some(offset)) = (v["data"]["seq"].as_u64(), v["offset"].as_str())
                else {
                    sh.note(format_args!("client {i}: unexpected frame {t}"));
                    continue;
                };
                offset.clone_into(pos);
                let mut book = lock(&sh.books[i]);
                let first = !book.has_message;
                if book.down(seq) {
                    sh.received.fetch_add(1, Ordering::Relaxed);
                }
                if first {
                    sh.with_message.fetch_add(1, Ordering::Relaxed);
                }
                if replay > 0 {
                    replay -= 1;
                    if replay == 0 {
                        book.t_caught_up = Some(now_us());
                        sh.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Some(Ok(Message::Close(c))) => {
                let at = now_us();
                // tungstenite answers the close; read on until the end.
                let code = c.as_ref().map(|f| u16::from(f.code));
                while let Some(Ok(_)) = ws.next().await {}
                return End::Closed(Some(code.unwrap_or(0)), at);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return End::Closed(None, now_us()),
        }
    }
}

/// One client: A, then (after A closes it) B, resumed.
async fn client(sh: Arc<Shared>, i: usize) {
    let id = &sh.ids[i];
    let token = token_for(id);
    let mut rng = harness::client_rng(sh.seed, i);
    // A.
    let url = format!("{}/{AGENT}/ws/{id}", sh.a_base);
    let opened = {
        let _permit = sh.first_connects.acquire().await;
        open(&sh, &url, &token).await
    };
    let (mut ws, w) = match opened {
        Ok(x) => x,
        Err(e) => {
            sh.note(format_args!("client {i}: connect to A failed: {e:#}"));
            return;
        }
    };
    let (Some(epoch), Some(offset)) = (w["epoch"].as_str(), w["offset"].as_str()) else {
        sh.note(format_args!(
            "client {i}: a welcome without epoch or offset: {w}"
        ));
        return;
    };
    let epoch = epoch.to_owned();
    let mut pos = offset.to_owned();
    sh.welcomed.fetch_add(1, Ordering::Relaxed);
    let (code, at) = match read(&sh, i, &mut ws, &mut pos, 0).await {
        End::Stop => {
            let _ = ws.close(None).await;
            return;
        }
        End::Closed(code, at) => (code, at),
    };
    drop(ws);
    {
        let mut book = lock(&sh.books[i]);
        book.t_close = Some(at);
        book.close_code = code;
    }
    // The pause, then B, until a connection there is resumed.
    if sh.jitter_ms > 0 {
        let pause = rng.below(sh.jitter_ms as usize * 1000 + 1) as u64;
        tokio::select! {
            () = sleep(Duration::from_micros(pause)) => {}
            () = stopped(&sh.stop) => return,
        }
    }
    lock(&sh.books[i]).t_reconnect = Some(now_us());
    let mut retry = RETRY_MIN;
    let mut first_resume = true;
    loop {
        if *sh.stop.borrow() {
            return;
        }
        let url = format!("{}/{AGENT}/ws/{id}?epoch={epoch}&offset={pos}", sh.b_base);
        let (mut ws, w) = match open(&sh, &url, &token).await {
            Ok(x) => x,
            Err(e) => {
                let retries = {
                    let mut book = lock(&sh.books[i]);
                    book.retries += 1;
                    book.retries
                };
                if retries == 1 {
                    sh.note(format_args!("client {i}: reconnect to B failed: {e:#}"));
                }
                tokio::select! {
                    () = sleep(retry) => {}
                    () = stopped(&sh.stop) => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        let now = now_us();
        let replay = w["replayed"].as_u64().unwrap_or(0);
        {
            let mut book = lock(&sh.books[i]);
            if !first_resume {
                book.later_connections += 1;
            }
            if w["resumed"] != true {
                let why = w["reason"].as_str().unwrap_or("?").to_owned();
                sh.note(format_args!("client {i}: resume failed: {w}"));
                book.resume_failed.get_or_insert(why);
                if let Some(o) = w["offset"].as_str() {
                    // As the protocol says: go on from the welcome's offset.
                    o.clone_into(&mut pos);
                }
            }
            if first_resume {
                book.t_welcome = Some(now);
                book.replayed = replay;
                if replay == 0 {
                    book.t_caught_up = Some(now);
                    sh.resumed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let replay = if first_resume { replay } else { 0 };
        first_resume = false;
        match read(&sh, i, &mut ws, &mut pos, replay).await {
            End::Stop => {
                let _ = ws.close(None).await;
                return;
            }
            End::Closed(..) => {
                sh.note(format_args!("client {i}: connection to B ended"));
            }
        }
    }
}

// --- the backend -------------------------------------------------------------

/// Publishes `{"seq":k}` to its share of the sessions in turn, at
/// `rate / PUBLISHERS` a second, until told to stop.
async fn publisher(sh: Arc<Shared>, redis: String, t: usize, rate: f64) {
    let mine: Vec<usize> = (0..sh.ids.len()).filter(|j| j % PUBLISHERS == t).collect();
    if mine.is_empty() || rate <= 0.0 {
        return;
    }
    // A long response timeout: during the storm this process is as busy as
    // the servers (same two cores), and a publish that timed out here
    // would be in doubt.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let connected = async {
        anyhow::Ok(
            redis_client(&redis)?
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        )
    };
    let mut conn = match connected.await {
        Ok(c) => c,
        Err(e) => {
            sh.note(format_args!("publisher {t}: {e:#}"));
            sh.publish_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let keys: Vec<String> = mine
        .iter()
        .map(|&j| format!("session:{}:history", sh.ids[j]))
        .collect();
    let per_sec = rate / PUBLISHERS as f64;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut cursor = 0;
    let mut tick = tokio::time::interval(PUBLISH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while sh.publishing.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
        if due <= sent {
            continue;
        }
        let mut pipe = redis::pipe();
        let mut batch = Vec::new();
        for _ in sent..due {
            let j = mine[cursor];
            let k = sh.confirmed[j].load(Ordering::Relaxed)
                + 1
                + batch.iter().filter(|&&b| b == j).count() as u64;
            pipe.cmd("FCALL")
                .arg("wsproxy_publish")
                .arg(1)
                .arg(&keys[cursor])
                .arg(format!(r#"{{"seq":{k}}}"#));
            batch.push(j);
            cursor = (cursor + 1) % mine.len();
        }
        match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
            Ok(_) => {
                for j in batch {
                    sh.confirmed[j].fetch_add(1, Ordering::Relaxed);
                }
                sent = due;
            }
            Err(e) => {
                // Redis is never restarted here: an error is a finding.
                sh.publish_errors.fetch_add(1, Ordering::Relaxed);
                sh.note(format_args!("publisher {t}: {e}"));
                return;
            }
        }
    }
}

// --- the run -----------------------------------------------------------------

/// Redis's and B's CPU so far, in µs.
fn cpu(procs: &Procs) -> (u64, u64) {
    let of = |c: &Option<Child>| net::cpu_us(&[Procs::pid(c)]).unwrap_or(0);
    (of(&procs.redis), of(&procs.b))
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    procs: &mut Procs,
    a_too: bool,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        procs.check_alive(a_too)?;
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[derive(Debug, Default, Serialize)]
struct Figures {
    clients: usize,
    rate: f64,
    jitter_ms: u64,
    seed: u64,
    /// SIGTERM to the last client caught up on B, seconds.
    all_resumed_s: f64,
    resumed: usize,
    resume_failed: u64,
    /// Reconnect start to caught up, µs.
    resume_p50_us: u64,
    resume_p99_us: u64,
    resume_max_us: u64,
    /// Reconnect start to the resumed welcome, µs.
    welcome_p99_us: u64,
    /// Close on A to caught up (pause included), µs.
    downtime_p50_us: u64,
    downtime_p99_us: u64,
    downtime_max_us: u64,
    /// SIGTERM to the close each client saw, µs.
    close_p50_us: u64,
    close_max_us: u64,
    close_codes: std::collections::BTreeMap<String, u64>,
    replayed: u64,
    retries: u64,
    clients_with_retries: u64,
    later_connections: u64,
    confirmed: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    publish_errors: u64,
    /// Redis CPU from the SIGTERM to all resumed, ms; and its rate in the
    /// steady state before (ms of CPU per s).
    redis_cpu_storm_ms: f64,
    redis_cpu_steady_ms_per_s: f64,
    /// wsproxy B's CPU from the SIGTERM to all resumed, ms.
    b_cpu_storm_ms: f64,
    /// A's exit status and how long after the SIGTERM it exited, s.
    a_exit: String,
    a_exit_s: f64,
    /// The three commands that took Redis the most time from the SIGTERM
    /// to all resumed (`INFO commandstats`): `name:calls:ms`.
    redis_top: String,
    /// The kernel's TcpExt ListenOverflows from the SIGTERM to all resumed
    /// (machine-wide): connects dropped because B's accept queue was full.
    listen_overflows: u64,
}

/// `cmd:calls:ms` of the three commands with the most time in `INFO
/// commandstats`.
fn top_commands(info: &str) -> String {
    let mut rows: Vec<(String, u64, u64)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            Some((name.to_owned(), field("calls")?, field("usec")?))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.2));
    rows.iter()
        .take(3)
        .map(|(n, calls, usec)| format!("{n}:{calls}:{}ms", usec / 1000))
        .collect::<Vec<_>>()
        .join(",")
}

/// TcpExt ListenOverflows from /proc/net/netstat (0 if unreadable).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn quantiles(h: &Histogram<u64>) -> (u64, u64, u64) {
    if h.is_empty() {
        return (0, 0, 0);
    }
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
}

pub async fn storm(args: StormArgs, sources: Arc<Sources>) -> anyhow::Result<Outcome> {
    let seed = args.seed.unwrap_or_else(harness::clock_seed) | 1;
    net::check_fd_budget(args.clients + 32)?;
    let mut rng = Rng(seed);
    let mut procs = Procs::start(&args, &mut rng)?;
    let (sh, stop) = setup(&args, &mut procs, sources, seed).await?;
    let warm = warm_up(&args, &mut procs, &sh).await?;
    let mut deploy = deploy(&args, &mut procs, &sh, warm.redis0, warm.steady_start).await?;
    let confirmed = wind_down(&args, &mut procs, &sh, warm, stop, &mut deploy).await?;
    let (f, resume) = measure(&args, seed, &sh, &deploy, confirmed)?;
    let failures = failures(&f, args.clients, args.timeout_secs);
    print_line(&f);
    let report = report(&args, &f, &resume, confirmed)?;
    drop(procs);
    Ok(Outcome { report, failures })
}

/// Prints the processes, waits for A and B, stores every session's token
/// and makes the state the clients and publishers share.
async fn setup(
    args: &StormArgs,
    procs: &mut Procs,
    sources: Arc<Sources>,
    seed: u64,
) -> anyhow::Result<(Arc<Shared>, watch::Sender<bool>)> {
    eprintln!(
        "storm: seed {seed}; redis :{} A :{} (pid {}) B :{} (pid {}); {} clients, {}/s, jitter {} ms",
        procs.redis_port,
        procs.a_port,
        Procs::pid(&procs.a),
        procs.b_port,
        Procs::pid(&procs.b),
        args.clients,
        args.rate,
        args.jitter_ms
    );
    let (a_port, b_port) = (procs.a_port, procs.b_port);
    wait_ready(procs, a_port).await?;
    wait_ready(procs, b_port).await?;

    let redis = procs.redis_url();
    let run = std::process::id() as u64 * 1_000_000 + (now_us() % 1_000_000);
    let ids: Vec<String> = (0..args.clients).map(|i| format!("st{run}-{i}")).collect();
    {
        let mut c = redis_conn(&redis).await?;
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("SETEX")
                    .arg(format!("session:{id}:auth"))
                    .arg(3600)
                    .arg(token_for(id))
                    .ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
    }
    let (stop, stop_rx) = watch::channel(false);
    let sh = Arc::new(Shared {
        a_base: format!("ws://127.0.0.1:{a_port}"),
        b_base: format!("ws://127.0.0.1:{b_port}"),
        sources,
        confirmed: (0..args.clients).map(|_| AtomicU64::new(0)).collect(),
        books: (0..args.clients).map(|_| Mutex::default()).collect(),
        ids,
        welcomed: AtomicUsize::new(0),
        with_message: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        publish_errors: AtomicU64::new(0),
        publishing: AtomicBool::new(true),
        stop: stop_rx,
        jitter_ms: args.jitter_ms,
        seed,
        first_connects: Semaphore::new(args.connect_concurrency.max(1)),
        notes: AtomicU64::new(0),
    });
    Ok((sh, stop))
}

/// The clients and publishers at work, and where the steady state began.
struct Warm {
    clients: Vec<tokio::task::JoinHandle<()>>,
    publishers: Vec<tokio::task::JoinHandle<()>>,
    /// Redis's CPU at the start of the steady state, µs.
    redis0: u64,
    steady_start: Instant,
}

/// Connects every client to A, starts publishing, waits until each client
/// has a message, then `--before-secs` of steady state.
async fn warm_up(args: &StormArgs, procs: &mut Procs, sh: &Arc<Shared>) -> anyhow::Result<Warm> {
    let n = args.clients;
    let started = Instant::now();
    let clients: Vec<_> = (0..n)
        .map(|i| tokio::spawn(client(sh.clone(), i)))
        .collect();
    wait_for(
        "every client's welcome from A",
        Duration::from_secs(120),
        procs,
        true,
        || sh.welcomed.load(Ordering::Relaxed) == n,
    )
    .await?;
    eprintln!(
        "storm: {n} clients on A in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let redis = procs.redis_url();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|t| tokio::spawn(publisher(sh.clone(), redis.clone(), t, args.rate)))
        .collect();
    // A round of the sessions takes n / rate seconds.
    let warm = Duration::from_secs_f64(n as f64 / args.rate.max(1.0) * 3.0 + 30.0);
    wait_for("a message on every client", warm, procs, true, || {
        sh.with_message.load(Ordering::Relaxed) == n
    })
    .await?;
    let (redis0, _) = cpu(procs);
    let steady_start = Instant::now();
    sleep(Duration::from_secs(args.before_secs)).await;
    procs.check_alive(true)?;
    Ok(Warm {
        clients,
        publishers,
        redis0,
        steady_start,
    })
}

/// What the deploy measured, from the SIGTERM to all resumed.
struct Deploy {
    /// now_us() and the instant of the SIGTERM.
    t_term: u64,
    term: Instant,
    all_resumed: Duration,
    resumed_in_time: usize,
    /// A's exit status and when, in s after the SIGTERM (0: not yet).
    a_exit: (String, f64),
    /// Redis's CPU at the start of the steady state, at the SIGTERM and at
    /// all resumed; B's at the last two (µs).
    redis_cpu: (u64, u64, u64),
    b_cpu: (u64, u64),
    steady_secs: f64,
    listen_overflows: u64,
    /// `INFO commandstats` at all resumed (reset at the SIGTERM).
    info: String,
}

/// SIGTERMs A and waits (at most `--timeout-secs`) for every client to
/// resume on B, measuring Redis and B meanwhile.
async fn deploy(
    args: &StormArgs,
    procs: &mut Procs,
    sh: &Shared,
    redis0: u64,
    steady_start: Instant,
) -> anyhow::Result<Deploy> {
    let n = args.clients;
    let mut stats_conn = redis_conn(&procs.redis_url()).await?;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut stats_conn)
        .await?;
    let overflows0 = listen_overflows();
    let (redis1, b1) = cpu(procs);
    let steady_secs = steady_start.elapsed().as_secs_f64();
    let t_term = now_us();
    let term = Instant::now();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(Procs::pid(&procs.a).to_string())
        .status()
        .context("running kill -TERM")?;
    if !status.success() {
        bail!("kill -TERM {} failed", Procs::pid(&procs.a));
    }
    let mut a_exit = (String::from("still running"), 0.0);
    let timeout = Duration::from_secs(args.timeout_secs);
    while sh.resumed.load(Ordering::Relaxed) < n && term.elapsed() < timeout {
        procs.check_alive(false)?;
        if let Some(a) = procs.a.as_mut()
            && a_exit.1 == 0.0
            && let Some(st) = a.try_wait()?
        {
            a_exit = (st.to_string(), term.elapsed().as_secs_f64());
        }
        sleep(Duration::from_millis(2)).await;
    }
    let all_resumed = term.elapsed();
    let (redis2, b2) = cpu(procs);
    let overflows = listen_overflows().saturating_sub(overflows0);
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut stats_conn)
        .await?;
    let resumed_in_time = sh.resumed.load(Ordering::Relaxed);
    eprintln!(
        "storm: {resumed_in_time} of {n} resumed {:.2} s after the SIGTERM",
        all_resumed.as_secs_f64()
    );
    Ok(Deploy {
        t_term,
        term,
        all_resumed,
        resumed_in_time,
        a_exit,
        redis_cpu: (redis0, redis1, redis2),
        b_cpu: (b1, b2),
        steady_secs,
        listen_overflows: overflows,
        info,
    })
}

/// `--after-secs` more publishing, then stops it, waits (at most
/// [`SETTLE`]) for what was confirmed to arrive and for A to exit, and
/// stops the clients. Returns the messages confirmed.
async fn wind_down(
    args: &StormArgs,
    procs: &mut Procs,
    sh: &Shared,
    warm: Warm,
    stop: watch::Sender<bool>,
    deploy: &mut Deploy,
) -> anyhow::Result<u64> {
    sleep(Duration::from_secs(args.after_secs)).await;
    sh.publishing.store(false, Ordering::Relaxed);
    for p in warm.publishers {
        let _ = p.await;
    }
    let confirmed: u64 = sh.confirmed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let settle = Instant::now();
    while sh.received.load(Ordering::Relaxed) < confirmed && settle.elapsed() < SETTLE {
        sleep(Duration::from_millis(20)).await;
    }
    if let Some(a) = procs.a.as_mut()
        && deploy.a_exit.1 == 0.0
    {
        let deadline = Instant::now() + Duration::from_secs(35);
        while Instant::now() < deadline {
            if let Some(st) = a.try_wait()? {
                deploy.a_exit = (st.to_string(), deploy.term.elapsed().as_secs_f64());
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = stop.send(true);
    let closing = tokio::time::Instant::now() + Duration::from_secs(10);
    for c in warm.clients {
        let abort = c.abort_handle();
        if tokio::time::timeout_at(closing, c).await.is_err() {
            abort.abort();
        }
    }
    Ok(confirmed)
}

/// The figures, from the deploy's measurements and every client's book;
/// and the histogram of resume latencies.
fn measure(
    args: &StormArgs,
    seed: u64,
    sh: &Shared,
    d: &Deploy,
    confirmed: u64,
) -> anyhow::Result<(Figures, Histogram<u64>)> {
    let (redis0, redis1, redis2) = d.redis_cpu;
    let (b1, b2) = d.b_cpu;
    let mut f = Figures {
        clients: args.clients,
        rate: args.rate,
        jitter_ms: args.jitter_ms,
        seed,
        all_resumed_s: d.all_resumed.as_secs_f64(),
        resumed: d.resumed_in_time,
        confirmed,
        publish_errors: sh.publish_errors.load(Ordering::Relaxed),
        redis_cpu_storm_ms: (redis2.saturating_sub(redis1)) as f64 / 1000.0,
        redis_cpu_steady_ms_per_s: (redis1.saturating_sub(redis0)) as f64
            / 1000.0
            / d.steady_secs.max(1e-9),
        b_cpu_storm_ms: (b2.saturating_sub(b1)) as f64 / 1000.0,
        a_exit: d.a_exit.0.clone(),
        a_exit_s: d.a_exit.1,
        redis_top: top_commands(&d.info),
        listen_overflows: d.listen_overflows,
        ..Figures::default()
    };
    let (mut resume, mut welcome, mut downtime, mut close) =
        (histogram(), histogram(), histogram(), histogram());
    for (j, b) in sh.books.iter().enumerate() {
        let b = lock(b);
        let c = sh.confirmed[j].load(Ordering::Relaxed);
        f.lost += b.missing(c);
        f.duplicated += b.duplicated;
        f.out_of_order += b.out_of_order;
        f.replayed += b.replayed;
        f.retries += b.retries;
        f.clients_with_retries += u64::from(b.retries > 0);
        f.later_connections += b.later_connections;
        f.resume_failed += u64::from(b.resume_failed.is_some());
        let code = b
            .close_code
            .map_or_else(|| "none".to_owned(), |c| c.to_string());
        *f.close_codes.entry(code).or_insert(0) += 1;
        let span = |from: Option<u64>, to: Option<u64>| match (from, to) {
            (Some(a), Some(z)) => Some(z.saturating_sub(a).max(1)),
            _ => None,
        };
        if let Some(v) = span(b.t_reconnect, b.t_caught_up) {
            let _ = resume.record(v);
        }
        if let Some(v) = span(b.t_reconnect, b.t_welcome) {
            let _ = welcome.record(v);
        }
        if let Some(v) = span(b.t_close, b.t_caught_up) {
            let _ = downtime.record(v);
        }
        if let Some(v) = span(Some(d.t_term), b.t_close) {
            let _ = close.record(v);
        }
    }
    (f.resume_p50_us, f.resume_p99_us, f.resume_max_us) = quantiles(&resume);
    f.welcome_p99_us = quantiles(&welcome).1;
    (f.downtime_p50_us, f.downtime_p99_us, f.downtime_max_us) = quantiles(&downtime);
    let (close_p50, _, close_max) = quantiles(&close);
    (f.close_p50_us, f.close_max_us) = (close_p50, close_max);
    Ok((f, resume))
}

/// Why the storm failed; empty when it passed.
fn failures(f: &Figures, n: usize, timeout_secs: u64) -> Vec<String> {
    let mut failures = Vec::new();
    if f.resumed < n {
        failures.push(format!(
            "{} of {n} clients not resumed {} s after the SIGTERM",
            n - f.resumed,
            timeout_secs
        ));
    }
    for (what, v) in [
        ("lost", f.lost),
        ("duplicated", f.duplicated),
        ("out of order", f.out_of_order),
        ("resumes failed", f.resume_failed),
        ("publish errors", f.publish_errors),
    ] {
        if v > 0 {
            failures.push(format!("{v} {what}"));
        }
    }
    failures
}

/// The storm's one line on stdout.
fn print_line(f: &Figures) {
    println!(
        "storm wsproxy n={} rate={}/s jitter={}ms all_resumed={:.2}s resume p50={} p99={} max={} \
         (welcome p99={}) downtime p50={} p99={} lost={} dup={} ooo={} failed={} retries={} \
         replayed={} redis_cpu={:.0}ms (steady {:.0}ms/s) B_cpu={:.0}ms redis_top={} \
         listen_overflows={} close={:?} A_exit={} at {:.2}s",
        f.clients,
        f.rate,
        f.jitter_ms,
        f.all_resumed_s,
        stats::us(f.resume_p50_us),
        stats::us(f.resume_p99_us),
        stats::us(f.resume_max_us),
        stats::us(f.welcome_p99_us),
        stats::us(f.downtime_p50_us),
        stats::us(f.downtime_p99_us),
        f.lost,
        f.duplicated,
        f.out_of_order,
        f.resume_failed,
        f.retries,
        f.replayed,
        f.redis_cpu_storm_ms,
        f.redis_cpu_steady_ms_per_s,
        f.b_cpu_storm_ms,
        f.redis_top,
        f.listen_overflows,
        f.close_codes,
        f.a_exit,
        f.a_exit_s,
    );
}

/// The report for `--json`.
fn report(
    args: &StormArgs,
    f: &Figures,
    resume: &Histogram<u64>,
    confirmed: u64,
) -> anyhow::Result<Report> {
    let n = args.clients;
    Ok(Report {
        scenario: "storm".into(),
        target: "wsproxy-reliable".into(),
        connections: n,
        sent: confirmed,
        delivered: confirmed.saturating_sub(f.lost),
        errors: f.resume_failed + (n - f.resumed) as u64,
        seconds: f.all_resumed_s,
        rate: 0.0,
        offered: args.rate,
        p50_us: f.resume_p50_us,
        p99_us: f.resume_p99_us,
        p999_us: resume.value_at_quantile(0.999),
        max_us: f.resume_max_us,
        note: format!(
            "{n} clients move from A (SIGTERM) to B, jitter {} ms; latency: reconnect to caught up",
            args.jitter_ms
        ),
        detail: Some(serde_json::to_value(f)?),
        ..Report::default()
    })
}
