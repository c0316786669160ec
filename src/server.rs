//! The server: TLS (ALPN `h2` and `http/1.1` on one port), the plain-HTTP
//! redirect listener, the worker threads, the expiry sweep, and graceful
//! shutdown.
//!
//! [`Server::bind`] opens the store, loads TLS and binds one listening
//! socket per worker (`SO_REUSEPORT`); [`Server::run`] starts the workers,
//! each a thread with its own single-threaded runtime, its own
//! [`listener::Listener`] (the accept loop), its own proxy and upstream
//! pool, so a request and its upstream connection never leave one thread
//! (a multi-threaded runtime sharing one pool measured half the throughput:
//! BENCHMARKS.md). The caller's runtime keeps the store's background work
//! and the expiry sweep. When the shutdown future completes every worker
//! stops accepting and drains within `shutdown_grace`; the store is flushed
//! once, after all of them. Tests start the server the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::metrics::{DeleteReason, Metrics};
use crate::ops::{AdminListener, Ops, OpsError};
use crate::proxy::{error_response, RespBody};
use crate::session::Clock;
use crate::store::{AnyStore, Store, StoreError};

mod conn;
mod drain;
pub(crate) mod h1;
mod io;
pub(crate) use io::{LINGER_BYTES, LINGER_TIME};
mod listener;
mod shutdown;

pub use conn::MAX_REQUEST_HEAD;
pub use shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener: `listen` or `redirect_http`.
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start a worker: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("a worker thread panicked")]
    WorkerPanicked,
    #[error(transparent)]
    Ops(#[from] OpsError),
}

/// Why the listener's certificate and key could not be made into a TLS
/// configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// `certificate` or `private key`.
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the certificate chain: {0}")]
    Certificates(#[source] rustls::pki_types::pem::Error),
    #[error("no certificate found in the cert file")]
    NoCertificate,
    #[error("cannot read the private key: {0}")]
    Key(#[source] rustls::pki_types::pem::Error),
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
    #[error("certificate and key do not fit: {0}")]
    Mismatch(#[source] rustls::Error),
}

/// Builds the rustls configuration from PEM text.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, ServerError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(TlsError::Certificates)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate.into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(TlsError::Key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn read(path: &std::path::Path, what: &'static str) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| {
        TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

/// How to start a [`Server`] beyond its configuration.
pub struct ServerOptions {
    /// Worker threads (1 by default). 0: one worker on the runtime that
    /// calls [`Server::run`], for a test that must control when the
    /// server runs.
    pub workers: usize,
    pub affinity: Affinity,
    /// The store to serve with; by default the one the configuration names.
    pub store: Option<Arc<AnyStore>>,
    pub clock: Clock,
    /// TLS configuration given in memory (the demo) instead of the PEM
    /// files of the configuration.
    pub tls: Option<rustls::ServerConfig>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            workers: 1,
            affinity: Affinity::default(),
            store: None,
            clock: Clock::default(),
            tls: None,
        }
    }
}

impl ServerOptions {
    pub fn workers(workers: usize) -> ServerOptions {
        ServerOptions {
            workers,
            ..ServerOptions::default()
        }
    }

    /// One worker serving with `store`.
    pub fn with_store(store: Arc<AnyStore>) -> ServerOptions {
        ServerOptions {
            workers: 1,
            store: Some(store),
            ..ServerOptions::default()
        }
    }
}

/// What every worker of a server shares, behind one `Arc`.
pub struct Shared {
    pub config: Config,
    pub store: Arc<AnyStore>,
    pub clock: Clock,
    pub tls: Option<TlsAcceptor>,
    /// `max_connections`: a permit per client connection.
    pub connections: Arc<Semaphore>,
    /// Metrics and the access log (SPEC 7.2, 7.3).
    pub ops: Ops,
    /// The configuration serving now: a reload (SPEC 7.1) sends a new one,
    /// and every worker follows.
    pub generation: tokio::sync::watch::Sender<Arc<Generation>>,
    /// How many times a worker has taken up a new generation, so that a
    /// reload is reported once every worker serves it.
    swaps: (std::sync::Mutex<usize>, std::sync::Condvar),
    workers: usize,
    /// One reload at a time: each one's new sockets reach every worker
    /// before the next is prepared.
    reloading: std::sync::Mutex<()>,
    /// The admin listener being served (its accept loop), for a reload
    /// that moves `[admin] listen`.
    admin: std::sync::Mutex<Option<AdminServing>>,
}

