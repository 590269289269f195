//! The `wsproxy` binary: reads configuration, sets up logging and signals,
//! and runs the library's server until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use wsproxy::config::{Cli, Command, Config, LogFormat};

/// The binary's allocator (feature `jemalloc`, on by default): jemalloc
/// with one arena. Idle connections take about a fifth less memory than
/// with glibc's malloc, at the same or lower CPU per connect and per
/// delivered message (BENCHMARKS.md, "The allocator").
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it first allocates (before `main`):
/// - `narenas:1`: one arena for every thread, so an idle connection's
///   long-lived blocks do not sit in a per-thread arena among the holes
///   other handshakes left (jemalloc's threads keep caches of their own,
///   which take most allocations without the arena's lock);
/// - `background_thread:true,dirty_decay_ms:1000`: pages freed after a
///   burst of handshakes go back to the kernel within about a second, from
///   a thread of jemalloc's, instead of after 10 s and only when something
///   allocates again.
///
/// `_RJEM_MALLOC_CONF` (say `narenas:4`) overrides them at run time.
///
/// jemalloc declares `malloc_conf` weak for a program to define; with
/// `tikv-jemalloc-sys`'s symbol prefix its name is `_rjem_malloc_conf`.
/// This is the workspace's one `unsafe` item (an exported symbol): the
/// value is a pointer to a NUL-terminated string that lives for the whole
/// program, which is all jemalloc reads.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: Option<&'static u8> =
    Some(&b"narenas:1,background_thread:true,dirty_decay_ms:1000\0"[0]);

/// Default log filter when RUST_LOG is unset.
const DEFAULT_LOG: &str = "info,wsproxy=debug";

fn main() -> ExitCode {
    // A .env file is optional; variables already set in the environment win.
    // One that cannot be read whole is a start-up error: dotenvy stops at
    // the first line it cannot parse, and every setting after it (a
    // METRICS_TOKEN, say) would be left out without a word.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("wsproxy: invalid configuration: .env: {e}");
        return ExitCode::from(2);
    }
    if let Some(line) = Cli::not_utf8(std::env::vars_os()) {
        eprintln!("wsproxy: invalid configuration: {line}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    if let Some(Command::HashPassword {
        password,
        user,
        sessions,
    }) = &cli.command
    {
        return hash_password(password.clone(), user.as_deref(), sessions.as_deref());
    }
    let ignored = cli.ignored();
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wsproxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_logging(&config) {
        eprintln!("wsproxy: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    for line in &ignored {
        tracing::warn!("{line}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsproxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A port that is taken is a start-up error like any bad setting: one
    // line, exit 2.
    let listener = match runtime.block_on(async { wsproxy::net::bind(config.listen) }) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "wsproxy: invalid configuration: HOST/PORT: cannot listen on {}: {e}",
                config.listen
            );
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(serve(config, listener)) {
        Ok(()) => ExitCode::SUCCESS,
        // A file named by the configuration (routes, users, TLS) or the
        // Redis URL is unusable: like any other bad setting, one line and
        // 2. Each message already names its cause, so the error's chain of
        // sources is not printed after it again.
        Err(e) => {
            eprintln!("wsproxy: invalid configuration: {e}");
            ExitCode::from(2)
        }
    }
}

/// `wsproxy hash-password`: prints an argon2 hash for a USERS_FILE line,
/// or with `--user` (and `--sessions`) the whole line, checked as
/// start-up would check it.
fn hash_password(password: Option<String>, user: Option<&str>, sessions: Option<&str>) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("wsproxy: cannot read the password from stdin: {e}");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        eprintln!("wsproxy: the password is empty");
        return ExitCode::from(2);
    }
    match wsproxy::auth::users::hash_password(&password) {
        Ok(hash) => {
            let Some(user) = user else {
                println!("{hash}");
                eprintln!(
                    "wsproxy: a USERS_FILE line is username:<hash>[:<sessions>], e.g. alice:<hash>:session-alice,team-7-* (without the sessions: any session); --user and --sessions print it whole"
                );
                return ExitCode::SUCCESS;
            };
            let line = match sessions {
                Some(list) => format!("{user}:{hash}:{list}"),
                None => format!("{user}:{hash}"),
            };
            match wsproxy::auth::users::Users::parse(&line, "--user/--sessions") {
                Err(e) => {
                    eprintln!("wsproxy: {e}");
                    return ExitCode::from(2);
                }
                // A name the file would read otherwise (a comment, spaces).
                Ok(users) if users.hash(user) != Some(hash.as_str()) => {
                    eprintln!("wsproxy: --user {user:?} cannot be written in USERS_FILE");
                    return ExitCode::from(2);
                }
                Ok(_) => {}
            }
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsproxy: cannot hash the password: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec)
            .map_err(|e| anyhow::anyhow!("RUST_LOG: {spec:?} is not a valid filter: {e}"))?,
        Err(_) => EnvFilter::new(DEFAULT_LOG),
    };
    // A log line that cannot be written (stdout a closed pipe) is dropped:
    // reporting it on stderr, closed too, would panic the task that logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        // Colours for a terminal only: a file or journald gets plain text.
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder.with_ansi(std::io::stdout().is_terminal()).init()
        }
    }
    Ok(())
}

async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
) -> Result<(), wsproxy::server::ServerError> {
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    wsproxy::run(config, listener, shutdown).await
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT. A second signal exits
/// at once, for the operator who does not want to wait for the drain.
async fn on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    // Cancelled before anything is logged: nothing may stand between the
    // signal and the drain.
    shutdown.cancel();
    tracing::info!("signal received; draining (send again to exit now)");
    wait_for_signal().await;
    tracing::warn!("second signal; exiting without waiting");
    std::process::exit(130);
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
