//! The server: listener, TLS, signals and shutdown (the routes are in
//! [`crate::http`]).
//!
//! [`run`] is the whole of wsproxy as a library call: it takes an already
//! bound listener and a shutdown token, so tests bind `127.0.0.1:0` and run
//! any number of instances in one process.
//!
//! Lifecycle, in the order things happen:
//! - The `Listener` (`server/listener.rs`) accepts TCP connections, at most
//!   `MAX_CONNECTIONS` at once (a semaphore permit per connection, held by
//!   upgraded WebSockets too), and serves each with hyper's HTTP/1 server.
//!   A request header that takes longer than `AUTH_TIMEOUT_SECS` to arrive
//!   is dropped (slowloris).
//! - On shutdown the listener stops accepting, `/ready` answers 503, idle
//!   HTTP connections are closed, and every WebSocket task sees the token,
//!   flushes its queue and closes with 1001.
//! - [`run`] waits for all of them (a [`TaskTracker`]: axum's own graceful
//!   shutdown does not wait for upgraded WebSockets) at most
//!   `SHUTDOWN_GRACE_PERIOD_SECS`, then stops the broker and returns.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod connection;
pub mod event_stream;
mod listener;

use crate::auth::users::Users;
use crate::broker::Broker;
use crate::config::Config;
pub use crate::context::{App, ConnectionSlot, Draining, WorkerPool};
use crate::metrics::Metrics;
pub use crate::net::{LISTEN_BACKLOG, bind, tune_socket};
use crate::redis_conn::RedisConn;

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The Redis URL was refused by the client library.
    #[error("REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
    /// A TLS file for Redis (`REDIS_CA_FILE`, the client certificate or
    /// key) could not be used.
    #[error(transparent)]
    RedisTls(#[from] crate::redis_tls::RedisTlsError),
    /// The Redis Cluster's seed nodes were refused by the client library,
    /// or its settings cannot be served.
    #[error("REDIS_CLUSTER_NODES: {0}")]
    Cluster(String),
    /// The users file could not be loaded.
    #[error(transparent)]
    Users(#[from] crate::auth::users::UsersError),
    /// The routes or CA file could not be loaded.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS_CERT_FILE/TLS_KEY_FILE: {0}")]
    Tls(#[from] TlsError),
    /// A worker thread could not be started.
    #[error("WORKERS: cannot start a worker thread: {0}")]
    Workers(std::io::Error),
}

/// Why the listener's TLS certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The certificate or key file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(std::path::PathBuf),
    /// rustls refused the certificate and key (e.g. they do not match).
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The proxy's worker threads: each runs a current-thread tokio runtime,
/// one event loop with its own epoll and timers, as each of nginx's worker
/// processes is. Once a proxied connection's handshakes are done (on the
/// main runtime, with everything else), its plain-TCP tunnel moves to the
/// next worker in turn, sockets and all: from then on a message through the
/// proxy is read, checked and written on one thread, with no work stealing
/// and nothing woken on another thread. Session and pub/sub connections stay
/// on the main runtime, beside the broker that feeds them.
#[derive(Debug)]
struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` (at least one) worker threads. Each builds its runtime
    /// itself and sends back a handle, so that a runtime is only ever
    /// dropped on its own thread (tokio refuses to drop one inside another's
    /// async context, which a failed thread spawn would otherwise do).
    fn start(n: usize) -> Result<(Self, WorkerPool), ServerError> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            threads: Vec::with_capacity(n),
            stop: stop.clone(),
        };
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("wsproxy-worker-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            let _ = tx.send(Ok(runtime.handle().clone()));
                            runtime.block_on(stop.cancelled());
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })
                .map_err(ServerError::Workers)?;
            workers.threads.push(thread);
            match rx.recv() {
                Ok(Ok(handle)) => handles.push(handle),
                Ok(Err(e)) => return Err(ServerError::Workers(e)),
                Err(_) => {
                    return Err(ServerError::Workers(std::io::Error::other(
                        "the worker thread ended before its runtime started",
                    )));
                }
            }
        }
        let pool = WorkerPool::new(handles);
        Ok((workers, pool))
    }

    /// Stops the event loops (dropping whatever they still run) and waits
    /// for their threads.
    async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// `run` failed or was dropped half-way: the threads end too.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One WARN line naming the users of `USERS_FILE` without a session list
/// (the first few of them), who may get a token for any session.
fn warn_unrestricted_users(users: &Users) {
    const SHOWN: usize = 10;
    let open = users.unrestricted();
    if open.is_empty() {
        return;
    }
    let mut names = open
        .iter()
        .take(SHOWN)
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if open.len() > SHOWN {
        names.push_str(&format!(" and {} more", open.len() - SHOWN));
    }
    tracing::warn!(
        users = open.len(),
        "USERS_FILE: {} user(s) without a session list may get a token for any session, and so read and write any user's topics: {names} (give each line a third field of the sessions it may join, as in name:<hash>:session-name,team-7-*, or :* to allow any explicitly)",
        open.len()
    );
}

/// Runs wsproxy on `listener` until `shutdown` is cancelled, then drains
/// connections (at most the configured grace period) and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let config = Arc::new(config);
    let users = match &config.users_file {
        Some(path) => Some(Users::load(path)?),
        None => None,
    };
    let upstream = match &config.routes_file {
        Some(path) => Some(Arc::new(crate::upstream::Upstream::load(
            path,
            config.upstream_ca_file.as_deref(),
        )?)),
        None => None,
    };
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let (redis, pubsub) = redis_connections(&config)?;
    let metrics = Arc::new(Metrics::new());
    // The broker outlives the connections: draining sessions still flush
    // what it delivered, so it has its own token, cancelled last.
    let broker_stop = CancellationToken::new();
    // Before the broker: a failure here must not leave it running.
    let (workers, worker_pool) = Workers::start(config.workers)?;
    let (broker, broker_task) = match pubsub {
        PubSub::Sharded(nodes, tls) => {
            Broker::start_sharded(nodes, tls, metrics.clone(), broker_stop.clone())
        }
        PubSub::Servers(clients) => {
            Broker::start_any(clients, metrics.clone(), broker_stop.clone())
        }
    };
    let app = Arc::new(App {
        config: config.clone(),
        redis,
        broker,
        metrics,
        shutdown: shutdown.clone(),
        draining: Draining::default(),
        tracker: TaskTracker::new(),
        users,
        workers: worker_pool,
        lifecycle: Arc::new(crate::session::lifecycle::Lifecycle::new(
            &config.lifecycle,
            config.keys(),
        )),
        history_loaded: std::sync::atomic::AtomicBool::new(false),
        history_loaded_for: std::sync::atomic::AtomicU64::new(0),
        // Kept twice as long as an admission may take (AUTH_TIMEOUT_SECS
        // bounds its Redis steps).
        disconnects: Arc::new(crate::session::control::Recent::new(
            config.auth_timeout * 2,
        )),
        closes: Default::default(),
        paces: Default::default(),
    });
    tokio::spawn(crate::session::control::listen(
        app.broker.clone(),
        app.redis.clone(),
        config.keys(),
        app.disconnects.clone(),
        app.metrics.clone(),
        config.auth_timeout,
        broker_stop.clone(),
    ));
    if app.lifecycle.enabled() {
        tracing::info!(
            process = app.lifecycle.process(),
            events = config.lifecycle.events,
            presence = config.lifecycle.presence,
            "lifecycle tracking on"
        );
        tokio::spawn(crate::session::lifecycle::keep_alive(
            app.lifecycle.clone(),
            app.redis.clone(),
            app.broker.clone(),
            app.metrics.clone(),
            config.auth_timeout,
            // Beats until the drain is over: connections that close during
            // it send their own disconnect events.
            broker_stop.clone(),
        ));
    }
    tokio::spawn(keep_libraries(app.clone()));
    if let Some(upstream) = &upstream {
        upstream.start(&app);
        tracing::info!(
            routes = upstream.route_count(),
            "reverse proxy routes loaded"
        );
    }
    reload_on_sighup(app.clone(), upstream.clone());
    if let Some(users) = &app.users {
        warn_unrestricted_users(users);
    }
    if config.users_file.is_some() && config.jwt.is_none() {
        tracing::warn!(
            "USERS_FILE is set but JWT_SECRET is not: POST /auth/token answers 503 until JWT_SECRET is set"
        );
    }
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, tls = tls.is_some(), "wsproxy listening"),
        Err(_) => tracing::info!(tls = tls.is_some(), "wsproxy listening"),
    }

    let accept = listener::Listener {
        listener,
        router: crate::http::router(crate::http::Gateway {
            app: app.clone(),
            upstream: upstream.clone(),
        }),
        limit: Arc::new(Semaphore::new(config.max_connections)),
        app: app.clone(),
        tls,
    };
    accept.run().await;

    // Shutdown: no new connections; tell the open ones, and wait for them
    // to finish.
    app.draining.begin();
    app.tracker.close();
    let open = app.metrics.connections_active.get();
    tracing::info!(open_websockets = open, grace = ?config.shutdown_grace_period, "shutting down");
    if tokio::time::timeout(config.shutdown_grace_period, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = app.tracker.len(),
            "grace period over; dropping the connections still open"
        );
    }
    // What is still open past the grace period ends with its worker.
    workers.stop().await;
    if let Some(upstream) = &upstream {
        upstream.stop();
    }
    broker_stop.cancel();
    let _ = broker_task.await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Where the broker subscribes (see [`redis_connections`]).
enum PubSub {
    /// Servers that each deliver every message: one Redis, or a cluster's
    /// seeds with classic pub/sub.
    Servers(Vec<redis::Client>),
    /// A cluster with sharded pub/sub: its seeds, and the certificates for
    /// `rediss://` ones.
    Sharded(Vec<String>, Option<redis::TlsCertificates>),
}

/// The process's command connection, and where the broker subscribes,
/// for a standalone Redis or a cluster.
fn redis_connections(config: &Config) -> Result<(RedisConn, PubSub), ServerError> {
    // On a TLS cluster, `cluster_tls` is the certificates read once here,
    // for the broker's sharded connection as well.
    let (redis, pubsub_clients, cluster_tls) = match &config.redis_cluster {
        None => {
            let client = redis_client(config)?;
            let redis = RedisConn::from(ConnectionManager::new_lazy_with_config(
                client.clone(),
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2)),
            )?);
            (redis, vec![client], None)
        }
        Some(cluster) => {
            let c = cluster_connections(cluster, &config.redis_tls)?;
            (c.redis, c.seeds, c.tls)
        }
    };
    let pubsub = match &config.redis_cluster {
        Some(cluster) if cluster.pubsub == crate::config::ClusterPubSub::Sharded => {
            PubSub::Sharded(cluster.nodes.clone(), cluster_tls)
        }
        _ => PubSub::Servers(pubsub_clients),
    };
    Ok((redis, pubsub))
}