struct AdminServing {
    admin: Arc<crate::admin::Admin>,
    task: tokio::task::JoinHandle<()>,
}

/// One configuration as the workers serve it.
pub struct Generation {
    pub config: Config,
    pub tls: Option<TlsAcceptor>,
    /// The sockets this reload bound, when it moved a listener.
    rebind: Option<Rebind>,
}

/// Sockets a reload bound for the workers to take up (SPEC 7.1).
struct Rebind {
    /// One per worker on the new `listen` address (empty: unchanged).
    listen: Vec<std::sync::Mutex<Option<std::net::TcpListener>>>,
    /// Worker 0's new `redirect_http` socket (inside, `None`: removed),
    /// when it changed.
    redirect: Option<std::sync::Mutex<Option<std::net::TcpListener>>>,
    /// The port the redirect sends clients to, when `listen` moved.
    https_port: Option<u16>,
}

fn take<T>(m: &std::sync::Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|e| e.into_inner()).take()
}

impl Shared {
    /// Re-reads the configuration file (and its certificate, key, secret
    /// and token files); when it is valid and changes nothing that needs
    /// a restart, every worker serves it from its next connection and
    /// request. Logged and counted either way.
    pub fn reload(&self) -> Result<(), crate::reload::ReloadError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.generation.borrow().clone();
        let path = current.config.source.clone();
        let outcome = crate::reload::prepare(&current.config, &path).and_then(|p| {
            crate::reload::restart_only_changes(&current.config, &p.config)?;
            Ok(p)
        });
        let p = match outcome {
            Ok(p) => p,
            Err(e) => {
                crate::reload::record_failure(&self.ops.metrics, &path, &e);
                return Err(e);
            }
        };
        // New addresses are bound before anything changes: one that cannot
        // be bound leaves everything as it was.
        let (rebind, admin) = match self.bind_changes(&current.config, &p.config) {
            Ok(b) => b,
            Err(e) => {
                crate::reload::record_failure(&self.ops.metrics, &path, &e);
                return Err(e);
            }
        };
        let routes = p.config.routes.len();
        // Against the start-up values, which are the ones in effect.
        let kept = crate::reload::kept_until_restart(&self.config, &p.config);
        let moved = rebind.is_some() || admin.is_some();
        let (listen, redirect) = (p.config.server.listen, p.config.server.redirect_http);
        let listen_moved = rebind.as_ref().is_some_and(|r| !r.listen.is_empty());
        let bound_at = rebind.as_ref().and_then(|r| {
            r.listen
                .first()
                .and_then(|m| m.lock().ok()?.as_ref()?.local_addr().ok())
        });
        let tls = match p.tls {
            Some(t) => Some(TlsAcceptor::from(Arc::new(t))),
            // TLS given in memory (the demo) stays.
            None => current
                .tls
                .clone()
                .filter(|_| p.config.server.tls.is_none()),
        };
        // The store's keys (and what else it takes from `[session]`) before
        // any worker serves the new configuration.
        self.store.follow(&p.config);
        if let Some(a) = &self.ops.admin {
            a.configure(&p.config);
        }
        let (count, taken) = &self.swaps;
        let target = *count.lock().unwrap_or_else(|e| e.into_inner()) + self.workers;
        let tls_on = tls.is_some();
        self.generation.send_replace(Arc::new(Generation {
            config: p.config,
            tls,
            rebind,
        }));
        if let Some(l) = admin {
            let mut serving = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = serving.as_mut() {
                // The old accept loop ends (its socket closes); admin
                // requests in flight finish in their own tasks.
                let task = crate::admin::spawn(l, s.admin.clone());
                std::mem::replace(&mut s.task, task).abort();
            }
        }
        // Reported once every worker serves it (bounded: a worker stuck
        // elsewhere does not hold the reload).
        let guard = count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = taken.wait_timeout_while(guard, Duration::from_secs(5), |n| *n < target);
        if moved {
            if listen_moved {
                announce(tls_on, bound_at.unwrap_or(listen), None);
            }
            tracing::info!(%listen, redirect_http = ?redirect, "listeners moved by the reload; the old ones are closed, their connections finish their requests");
        }
        crate::reload::record_success(&self.ops.metrics, &path, routes);
        if !kept.is_empty() {
            tracing::warn!(
                config = %path.display(),
                "[server] {} changed: the reload keeps the start-up value until a restart",
                kept.join(", ")
            );
        }
        Ok(())
    }

    /// Binds what a reload moved (`listen`, one socket per worker;
    /// `redirect_http`; `[admin] listen`), or says why it cannot, with the
    /// message a start would print.
    fn bind_changes(
        &self,
        running: &Config,
        new: &Config,
    ) -> Result<(Option<Rebind>, Option<TcpListener>), crate::reload::ReloadError> {
        let fail = |e: ServerError| crate::reload::ReloadError::Bind(Box::new(e));
        let (a, b) = (&running.server, &new.server);
        let mut listen = Vec::new();
        let mut https_port = None;
        if a.listen != b.listen {
            if a.listen.port() != b.listen.port() {
                not_held_elsewhere(b.listen).map_err(|source| {
                    fail(ServerError::Bind {
                        what: "listen",
                        addr: b.listen,
                        source,
                    })
                })?;
            }
            let first = bind_reuseport(b.listen).map_err(fail)?;
            let addr = first.local_addr().map_err(|source| {
                fail(ServerError::Bind {
                    what: "listen",
                    addr: b.listen,
                    source,
                })
            })?;
            https_port = Some(addr.port());
            listen.push(first);
            for _ in 1..self.workers {
                listen.push(bind_reuseport(addr).map_err(fail)?);
            }
        }
        let redirect = match (a.redirect_http != b.redirect_http, b.redirect_http) {
            (false, _) => None,
            (true, None) => Some(None),
            (true, Some(addr)) => {
                let err = |source| {
                    fail(ServerError::Bind {
                        what: "redirect_http",
                        addr,
                        source,
                    })
                };
                let l = std::net::TcpListener::bind(addr).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                Some(Some(l))
            }
        };
        let admin = match (&running.admin, &new.admin) {
            (Some(x), Some(y)) if x.listen != y.listen => {
                let held = if x.listen.port() != y.listen.port() {
                    not_held_elsewhere(y.listen)
                } else {
                    Ok(())
                };
                Some(
                    held.and_then(|()| listen_reuseport(y.listen, 128))
                        .map_err(|source| {
                            crate::reload::ReloadError::Bind(Box::new(
                                crate::admin::AdminError::Bind {
                                    addr: y.listen,
                                    source,
                                },
                            ))
                        })?,
                )
            }
            _ => None,
        };
        let rebind = (!listen.is_empty() || redirect.is_some()).then(|| Rebind {
            listen: listen
                .into_iter()
                .map(|l| std::sync::Mutex::new(Some(l)))
                .collect(),
            redirect: redirect.map(std::sync::Mutex::new),
            https_port,
        });
        Ok((rebind, admin))
    }

    /// A worker serves the newest generation.
    fn swapped(&self) {
        let (count, taken) = &self.swaps;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        taken.notify_all();
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    shared: Arc<Shared>,
    /// One per worker, all on the same address.
    listeners: Vec<std::net::TcpListener>,
    redirect: Option<std::net::TcpListener>,
    affinity: Affinity,
    /// The one worker runs on the caller's runtime (`workers: 0`).
    inline: bool,
    admin: Option<AdminListener>,
}

