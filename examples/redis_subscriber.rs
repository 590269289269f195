//! Run with: cargo run --release --example redis_subscriber <session_id>
//!
//! Stands in for a backend agent listening to a WebSocket client: it
//! subscribes to `session:{session_id}:up`, the channel wsproxy publishes
//! every client frame of that session to, and prints each message as it
//! arrives. Pair it with `ws_bidir_client` to watch the client's pings flow
//! upstream, or feed it by hand with `redis-cli PUBLISH`.
//!
//! Redis is reached through `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! or on a Redis Cluster through `REDIS_CLUSTER_NODES` (comma-separated
//! seeds): then it listens with `SSUBSCRIBE session:{<id>}:up` (sharded
//! pub/sub, wsproxy's default there), or `SUBSCRIBE` with
//! `REDIS_CLUSTER_PUBSUB=classic`. Ctrl+C stops it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;

const USAGE: &str = "usage: redis_subscriber <session_id>";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Fail fast on a wrong `REDIS_URL` instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn parse_args() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let Some(session_id) = args.next() else {
        return Err("missing <session_id>".into());
    };
    if args.next().is_some() {
        return Err("too many arguments".into());
    }
    if session_id.is_empty() {
        return Err("<session_id> must not be empty".into());
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

    if let Ok(nodes) = std::env::var("REDIS_CLUSTER_NODES") {
        return subscribe_on_cluster(&nodes, &session_id).await;
    }
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
    let client = redis::Client::open(redis_url.as_str()).context("invalid REDIS_URL")?;
    // Print only host:port; the URL itself may carry a password.
    let redis_addr = client.get_connection_info().addr().to_string();
    // Pub/sub needs a dedicated connection: once subscribed, Redis accepts
    // only subscription commands on it.
    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to Redis at {redis_addr}"))?
        .with_context(|| format!("could not connect to Redis at {redis_addr}"))?;

    let channel = format!("session:{session_id}:up");
    pubsub
        .subscribe(&channel)
        .await
        .with_context(|| format!("SUBSCRIBE {channel} failed"))?;
    println!("Subscribed to {channel} on {redis_addr} (Ctrl+C to stop)");

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut messages = pubsub.on_message();
    let mut received: u64 = 0;

    loop {
        tokio::select! {
            res = &mut ctrl_c => {
                res.context("could not listen for Ctrl+C")?;
                break;
            }
            msg = messages.next() => {
                // The stream only ends when the connection to Redis is gone.
                let Some(msg) = msg else {
                    bail!("connection to Redis at {redis_addr} closed after {received} message(s)");
                };
                received += 1;
                // wsproxy only forwards valid JSON, but anything may be
                // published by hand, so show non-UTF-8 payloads lossily.
                let payload = String::from_utf8_lossy(msg.get_payload_bytes());
                println!("#{received} [{}] {payload}", msg.get_channel_name());
            }
        }
    }

    println!("Stopped after {received} message(s).");
    Ok(ExitCode::SUCCESS)
}

/// The same on a Redis Cluster: a RESP3 connection whose subscription
/// messages arrive as pushes.
async fn subscribe_on_cluster(nodes: &str, session_id: &str) -> anyhow::Result<ExitCode> {
    let seeds: Vec<&str> = nodes
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()
        .context("invalid REDIS_CLUSTER_NODES")?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to the Redis Cluster"))?
        .context("could not connect to the Redis Cluster")?;
    let channel = format!("session:{{{session_id}}}:up");
    let classic = std::env::var("REDIS_CLUSTER_PUBSUB").is_ok_and(|m| m == "classic");
    if classic {
        conn.subscribe(&channel).await
    } else {
        conn.ssubscribe(&channel).await
    }
    .with_context(|| format!("subscribing to {channel} failed"))?;
    println!(
        "Subscribed to {channel} on a cluster of {} seed(s) (Ctrl+C to stop)",
        seeds.len()
    );
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut received: u64 = 0;
    loop {
        tokio::select! {
            res = &mut ctrl_c => {
                res.context("could not listen for Ctrl+C")?;
                break;
            }
            push = rx.recv() => {
                let Some(push) = push else {
                    bail!("connection to the Redis Cluster closed after {received} message(s)");
                };
                if !matches!(push.kind, redis::PushKind::Message | redis::PushKind::SMessage) {
                    continue;
                }
                let Some(redis::Value::BulkString(payload)) = push.data.get(1) else {
                    continue;
                };
                received += 1;
                println!("#{received} [{channel}] {}", String::from_utf8_lossy(payload));
            }
        }
    }
    println!("Stopped after {received} message(s).");
    Ok(ExitCode::SUCCESS)
}
