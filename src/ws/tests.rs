//! The driver on a fake socket (two channels) and paused time: the
//! heartbeat, token expiry and slow-consumer rules take no real time.
use super::*;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// A socket whose client side the test holds: `to_server` carries the
/// client's frames, `from_server` what the driver sends. While
/// `stalled`, sends never complete (a client that stopped reading).
struct FakeSocket {
    to_server: mpsc::UnboundedReceiver<Result<Message, axum::Error>>,
    from_server: mpsc::UnboundedSender<Message>,
    stalled: bool,
    /// Flushes of frames written since the last flush.
    flushes: Arc<std::sync::atomic::AtomicUsize>,
    unflushed: usize,
}

impl futures_util::Stream for FakeSocket {
    type Item = Result<Message, axum::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.to_server.poll_recv(cx)
    }
}

impl futures_util::Sink<Message> for FakeSocket {
    type Error = axum::Error;
    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        if self.stalled {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), axum::Error> {
        self.unflushed += 1;
        self.from_server.send(msg).map_err(axum::Error::new)
    }
    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        if self.unflushed > 0 {
            self.unflushed = 0;
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        Poll::Ready(Ok(()))
    }
}

/// Ignores every client frame.
struct Quiet;

impl Handler for Quiet {
    fn on_text(&mut self, _: Utf8Bytes) -> HandlerFuture<'_> {
        Box::pin(std::future::ready(Reply::None))
    }
    fn on_binary(&mut self, _: bytes::Bytes) -> Reply {
        Reply::None
    }
}

/// An App whose Redis is never reached (the broker is stopped at once).
fn app(queue: usize) -> Arc<App> {
    let mut config = crate::config::Config::for_redis("redis://127.0.0.1:1");
    config.outbound_queue = queue;
    let client = redis::Client::open(config.redis_url.as_str()).expect("url");
    let redis = redis::aio::ConnectionManager::new_lazy_with_config(
        client.clone(),
        redis::aio::ConnectionManagerConfig::new(),
    )
    .expect("lazy")
    .into();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    let (broker, _) = crate::broker::Broker::start(client, metrics.clone(), stop);
    Arc::new(App {
        config: Arc::new(config),
        redis,
        broker,
        metrics,
        shutdown: tokio_util::sync::CancellationToken::new(),
        draining: Default::default(),
        tracker: Default::default(),
        users: None,
        workers: crate::context::WorkerPool::new(vec![tokio::runtime::Handle::current()]),
        lifecycle: Arc::new(crate::session::lifecycle::Lifecycle::new(
            &Default::default(),
            crate::keys::Keys::Standalone,
        )),
        history_loaded: Default::default(),
        history_loaded_for: Default::default(),
        disconnects: Arc::new(crate::session::control::Recent::new(Duration::from_secs(1))),
        closes: Default::default(),
        paces: Default::default(),
    })
}

struct Running {
    app: Arc<App>,
    outbox: Arc<Outbox>,
    to_server: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    from_server: mpsc::UnboundedReceiver<Message>,
    done: tokio::task::JoinHandle<()>,
    flushes: Arc<std::sync::atomic::AtomicUsize>,
}

fn start(queue: usize, expires: Option<Duration>, stalled: bool) -> Running {
    let app = app(queue);
    let outbox = Outbox::new(app.config.outbound_queue);
    let (to_server, rx) = mpsc::unbounded_channel();
    let (tx, from_server) = mpsc::unbounded_channel();
    let driver = Driver {
        app: app.clone(),
        outbox: outbox.clone(),
        handler: Quiet,
        expires: expires.map(|d| tokio::time::Instant::now() + d),
        counters: Counters {
            active: Default::default(),
            opened: Default::default(),
            delivered: Default::default(),
        },
        label: Label {
            endpoint: "test",
            session_id: "-".into(),
            agent_id: None,
            user: None,
        },
        task: app.tracker.token(),
        slot: None,
        preamble: Vec::new(),
        tracking: Default::default(),
    };
    let flushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let socket = FakeSocket {
        to_server: rx,
        from_server: tx,
        stalled,
        flushes: flushes.clone(),
        unflushed: 0,
    };
    let done = tokio::spawn(driver.run(socket));
    Running {
        app,
        outbox,
        to_server,
        from_server,
        done,
        flushes,
    }
}

/// Reads what the driver sends until its close frame (answering pings
/// when `pong`); returns the close code.
async fn close_code(r: &mut Running, pong: bool) -> u16 {
    while let Some(msg) = r.from_server.recv().await {
        match msg {
            Message::Ping(p) if pong => {
                let _ = r.to_server.send(Ok(Message::Pong(p)));
            }
            Message::Close(Some(frame)) => {
                let _ = r.to_server.send(Ok(Message::Close(None)));
                return frame.code;
            }
            _ => {}
        }
    }
    panic!("the driver ended without a close frame");
}

