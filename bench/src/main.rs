//! wsproxy-bench: load generator for wsproxy and the systems users would
//! pick instead (nchan, nginx, HAProxy), measured side by side.
//!
//! Run with e.g.
//! `cargo run --release -p wsproxy-bench -- down --n 1000 --m 100000`
//! or `... -- compare down --peer nchan --n 1000 --m 100000 --rate 20000`,
//! or `... -- soak --duration 60m --pids $(pgrep -x wsproxy)` (an hour of
//! mixed load, sampled every minute for growth), or `... -- chaos` (reliable
//! sessions while connections, wsproxy and Redis are killed; it starts its
//! own wsproxy and Redis).
//! On a Redis Cluster: `... -- --redis-cluster redis://127.0.0.1:7000,...
//! down --n 1000` (SPUBLISH, or PUBLISH with `--cluster-pubsub classic`);
//! `bench/cluster.sh` compares that with one Redis.
//! `bench/run.sh` starts everything and regenerates BENCHMARKS.md.

mod chaos;
mod chaos_cluster;
mod cluster;
mod harness;
mod net;
mod scenarios;
mod soak;
mod sse;
mod stats;
mod storm;

use std::io::Write as _;
use std::sync::Arc;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use scenarios::Target;
use stats::Report;

#[derive(Debug, Parser)]
#[command(
    name = "wsproxy-bench",
    about = "Benchmark wsproxy beside nchan, nginx and HAProxy"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// wsproxy's WebSocket base URL.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080")]
    wsproxy: String,
    /// The Redis wsproxy uses (tokens are stored and messages published there).
    #[arg(long, global = true, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// A Redis Cluster instead (wsproxy's REDIS_CLUSTER_NODES): seed URLs,
    /// comma-separated. Tokens go to `session:{<id>}:auth`, messages to
    /// `session:{<id>}:down`, one pipeline per master. For the wsproxy
    /// target of connect, idle, down, fanout and compare; --redis is then
    /// ignored.
    #[arg(long, global = true, value_delimiter = ',')]
    redis_cluster: Vec<String>,
    /// How messages are published on the cluster: SPUBLISH (sharded, as
    /// wsproxy's REDIS_CLUSTER_PUBSUB=sharded) or PUBLISH (classic).
    #[arg(long, global = true, value_enum, default_value = "sharded")]
    cluster_pubsub: cluster::PubSub,
    /// nchan's HTTP base URL (publish: POST /pub/{id}; subscribe: WS /sub/{id}).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8091")]
    nchan: String,
    /// Client connections are spread over 127.0.0.1..127.0.0.K as source
    /// addresses, so more than ~28k connections to one port are possible.
    #[arg(long, global = true, default_value_t = 4)]
    sources: usize,
    /// Handshakes in flight at once.
    #[arg(long, global = true, default_value_t = 200)]
    concurrency: usize,
    /// Reliable target: messages a call. 1 publishes each with `FCALL
    /// wsproxy_publish`; K > 1 sends K consecutive messages of one session
    /// in one `FCALL wsproxy_publish_batch` (a reply streamed token by
    /// token, as the Python library's `reliable_stream` sends it); message
    /// i then goes to session (i / K) mod N.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    per_call: u16,
    /// Hub target: the wsproxy has JWT_SECRET set, so its anonymous
    /// clients' topics are on channels of their own
    /// (`pubsub:anon:{session}:{topic}`), where the benchmark publishes.
    #[arg(long, global = true)]
    hub_anonymous_apart: bool,
    /// Append each report as a JSON line to this file.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// Exit non-zero if any message was lost or any connect failed.
    #[arg(long, global = true)]
    strict: bool,
    /// Report the target under this name: for a peer that speaks the
    /// session bridge's protocol at --wsproxy (e.g. `--label fastapi` for
    /// bench/peers/fastapi).
    #[arg(long, global = true)]
    label: Option<String>,
}