/// The Redis client every connection is made from (the command
/// connection and the broker's pub/sub one), for `config.redis_url`.
///
/// Its TCP connections have Nagle's algorithm off. The redis crate leaves
/// it on by default, and with it every small command (a PUBLISH, a
/// SUBSCRIBE) that follows one still unacknowledged can wait for the
/// peer's delayed ACK: 40 ms stalls under load.
///
/// A `rediss://` URL gets TLS with the certificates of
/// `config.redis_tls`, read now (see [`crate::redis_tls`]).
pub fn redis_client(config: &Config) -> Result<redis::Client, ServerError> {
    use redis::IntoConnectionInfo;
    let info = config.redis_url.as_str().into_connection_info()?;
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let info = info.set_tcp_settings(tcp);
    Ok(match info.addr() {
        redis::ConnectionAddr::TcpTls { .. } => {
            redis::Client::build_with_tls(info, crate::redis_tls::certificates(&config.redis_tls)?)?
        }
        _ => redis::Client::open(info)?,
    })
}

/// A client for one of a cluster's seed nodes, with Nagle's algorithm off
/// like [`redis_client`]'s, and TLS with `tls` for a `rediss://` seed
/// (all seeds use the same scheme, checked at start-up).
fn seed_client(
    url: &str,
    tls: Option<&redis::TlsCertificates>,
) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let info = url.into_connection_info()?.set_tcp_settings(tcp);
    match (info.addr(), tls) {
        (redis::ConnectionAddr::TcpTls { .. }, Some(tls)) => {
            redis::Client::build_with_tls(info, tls.clone())
        }
        _ => redis::Client::open(info),
    }
}

