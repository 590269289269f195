//! What the benches that start their own `redis-server` and wsproxy
//! (`chaos`, `storm`) share: a temporary directory, free ports, the
//! redis-server command line, waiting for `/ready`, and the seeds of their
//! random choices.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::sleep;

use crate::soak::Rng;

/// Longest wait for a (re)started process to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// redis-server's persistence for the runs that kill it: every write is
/// in the AOF before Redis answers it, and nothing else is saved.
pub const AOF_ALWAYS: [&str; 6] = [
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--save",
    "",
];

/// The guard of `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A seed from the clock, for a run given none.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Client `i`'s own random numbers, from the run's seed.
pub fn client_rng(seed: u64, i: usize) -> Rng {
    Rng((seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
}

/// A new directory `wsproxy-<bench>-<pid>-<ns>` in the system's temporary
/// directory.
pub fn temp_dir(bench: &str) -> anyhow::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("wsproxy-{bench}-{}-{stamp}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A free loopback port below the kernel's ephemeral range, so that no
/// client's outgoing connection can take it (not even while wsproxy or
/// Redis is down between a kill and its restart).
pub fn free_port(rng: &mut Rng, taken: &[u16]) -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = if ephemeral_low > 11_000 {
        (10_000, ephemeral_low)
    } else {
        (1_024, ephemeral_low.max(1_025))
    };
    for _ in 0..500 {
        let port = low + rng.below(usize::from(high - low)) as u16;
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found in {low}..{high}")
}

/// `redis-server` on 127.0.0.1:`port`, in the foreground, working in `dir`
/// and logging to `redis.log` there, its own output dropped; the caller
/// adds the persistence settings and spawns it.
pub fn redis_server(bin: &Path, port: u16, dir: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The status of `GET path` on 127.0.0.1:port, or None.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    let get = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 12 {
            let n = s.read(&mut buf[got..]).await.ok()?;
            if n == 0 {
                break;
            }
            got += n;
        }
        std::str::from_utf8(&buf[..got])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

/// Waits until the wsproxy on `port` (`what`, in the error) answers
/// `/ready` with 200 (it is 503 until Redis answers and the library is
/// loaded), calling `alive` between tries; how long that took.
pub async fn wait_ready(
    port: u16,
    what: &str,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while http_status(port, "/ready").await != Some(200) {
        alive()?;
        if start.elapsed() > START_TIMEOUT {
            bail!("{what} not ready {START_TIMEOUT:?} after starting");
        }
        sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}