impl Server {
    /// Opens the store, loads TLS material and binds the listeners (port 0
    /// picks a free port: see [`Server::local_addr`]).
    pub async fn bind(config: Config, options: ServerOptions) -> Result<Server, ServerError> {
        let ServerOptions {
            workers,
            affinity,
            store,
            clock,
            tls,
        } = options;
        let inline = workers == 0;
        let workers = workers.max(1);
        let store = match store {
            Some(s) => s,
            None => Arc::new(AnyStore::open(&config).await?),
        };
        let tls = load_tls(&config, tls)?;
        let first = bind_reuseport(config.server.listen)?;
        let addr = first.local_addr().map_err(|source| ServerError::Bind {
            what: "listen",
            addr: config.server.listen,
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..workers {
            listeners.push(bind_reuseport(addr)?);
        }
        let redirect = match (config.server.redirect_http, &tls) {
            (Some(a), Some(_)) => {
                let err = |source| ServerError::Bind {
                    what: "redirect_http",
                    addr: a,
                    source,
                };
                let l = TcpListener::bind(a).await.map_err(err)?;
                Some(l.into_std().map_err(err)?)
            }
            _ => None,
        };
        let connections = Arc::new(Semaphore::new(config.server.max_connections));
        let (ops, admin) = Ops::start(&config, &store, &clock).await?;
        let tls = tls.map(|t| TlsAcceptor::from(Arc::new(t)));
        let (generation, _) = tokio::sync::watch::channel(Arc::new(Generation {
            config: config.clone(),
            tls: tls.clone(),
            rebind: None,
        }));
        let shared = Arc::new(Shared {
            store,
            clock,
            tls,
            connections,
            config,
            ops,
            generation,
            swaps: Default::default(),
            workers,
            reloading: Default::default(),
            admin: Default::default(),
        });
        if let Some(a) = &admin {
            let weak = Arc::downgrade(&shared);
            a.set_reload(Box::new(move || match weak.upgrade() {
                Some(s) => s
                    .reload()
                    .map(|()| s.config.source.display().to_string())
                    .map_err(|e| e.to_string()),
                None => Err("the server has stopped".into()),
            }));
        }
        Ok(Server {
            shared,
            listeners,
            redirect,
            affinity,
            inline,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0].local_addr().expect("bound listener")
    }

    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    pub fn store(&self) -> Arc<AnyStore> {
        self.shared.store.clone()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(AdminListener::local_addr)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.ops.metrics
    }

    /// Serves until `shutdown` completes (or [`Shutdown::trigger`] on the
    /// handle given to [`Server::run_with`]), then stops accepting, lets
    /// in-flight requests finish within `shutdown_grace`, and flushes the
    /// store.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        self.run_with(Shutdown::new(), shutdown).await
    }

    /// [`Server::run`] with a stop handle of the caller's.
    pub async fn run_with(
        self,
        stop: Shutdown,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Server {
            shared,
            listeners,
            mut redirect,
            affinity,
            inline,
            admin,
        } = self;
        // The workers stop when this future ends, also when it is dropped
        // unfinished (a test's runtime ending).
        let _stop_on_drop = StopOnDrop(stop.clone());
        let addr = listeners[0].local_addr().map_err(ServerError::Runtime)?;
        let redirect_addr = redirect.as_ref().and_then(|r| r.local_addr().ok());
        // The SIGHUP and SIGUSR1 handlers before the "listening" line: a
        // SIGHUP sent as soon as it appears (a supervisor, a test) reloads
        // instead of ending the process (the signal's default).
        let reopen =
            spawn_reopen_on_sigusr1(shared.ops.access_log.clone()).map_err(ServerError::Runtime)?;
        let hup = spawn_reload_on_sighup(shared.clone()).map_err(ServerError::Runtime)?;
        announce(shared.tls.is_some(), addr, redirect_addr);
        let workers = listeners.len();
        tracing::info!(workers, "worker threads");
        // Read before any thread is pinned: the process's own CPU set.
        let cpus = worker_cpus(affinity, workers, core_affinity::get_core_ids());
        let sweeper = spawn_sweeper(
            shared.store.clone(),
            shared.config.store.clear_expired_interval,
            shared.clock.clone(),
            shared.ops.metrics.clone(),
        );
        if let Some(a) = admin {
            let admin = a.admin();
            let task = a.spawn();
            *shared.admin.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(AdminServing { admin, task });
        }
        let mut ended = tokio::task::JoinSet::new();
        let mut started = Ok(());
        for (i, listener) in listeners.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let start = WorkerStart {
                index: i,
                listener,
                redirect: if i == 0 { redirect.take() } else { None },
                shared: shared.clone(),
                stop: stop.clone(),
                cpu: cpus.as_ref().map(|c| c[i]),
                workers,
                https_port: addr.port(),
                done: tx,
            };
            let spawn = match inline {
                false => spawn_worker(start),
                true => {
                    tokio::spawn(async move {
                        let done = start.done;
                        let r = worker(
                            0,
                            start.listener,
                            start.redirect,
                            start.shared,
                            start.stop,
                            1,
                            start.https_port,
                        )
                        .await;
                        let _ = done.send(r);
                    });
                    Ok(())
                }
            };
            if let Err(e) = spawn {
                started = Err(e);
                break;
            }
            ended.spawn(async move { rx.await.unwrap_or(Err(ServerError::WorkerPanicked)) });
        }
        let mut result = started;
        if result.is_ok() {
            tokio::pin!(shutdown);
            tokio::select! {
                () = &mut shutdown => {}
                () = stop.wait() => {}
                Some(r) = ended.join_next() => {
                    // A worker ended before the shutdown: stop the others.
                    result = r.unwrap_or(Err(ServerError::WorkerPanicked));
                }
            }
        }
        stop.trigger();
        // Once for the process; each worker's listener logs at debug.
        tracing::info!(grace = ?shared.config.server.shutdown_grace, "shutting down: no new connections, finishing in-flight requests");
        while let Some(r) = ended.join_next().await {
            let r = r.unwrap_or(Err(ServerError::WorkerPanicked));
            if let Err(e) = r {
                tracing::error!(error = %e, "a worker failed");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        if let Some(s) = sweeper {
            s.abort();
        }
        if let Some(a) = shared
            .admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            a.task.abort();
        }
        reopen.abort();
        hup.abort();
        let log = shared.ops.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || log.flush()).await;
        shared.store.flush().await?;
        tracing::info!("stopped");
        result
    }
}

struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// What a worker thread starts with.
struct WorkerStart {
    index: usize,
    listener: std::net::TcpListener,
    redirect: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    stop: Shutdown,
    cpu: Option<core_affinity::CoreId>,
    workers: usize,
    https_port: u16,
    done: tokio::sync::oneshot::Sender<Result<(), ServerError>>,
}

/// One worker: its proxy and pool, its accept loop, until `stop`.
async fn worker(
    index: usize,
    listener: std::net::TcpListener,
    redirect: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    stop: Shutdown,
    workers: usize,
    https_port: u16,
) -> Result<(), ServerError> {
    let listener = TcpListener::from_std(listener).map_err(ServerError::Runtime)?;
    let redirect = redirect
        .map(TcpListener::from_std)
        .transpose()
        .map_err(ServerError::Runtime)?;
    let mut config = shared.config.clone();
    // Each worker has its own upstream pool: the limit is shared out
    // among them.
    let up = &mut config.server.max_upstream_connections;
    *up = up.div_ceil(workers);
    let proxy = Arc::new(
        shared
            .ops
            .proxy(&config, shared.store.clone(), shared.clock.clone()),
    );
    let mut generations = shared.generation.subscribe();
    let current = generations.borrow_and_update().clone();
    let worker = Arc::new(conn::Worker::new(
        proxy,
        current.tls.clone(),
        &config.server,
        https_port,
    ));
    // Reloads: this worker's proxy (and pool) for each new configuration,
    // built on this worker's thread, and the sockets it moved to.
    let (rebinds, rebound) = tokio::sync::mpsc::unbounded_channel();
    let follower = {
        let (worker, shared) = (worker.clone(), shared.clone());
        tokio::spawn(async move {
            while generations.changed().await.is_ok() {
                let g = generations.borrow_and_update().clone();
                let mut config = g.config.clone();
                let up = &mut config.server.max_upstream_connections;
                *up = up.div_ceil(workers);
                let proxy = Arc::new(shared.ops.proxy(
                    &config,
                    shared.store.clone(),
                    shared.clock.clone(),
                ));
                worker.swap(proxy, g.tls.clone(), &config.server);
                if let Some(r) = &g.rebind {
                    if let Some(port) = r.https_port {
                        worker
                            .https_port
                            .store(port, std::sync::atomic::Ordering::Relaxed);
                    }
                    let tokio_listener = |l: std::net::TcpListener| match TcpListener::from_std(l) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            tracing::error!(error = %e, "a listener bound by the reload cannot be served");
                            None
                        }
                    };
                    let listen = r.listen.get(index).and_then(take).and_then(tokio_listener);
                    let redirect = match (&r.redirect, index) {
                        (Some(m), 0) => Some(take(m).and_then(tokio_listener)),
                        _ => None,
                    };
                    if listen.is_some() || redirect.is_some() {
                        // Counted as taken up once the worker accepts on
                        // the new socket and has closed the old one.
                        let (done, taken) = tokio::sync::oneshot::channel();
                        let sent = rebinds.send(listener::Rebound {
                            listen,
                            redirect,
                            done: Some(done),
                        });
                        if sent.is_ok() {
                            let _ = taken.await;
                        }
                    }
                }
                shared.swapped();
            }
        })
    };
    listener::Listener {
        listener,
        redirect,
        worker,
        limit: shared.connections.clone(),
        grace: config.server.shutdown_grace,
        rebinds: rebound,
    }
    .run(stop)
    .await;
    follower.abort();
    Ok(())
}

