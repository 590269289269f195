//! What every connection task needs, below the server that creates it:
//! the shared [`App`] state, the [`ConnectionSlot`] a connection holds, the
//! cheap shutdown flag [`Draining`] and the proxy's [`WorkerPool`].
//!
//! The endpoints (`ws`, `bridge`, `pubsub`, `upstream`) depend on this
//! module and never on [`crate::server`], which sits on top: it builds the
//! `App`, runs the listener and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;

/// State shared by every handler and connection task.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The one multiplexed Redis connection for commands (auth, PUBLISH),
    /// to a standalone Redis or a cluster; it reconnects by itself.
    pub redis: RedisConn,
    /// The one shared pub/sub connection.
    pub broker: Broker,
    /// This instance's metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// The same moment, for hot paths: see [`Draining`].
    pub draining: Draining,
    /// Every connection task; shutdown waits for it to empty.
    pub tracker: TaskTracker,
    /// Users allowed to get tokens from `POST /auth/token`.
    pub users: Option<crate::auth::users::Users>,
    /// The event loops proxied tunnels run on (see `server::Workers`).
    pub workers: WorkerPool,
    /// This process's lifecycle tracking (events, presence, heartbeat).
    pub lifecycle: Arc<crate::session::lifecycle::Lifecycle>,
    /// True while the Redis libraries are loaded: `wsproxy_control`, and
    /// `wsproxy` (reliable sessions) when they are on (see
    /// `server::keep_libraries`). A call that finds `wsproxy` missing
    /// clears it, and both are loaded again.
    pub history_loaded: std::sync::atomic::AtomicBool,
    /// The count of pub/sub reconnections (`wsproxy_redis_reconnects_total`)
    /// when the library was last loaded: a reconnection since may be a
    /// Redis that restarted without it (see [`App::history_ready`]).
    pub history_loaded_for: std::sync::atomic::AtomicU64,
    /// The backends' recent disconnects, for admissions under way when one
    /// came (see [`crate::session::control`]).
    pub disconnects: Arc<crate::session::control::Recent>,
    /// The last closed connections, for the status page.
    pub closes: crate::close::Recent,
    /// The sessions whose clients' messages are ahead of their steady rate
    /// (see [`crate::pace`]).
    pub paces: crate::pace::Paces,
}

impl App {
    /// The `wsproxy` library of reliable sessions is in Redis, as far as
    /// this process knows: loaded, and not since a pub/sub reconnection
    /// (after which Redis may have restarted without it, until
    /// `server::keep_history_library` has loaded it again).
    pub fn history_ready(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.history_loaded.load(Ordering::SeqCst)
            && self.history_loaded_for.load(Ordering::SeqCst) == self.metrics.redis_reconnects.get()
    }
}

/// Handles of the worker runtimes (see `server::Workers`), handed out in
/// turn.
#[derive(Debug)]
pub struct WorkerPool {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl WorkerPool {
    /// The runtime the next tunnel goes to.
    pub fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

impl WorkerPool {
    /// A pool over these runtimes (at least one).
    pub fn new(handles: Vec<tokio::runtime::Handle>) -> Self {
        Self {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// Tells long-lived connection tasks that shutdown has begun, cheaply
/// enough to be asked on every poll of a hot path.
///
/// `CancellationToken::is_cancelled` takes the token's lock, and a fresh
/// `cancelled()` future locks twice more (to register and to unregister):
/// three trips through one process-wide lock per message (1-2% of the
/// proxy's profile; on 2 cores no throughput difference was measurable,
/// but the lock is shared by every connection on every core). Here a task
/// registers its waker once and from then on reads an atomic flag; the
/// flag is set before the waiters are woken.
#[derive(Debug, Default)]
pub struct Draining {
    flag: std::sync::atomic::AtomicBool,
    wake: CancellationToken,
}

impl Draining {
    /// Begins the drain: sets the flag, then wakes every registered task.
    pub fn begin(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
        self.wake.cancel();
    }

    /// True once the drain has begun.
    pub fn has_begun(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What a task keeps to be woken: pin it once, then pass it to
    /// [`Draining::poll`] on every poll.
    pub fn waiter(&self) -> DrainWaiter<'_> {
        DrainWaiter {
            wait: self.wake.cancelled(),
            waker: None,
        }
    }

    /// Ready once the drain has begun. Registers `cx`'s waker with the
    /// token only when it differs from the one registered before (a tokio
    /// task's waker never changes, so that is once per task).
    pub fn poll(
        &self,
        waiter: std::pin::Pin<&mut DrainWaiter<'_>>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::future::Future;
        if self.has_begun() {
            return std::task::Poll::Ready(());
        }
        let waiter = waiter.project();
        if waiter
            .waker
            .as_ref()
            .is_none_or(|w| !w.will_wake(cx.waker()))
        {
            *waiter.waker = Some(cx.waker().clone());
            if waiter.wait.poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// A task's registration with [`Draining`].
    #[derive(Debug)]
    pub struct DrainWaiter<'a> {
        #[pin]
        wait: tokio_util::sync::WaitForCancellationFuture<'a>,
        waker: Option<std::task::Waker>,
    }
}

/// Held for as long as a client connection (HTTP or upgraded WebSocket)
/// lives; it carries the connection's `MAX_CONNECTIONS` permit.
#[derive(Debug, Clone)]
pub struct ConnectionSlot {
    /// The client's address.
    pub peer: SocketAddr,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl ConnectionSlot {
    /// A slot for the connection from `peer`, holding `permit`.
    pub fn new(peer: SocketAddr, permit: OwnedSemaphorePermit) -> Self {
        Self {
            peer,
            _permit: Arc::new(permit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn draining_wakes_a_registered_task_once_begun() {
        let draining = Arc::new(Draining::default());
        let d = draining.clone();
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let p = polls.clone();
        let task = tokio::spawn(async move {
            let mut waiter = std::pin::pin!(d.waiter());
            std::future::poll_fn(|cx| {
                p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                d.poll(waiter.as_mut(), cx)
            })
            .await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        assert!(!draining.has_begun());
        assert_eq!(polls.load(std::sync::atomic::Ordering::Relaxed), 1);
        draining.begin();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken")
            .expect("no panic");
        assert!(draining.has_begun());
        // A waiter made after the drain began is ready at once.
        let mut late = std::pin::pin!(draining.waiter());
        let ready =
            std::future::poll_fn(|cx| std::task::Poll::Ready(draining.poll(late.as_mut(), cx)))
                .await;
        assert!(ready.is_ready());
    }
}