fn disconnects(app: &App, reason: &str) -> bool {
    app.metrics.render().contains(&format!(
        "wsproxy_disconnects_total{{reason=\"{reason}\"}} 1"
    ))
}

/// Messages that queued while the task was busy go out with one flush
/// (one write to the socket), in order, each counted.
#[tokio::test(start_paused = true)]
async fn a_burst_goes_out_in_one_flush() {
    let mut r = start(1000, None, false);
    for i in 0..200 {
        assert!(r.outbox.push(Message::Text(format!("m{i}").into())));
    }
    let mut got = Vec::new();
    while got.len() < 200 {
        match r.from_server.recv().await {
            Some(Message::Text(t)) => got.push(t.to_string()),
            Some(_) => {}
            None => panic!("the driver stopped"),
        }
    }
    let expected: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(got, expected);
    // 200 queued: four batches of at most 64, not 200 flushes.
    let flushes = r.flushes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(flushes <= 4, "{flushes} flushes for 200 queued messages");
    // One more, alone: its own flush.
    assert!(r.outbox.push(Message::Text("last".into())));
    assert!(matches!(r.from_server.recv().await, Some(Message::Text(t)) if t == "last"));
    assert_eq!(
        r.flushes.load(std::sync::atomic::Ordering::SeqCst),
        flushes + 1
    );
    r.app.shutdown.cancel();
    let _ = r.done.await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_ping_closes_with_1011_after_interval_plus_timeout() {
    let started = tokio::time::Instant::now();
    let mut r = start(8, None, false);
    assert_eq!(close_code(&mut r, false).await, CLOSE_INTERNAL);
    // Defaults: a ping after 30 s, 10 s to answer it.
    assert_eq!(started.elapsed(), Duration::from_secs(40));
    r.done.await.expect("driver ends");
    assert!(disconnects(&r.app, "heartbeat_timeout"));
}

#[tokio::test(start_paused = true)]
async fn answered_pings_keep_it_open_until_the_token_expires_with_1008() {
    let started = tokio::time::Instant::now();
    let mut r = start(8, Some(Duration::from_secs(95)), false);
    assert_eq!(close_code(&mut r, true).await, CLOSE_POLICY);
    assert_eq!(started.elapsed(), Duration::from_secs(95));
    r.done.await.expect("driver ends");
    assert!(disconnects(&r.app, "token_expired"));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_off_as_slow() {
    let started = tokio::time::Instant::now();
    let r = start(2, None, true);
    // One message is being written (and never completes), two more
    // fill the queue, the fourth overflows it.
    for i in 0..4 {
        r.outbox.push(Message::Text(format!("{i}").into()));
        tokio::task::yield_now().await;
    }
    r.done.await.expect("driver ends");
    assert!(disconnects(&r.app, "slow_consumer"));
    // At once: the overflow, not the write timeout, decided it (the
    // close frame then waits at most CLOSE_REPLY_WAIT).
    assert!(
        started.elapsed() <= CLOSE_REPLY_WAIT,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_stalled_past_the_ping_timeout_is_a_slow_consumer() {
    let started = tokio::time::Instant::now();
    let r = start(8, None, true);
    r.outbox.push(Message::Text("stuck".into()));
    r.done.await.expect("driver ends");
    assert!(disconnects(&r.app, "slow_consumer"));
    // WS_PING_TIMEOUT_SECS (10 s), then at most the close's wait.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_secs(10) + CLOSE_REPLY_WAIT,
        "{took:?}"
    );
}

/// A backend's close order that is still behind queued messages when the
/// server shuts down keeps its code: the messages go out, then the
/// order's close, not 1001 (which a client takes for "come back").
#[tokio::test(start_paused = true)]
async fn a_close_order_pending_at_shutdown_keeps_its_code() {
    let mut r = start(8, None, false);
    // The driver has not run yet: all of this is there at its first look.
    for i in 0..3 {
        assert!(r.outbox.push(Message::Text(format!("m{i}").into())));
    }
    assert!(r.outbox.order_close(crate::broker::CloseOrder {
        code: 4001,
        reason: "revoked".into(),
    }));
    r.app.shutdown.cancel();
    let mut got = Vec::new();
    let code = loop {
        match r.from_server.recv().await {
            Some(Message::Text(t)) => got.push(t.to_string()),
            Some(Message::Close(Some(frame))) => {
                let _ = r.to_server.send(Ok(Message::Close(None)));
                break (frame.code, frame.reason.to_string());
            }
            Some(_) => {}
            None => panic!("the driver ended without a close frame"),
        }
    };
    assert_eq!(got, ["m0", "m1", "m2"]);
    assert_eq!(code, (4001, "revoked".to_owned()));
    let _ = r.done.await;
}