fn spawn_worker(start: WorkerStart) -> Result<(), ServerError> {
    let i = start.index;
    std::thread::Builder::new()
        .name(format!("sessiongate-worker-{i}"))
        .spawn(move || {
            let WorkerStart {
                index: i,
                listener,
                redirect,
                shared,
                stop,
                cpu,
                workers,
                https_port,
                done,
            } = start;
            if let Some(cpu) = cpu {
                if core_affinity::set_for_current(cpu) {
                    tracing::info!(worker = i, cpu = cpu.id, "worker pinned");
                } else {
                    tracing::warn!(
                        worker = i,
                        cpu = cpu.id,
                        "could not pin the worker; it runs unpinned"
                    );
                }
            }
            // After the pin (or not): tests read the thread's CPUs then.
            tracing::debug!(worker = i, "worker started");
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ServerError::Runtime)
                .and_then(|rt| {
                    rt.block_on(worker(
                        i, listener, redirect, shared, stop, workers, https_port,
                    ))
                });
            let _ = done.send(result);
        })
        .map(|_| ())
        .map_err(ServerError::Runtime)
}

fn announce(tls: bool, addr: SocketAddr, redirect: Option<SocketAddr>) {
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(%addr, url = %format!("{scheme}://{addr}/"), "sessiongate listening");
    if let Some(r) = redirect {
        tracing::info!(addr = %r, "redirecting plain HTTP to https");
    }
}