/// What [`cluster_connections`] makes of a Redis Cluster's settings.
struct ClusterConnections {
    /// The command connection.
    redis: RedisConn,
    /// Clients for the seeds, where the broker's classic pub/sub connection
    /// goes.
    seeds: Vec<redis::Client>,
    /// For `rediss://` seeds: the certificates every connection uses.
    tls: Option<redis::TlsCertificates>,
}

/// A Redis Cluster's command connection (one multiplexed connection per
/// master, made when first needed: a cluster that is down at start-up
/// makes `/ready` false, not the start fail), the seeds the broker's classic
/// pub/sub connection goes to, and, when the seeds are `rediss://`, the
/// certificates of `tls` that every connection uses (read now, once: a bad
/// file stops start-up; see [`crate::redis_tls`]).
fn cluster_connections(
    cluster: &crate::config::ClusterConfig,
    tls: &crate::config::RedisTlsConfig,
) -> Result<ClusterConnections, ServerError> {
    use redis::IntoConnectionInfo;
    let refused = |e: redis::RedisError| ServerError::Cluster(e.to_string());
    // The seeds share one scheme (checked at start-up): the first tells.
    let uses_tls = match cluster.nodes.first() {
        Some(seed) => matches!(
            seed.as_str()
                .into_connection_info()
                .map_err(refused)?
                .addr(),
            redis::ConnectionAddr::TcpTls { .. }
        ),
        None => false,
    };
    let certificates = if uses_tls {
        Some(crate::redis_tls::certificates(tls)?)
    } else {
        None
    };
    let redis = RedisConn::from(crate::redis_conn::ClusterConn::new(
        &cluster.nodes,
        certificates.clone(),
    ));
    let seeds = cluster
        .nodes
        .iter()
        .map(|n| seed_client(n, certificates.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(refused)?;
    Ok(ClusterConnections {
        redis,
        seeds,
        tls: certificates,
    })
}

/// Loads the Redis libraries at start-up, and again after each
/// reconnection of the pub/sub connection (a Redis that restarted without
/// persistence has forgotten them, and backends' `FCALL`s would fail until
/// they are back): `wsproxy_control` always (backends' control commands),
/// and `wsproxy` with reliable sessions; both again when a call found
/// `wsproxy` missing (`FUNCTION FLUSH`). `/ready` is 503 until they are
/// loaded.
async fn keep_libraries(app: Arc<App>) {
    use std::sync::atomic::Ordering;
    let mut loaded_at: Option<u64> = None;
    let mut redis = app.redis.clone();
    let scripts_conn = app.redis.clone();
    let reliable = app.config.reliable.enabled;
    loop {
        let reconnects = app.metrics.redis_reconnects.get();
        // Again after the pub/sub connection came back (Redis may have
        // restarted without it), or when a call found it missing.
        let missing = loaded_at.is_some() && !app.history_loaded.load(Ordering::SeqCst);
        if loaded_at != Some(reconnects) || missing {
            app.history_loaded.store(false, Ordering::SeqCst);
            let limit = app.config.auth_timeout;
            let libraries = async {
                let control =
                    crate::session::control::install(&mut redis, app.config.keys(), limit).await;
                let history = if reliable {
                    crate::session::history::install(
                        &mut redis,
                        &app.config.reliable,
                        app.config.keys(),
                        limit,
                    )
                    .await
                    .map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                (control, history)
            };
            // The scripts connects call, in the script cache beside the
            // libraries: in place once /ready says 200, and no later than
            // the libraries unless Redis is slow (then `limit` at most). A
            // warm-up only: each call loads its script when Redis lacks it.
            let ((control, history), scripts) =
                tokio::join!(libraries, load_scripts(&app, &scripts_conn, limit));
            if let (Ok(()), Err(e)) = (&control, scripts) {
                tracing::warn!(error = %e, "cannot load the token and lifecycle scripts ahead of connects; each connect loads what it lacks");
            }
            match (control, history) {
                (Ok(()), Ok(())) => {
                    loaded_at = Some(reconnects);
                    app.history_loaded_for.store(reconnects, Ordering::SeqCst);
                    app.history_loaded.store(true, Ordering::SeqCst);
                    tracing::info!(reliable, "the wsproxy Redis libraries are loaded");
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "cannot load the wsproxy_control Redis library; retrying")
                }
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "reliable sessions: cannot load the wsproxy Redis library; retrying")
                }
            }
        }
        // /ready is 503 from a reconnection until the library is loaded
        // again (App::history_ready), so a short pause keeps that short.
        let pause = if loaded_at.is_some() {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Loads the scripts every connect calls (the token check's; with
/// lifecycle tracking, its own too) into Redis's script cache, on a
/// cluster into every master's, within `limit`.
async fn load_scripts(app: &App, redis: &RedisConn, limit: Duration) -> Result<(), String> {
    let mut token_conn = redis.clone();
    let both = async {
        let (token, lifecycle) = tokio::join!(
            crate::auth::load_token_script(&mut token_conn),
            app.lifecycle.load_scripts(redis),
        );
        token.map_err(|e| e.to_string())?;
        lifecycle.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(limit, both).await {
        Ok(loaded) => loaded,
        Err(_) => Err("Redis did not answer in time".to_owned()),
    }
}

/// Reloads the routes file on every SIGHUP; a bad file is refused and
/// the routes in use stay. Without `ROUTES_FILE` a SIGHUP is only logged.
///
/// The listener is installed here, before the caller logs `wsproxy
/// listening`, not in the task: a SIGHUP that arrived before the task first
/// ran met the default action, which ends the process.
fn reload_on_sighup(app: Arc<App>, upstream: Option<Arc<crate::upstream::Upstream>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; routes will not be reloaded");
            return;
        };
        tokio::spawn(reload_loop(app, upstream, hup));
    }
    #[cfg(not(unix))]
    let _ = (app, upstream);
}

/// Reloads the routes on each SIGHUP until shutdown.
#[cfg(unix)]
async fn reload_loop(
    app: Arc<App>,
    upstream: Option<Arc<crate::upstream::Upstream>>,
    mut hup: tokio::signal::unix::Signal,
) {
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let Some(upstream) = &upstream else {
            tracing::info!("SIGHUP received; no ROUTES_FILE is set, so there is nothing to reload");
            continue;
        };
        match upstream.reload(&app) {
            Ok(n) => tracing::info!(routes = n, "routes reloaded"),
            Err(e) => tracing::error!("routes not reloaded, keeping the old ones: {e}"),
        }
    }
}

/// Builds the TLS acceptor from PEM files.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| TlsError::Pem { path, source }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(pem(cert))?
        .collect::<Result<_, _>>()
        .map_err(pem(cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()).into());
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::from)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(TlsError::from)?;
    let mut config = config;
    // HTTP/2 when the client offers it (browsers do): a page's event
    // streams and POSTs then share one connection, where HTTP/1.1 allows
    // six per origin. WebSockets stay on HTTP/1.1: a browser that finds no
    // extended CONNECT on an h2 connection opens an HTTP/1.1 one for them.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
