//! Sessions over HTTP (Server-Sent Events) beside WebSockets, in one run:
//! `wsproxy-bench sse idle|down|resume` measures the event-stream
//! transport of wsproxy's session bridge the way `idle`, `down` and
//! `resume` measure its WebSockets, so the two can be put side by side.
//!
//! The client is a small HTTP/1.1 reader (chunked bodies, events split at
//! blank lines), as cheap as the WebSocket client the other scenarios use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::{self, Sources};
use crate::scenarios::{self, Received, Target};
use crate::stats::{Report, histogram, message, now_us};

/// One open event stream.
pub struct SseConn {
    stream: TcpStream,
    /// Bytes read and not yet decoded from chunked framing.
    raw: BytesMut,
    /// Decoded body bytes not yet split into events.
    body: BytesMut,
    /// The body is chunked (wsproxy's is; a peer's may not be).
    chunked: bool,
}

/// One event: its id (if any) and its data lines joined.
pub struct Event {
    pub id: Option<String>,
    pub kind: Option<String>,
    pub data: Vec<u8>,
}

impl SseConn {
    /// `GET {http}/bench/sse/{channel}{query}` with the channel's token
    /// (wsproxy), or `GET {http}/sse/{channel}` (nchan's EventSource).
    pub async fn open(
        sources: &Sources,
        http: &str,
        channel: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<SseConn> {
        Self::open_path(
            sources,
            http,
            &format!("/bench/sse/{channel}{query}"),
            Some(&scenarios::token_for(channel)),
            last_event_id,
        )
        .await
    }

    /// `GET {http}{path}`, with a bearer token when given.
    pub async fn open_path(
        sources: &Sources,
        http: &str,
        path: &str,
        token: Option<&str>,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<SseConn> {
        let addr = net::addr_of(http)?;
        let mut stream = sources.tcp(addr).await?;
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n");
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = BytesMut::with_capacity(1024);
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if stream.read_buf(&mut raw).await? == 0 {
                bail!("the stream closed before its head");
            }
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            bail!("refused: {}", head.lines().next().unwrap_or(""));
        }
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        raw.advance(head_end + 4);
        Ok(SseConn {
            stream,
            raw,
            body: BytesMut::new(),
            chunked,
        })
    }

    /// Moves whole chunks to the body; false at the last chunk.
    fn decode(&mut self) -> anyhow::Result<bool> {
        if !self.chunked {
            let all = self.raw.split();
            self.body.extend_from_slice(&all);
            return Ok(true);
        }
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return Ok(true);
            };
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .context("a bad chunk size")?;
            if size == 0 {
                return Ok(false);
            }
            if self.raw.len() < line_end + 2 + size + 2 {
                return Ok(true);
            }
            self.raw.advance(line_end + 2);
            self.body.extend_from_slice(&self.raw[..size]);
            self.raw.advance(size + 2);
        }
    }

    /// The next event (comments and `retry:` skipped); `None` at the end.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let block = self.body.split_to(end + 2);
                let mut event = Event {
                    id: None,
                    kind: None,
                    data: Vec::new(),
                };
                let mut has_data = false;
                for line in block[..end].split(|&b| b == b'\n') {
                    if let Some(v) = line.strip_prefix(b"data: ") {
                        if has_data {
                            event.data.push(b'\n');
                        }
                        event.data.extend_from_slice(v);
                        has_data = true;
                    } else if let Some(v) = line.strip_prefix(b"id: ") {
                        event.id = Some(String::from_utf8_lossy(v).into_owned());
                    } else if let Some(v) = line.strip_prefix(b"event: ") {
                        event.kind = Some(String::from_utf8_lossy(v).into_owned());
                    }
                }
                if has_data {
                    return Ok(Some(event));
                }
                continue;
            }
            if !self.decode()? {
                return Ok(None);
            }
            if self.body.windows(2).any(|w| w == b"\n\n") {
                continue;
            }
            if self.stream.read_buf(&mut self.raw).await? == 0 {
                return Ok(None);
            }
        }
    }
}

fn http_of(ws: &str) -> String {
    ws.replacen("ws://", "http://", 1)
}