/// The TLS configuration: the one given, else the configured PEM files.
fn load_tls(
    config: &Config,
    given: Option<rustls::ServerConfig>,
) -> Result<Option<rustls::ServerConfig>, ServerError> {
    Ok(match (given, &config.server.tls) {
        (Some(t), _) => Some(t),
        (None, Some(files)) => Some(tls_config(
            &read(&files.cert, "certificate")?,
            &read(&files.key, "private key")?,
        )?),
        (None, None) => None,
    })
}

/// A listening socket with `SO_REUSEPORT`, so every worker can have its own
/// on the same address and the kernel spreads connections among them.
fn bind_reuseport(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    listen_reuseport(addr, 1024)
        .and_then(TcpListener::into_std)
        .map_err(|source| ServerError::Bind {
            what: "listen",
            addr,
            source,
        })
}

/// Fails with `AddrInUse` when another socket listens on `addr` (port 0:
/// never). A reload binds its new `listen` with `SO_REUSEPORT`, which
/// would succeed beside another sessiongate of the same user and split
/// the traffic with it; a second process on one port is a binary upgrade,
/// started with `run`, never a reload. The probe binds without
/// `SO_REUSEPORT` (so any listener conflicts) and with `SO_REUSEADDR` (so
/// connections in `TIME_WAIT` do not), then closes.
fn not_held_elsewhere(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = reusing_addr(addr)?;
    probe.bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(
                e.kind(),
                "address in use by another process (a reload does not share a port; start a second process with `run` for that)",
            )
        } else {
            e
        }
    })
}

