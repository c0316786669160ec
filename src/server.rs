//! Listeners, TLS (ALPN `h2` and `http/1.1` on one port), the plain-HTTP
//! redirect listener, the expiry sweep, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ServerConfig};
use crate::metrics::{DeleteReason, Metrics};
use crate::ops::{ConnGuard, Ops, OpsError};
use crate::proxy::{error_response, Proxy, RespBody};
use crate::session::Clock;
use crate::store::{AnyStore, Store, StoreError};

mod drain;
use drain::Drain;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start a worker: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Ops(#[from] OpsError),
}

/// Builds the rustls configuration from PEM text.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, ServerError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ServerError::Tls(format!("cannot read the certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(
            "no certificate found in the cert file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ServerError::Tls(format!("cannot read the private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("certificate and key do not fit: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path)
        .map_err(|e| ServerError::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

pub struct Server {
    listener: TcpListener,
    redirect: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    config: Config,
    clock: Clock,
    /// Metrics, access log and admin listener (the workers of
    /// [`run_threaded`] share the control thread's).
    ops: Option<Ops>,
}

impl Server {
    /// Opens the store, loads TLS material and binds the listeners (port 0
    /// picks a free port: see [`Server::local_addr`]).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let store = AnyStore::open(&config).await?;
        Server::bind_with(config, Arc::new(store), Clock::default(), None).await
    }

    /// Like [`Server::bind`] with a given store, clock and (for the demo)
    /// in-memory TLS configuration.
    pub async fn bind_with(
        config: Config,
        store: Arc<AnyStore>,
        clock: Clock,
        tls: Option<rustls::ServerConfig>,
    ) -> Result<Server, ServerError> {
        let tls = load_tls(&config, tls)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let listener = bind(config.server.listen).await?;
        let redirect = match config.server.redirect_http {
            Some(a) if tls.is_some() => Some(bind(a).await?),
            _ => None,
        };
        let ops = Ops::start(&config, &store).await?;
        let proxy = Arc::new(ops.proxy(&config, store, clock.clone()));
        Ok(Server {
            listener,
            redirect,
            tls: tls.map(|t| TlsAcceptor::from(Arc::new(t))),
            proxy,
            config,
            clock,
            ops: Some(ops),
        })
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().and_then(Ops::admin_addr)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.proxy.metrics()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    pub fn store(&self) -> Arc<AnyStore> {
        self.proxy.store().clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish within `shutdown_grace`, and flushes the store.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        announce(self.tls.is_some(), self.local_addr(), self.redirect_addr());
        let store = self.proxy.store().clone();
        let sweeper = spawn_sweeper(
            store.clone(),
            self.config.store.clear_expired_interval,
            self.clock.clone(),
            self.proxy.metrics().clone(),
        );
        let admin = self.ops.as_mut().and_then(Ops::spawn_admin);
        let self_ops = self.ops.take();
        self.serve(shutdown).await;
        if let Some(s) = sweeper {
            s.abort();
        }
        if let Some(a) = admin {
            a.abort();
        }
        if let Some(ops) = &self_ops {
            let log = ops.access_log.clone();
            let _ = tokio::task::spawn_blocking(move || log.flush()).await;
        }
        store.flush().await?;
        tracing::info!("stopped");
        Ok(())
    }

    /// The accept loop until `shutdown`, then the bounded graceful stop.
    async fn serve(self, shutdown: impl Future<Output = ()>) {
        let addr = self.local_addr();
        let drain = Drain::new();
        // Every connection task, so the ones still open when the grace
        // period ends can be aborted before the store is flushed.
        let mut conns: JoinSet<()> = JoinSet::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            // Coarse: checked every 100 ms, no tokio timer per request.
            .timer(self.proxy.timer().clone())
            .header_read_timeout(self.config.server.header_read_timeout)
            .keep_alive(true)
            // One write per response head and short body.
            .writev(false)
            // A request in flight is not watched for the client going
            // away: it runs to its end and its session changes are saved,
            // as a Django view's are (and a client may half-close and still
            // read the answer). This also spares a read buffer per request.
            .half_close(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)));

        let redirect_port = addr.port();
        let mut redirect = self.redirect;
        let gauge = self.proxy.metrics().connections("main");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                res = self.listener.accept() => {
                    let (stream, peer) = match res {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            // Out of descriptors and the like: back off briefly.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    while conns.try_join_next().is_some() {}
                    let ctx = ConnCtx {
                        tls: &self.tls,
                        proxy: &self.proxy,
                        builder: &builder,
                        handshake_timeout: self.config.server.header_read_timeout,
                        server: &self.config.server,
                        gauge: &gauge,
                    };
                    serve_conn(stream, peer, &ctx, &drain, &mut conns);
                }
                res = accept_opt(&mut redirect) => {
                    if let Ok((stream, _)) = res {
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), service_fn(move |req| async move {
                                Ok::<_, std::convert::Infallible>(redirect_response(&req, redirect_port))
                            }))
                            .into_owned();
                        let watched = drain.watch(conn);
                        conns.spawn(async move {
                            let _ = watched.await;
                        });
                    }
                }
            }
        }
        drop(self.listener);
        drop(redirect);
        tracing::info!(grace = ?self.config.server.shutdown_grace, "shutting down: no new connections, finishing in-flight requests");
        drain.start();
        let all_closed = async { while conns.join_next().await.is_some() {} };
        match tokio::time::timeout(self.config.server.shutdown_grace, all_closed).await {
            Ok(()) => tracing::info!("all connections closed"),
            Err(_) => {
                tracing::warn!(
                    open = conns.len(),
                    "shutdown grace period over; closing the remaining connections"
                );
                conns.abort_all();
            }
        }
        while conns.join_next().await.is_some() {}
    }
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
    let err = |source| ServerError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.set_reuseport(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)?.into_std().map_err(err)
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

