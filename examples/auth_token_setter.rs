//! Run with: cargo run --release --example auth_token_setter <session_id> <token> [ttl_secs]
//!
//! Plays the backend's part in the wsproxy auth handshake: it stores the
//! token a WebSocket client must present (`Authorization: Bearer <token>`)
//! under `session:{session_id}:auth` with `SETEX`, so the key expires on its
//! own if no client ever connects. wsproxy reads that key when the client
//! upgrades and then resets its TTL to the reconnect grace period.
//!
//! The TTL comes from the third argument, else `AUTH_TIMEOUT_SECS`, else 5
//! seconds. Redis is reached through `REDIS_URL`
//! (default `redis://127.0.0.1:6379`), or on a Redis Cluster through
//! `REDIS_CLUSTER_NODES` (comma-separated seeds, as wsproxy takes them),
//! where the key carries the session as a hash tag: `session:{<id>}:auth`.
//!
//! The token is a secret, so only its length is printed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::AsyncCommands;

const USAGE: &str = "usage: auth_token_setter <session_id> <token> [ttl_secs]";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_TTL_SECS: u64 = 5;
/// How long to wait for Redis to accept the connection before giving up,
/// so a wrong `REDIS_URL` fails fast instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Args {
    session_id: String,
    token: String,
    /// `None` when no TTL was given on the command line.
    ttl_secs: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (Some(session_id), Some(token)) = (args.next(), args.next()) else {
        return Err("missing <session_id> or <token>".into());
    };
    let ttl_secs = args.next().map(|s| parse_ttl(&s)).transpose()?;
    if args.next().is_some() {
        return Err("too many arguments".into());
    }
    if session_id.is_empty() {
        return Err("<session_id> must not be empty".into());
    }
    if token.is_empty() {
        return Err("<token> must not be empty".into());
    }
    Ok(Args {
        session_id,
        token,
        ttl_secs,
    })
}

/// SETEX rejects a zero expiry, so 0 is refused here with a clearer message.
fn parse_ttl(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) | Err(_) => Err(format!(
            "ttl must be a positive whole number of seconds, got {s:?}"
        )),
        Ok(n) => Ok(n),
    }
}

/// Argument first, then `AUTH_TIMEOUT_SECS`, then the built-in default.
fn resolve_ttl(from_args: Option<u64>) -> anyhow::Result<(u64, &'static str)> {
    if let Some(ttl) = from_args {
        return Ok((ttl, "command line"));
    }
    match std::env::var("AUTH_TIMEOUT_SECS") {
        Ok(raw) => {
            let ttl = parse_ttl(&raw)
                .map_err(anyhow::Error::msg)
                .context("invalid AUTH_TIMEOUT_SECS")?;
            Ok((ttl, "AUTH_TIMEOUT_SECS"))
        }
        Err(std::env::VarError::NotPresent) => Ok((DEFAULT_TTL_SECS, "default")),
        Err(e) => Err(e).context("invalid AUTH_TIMEOUT_SECS"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Some libraries wrap an error and
/// repeat its message in their own, so a cause already quoted by the
/// message before it is left out.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.last().is_some_and(|prev| prev.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// `SETEX key token ttl`, then the TTL Redis holds for it.
async fn store(
    mut conn: impl redis::aio::ConnectionLike + Send + Sync,
    key: &str,
    token: &str,
    ttl_secs: u64,
) -> anyhow::Result<i64> {
    let () = conn
        .set_ex(key, token, ttl_secs)
        .await
        .with_context(|| format!("SETEX {key} failed"))?;
    // Read the expiry back so the output shows what Redis actually holds.
    let remaining: i64 = conn
        .ttl(key)
        .await
        .with_context(|| format!("TTL {key} failed"))?;
    if remaining < 0 {
        bail!("{key} was set but has no expiry in Redis (TTL {remaining})");
    }
    Ok(remaining)
}

async fn run() -> anyhow::Result<ExitCode> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("error: {msg}\n{USAGE}");
            return Ok(ExitCode::from(2));
        }
    };
    let (ttl_secs, ttl_source) = resolve_ttl(args.ttl_secs)?;

    let (redis_addr, key, remaining) = match std::env::var("REDIS_CLUSTER_NODES") {
        Ok(nodes) => {
            let seeds: Vec<&str> = nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            let client = redis::cluster::ClusterClient::new(seeds.clone())
                .context("invalid REDIS_CLUSTER_NODES")?;
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
                .await
                .map_err(|_| anyhow::anyhow!("timed out connecting to the Redis Cluster"))?
                .context("could not connect to the Redis Cluster")?;
            let key = format!("session:{{{}}}:auth", args.session_id);
            let remaining = store(conn, &key, &args.token, ttl_secs).await?;
            (
                format!("cluster of {} seed(s)", seeds.len()),
                key,
                remaining,
            )
        }
        Err(_) => {
            let redis_url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
            let client = redis::Client::open(redis_url.as_str()).context("invalid REDIS_URL")?;
            // Print only host:port; the URL itself may carry a password.
            let redis_addr = client.get_connection_info().addr().to_string();
            let conn =
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out connecting to Redis at {redis_addr}"))?
                    .with_context(|| format!("could not connect to Redis at {redis_addr}"))?;
            let key = format!("session:{}:auth", args.session_id);
            let remaining = store(conn, &key, &args.token, ttl_secs).await?;
            (redis_addr, key, remaining)
        }
    };

    println!("Redis:   {redis_addr}");
    println!("Key:     {key}");
    println!("Token:   <{} bytes, not shown>", args.token.len());
    println!("TTL:     {ttl_secs}s (from {ttl_source}), {remaining}s remaining in Redis");
    println!(
        "Connect a client within {ttl_secs}s with header `Authorization: Bearer <token>`, \
         e.g. cargo run --release --example ws_bidir_client <agent_id> {} <token>",
        args.session_id
    );
    Ok(ExitCode::SUCCESS)
}
