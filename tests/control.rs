//! Durable control (issue 22, defect 11): a backend's disconnect reaches
//! every process through the `wsproxy:control:log` stream, so neither a
//! burst nor an outage of a process's Redis connections loses one. Against
//! a private redis-server with wsproxy in-process.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "control-token";
const APPLIED: &str = "wsproxy_control_messages_total{reason=\"applied\"}";
const MISSED: &str = "wsproxy_control_messages_total{reason=\"missed\"}";

/// The documented way a backend sends a control command.
fn send(cmd: &mut redis::Pipeline, json: &str) {
    cmd.cmd("FCALL")
        .arg("wsproxy_control")
        .arg(1)
        .arg("wsproxy:control:log")
        .arg(json)
        .ignore();
}

fn disconnect(session: &str) -> String {
    format!(r#"{{"type":"disconnect","session_id":"{session}","code":4001,"reason":"revoked"}}"#)
}

/// Sends disconnects for a session nobody holds until the process has
/// applied one (it reads the stream from where it was when it first
/// reached Redis); the count applied so far.
async fn wait_control_ready(server: &Server, redis: &Redis) -> f64 {
    let mut c = redis.conn().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let mut p = redis::pipe();
        send(&mut p, &disconnect("warm-up"));
        // Before the library is loaded the call fails: try again.
        let _: redis::RedisResult<()> = p.query_async(&mut c).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let applied = server.metric(APPLIED).await;
        if applied >= 1.0 {
            return applied;
        }
        assert!(Instant::now() < deadline, "control never applied anything");
    }
}

/// The close code the server sent, and when it came.
async fn close_code_at(ws: &mut Ws, limit: Duration) -> (u16, Instant) {
    loop {
        match tokio::time::timeout(limit, ws.next())
            .await
            .expect("a close frame in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (f.code.into(), Instant::now()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket error before the close frame: {e}"),
        }
    }
}

/// How many disconnects [`every_disconnect_of_a_burst_is_applied`] sends:
/// 20,000 by default, or `WSPROXY_CONTROL_BURST` (a multiple of 10, e.g.
/// 100000, what the stream keeps, as `.ci/run` runs it in a step of its
/// own).
fn burst_size() -> usize {
    let burst = match std::env::var("WSPROXY_CONTROL_BURST") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("WSPROXY_CONTROL_BURST={v:?} is not a count")),
        Err(_) => 20_000,
    };
    assert!(
        burst >= 10 && burst % 10 == 0,
        "WSPROXY_CONTROL_BURST={burst}: a multiple of 10 (ten evenly spaced ones are for live sessions)"
    );
    burst
}

/// A burst of disconnects in one pipeline (20,000, or
/// `WSPROXY_CONTROL_BURST`: `.ci/run` sends 100,000), ten
/// of them for sessions with a live connection, reaching the process at
/// once: every one is applied (the pub/sub path alone dropped about half
/// of 20,000 as `overflow`), and the ten connections are closed with the
/// backend's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_disconnect_of_a_burst_is_applied() {
    let burst = burst_size();
    // Logging as the binary does (a line per disconnect, INFO, written
    // out): what a busy process pays.
    let null: &'static std::fs::File = Box::leak(Box::new(
        std::fs::File::create("/dev/null").expect("/dev/null"),
    ));
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || null)
            .finish(),
    );
    let redis = Redis::start().await;
    let proxy = Cuttable::start(redis.port).await;
    let server = Server::start(&proxy.url).await;
    let before = wait_control_ready(&server, &redis).await;
    let live: Vec<String> = (0..10).map(|i| unique(&format!("live{i}"))).collect();
    let mut sockets = Vec::new();
    for s in &live {
        redis.set_token(s, TOKEN, 60).await;
        sockets.push(server.connect(s, TOKEN).await);
    }
    let mut p = redis::pipe();
    for i in 0..burst {
        let session = if i % (burst / live.len()) == 0 {
            live[i / (burst / live.len())].clone()
        } else {
            format!("gone-{i}")
        };
        send(&mut p, &disconnect(&session));
    }
    let started = Instant::now();
    let mut c = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(60))),
        )
        .await
        .expect("connect");
    // The burst reaches the process at once, as if it had been busy.
    proxy.hold(true);
    let _: () = p.query_async(&mut c).await.expect("the burst");
    let sent = started.elapsed();
    proxy.hold(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = server.metric(APPLIED).await - before;
        if applied >= burst as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{applied} of {burst} applied; overflow {}",
            server
                .metric("wsproxy_control_messages_total{reason=\"overflow\"}")
                .await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{burst} disconnects sent in {sent:?}, all applied {:?} after the first was sent",
        started.elapsed()
    );
    assert_eq!(server.metric(APPLIED).await - before, burst as f64);
    assert_eq!(server.metric(MISSED).await, 0.0);
    for ws in &mut sockets {
        assert_eq!(close_code_at(ws, WAIT).await.0, 4001);
    }
    server.stop().await;
}