/// A TCP socket of `addr`'s family with `SO_REUSEADDR` (connections in
/// `TIME_WAIT` do not stop a bind).
fn reusing_addr(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// A listening socket on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`
/// (the workers' listeners, and the admin listener, so that a second
/// process can bind beside this one).
pub(crate) fn listen_reuseport(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = reusing_addr(addr)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Whether [`run_threaded`] pins each worker thread to a CPU of its own
/// (`SESSIONGATE_CPU_AFFINITY`), as nginx's `worker_cpu_affinity auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Affinity {
    /// The scheduler places the workers (the default).
    #[default]
    Off,
    /// Worker `i` runs only on the `i`-th CPU the process may use, when there
    /// are at least as many such CPUs as workers.
    Auto,
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Affinity::Off => "off",
            Affinity::Auto => "auto",
        })
    }
}

impl std::str::FromStr for Affinity {
    type Err = String;

    fn from_str(s: &str) -> Result<Affinity, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "0" => Ok(Affinity::Off),
            "auto" | "1" => Ok(Affinity::Auto),
            _ => Err(format!("{s:?}: expected \"auto\" or \"off\"")),
        }
    }
}

/// The CPU for each worker under `affinity`: none when off, or when the
/// process may use fewer CPUs than there are workers (two workers pinned to
/// one CPU would only queue behind each other).
fn worker_cpus(
    affinity: Affinity,
    workers: usize,
    allowed: Option<Vec<core_affinity::CoreId>>,
) -> Option<Vec<core_affinity::CoreId>> {
    if affinity == Affinity::Off {
        return None;
    }
    if !cfg!(target_os = "linux") {
        // Elsewhere core_affinity sets at most a hint (macOS), which would
        // be logged as a pin that is not one.
        tracing::warn!("SESSIONGATE_CPU_AFFINITY: supported on Linux only; workers not pinned");
        return None;
    }
    match allowed {
        Some(cpus) if cpus.len() >= workers => Some(cpus.into_iter().take(workers).collect()),
        Some(cpus) => {
            tracing::warn!(
                workers,
                cpus = cpus.len(),
                "SESSIONGATE_CPU_AFFINITY: fewer usable CPUs than workers; workers not pinned"
            );
            None
        }
        None => {
            tracing::warn!(
                "SESSIONGATE_CPU_AFFINITY: the usable CPUs cannot be read here; workers not pinned"
            );
            None
        }
    }
}

