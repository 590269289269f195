//! Sockets for the load generator: WebSocket clients spread over several
//! 127.0.0.x source addresses (one source address gives at most ~28k
//! ephemeral ports towards one server port), the open-file limit, RSS of
//! the process under test, and a tiny keep-alive HTTP client for nchan.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Hands out source addresses 127.0.0.1 .. 127.0.0.`count` round robin.
#[derive(Debug)]
pub struct Sources {
    count: usize,
    next: AtomicUsize,
}

impl Sources {
    pub fn new(count: usize) -> Self {
        Self {
            count: count.clamp(1, 250),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> IpAddr {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.count;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, (i + 1) as u8))
    }

    /// Opens a TCP connection to `server` from the next source address.
    pub async fn tcp(&self, server: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        if self.count > 1 {
            socket.bind(SocketAddr::new(self.pick(), 0))?;
        }
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Small client buffers: the benchmark must not be the memory hog.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Resolves `ws://host:port/...` to the socket address to dial.
pub fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .with_context(|| format!("{url}: only ws:// and http:// URLs are supported"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .with_context(|| format!("{url}: host must be an IP address (e.g. 127.0.0.1)"))
}

/// Connects a WebSocket to `url`, with an optional bearer token.
pub async fn connect(sources: &Sources, url: &str, token: Option<&str>) -> anyhow::Result<Ws> {
    connect_with(sources, url, token, None).await
}

/// [`connect`], offering a subprotocol.
pub async fn connect_with(
    sources: &Sources,
    url: &str,
    token: Option<&str>,
    protocol: Option<&str>,
) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    if let Some(token) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
    }
    if let Some(protocol) = protocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(protocol)?);
    }
    let stream = sources.tcp(addr_of(url)?).await.map_err(|e| {
        if e.raw_os_error() == Some(24) {
            anyhow::anyhow!("out of file descriptors (EMFILE): the open-file limit is reached")
        } else if e.raw_os_error() == Some(99) {
            anyhow::anyhow!("out of ephemeral ports (EADDRNOTAVAIL): use more --sources")
        } else {
            anyhow::Error::from(e)
        }
    })?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
        .await
        .with_context(|| format!("handshake with {url}"))?;
    Ok(ws)
}

/// Raises the soft open-file limit as far as allowed; returns it.
pub fn raise_fd_limit() -> u64 {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, hard)) => {
            if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Fails clearly when `connections` sockets cannot fit under the limit.
pub fn check_fd_budget(connections: usize) -> anyhow::Result<()> {
    let limit = raise_fd_limit();
    // Leave room for Redis connections, stdio, the runtime.
    let usable = limit.saturating_sub(64) as usize;
    if connections > usable {
        bail!(
            "the open-file limit is {limit} per process, so this benchmark can hold at most \
             {usable} connections; {connections} were asked for (the limit, not wsproxy, is what stops here)"
        );
    }
    Ok(())
}

/// CPU time (user + system, every thread) used so far by `pids`, in
/// microseconds, from /proc/PID/stat (clock ticks of 1/100 s).
pub fn cpu_us(pids: &[u32]) -> anyhow::Result<u64> {
    let mut ticks = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name, which may hold spaces: state is
        // the 3rd field of the line, utime the 14th and stime the 15th.
        let rest = stat
            .rsplit_once(") ")
            .map(|(_, r)| r)
            .with_context(|| format!("unexpected /proc/{pid}/stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no field {} in /proc/{pid}/stat", i + 3))
        };
        ticks += field(11)? + field(12)?;
    }
    Ok(ticks * 10_000)
}

/// Memory of `pids` in KiB: the sum of their proportional set size (Pss,
/// from /proc/PID/smaps_rollup), so pages shared between nginx workers
/// are counted once; VmRSS from /proc/PID/status where Pss is unavailable.
/// For a single process like wsproxy the two grow alike.
pub fn rss_kib(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        if let Some(pss) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Pss:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            })
        {
            total += pss;
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kib = vm_rss_from_status(&status)
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
        total += kib;
    }
    Ok(total)
}

/// The `VmRSS` line of a /proc/PID/status text, in KiB.
pub fn vm_rss_from_status(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident set size of `pid` in KiB (VmRSS of /proc/PID/status); None if
/// the process is gone.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    vm_rss_from_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Open file descriptors of `pid` (entries of /proc/PID/fd); None if the
/// process is gone or not ours to look at.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A keep-alive HTTP/1.1 connection used to publish to nchan.
pub struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpConn {
    pub async fn open(base: &str) -> anyhow::Result<Self> {
        let addr = addr_of(base)?;
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends one request and returns status and body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        accept: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("accept", accept)
            .body(Full::new(body))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .context("HTTP request timed out")??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status =
            "Name:\twsproxy\nVmPeak:\t  123456 kB\nVmRSS:\t    9120 kB\nRssAnon:\t    4000 kB\n";
        assert_eq!(vm_rss_from_status(status), Some(9120));
        assert_eq!(
            vm_rss_from_status("Name:\tkthreadd\nState:\tS (sleeping)\n"),
            None
        );
        // This process has a VmRSS and some open descriptors.
        let me = std::process::id();
        assert!(vm_rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(open_fds(me).is_some_and(|n| n >= 3));
    }

    #[test]
    fn urls_resolve_to_socket_addresses() {
        let a = addr_of("ws://127.0.0.1:8090/echo").expect("valid");
        assert_eq!(a.port(), 8090);
        assert_eq!(addr_of("ws://localhost/x").expect("valid").port(), 80);
        assert!(addr_of("wss://127.0.0.1:1/").is_err());
    }
}
