//! Run with: cargo run --release --example redis_publisher [session_id]
//!
//! Stands in for a backend agent talking *to* a WebSocket client: every two
//! seconds it publishes `{"type":"data","payload":"Message #N"}` on
//! `session:{session_id}:down`, the channel wsproxy forwards to the client
//! connected to that session. For each publish it prints how many Redis
//! subscribers received it; 0 means nothing listens on the channel, usually
//! because no client is connected for the session. The session id defaults
//! to `test-session-123`.
//!
//! Redis is reached through `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! or on a Redis Cluster through `REDIS_CLUSTER_NODES` (comma-separated
//! seeds): then it publishes with `SPUBLISH session:{<id>}:down` (sharded
//! pub/sub, wsproxy's default there), or `PUBLISH` with
//! `REDIS_CLUSTER_PUBSUB=classic`. Ctrl+C stops it between publishes.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

const USAGE: &str = "usage: redis_publisher [session_id]";
const DEFAULT_SESSION_ID: &str = "test-session-123";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// Fail fast on a wrong `REDIS_URL` instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The downstream message. A struct rather than `json!` so the fields are
/// written in this order (`json!` sorts keys alphabetically).
#[derive(Serialize)]
struct DataMessage {
    #[serde(rename = "type")]
    kind: &'static str,
    payload: String,
}

fn parse_args() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let session_id = args.next().unwrap_or_else(|| DEFAULT_SESSION_ID.to_owned());
    if args.next().is_some() {
        return Err("too many arguments".into());
    }
    if session_id.is_empty() {
        return Err("[session_id] must not be empty".into());
    }
    Ok(session_id)
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

async fn run() -> anyhow::Result<ExitCode> {
    let session_id = match parse_args() {
        Ok(id) => id,
        Err(msg) => {
            eprintln!("error: {msg}\n{USAGE}");
            return Ok(ExitCode::from(2));
        }
    };

    match std::env::var("REDIS_CLUSTER_NODES") {
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
            let classic = std::env::var("REDIS_CLUSTER_PUBSUB").is_ok_and(|m| m == "classic");
            let command = if classic { "PUBLISH" } else { "SPUBLISH" };
            let channel = format!("session:{{{session_id}}}:down");
            let on = format!("a cluster of {} seed(s)", seeds.len());
            publish_loop(conn, command, &channel, &on).await
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
            let channel = format!("session:{session_id}:down");
            publish_loop(conn, "PUBLISH", &channel, &redis_addr).await
        }
    }
}

/// Publishes a numbered message on `channel` every two seconds with
/// `command` (`PUBLISH` or `SPUBLISH`) until Ctrl+C.
async fn publish_loop(
    mut conn: impl redis::aio::ConnectionLike + Send,
    command: &str,
    channel: &str,
    on: &str,
) -> anyhow::Result<ExitCode> {
    println!(
        "Publishing to {channel} on {on} every {}s (Ctrl+C to stop)",
        PUBLISH_EVERY.as_secs()
    );
    // Registered once, outside the loop, so a Ctrl+C that arrives while a
    // publish is in flight is still seen on the next turn of the loop.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // The first tick completes immediately, so message #1 goes out at once.
    let mut ticker = tokio::time::interval(PUBLISH_EVERY);
    let mut counter: u64 = 0;

    loop {
        tokio::select! {
            res = &mut ctrl_c => {
                res.context("could not listen for Ctrl+C")?;
                break;
            }
            _ = ticker.tick() => {
                counter += 1;
                let message = serde_json::to_string(&DataMessage {
                    kind: "data",
                    payload: format!("Message #{counter}"),
                })
                .context("could not encode message")?;
                let receivers: usize = redis::cmd(command)
                    .arg(channel)
                    .arg(&message)
                    .query_async(&mut conn)
                    .await
                    .with_context(|| format!("{command} to {channel} failed"))?;
                println!("#{counter} published {message} -> {receivers} subscriber(s)");
            }
        }
    }

    println!("Stopped after {counter} message(s).");
    Ok(ExitCode::SUCCESS)
}