#[derive(Debug, Args, Clone)]
struct Load {
    /// Connections (sessions / subscribers / clients).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Messages in total (down, fanout) or per client (up, echo).
    #[arg(long, default_value_t = 100_000)]
    m: u64,
    /// Offered rate in messages per second; 0 sends flat out.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    /// The session bridge.
    Wsproxy,
    /// nchan.
    Nchan,
    /// wsproxy's topic pub/sub hub (/ws; needs PUBSUB_ALLOW_ANONYMOUS=true).
    Hub,
    /// The session bridge in reliable mode (wsproxy.v1; needs
    /// RELIABLE_SESSIONS=true).
    Reliable,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N clients connect (wsproxy: authenticated); connects per second.
    Connect {
        #[arg(long, value_enum, default_value = "wsproxy")]
        target: Which,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Connect to this WebSocket URL instead (e.g. a proxy route).
        #[arg(long)]
        url: Option<String>,
        /// Name to report a --url target under.
        #[arg(long, default_value = "url")]
        name: String,
    },
    /// Hold N connections; RSS growth per connection of --pids.
    Idle {
        #[arg(long, value_enum, default_value = "wsproxy")]
        target: Which,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Hold connections to this WebSocket URL instead (e.g. a proxy route).
        #[arg(long)]
        url: Option<String>,
        /// Name to report a --url target under.
        #[arg(long, default_value = "url")]
        name: String,
        /// Process ids whose RSS is summed (all worker processes).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
    },
    /// N sessions, M messages published round robin through the target.
    Down {
        #[arg(long, value_enum, default_value = "wsproxy")]
        target: Which,
        #[command(flatten)]
        load: Load,
        /// Process ids (the server's, all workers) whose CPU time per
        /// delivered message is reported.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
    },
    /// N clients each send M messages; a Redis subscriber counts them.
    Up {
        #[command(flatten)]
        load: Load,
    },
    /// One channel, N subscribers, M messages.
    Fanout {
        #[arg(long, value_enum, default_value = "wsproxy")]
        target: Which,
        #[command(flatten)]
        load: Load,
    },
    /// N clients each make M request/response round trips through --url.
    Echo {
        /// WebSocket URL to echo through (a proxy route or the backend itself).
        #[arg(long)]
        url: String,
        /// Name to report the target under.
        #[arg(long, default_value = "echo")]
        name: String,
        /// Process ids (the proxy's, all workers) whose CPU time per round
        /// trip is reported.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        #[command(flatten)]
        load: Load,
    },
    /// Reliable sessions: N times, a client misses M messages and resumes;
    /// latency from the reconnect to the last replayed message (needs
    /// RELIABLE_SESSIONS=true).
    Resume {
        #[arg(long, default_value_t = 50)]
        n: usize,
        #[arg(long, default_value_t = 1000)]
        m: u64,
    },
    /// The session bridge's event streams (Server-Sent Events), to set
    /// beside the WebSocket figures of the same run: `idle` (RSS per
    /// stream of --pids), `down` (plain streams, M messages round robin),
    /// `resume` (a resumable stream misses M messages and comes back with
    /// Last-Event-ID, N times; needs RELIABLE_SESSIONS=true).
    Sse {
        /// idle, down or resume.
        scenario: String,
        #[command(flatten)]
        load: Load,
        /// Process ids whose RSS is summed (idle).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        /// down: measure nchan's EventSource subscribers (at --nchan)
        /// instead of wsproxy's event streams.
        #[arg(long)]
        peer: bool,
    },
    /// A bounded mixed load (session churn, down, up, topic pub/sub,
    /// proxied echo) for --duration; every --interval one line of the
    /// --pids' RSS and fds, Redis' channels and clients, and the counts.
    /// With --strict, exits non-zero on any lost message or any sample
    /// with more Redis channels than the open connections need.
    Soak {
        #[command(flatten)]
        args: soak::SoakArgs,
    },
    /// Reliable sessions under failure: starts its own redis-server (AOF,
    /// appendfsync always) and wsproxy (--wsproxy-bin), runs reliable
    /// clients with traffic both ways while connections are reset, wsproxy
    /// is SIGKILLed and restarted and Redis too; prints lost, duplicated and
    /// out-of-order counts per direction and exits non-zero unless all are
    /// zero. Ignores --wsproxy and --redis.
    Chaos {
        #[command(flatten)]
        args: chaos::ChaosArgs,
    },
    /// A deploy's reconnect storm: starts its own redis-server and two
    /// wsproxy processes (--wsproxy-bin), puts --clients reliable clients
    /// on A while a backend publishes, SIGTERMs A, and each client resumes
    /// on B after a random pause (--jitter-ms); prints the time until all
    /// resumed, resume latency, lost/duplicated/reordered (must be 0) and
    /// Redis's and B's CPU. Ignores --wsproxy and --redis.
    Storm {
        #[command(flatten)]
        args: storm::StormArgs,
    },
    /// Render JSON-lines results (from --json) as a Markdown table.
    Report {
        /// The JSON-lines file written by earlier runs.
        input: std::path::PathBuf,
    },
    /// Run an echo backend (for the echo scenario and the proxy peers).
    EchoServer {
        #[arg(long, default_value_t = 9001)]
        port: u16,
    },
    /// Run a scenario against wsproxy and a peer, alternately, and print
    /// both with their ratio.
    Compare {
        /// connect, idle, down or fanout.
        scenario: String,
        #[command(flatten)]
        load: Load,
        /// Rounds (wsproxy, peer, wsproxy, peer, ...).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// wsproxy's process id (idle).
        #[arg(long, value_delimiter = ',')]
        wsproxy_pids: Vec<u32>,
        /// The peer's process ids (idle): nginx master and workers.
        #[arg(long, value_delimiter = ',')]
        peer_pids: Vec<u32>,
        /// Which side of wsproxy to compare: the session bridge or the hub.
        #[arg(long, value_enum, default_value = "wsproxy")]
        ours: Which,
    },
}