/// Serves `config` with one worker thread per core, each running its own
/// single-threaded runtime, its own listener on the shared address and its
/// own upstream connection pool, so a request and its upstream connection
/// never leave one thread (a multi-threaded runtime sharing one pool
/// measured half the throughput: BENCHMARKS.md). A small control runtime
/// owns the store's background work, the signals and the expiry sweep. On
/// SIGTERM/SIGINT every worker stops accepting and finishes within
/// `shutdown_grace`; the store is flushed once, after all of them. With
/// [`Affinity::Auto`] each worker is pinned to a CPU of its own.
pub fn run_threaded(config: Config, workers: usize, affinity: Affinity) -> Result<(), ServerError> {
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sessiongate-control")
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let signals = {
        let _ctx = control.enter();
        shutdown_signal().map_err(ServerError::Runtime)?
    };
    let clock = Clock::default();
    let workers = workers.max(1);
    let (store, tls, listeners, redirect, mut ops) = control.block_on(async {
        let store = Arc::new(AnyStore::open(&config).await?);
        let ops = Ops::start(&config, &store).await?;
        let tls = load_tls(&config, None)?;
        let first = bind_reuseport(config.server.listen)?;
        let addr = first.local_addr().map_err(|source| ServerError::Bind {
            addr: config.server.listen,
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..workers {
            listeners.push(bind_reuseport(addr)?);
        }
        let redirect = match (config.server.redirect_http, &tls) {
            (Some(a), Some(_)) => {
                let err = |source| ServerError::Bind { addr: a, source };
                let l = TcpListener::bind(a).await.map_err(err)?;
                Some(l.into_std().map_err(err)?)
            }
            _ => None,
        };
        Ok::<_, ServerError>((store, tls, listeners, redirect, ops))
    })?;
    let addr = listeners[0].local_addr().map_err(ServerError::Runtime)?;
    announce(
        tls.is_some(),
        addr,
        redirect.as_ref().and_then(|r| r.local_addr().ok()),
    );
    tracing::info!(workers, "one worker thread per core");
    // Read before any thread is pinned: the process's own CPU set.
    let cpus = worker_cpus(affinity, workers, core_affinity::get_core_ids());
    let (sweeper, admin, reopen) = {
        let _ctx = control.enter();
        let sweeper = spawn_sweeper(
            store.clone(),
            config.store.clear_expired_interval,
            clock.clone(),
            ops.metrics.clone(),
        );
        let reopen =
            spawn_reopen_on_sigusr1(ops.access_log.clone()).map_err(ServerError::Runtime)?;
        (sweeper, ops.spawn_admin(), reopen)
    };
    let ops = Arc::new(ops);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let acceptor = tls.map(|t| TlsAcceptor::from(Arc::new(t)));
    let mut redirect = redirect;
    let mut handles = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let config = config.clone();
        let store = store.clone();
        let clock = clock.clone();
        let acceptor = acceptor.clone();
        let mut stopped = stopped.clone();
        let redirect = if i == 0 { redirect.take() } else { None };
        let cpu = cpus.as_ref().map(|c| c[i]);
        let ops = ops.clone();
        let handle = std::thread::Builder::new()
            .name(format!("sessiongate-worker-{i}"))
            .spawn(move || -> Result<(), ServerError> {
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
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ServerError::Runtime)?;
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).map_err(ServerError::Runtime)?;
                    let redirect = redirect
                        .map(TcpListener::from_std)
                        .transpose()
                        .map_err(ServerError::Runtime)?;
                    let proxy = Arc::new(ops.proxy(&config, store, clock.clone()));
                    let server = Server {
                        listener,
                        redirect,
                        tls: acceptor,
                        proxy,
                        config,
                        clock,
                        ops: None,
                    };
                    server
                        .serve(async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        })
                        .await;
                    Ok(())
                })
            })
            .map_err(ServerError::Runtime)?;
        handles.push(handle);
    }
    control.block_on(signals);
    let _ = stop.send(true);
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "a worker failed"),
            Err(_) => tracing::error!("a worker panicked"),
        }
    }
    if let Some(s) = sweeper {
        s.abort();
    }
    if let Some(a) = admin {
        a.abort();
    }
    reopen.abort();
    ops.access_log.flush();
    control.block_on(store.flush())?;
    tracing::info!("stopped");
    Ok(())
}