/// Opens one stream per channel, at most `concurrency` at once.
async fn open_all(
    sources: &Arc<Sources>,
    http: &str,
    channels: &[String],
    query: &'static str,
    concurrency: usize,
    nchan: bool,
) -> (Vec<SseConn>, u64, Option<String>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(channels.len());
    for ch in channels {
        let (sources, permits, http, ch) = (
            sources.clone(),
            permits.clone(),
            http.to_owned(),
            ch.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut conn = if nchan {
                SseConn::open_path(&sources, &http, &format!("/sse/{ch}"), None, None).await?
            } else {
                SseConn::open(&sources, &http, &ch, query, None).await?
            };
            if !query.is_empty() {
                // A resumable stream is ready with its welcome.
                conn.next().await?.context("no welcome")?;
            }
            Ok::<_, anyhow::Error>(conn)
        }));
    }
    let (mut conns, mut errors, mut first) = (Vec::new(), 0, None);
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => {
                errors += 1;
                first.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                errors += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
    (conns, errors, first)
}

/// `sse idle`: hold N event streams; RSS growth per stream of --pids.
pub async fn idle(
    ws: &str,
    redis: &str,
    sources: &Arc<Sources>,
    n: usize,
    pids: &[u32],
    concurrency: usize,
) -> anyhow::Result<Report> {
    if pids.is_empty() {
        bail!("sse idle needs the target's process ids (--pids)");
    }
    net::check_fd_budget(n)?;
    let target = Target::Wsproxy {
        ws: ws.to_owned(),
        redis: redis.to_owned(),
    };
    let http = http_of(ws);
    let warm = scenarios::channels("sw", 50.min(n));
    target.prepare(&warm).await?;
    let (warm_conns, _, _) = open_all(sources, &http, &warm, "", concurrency, false).await;
    let chans = scenarios::channels("si", n);
    target.prepare(&chans).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = net::rss_kib(pids)?;
    let started = Instant::now();
    let (conns, errors, first) = open_all(sources, &http, &chans, "", concurrency, false).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = net::rss_kib(pids)?;
    let held = conns.len();
    let per_conn = (after.saturating_sub(before) * 1024) as f64 / held.max(1) as f64;
    drop(conns);
    drop(warm_conns);
    Ok(Report {
        scenario: "idle".into(),
        target: "wsproxy-sse".into(),
        connections: n,
        sent: n as u64,
        delivered: held as u64,
        errors,
        seconds: took.as_secs_f64(),
        rate: held as f64 / took.as_secs_f64(),
        rss_per_conn: Some(per_conn),
        note: first.unwrap_or_else(|| format!("rss {before} KiB -> {after} KiB")),
        ..Report::default()
    })
}

/// `sse down`: N plain event streams, M messages published round robin
/// (`PUBLISH session:{id}:down`, as the WebSocket `down` does); with
/// `nchan`, nchan's EventSource subscribers (`/sse/{id}` of the peer at
/// that address), published by HTTP POST as its WebSocket peer is.
pub async fn down(
    ws: &str,
    redis: &str,
    nchan: Option<&str>,
    sources: &Arc<Sources>,
    load: (usize, u64, f64),
    concurrency: usize,
) -> anyhow::Result<Report> {
    let (n, m, rate) = load;
    net::check_fd_budget(n)?;
    let (target, http, name) = match nchan {
        Some(http) => (
            Target::Nchan {
                http: http.to_owned(),
            },
            http.to_owned(),
            "nchan-sse",
        ),
        None => (
            Target::Wsproxy {
                ws: ws.to_owned(),
                redis: redis.to_owned(),
            },
            http_of(ws),
            "wsproxy-sse",
        ),
    };
    let chans = scenarios::channels("sd", n);
    target.prepare(&chans).await?;
    let (conns, errors, first) =
        open_all(sources, &http, &chans, "", concurrency, nchan.is_some()).await;
    if errors > 0 {
        bail!("{errors} streams refused: {}", first.unwrap_or_default());
    }
    target.wait_active(&chans, 1).await?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut receivers = Vec::with_capacity(n);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let expected = m / n as u64 + u64::from((i as u64) < m % n as u64);
        let stop = stop.clone();
        let mut got = Received {
            count: 0,
            hist: histogram(),
            last_us: 0,
            socket: None,
        };
        receivers.push(tokio::spawn(async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            while got.count < expected {
                let event = tokio::select! {
                    e = conn.next() => e,
                    _ = &mut stopped => break,
                };
                let Ok(Some(event)) = event else { break };
                let now = now_us();
                got.count += 1;
                got.last_us = now;
                if let Some(sent) = crate::stats::sent_at(&event.data) {
                    let _ = got.hist.record(now.saturating_sub(sent).max(1));
                }
            }
            got
        }));
    }
    let (t0, published, pub_errors, lag, _) = scenarios::publish(&target, &chans, m, rate).await?;
    let (delivered, hist, last, _) =
        scenarios::collect(receivers, stop, Duration::from_secs(10)).await;
    let seconds = (last.saturating_sub(t0)) as f64 / 1e6;
    Ok(Report {
        scenario: "down".into(),
        target: name.into(),
        connections: n,
        sent: published,
        delivered,
        errors: pub_errors,
        seconds,
        rate: delivered as f64 / seconds.max(1e-9),
        note: if rate > 0.0 {
            format!("publisher lag max {} us", lag)
        } else {
            String::new()
        },
        ..Report::default()
    }
    .with_latency(&hist))
}