/// `308` to the same host and path over https (never a cookie).
fn redirect_response<B>(req: &Request<B>, https_port: u16) -> Response<RespBody> {
    // An absolute-form target's authority wins over Host (RFC 9112 3.2.2).
    let host = req
        .uri()
        .host()
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .map(crate::config::strip_port)
        .unwrap_or("");
    if host.is_empty() || host.bytes().any(|b| b <= 0x20 || b == b'/' || b == b'@') {
        return error_response(StatusCode::BAD_REQUEST, "missing or invalid Host header");
    }
    let pq = match req.uri().path_and_query().map(|p| p.as_str()) {
        None | Some("") => "/",
        // `OPTIONS *` names no resource to send elsewhere.
        Some(p) if !p.starts_with('/') && !p.starts_with('?') => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "the request path must start with /",
            )
        }
        Some(p) => p,
    };
    let with_slash;
    let pq = if pq.starts_with('?') {
        with_slash = format!("/{pq}");
        with_slash.as_str()
    } else {
        pq
    };
    let location = if https_port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{https_port}{pq}")
    };
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"moved to https\n",
    ))));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn spawn_sweeper(
    store: Arc<AnyStore>,
    every: Duration,
    clock: Clock,
    metrics: Arc<Metrics>,
) -> Option<tokio::task::JoinHandle<()>> {
    if every.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match store.clear_expired(clock.now_ms()).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics.sessions_deleted(DeleteReason::Expired, n);
                    tracing::info!(removed = n, "expired sessions swept");
                }
                Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
            }
        }
    }))
}