fn target(which: Which, c: &Common) -> anyhow::Result<Target> {
    let cluster = !c.redis_cluster.is_empty();
    Ok(match which {
        Which::Wsproxy if cluster => Target::WsproxyCluster {
            ws: c.wsproxy.clone(),
            nodes: c.redis_cluster.clone(),
            pubsub: c.cluster_pubsub,
        },
        Which::Hub | Which::Reliable if cluster => {
            bail!("--redis-cluster supports the wsproxy and nchan targets, not {which:?}")
        }
        Which::Wsproxy => Target::Wsproxy {
            ws: c.wsproxy.clone(),
            redis: c.redis.clone(),
        },
        Which::Nchan => Target::Nchan {
            http: c.nchan.clone(),
        },
        Which::Hub => Target::Hub {
            ws: c.wsproxy.clone(),
            redis: c.redis.clone(),
            apart: c.hub_anonymous_apart,
        },
        Which::Reliable => Target::Reliable {
            ws: c.wsproxy.clone(),
            redis: c.redis.clone(),
            per_call: c.per_call.into(),
        },
    })
}

async fn run_one(
    scenario: &str,
    t: &Target,
    c: &Common,
    sources: &Arc<net::Sources>,
    load: &Load,
    pids: &[u32],
) -> anyhow::Result<Report> {
    match scenario {
        "connect" => scenarios::connect(t, sources, load.n, c.concurrency).await,
        "idle" => scenarios::idle(t, sources, load.n, pids, c.concurrency).await,
        "down" => {
            let load = (load.n, load.m, load.rate);
            scenarios::down(t, sources, load, c.concurrency, pids).await
        }
        "fanout" => scenarios::fanout(t, sources, load.n, load.m, load.rate, c.concurrency).await,
        other => bail!("compare supports connect, idle, down and fanout, not {other:?}"),
    }
}

fn emit(report: &Report, c: &Common) -> anyhow::Result<()> {
    let mut report = report.clone();
    if let Some(label) = &c.label {
        report.target.clone_from(label);
    }
    let report = &report;
    println!("{}", report.line());
    if let Some(path) = &c.json {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{}", serde_json::to_string(report)?)?;
    }
    Ok(())
}

