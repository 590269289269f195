//! Reverse-proxy helpers: in-process echo backends (plain and TLS) that
//! record what they saw, routes files, and raw upgrades.
#![allow(clippy::result_large_err)] // the tungstenite handshake callback signature

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::*;

/// What a test backend saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// Path and query of each handshake.
    pub paths: Vec<String>,
    /// Request headers of each handshake (lower-case names).
    pub headers: Vec<Vec<(String, String)>>,
    /// Close codes received from clients.
    pub closes: Vec<u16>,
}

/// An echo backend: greets with `hello from {id}`, echoes text and binary,
/// closes with code N on the text `close:N`, picks the subprotocol
/// `superchat` when offered.
pub struct EchoBackend {
    pub port: u16,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo_backend(id: &str) -> EchoBackend {
    echo_backend_tls(id, None).await
}

pub async fn echo_backend_tls(id: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> EchoBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (id, seen2) = (id.to_owned(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (id, seen) = (id.clone(), seen2.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_echo(stream, id, seen).await,
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(stream).await {
                            serve_echo(s, id, seen).await;
                        }
                    }
                }
            });
        }
    });
    EchoBackend { port, seen, task }
}

pub async fn serve_echo<S>(stream: S, id: String, seen: Arc<Mutex<Seen>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let seen_hs = seen.clone();
    let callback = move |req: &Request, mut resp: Response| {
        let mut s = seen_hs.lock().expect("lock");
        s.paths.push(req.uri().to_string());
        s.headers.push(
            req.headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
        );
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if offered.split(',').any(|p| p.trim() == "superchat") {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("superchat"),
            );
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    if ws
        .send(Message::text(format!("hello from {id}")))
        .await
        .is_err()
    {
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = &msg
            && let Some(code) = t.strip_prefix("close:")
        {
            let code: u16 = code.parse().unwrap_or(1000);
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: "backend says bye".into(),
            };
            let _ = ws.close(Some(frame)).await;
            continue;
        }
        if let Message::Close(Some(f)) = &msg {
            seen.lock().expect("lock").closes.push(f.code.into());
            continue;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// Writes a routes file and returns its path.
pub fn routes_file(json: serde_json::Value) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}.routes.json", unique("wsproxy-test")));
    std::fs::write(&path, json.to_string()).expect("write routes");
    path
}

pub fn route(external: &str, internal: &str, ports: &[(u16, u32)]) -> serde_json::Value {
    serde_json::json!({
        "protocol": "websocket",
        // Named by port, so that tests can find each backend's metrics.
        "backends": ports.iter().map(|(p, w)| serde_json::json!({"name": p.to_string(), "host": "ws://127.0.0.1", "port": p, "weight": w})).collect::<Vec<_>>(),
        "external_path": external,
        "internal_path": internal,
        "methods": ["GET"],
        "auth_required": false,
    })
}

pub fn file(routes: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({ "version": 1, "routers": routes })
}

pub async fn proxy(redis: &Redis, routes: serde_json::Value) -> Server {
    let path = routes_file(routes);
    Server::start_with(&redis.url(), move |c| c.routes_file = Some(path)).await
}

pub async fn open(server: &Server, path: &str) -> Result<Ws, (u16, serde_json::Value)> {
    let req = format!("ws://{}{path}", server.addr)
        .into_client_request()
        .expect("req");
    connect_request(req).await
}

/// Upgrades on a plain TCP connection, offering `extensions`; returns the
/// connection and the 101 response (lower case), which must be all that
/// has arrived yet.
pub async fn raw_upgrade(
    server: &Server,
    path: &str,
    extensions: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: {extensions}\r\n\r\n"
    );
    c.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, c.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    let resp = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(resp.starts_with("http/1.1 101"), "{resp}");
    assert!(
        resp.ends_with("\r\n\r\n"),
        "frames came with the 101: {resp}"
    );
    (c, resp)
}

/// A WebSocket upgrade written by hand (the path goes out exactly as
/// given), expected to be refused: its status and JSON body.
pub async fn refused_upgrade(server: &Server, path: &str, extra: &str) -> (u16, serde_json::Value) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    let (status, body) = http_request(server.addr, &request)
        .await
        .expect("an answer");
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}