/// Reloads the configuration on each SIGHUP (SPEC 7.1).
fn spawn_reload_on_sighup(shared: Arc<Shared>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the configuration");
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
        }
    }))
}

/// Reopens the access log file on each SIGUSR1 (logrotate's
/// `postrotate`), as nginx does.
fn spawn_reopen_on_sigusr1(
    log: crate::access_log::AccessLog,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    Ok(tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1 received: reopening the access log");
            let log = log.clone();
            // `reopen` waits for room in the writer's channel.
            let _ = tokio::task::spawn_blocking(move || log.reopen()).await;
        }
    }))
}

/// Installs the SIGTERM and SIGINT handlers now (call it before binding,
/// so a signal that arrives during start-up still shuts down cleanly) and
/// returns a future that resolves on the first of them.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_say_what_is_wrong_and_keep_their_cause() {
        use std::error::Error as _;
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let (cert, key_a, key_b) = (
            a.cert.pem(),
            a.signing_key.serialize_pem(),
            b.signing_key.serialize_pem(),
        );
        assert!(tls_config(cert.as_bytes(), key_a.as_bytes()).is_ok());
        // The message, and whether the TLS error kept a cause beneath it.
        let failed = |cert: &str, key: &str| {
            let e = tls_config(cert.as_bytes(), key.as_bytes()).unwrap_err();
            let caused = e.source().and_then(|tls| tls.source()).is_some();
            (e.to_string(), caused)
        };
        let (msg, caused) = failed(&cert, &key_b);
        assert!(
            msg.starts_with("TLS: certificate and key do not fit: "),
            "{msg}"
        );
        assert!(caused);
        let (msg, caused) = failed("", &key_a);
        assert_eq!(msg, "TLS: no certificate found in the cert file");
        assert!(!caused);
        let (msg, caused) = failed(&cert, "not a key");
        assert!(
            msg.starts_with("TLS: cannot read the private key: "),
            "{msg}"
        );
        assert!(caused);
        let missing = std::path::Path::new("/nonexistent/sessiongate/key.pem");
        let e = read(missing, "private key").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("TLS: cannot read private key /nonexistent/sessiongate/key.pem: "),
            "{e}"
        );
        assert!(e.source().and_then(|tls| tls.source()).is_some());
    }

    #[test]
    fn affinity_values() {
        for v in ["auto", "AUTO", "1", " auto "] {
            assert_eq!(v.parse::<Affinity>(), Ok(Affinity::Auto), "{v:?}");
        }
        for v in ["off", "0", "OFF"] {
            assert_eq!(v.parse::<Affinity>(), Ok(Affinity::Off), "{v:?}");
        }
        assert!("on-cpu-0".parse::<Affinity>().is_err());
        // Blank means unset, which main.rs handles before parsing.
        assert!("".parse::<Affinity>().is_err());
    }

    #[test]
    fn worker_cpus_pins_only_with_a_cpu_for_every_worker() {
        let ids = |v: &[usize]| {
            v.iter()
                .map(|&id| core_affinity::CoreId { id })
                .collect::<Vec<_>>()
        };
        assert_eq!(worker_cpus(Affinity::Off, 2, Some(ids(&[0, 1]))), None);
        assert_eq!(
            worker_cpus(Affinity::Auto, 2, Some(ids(&[2, 5, 7]))),
            Some(ids(&[2, 5]))
        );
        assert_eq!(worker_cpus(Affinity::Auto, 3, Some(ids(&[0, 1]))), None);
        assert_eq!(worker_cpus(Affinity::Auto, 1, None), None);
    }
}