/// `sse resume`: N times, a resumable stream misses M messages and comes
/// back with `Last-Event-ID`; latency from the reconnect to the last
/// replayed event. Every replayed message must arrive, in order.
pub async fn resume(
    ws: &str,
    redis: &str,
    sources: &Arc<Sources>,
    n: usize,
    m: u64,
) -> anyhow::Result<Report> {
    let target = Target::Reliable {
        ws: ws.to_owned(),
        redis: redis.to_owned(),
        per_call: 1,
    };
    let http = http_of(ws);
    let chans = scenarios::channels("sr", n);
    target.prepare(&chans).await?;
    let mut c = scenarios::redis_conn(redis).await?;
    let mut hist = histogram();
    let (mut delivered, mut errors) = (0u64, 0u64);
    let mut note = String::new();
    let started = Instant::now();
    for ch in &chans {
        let mut conn = SseConn::open(sources, &http, ch, "?reliable=true", None).await?;
        let welcome = conn.next().await?.context("no welcome")?;
        let last_id = welcome.id.context("a welcome without an id")?;
        drop(conn);
        let key = format!("session:{ch}:history");
        for chunk in (0..m).collect::<Vec<_>>().chunks(500) {
            let mut pipe = redis::pipe();
            for &i in chunk {
                pipe.cmd("FCALL")
                    .arg("wsproxy_publish")
                    .arg(1)
                    .arg(&key)
                    .arg(message(now_us(), i))
                    .ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        let t0 = now_us();
        let mut conn = SseConn::open(sources, &http, ch, "?reliable=true", Some(&last_id)).await?;
        let welcome = conn.next().await?.context("no welcome on resume")?;
        if !welcome.data.windows(14).any(|w| w == b"\"resumed\":true") {
            errors += 1;
            if note.is_empty() {
                note = format!("resume refused: {}", String::from_utf8_lossy(&welcome.data));
            }
            continue;
        }
        let mut next = 0u64;
        while next < m {
            let event = tokio::time::timeout(Duration::from_secs(10), conn.next())
                .await
                .context("replay stalled")??
                .context("replay ended early")?;
            match scenarios::seq_of(&event.data) {
                Some(s) if s == next => next += 1,
                other => bail!("replay out of order: expected {next}, got {other:?}"),
            }
        }
        let _ = hist.record(now_us().saturating_sub(t0).max(1));
        delivered += m;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        scenario: "resume".into(),
        target: "wsproxy-sse-reliable".into(),
        connections: n,
        sent: m * n as u64,
        delivered,
        errors,
        seconds,
        rate: delivered as f64 / seconds.max(1e-9),
        note: if note.is_empty() {
            format!("{m} missed messages per resume; latency: reconnect to last replayed")
        } else {
            note
        },
        ..Report::default()
    }
    .with_latency(&hist))
}
