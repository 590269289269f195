//! Run with: cargo run --release --example ws_bidir_client <agent_id> <session_id> <auth_token>
//!
//! A WebSocket client for a wsproxy session, exercising both directions of
//! the bridge. It connects to `{WSPROXY_URL}/{agent_id}/ws/{session_id}`
//! (`WSPROXY_URL` defaults to `ws://127.0.0.1:8080`) with
//! `Authorization: Bearer <auth_token>`, where the token must first have been
//! stored with `auth_token_setter`. Then it:
//!
//! * sends `{"type":"ping","counter":N,"timestamp":"<RFC 3339 UTC>"}` every
//!   three seconds; wsproxy publishes these on `session:{session_id}:up`
//!   (watch them with `redis_subscriber`);
//! * prints every message wsproxy delivers, i.e. whatever is published on
//!   `session:{session_id}:down` (e.g. by `redis_publisher`).
//!
//! If wsproxy refuses the upgrade (missing, wrong or expired token), the HTTP
//! status and the JSON error body are printed. Ctrl+C sends a normal (1000)
//! close frame, waits briefly for wsproxy to answer it, and exits.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const USAGE: &str = "usage: ws_bidir_client <agent_id> <session_id> <auth_token>";
const DEFAULT_WSPROXY_URL: &str = "ws://127.0.0.1:8080";
const PING_EVERY: Duration = Duration::from_secs(3);
/// Bounds the TCP connect plus upgrade, so an address that swallows packets
/// does not leave the client hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for wsproxy to echo our close frame before giving up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The upstream message. A struct rather than `json!` so the fields are
/// written in this order (`json!` sorts keys alphabetically).
#[derive(Serialize)]
struct Ping {
    #[serde(rename = "type")]
    kind: &'static str,
    counter: u64,
    /// RFC 3339, UTC, whole seconds, e.g. `2025-01-15T12:00:00Z`.
    timestamp: String,
}

struct Args {
    agent_id: String,
    session_id: String,
    /// `Bearer <auth_token>`, checked while parsing so a token that cannot
    /// be sent in a header is reported as a usage error.
    bearer: HeaderValue,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (Some(agent_id), Some(session_id), Some(token)) = (args.next(), args.next(), args.next())
    else {
        return Err("missing <agent_id>, <session_id> or <auth_token>".into());
    };
    if args.next().is_some() {
        return Err("too many arguments".into());
    }
    for (name, value) in [
        ("<agent_id>", &agent_id),
        ("<session_id>", &session_id),
        ("<auth_token>", &token),
    ] {
        if value.is_empty() {
            return Err(format!("{name} must not be empty"));
        }
    }
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "<auth_token> contains characters not allowed in an HTTP header")?;
    Ok(Args {
        agent_id,
        session_id,
        bearer,
    })
}

/// Percent-encodes everything outside RFC 3986's unreserved set, so an id
/// containing `/`, `?`, `#` or spaces stays a single path segment.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            // Writing into a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Prints why wsproxy refused the upgrade. Its error bodies are JSON, which
/// is pretty-printed; anything else is shown as text.
fn report_rejection(status: u16, reason: &str, body: Option<&[u8]>) {
    eprintln!("Handshake rejected: HTTP {status} {reason}");
    match body {
        None | Some([]) => eprintln!("(empty response body)"),
        Some(bytes) => match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(value) => {
                let pretty =
                    serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string());
                eprintln!("{pretty}");
            }
            Err(_) => eprintln!("{}", String::from_utf8_lossy(bytes)),
        },
    }
}

fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("code {}", u16::from(f.code)),
        Some(f) => format!("code {}: {}", u16::from(f.code), f.reason),
        None => "no close code".to_owned(),
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

async fn run() -> anyhow::Result<ExitCode> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("error: {msg}\n{USAGE}");
            return Ok(ExitCode::from(2));
        }
    };

    let base = std::env::var("WSPROXY_URL").unwrap_or_else(|_| DEFAULT_WSPROXY_URL.to_owned());
    let url = format!(
        "{}/{}/ws/{}",
        base.trim_end_matches('/'),
        path_segment(&args.agent_id),
        path_segment(&args.session_id)
    );

    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("invalid WebSocket URL {url:?} (check WSPROXY_URL)"))?;
    request.headers_mut().insert(AUTHORIZATION, args.bearer);

    println!("Connecting to {url}");
    let connected =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| anyhow::anyhow!("timed out connecting to {url}"))?;
    let (ws, response) = match connected {
        Ok(ok) => ok,
        Err(WsError::Http(response)) => {
            let status = response.status();
            report_rejection(
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                response.body().as_deref(),
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e).with_context(|| format!("could not connect to {url}")),
    };
    println!(
        "Connected (HTTP {}); sending a ping every {}s, Ctrl+C to close",
        response.status().as_u16(),
        PING_EVERY.as_secs()
    );
    run_session(ws).await
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Pings, prints and waits for Ctrl+C until either side closes the session.
async fn run_session(mut ws: WsStream) -> anyhow::Result<ExitCode> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // The first tick completes immediately, so ping #1 goes out at once.
    let mut ticker = tokio::time::interval(PING_EVERY);
    let mut counter: u64 = 0;

    loop {
        tokio::select! {
            res = &mut ctrl_c => {
                res.context("could not listen for Ctrl+C")?;
                break;
            }
            _ = ticker.tick() => {
                counter += 1;
                let ping = serde_json::to_string(&Ping {
                    kind: "ping",
                    counter,
                    timestamp: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                })
                .context("could not encode ping")?;
                ws.send(Message::text(ping.clone()))
                    .await
                    .context("sending ping failed")?;
                println!("sent     {ping}");
            }
            // `next()` on a WebSocketStream is cancel safe: a partly read
            // frame stays buffered when another branch wins.
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => println!("received {}", text.as_str()),
                Some(Ok(Message::Binary(bytes))) => {
                    println!("received binary message ({} bytes)", bytes.len());
                }
                // Pongs to the server's pings are queued by tungstenite and
                // flushed on the next read or write; nothing to do here.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    println!("wsproxy closed the connection ({})", describe_close(frame.as_ref()));
                    // tungstenite has queued the answering close frame; flush
                    // it so the server sees a completed close handshake. An
                    // error here only means the server has already gone.
                    let _ = ws.flush().await;
                    // Anything but a normal or going-away close means the
                    // server ended the session because of a problem.
                    let clean = frame
                        .as_ref()
                        .is_none_or(|f| matches!(f.code, CloseCode::Normal | CloseCode::Away));
                    return Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
                Some(Err(e)) => return Err(e).context("WebSocket connection failed"),
                None => bail!("WebSocket connection ended without a close frame"),
            },
        }
    }

    println!("Closing connection (code 1000)");
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "client shutting down".into(),
    }))
    .await
    .context("sending close frame failed")?;
    // Wait for wsproxy's answering close frame so the close handshake
    // completes; messages still in flight are printed meanwhile.
    let drain = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(text)) => println!("received {}", text.as_str()),
                Ok(Message::Close(frame)) => {
                    println!("Close acknowledged ({})", describe_close(frame.as_ref()));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, drain).await.is_err() {
        println!(
            "No close reply within {}s; exiting anyway",
            CLOSE_TIMEOUT.as_secs()
        );
    }
    Ok(ExitCode::SUCCESS)
}