/// wsproxy's figure divided by the peer's, oriented so > 1 means wsproxy
/// is better.
fn ratios(w: &Report, p: &Report) -> String {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let mut parts = vec![format!("throughput x{:.2}", div(w.rate, p.rate))];
    if w.p99_us > 0 && p.p99_us > 0 {
        parts.push(format!(
            "p99 latency {:.2} of the peer's",
            div(w.p99_us as f64, p.p99_us as f64)
        ));
    }
    if let (Some(a), Some(b)) = (w.rss_per_conn, p.rss_per_conn) {
        parts.push(format!("memory/conn {:.2} of the peer's", div(a, b)));
    }
    parts.join(", ")
}

/// A Markdown table of every report in a JSON-lines file, in run order.
fn markdown(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let mut out = String::from(
        "| scenario | target | N | sent | delivered | loss | rate/s | offered/s | p50 | p99 | p99.9 | max | memory/conn | CPU/op | note |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: serde_json::Value = serde_json::from_str(line)?;
        let num = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let lat = |k: &str| {
            let v = r[k].as_u64().unwrap_or(0);
            if v == 0 { "-".to_owned() } else { stats::us(v) }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or("?"),
            r["target"].as_str().unwrap_or("?"),
            num("connections"),
            num("sent"),
            num("delivered"),
            num("sent") - num("delivered"),
            num("rate"),
            if num("offered") > 0.0 {
                format!("{:.0}", num("offered"))
            } else {
                "max".into()
            },
            lat("p50_us"),
            lat("p99_us"),
            lat("p999_us"),
            lat("max_us"),
            r["rss_per_conn"]
                .as_f64()
                .map_or("-".into(), |b| format!("{b:.0} B")),
            r["cpu_us_per_op"]
                .as_f64()
                .map_or("-".into(), |u| format!("{u:.1} µs")),
            r["note"].as_str().unwrap_or("").replace('|', "/"),
        ));
    }
    Ok(out)
}

/// What a run found wrong, beyond errors it returned.
#[derive(Default)]
struct Verdict {
    /// A report with lost messages or errors (fails the run with --strict).
    lossy: bool,
    /// A soak that lost messages or held more Redis channels than needed
    /// (fails the run with --strict).
    soak_failed: bool,
    /// What chaos or storm found broken (always fails the run).
    failures: Vec<String>,
}

impl Verdict {
    /// Prints (and records) `report`, noting loss or errors.
    fn emit(&mut self, report: &Report, c: &Common) -> anyhow::Result<()> {
        if report.loss() > 0 || report.errors > 0 {
            self.lossy = true;
        }
        emit(report, c)
    }
}

