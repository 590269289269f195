//! A small Server-Sent Events client over a raw socket (HTTP/1.1, chunked
//! bodies), parsing events as the HTML standard says a browser does.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// `event:` (`message` when none was given).
    pub event: String,
    /// The `data:` lines joined with line feeds.
    pub data: String,
    /// The last event id in effect (as the browser's `lastEventId`).
    pub id: String,
}

/// An open event stream.
pub struct SseClient {
    stream: TcpStream,
    /// Decoded body bytes not parsed into events yet.
    body: Vec<u8>,
    /// Raw bytes not decoded from chunks yet.
    raw: Vec<u8>,
    /// The response head.
    pub head: String,
    /// The `retry:` value, once seen.
    pub retry: Option<u64>,
    /// The last event id (kept across events, as browsers do).
    pub last_id: String,
    /// Comment lines seen (keepalives).
    pub comments: usize,
    /// The body's end was read.
    pub ended: bool,
}

/// A refused stream: status and JSON body.
pub type Refused = (u16, serde_json::Value);

impl SseClient {
    /// Opens `path` with these extra header lines (`Name: value`).
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[&str],
    ) -> Result<SseClient, Refused> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n");
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("a response head in time")
                .expect("read");
            assert!(
                n > 0,
                "closed before the head: {}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let rest = raw[head_end + 4..].to_vec();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        let mut client = SseClient {
            stream,
            body: Vec::new(),
            raw: rest,
            head,
            retry: None,
            last_id: String::new(),
            comments: 0,
            ended: false,
        };
        if status != 200 {
            let body = client.read_to_end().await;
            let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
            return Err((status, json));
        }
        Ok(client)
    }

    /// A response header's value (lower-case name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }

    /// Moves whole chunks from `raw` to `body`; true at the last chunk.
    fn decode(&mut self) -> bool {
        if !self.chunked() {
            self.body.append(&mut self.raw);
            return false;
        }
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return false;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("a chunk size");
            if size == 0 {
                return true;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return false;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// Reads more from the socket; false at its end.
    async fn fill(&mut self, limit: Duration) -> Option<bool> {
        let mut buf = [0u8; 8192];
        let n = tokio::time::timeout(limit, self.stream.read(&mut buf))
            .await
            .ok()?;
        let n = n.unwrap_or(0);
        if n == 0 {
            return Some(false);
        }
        if std::env::var_os("SSE_DEBUG").is_some() {
            eprintln!("sse read: {:?}", String::from_utf8_lossy(&buf[..n]));
        }
        self.raw.extend_from_slice(&buf[..n]);
        Some(true)
    }

    async fn read_to_end(&mut self) -> String {
        let length: Option<usize> = self.header("content-length").and_then(|v| v.parse().ok());
        loop {
            if length.is_some_and(|n| self.raw.len() >= n) {
                break;
            }
            if self.chunked() && self.decode() {
                return String::from_utf8_lossy(&self.body).into_owned();
            }
            if self.fill(WAIT).await != Some(true) {
                break;
            }
        }
        if !self.chunked() {
            self.body.append(&mut self.raw);
        }
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The next event, within `limit`; `None` when the stream ended (or
    /// nothing came in time: see `ended`).
    pub async fn next_within(&mut self, limit: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut event = Event::default();
        let mut has_data = false;
        let mut data_lines: Vec<String> = Vec::new();
        // What came with the head (or an earlier read) first.
        if !self.ended && self.decode() {
            self.ended = true;
        }
        loop {
            // Parse whole lines from the decoded body.
            while let Some(end) = self.body.iter().position(|&b| b == b'\n' || b == b'\r') {
                let line = String::from_utf8(self.body[..end].to_vec()).expect("utf-8 events");
                let skip = if self.body[end] == b'\r' && self.body.get(end + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                self.body.drain(..end + skip);
                if line.is_empty() {
                    if has_data {
                        event.data = data_lines.join("\n");
                        if event.event.is_empty() {
                            event.event = "message".into();
                        }
                        event.id = self.last_id.clone();
                        return Some(event);
                    }
                    event = Event::default();
                    data_lines.clear();
                    continue;
                }
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                    None => (line.clone(), String::new()),
                };
                match field.as_str() {
                    "event" => event.event = value,
                    "data" => {
                        has_data = true;
                        data_lines.push(value);
                    }
                    "id" => self.last_id = value,
                    "retry" => self.retry = value.parse().ok(),
                    _ => {}
                }
            }
            if self.ended {
                return None;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.fill(left).await {
                None => return None,
                Some(false) => {
                    self.ended = true;
                    self.decode();
                }
                Some(true) => {
                    if self.decode() {
                        self.ended = true;
                    }
                }
            }
        }
    }

    /// Reads raw bytes until the server closes the connection; panics if it
    /// does not within the wait.
    pub async fn closed_by_server(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.fill(left).await {
                Some(true) => self.raw.clear(),
                Some(false) => return,
                None => panic!("the server kept the connection open"),
            }
        }
    }

    /// The next event; panics if none comes within the wait.
    pub async fn next(&mut self) -> Event {
        self.next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("no event within the wait (ended: {})", self.ended))
    }

    /// Reads until the stream ends; panics if it does not within the wait.
    pub async fn until_end(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.next_within(Duration::from_millis(200)).await {
                Some(e) => events.push(e),
                None if self.ended => return events,
                None => assert!(
                    tokio::time::Instant::now() < deadline,
                    "the stream did not end: {events:?}"
                ),
            }
        }
    }
}

/// A raw request (with `Connection: close`): status, head and body.
pub async fn request(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, head.to_owned(), body.to_owned())
}

/// `POST path` with a JSON body and extra header lines: status and JSON.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, serde_json::Value) {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    let (status, _, body) = request(addr, &req).await;
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, json)
}