/// A TCP proxy in front of Redis that can cut every connection through it
/// and refuse new ones (`cut`), then let them through again (`restore`):
/// a process's outage while backends still reach Redis. It can also hold
/// back what Redis sends (`hold`), so that a burst reaches the process at
/// once, as it does a process that was busy.
struct Cuttable {
    url: String,
    down: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Cuttable {
    async fn start(redis_port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let hold = Arc::new(tokio::sync::watch::Sender::new(false));
        let (d, k, h) = (down.clone(), cut.clone(), hold.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let token = k.lock().expect("lock").clone();
                let mut held = h.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        return;
                    };
                    let (mut client_rd, mut client_wr) = client.split();
                    let (mut server_rd, mut server_wr) = server.split();
                    let up = tokio::io::copy(&mut client_rd, &mut server_wr);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            // Held: Redis keeps what it sends meanwhile.
                            if held.wait_for(|h| !*h).await.is_err() {
                                return;
                            }
                            match server_rd.read(&mut buf).await {
                                Ok(n @ 1..) => {
                                    if client_wr.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                _ => return,
                            }
                        }
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self {
            url: format!("redis://{addr}"),
            down,
            cut,
            hold,
        }
    }

    /// Holds back (true) or lets through (false) what Redis sends.
    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }

    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut token = self.cut.lock().expect("lock");
        token.cancel();
        *token = CancellationToken::new();
    }

    fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A disconnect published while the process's Redis connections are cut
/// for 10 s is applied within a second of the process reconnecting (the
/// pub/sub path alone never delivered it).
#[tokio::test]
async fn a_disconnect_published_during_a_10s_outage_is_applied_after_it() {
    let redis = Redis::start().await;
    let proxy = Cuttable::start(redis.port).await;
    let server = Server::start(&proxy.url).await;
    wait_control_ready(&server, &redis).await;
    let session = unique("outage");
    redis.set_token(&session, TOKEN, 60).await;
    let mut ws = server.connect(&session, TOKEN).await;
    let reconnects = "wsproxy_redis_reconnects_total";
    let before = server.metric(reconnects).await;

    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut c = redis.conn().await;
    let mut p = redis::pipe();
    send(&mut p, &disconnect(&session));
    let _: () = p.query_async(&mut c).await.expect("published");
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Still open: nothing could reach the process.
    assert_silent(&mut ws, Duration::from_millis(10)).await;
    proxy.restore();
    let restored = Instant::now();

    let closed = tokio::spawn(async move { close_code_at(&mut ws, Duration::from_secs(30)).await });
    // When the process is back on Redis (its pub/sub connection counts it).
    let back = loop {
        if server.metric(reconnects).await > before {
            break Instant::now();
        }
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (code, at) = closed.await.expect("close task");
    assert_eq!(code, 4001);
    let after = at.saturating_duration_since(back);
    println!(
        "reconnected {:?} after the restore; closed {:?} after the restore",
        back - restored,
        at - restored
    );
    assert!(
        after <= Duration::from_secs(1),
        "closed {after:?} after reconnecting"
    );
    server.stop().await;
}

/// The old form, a command published on `wsproxy:control`, is still
/// applied (live only, best effort) and counted apart (`legacy`), so that
/// operators see who has not moved yet; `FCALL wsproxy_control` appends
/// to the stream and wakes the processes up with the entry's id, which
/// is no command.
#[tokio::test]
async fn the_old_publish_still_works_and_is_counted_as_legacy() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    let session = unique("old");
    redis.set_token(&session, TOKEN, 60).await;
    let mut ws = server.connect(&session, TOKEN).await;
    server.wait_metric("wsproxy_broker_channels", 2.0).await;
    let mut wake = redis.subscribe("wsproxy:control").await;
    redis
        .publish("wsproxy:control", &disconnect(&session))
        .await;
    assert_eq!(close_code_at(&mut ws, WAIT).await.0, 4001);
    server
        .wait_metric("wsproxy_control_messages_total{reason=\"legacy\"}", 1.0)
        .await;
    assert_eq!(server.metric(APPLIED).await, 0.0);

    let mut c = redis.conn().await;
    let id: String = redis::cmd("FCALL")
        .arg("wsproxy_control")
        .arg(1)
        .arg("wsproxy:control:log")
        .arg(disconnect("nobody"))
        .query_async(&mut c)
        .await
        .expect("FCALL");
    server.wait_metric(APPLIED, 1.0).await;
    let mut messages = wake.on_message();
    // The old command, then the wake-up.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("in time")
            .expect("a message");
        seen.push(m.get_payload::<String>().expect("text"));
    }
    assert_eq!(seen, [disconnect(&session), id]);
    assert_eq!(
        server
            .metric("wsproxy_control_messages_total{reason=\"malformed\"}")
            .await,
        0.0
    );
    server.stop().await;
}