/// The target named by `--url` (with its `--name`), or else by `--target`.
fn url_or_target(
    url: Option<String>,
    name: String,
    w: Which,
    c: &Common,
) -> anyhow::Result<Target> {
    Ok(match url {
        Some(url) => Target::Url { name, url },
        None => target(w, c)?,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let c = cli.common.clone();
    let sources = Arc::new(net::Sources::new(c.sources));
    net::raise_fd_limit();
    if !c.redis_cluster.is_empty()
        && matches!(
            cli.command,
            Command::Up { .. } | Command::Resume { .. } | Command::Soak { .. }
        )
    {
        bail!("--redis-cluster supports connect, idle, down, fanout and compare");
    }
    let verdict = execute(cli.command, &c, &sources).await?;
    if c.strict && verdict.lossy {
        bail!("loss or errors (--strict)");
    }
    if !verdict.failures.is_empty() {
        bail!("{}", verdict.failures.join("; "));
    }
    if c.strict && verdict.soak_failed {
        bail!("soak: lost messages or more Redis channels than needed (--strict)");
    }
    Ok(())
}

/// Runs one command, printing (and recording) its reports.
async fn execute(
    command: Command,
    c: &Common,
    sources: &Arc<net::Sources>,
) -> anyhow::Result<Verdict> {
    let mut v = Verdict::default();
    match command {
        Command::Connect {
            target: w,
            n,
            url,
            name,
        } => {
            let load = Load { n, m: 0, rate: 0.0 };
            let t = url_or_target(url, name, w, c)?;
            let r = run_one("connect", &t, c, sources, &load, &[]).await?;
            v.emit(&r, c)?;
        }
        Command::Idle {
            target: w,
            n,
            pids,
            url,
            name,
        } => {
            let load = Load { n, m: 0, rate: 0.0 };
            let t = url_or_target(url, name, w, c)?;
            let r = run_one("idle", &t, c, sources, &load, &pids).await?;
            v.emit(&r, c)?;
        }
        Command::Resume { n, m } => {
            let r = scenarios::resume(&c.wsproxy, &c.redis, sources, n, m).await?;
            v.emit(&r, c)?;
        }
        Command::Sse {
            scenario,
            load,
            pids,
            peer,
        } => {
            let r = match scenario.as_str() {
                "idle" => {
                    sse::idle(&c.wsproxy, &c.redis, sources, load.n, &pids, c.concurrency).await?
                }
                "down" => {
                    let peer = peer.then_some(c.nchan.as_str());
                    let load = (load.n, load.m, load.rate);
                    sse::down(&c.wsproxy, &c.redis, peer, sources, load, c.concurrency).await?
                }
                "resume" => sse::resume(&c.wsproxy, &c.redis, sources, load.n, load.m).await?,
                other => bail!("sse scenarios are idle, down and resume, not {other:?}"),
            };
            v.emit(&r, c)?;
        }
        Command::Down {
            target: w,
            load,
            pids,
        } => {
            let r = run_one("down", &target(w, c)?, c, sources, &load, &pids).await?;
            v.emit(&r, c)?;
        }
        Command::Fanout { target: w, load } => {
            let r = run_one("fanout", &target(w, c)?, c, sources, &load, &[]).await?;
            v.emit(&r, c)?;
        }
        Command::Up { load } => {
            let (n, m) = (load.n, load.m);
            let r = scenarios::up(&c.wsproxy, &c.redis, sources, n, m, c.concurrency).await?;
            v.emit(&r, c)?;
        }
        Command::Echo {
            url,
            name,
            pids,
            load,
        } => {
            let (n, m) = (load.n, load.m);
            let r = scenarios::echo(&name, &url, sources, n, m, c.concurrency, &pids).await?;
            v.emit(&r, c)?;
        }
        Command::Soak { args } => {
            let out = soak::soak(&c.wsproxy, &c.redis, sources, args).await?;
            v.soak_failed = out.lost > 0 || out.channel_excess_samples > 0;
            emit(&out.report, c)?;
        }
        Command::Chaos { args } => {
            let out = chaos::chaos(args).await?;
            emit(&out.report, c)?;
            if !out.failures.is_empty() {
                v.failures
                    .push(format!("chaos: {}", out.failures.join("; ")));
            }
        }
        Command::Storm { args } => {
            let out = storm::storm(args, sources.clone()).await?;
            emit(&out.report, c)?;
            if !out.failures.is_empty() {
                v.failures
                    .push(format!("storm: {}", out.failures.join("; ")));
            }
        }
        Command::EchoServer { port } => scenarios::echo_server(port).await?,
        Command::Report { input } => print!("{}", markdown(&input)?),
        Command::Compare {
            scenario,
            load,
            rounds,
            wsproxy_pids,
            peer_pids,
            ours,
        } => {
            let w = target(ours, c)?;
            let p = target(Which::Nchan, c)?;
            for round in 1..=rounds.max(1) {
                let a = run_one(&scenario, &w, c, sources, &load, &wsproxy_pids).await?;
                v.emit(&a, c)?;
                // Only wsproxy's loss counts against the run.
                let b = run_one(&scenario, &p, c, sources, &load, &peer_pids).await?;
                emit(&b, c)?;
                println!("round {round}: wsproxy vs {}: {}", b.target, ratios(&a, &b));
            }
        }
    }
    Ok(v)
}