async fn accept_opt(l: &mut Option<TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// What serving one accepted connection needs.
struct ConnCtx<'a> {
    tls: &'a Option<TlsAcceptor>,
    proxy: &'a Arc<Proxy>,
    builder: &'a auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    server: &'a ServerConfig,
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
}

fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: &ConnCtx<'_>,
    drain: &Drain,
    conns: &mut JoinSet<()>,
) {
    let ConnCtx {
        tls,
        proxy,
        builder,
        handshake_timeout,
        server,
        gauge,
    } = *ctx;
    let guard = ConnGuard::new(gauge);
    if server.proxy_protocol {
        // The PROXY header first, in the connection's task; then the
        // connection as usual (a connection without one is closed).
        let server = server.clone();
        let tls = tls.clone();
        let proxy = proxy.clone();
        let builder = builder.clone();
        let drain = drain.clone();
        conns.spawn(async move {
            let _guard = guard;
            let mut stream = stream;
            let info = tokio::select! {
                r = crate::ops::conn_info(&mut stream, peer, tls.is_some(), &server) => match r {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "connection closed: no valid PROXY protocol header");
                        return;
                    }
                },
                () = drain.started() => return,
            };
            let svc = service_fn(move |req: Request<Incoming>| proxy.clone().handle(req, info.clone()));
            match tls {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    let _ = drain.watch(conn).await;
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    let tls = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => s,
                            _ => return,
                        },
                        () = drain.started() => return,
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    let _ = drain.watch(conn).await;
                }
            }
        });
        return;
    }
    let info =
        crate::proxy::ConnInfo::with_trust(peer, tls.is_some(), server.is_trusted(peer.ip()));
    let proxy = proxy.clone();
    let svc = service_fn(move |req: Request<Incoming>| proxy.clone().handle(req, info.clone()));
    match tls {
        None => {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let watched = drain.watch(conn);
            conns.spawn(async move {
                let _guard = guard;
                let _ = watched.await;
            });
        }
        Some(acceptor) => {
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            // The handshake happens in the task; a connection still
            // handshaking when the drain starts is dropped (it has no
            // request yet), not waited on.
            let drain = drain.clone();
            conns.spawn(async move {
                let _guard = guard;
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                let tls = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    },
                    () = drain.started() => return,
                };
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .into_owned();
                let _ = drain.watch(conn).await;
            });
        }
    }
}

/// `308` to the same host and path over https (never a cookie).
fn redirect_response(req: &Request<Incoming>, https_port: u16) -> Response<RespBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(crate::config::strip_port)
        .unwrap_or("");
    if host.is_empty() || host.bytes().any(|b| b <= 0x20 || b == b'/' || b == b'@') {
        return error_response(StatusCode::BAD_REQUEST, "missing or invalid Host header");
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
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