/// A process cut off while more commands than the stream keeps were
/// appended cannot apply the ones trimmed away: it says so (`missed`),
/// and applies what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_fell_behind_the_trimming_counts_it_as_missed() {
    let redis = Redis::start().await;
    let proxy = Cuttable::start(redis.port).await;
    let server = Server::start(&proxy.url).await;
    let before = wait_control_ready(&server, &redis).await;
    proxy.cut();
    // More than the stream keeps (`MAXLEN ~ 100000` trims whole nodes of
    // 100 entries): the first ones are gone.
    let mut p = redis::pipe();
    for i in 0..100_500 {
        send(&mut p, &disconnect(&format!("gone-{i}")));
    }
    let mut c = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(60))),
        )
        .await
        .expect("connect");
    let _: () = p.query_async(&mut c).await.expect("the burst");
    proxy.restore();
    server.wait_metric(MISSED, 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let kept: u64 = redis::cmd("XLEN")
        .arg("wsproxy:control:log")
        .query_async(&mut c)
        .await
        .expect("XLEN");
    while server.metric(APPLIED).await - before < kept as f64 {
        assert!(Instant::now() < deadline, "the rest was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.metric(APPLIED).await - before, kept as f64);
    server.stop().await;
}

/// `FCALL wsproxy_control` with one command: its entry's id.
async fn fcall(redis: &Redis, json: &str) -> String {
    redis::cmd("FCALL")
        .arg("wsproxy_control")
        .arg(1)
        .arg("wsproxy:control:log")
        .arg(json)
        .query_async(&mut redis.conn().await)
        .await
        .expect("FCALL wsproxy_control")
}

fn disconnect_with(session: &str, code: u16) -> String {
    format!(r#"{{"type":"disconnect","session_id":"{session}","code":{code}}}"#)
}

fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("an entry id");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

/// Asserts that no close frame (nor the end of the socket) comes within
/// `quiet`.
async fn assert_open(ws: &mut Ws, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(next) = tokio::time::timeout_at(deadline, ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the connection was to stay open, got {other:?}"),
        }
    }
}

/// After a Redis failover to a replica that had not got the tail of the
/// control stream (or a restore from an older snapshot), the stream's last
/// id is behind the position the process had read. It goes on from the
/// newest entry it recognises as one it applied: the old commands are not
/// applied again (a disconnect of s1 read before would close s1's new
/// connection with the old code; the whole log was read again from
/// `0-0`), while an entry the stream got since, with an id below the
/// position, is applied, and so is a command appended afterwards.
#[tokio::test]
async fn a_control_stream_that_lost_its_tail_is_not_applied_again() {
    let redis = Redis::start().await;
    let server = Server::start(&redis.url()).await;
    wait_control_ready(&server, &redis).await;
    let (s1, s3) = (unique("s1"), unique("s3"));
    redis.set_token(&s1, TOKEN, 60).await;
    redis.set_token(&s3, TOKEN, 60).await;
    let mut old = server.connect(&s1, TOKEN).await;
    server.wait_metric("wsproxy_broker_channels", 2.0).await;
    let e1 = fcall(&redis, &disconnect_with(&s1, 4001)).await;
    assert_eq!(close_code_at(&mut old, WAIT).await.0, 4001);
    // A later command, in a later millisecond: the tail the failover loses.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let e2 = fcall(&redis, &disconnect_with(&unique("gone"), 4002)).await;
    let (e1_at, e2_at) = (stream_id(&e1), stream_id(&e2));
    assert!(e2_at.0 > e1_at.0, "{e1} {e2}");
    let before = loop {
        let applied = server.metric(APPLIED).await;
        let mut c = redis.conn().await;
        let len: u64 = redis::cmd("XLEN")
            .arg("wsproxy:control:log")
            .query_async(&mut c)
            .await
            .expect("XLEN");
        if applied >= len as f64 {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut new = server.connect(&s1, TOKEN).await;
    let mut other = server.connect(&s3, TOKEN).await;
    server.wait_metric("wsproxy_broker_channels", 3.0).await;

    // The stream as the new master has it: everything up to e1, then an
    // entry written there after the failover, with an id between e1 and
    // e2 (its clock a little behind the old master's).
    let mut c = redis.conn().await;
    let kept: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("wsproxy:control:log")
        .arg("-")
        .arg(&e1)
        .query_async(&mut c)
        .await
        .expect("XRANGE");
    let mut p = redis::pipe();
    p.atomic().cmd("DEL").arg("wsproxy:control:log").ignore();
    for (id, fields) in &kept {
        let cmd = p.cmd("XADD").arg("wsproxy:control:log").arg(id);
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd.ignore();
    }
    p.cmd("XADD")
        .arg("wsproxy:control:log")
        .arg(format!("{}-{}", e1_at.0, e1_at.1 + 1))
        .arg("c")
        .arg(disconnect_with(&s3, 4003))
        .ignore();
    let _: () = p.query_async(&mut c).await.expect("the stream replaced");
    // The control subscription reconnects, and the process reads the
    // stream again.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 1, "no pub/sub connection to kill");

    // The entry the stream got since is applied...
    assert_eq!(close_code_at(&mut other, WAIT).await.0, 4003);
    // ... and nothing it had applied before.
    assert_open(&mut new, Duration::from_millis(500)).await;
    assert_eq!(server.metric(APPLIED).await, before + 1.0);
    // What comes next is applied as ever.
    fcall(&redis, &disconnect_with(&s1, 4004)).await;
    assert_eq!(close_code_at(&mut new, WAIT).await.0, 4004);
    assert_eq!(server.metric(APPLIED).await, before + 2.0);
    server.stop().await;
}

/// A command appended while the process was starting (from a second
/// before it started on, the start of its first read) is applied by that
/// first read. It was not: the first read only took the position, and the
/// command waited for the next wake-up or the minute's safety read, which
/// could then close a connection the session had opened since with it.
#[tokio::test]
async fn a_command_sent_while_the_process_starts_is_applied_at_once() {
    let redis = Redis::start().await;
    let (s1, s2) = (unique("s1"), unique("s2"));
    redis.set_token(&s1, TOKEN, 60).await;
    redis.set_token(&s2, TOKEN, 60).await;
    // Before the process has loaded its library: a plain XADD, as the
    // function would append it (with no process to wake up).
    let _: String = redis::cmd("XADD")
        .arg("wsproxy:control:log")
        .arg("*")
        .arg("c")
        .arg(disconnect_with(&s1, 4001))
        .query_async(&mut redis.conn().await)
        .await
        .expect("XADD");
    let server = Server::start(&redis.url()).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.metric(APPLIED).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the command sent during start-up was not applied within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A connection of s1 opened since is not closed by it later, and a
    // command sent now is applied at once.
    let mut ws1 = server.connect(&s1, TOKEN).await;
    let mut ws2 = server.connect(&s2, TOKEN).await;
    server.wait_metric("wsproxy_broker_channels", 3.0).await;
    let sent = Instant::now();
    fcall(&redis, &disconnect_with(&s2, 4002)).await;
    let (code, at) = close_code_at(&mut ws2, Duration::from_secs(2)).await;
    assert_eq!(code, 4002);
    assert!(at - sent < Duration::from_secs(2), "{:?}", at - sent);
    assert_open(&mut ws1, Duration::from_millis(300)).await;
    assert_eq!(server.metric(APPLIED).await, 2.0);
    server.stop().await;
}
