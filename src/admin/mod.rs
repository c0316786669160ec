//! The admin listener (SPEC 7.2): plain HTTP on `[admin] listen`, apart
//! from the proxy's listeners. `/healthz`, `/readyz` (a store ping within
//! `store.timeout`) and `/metrics`; it serves no route, and the proxy's
//! listeners serve none of these paths (they are routed like any other).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{Config, Engine};
use crate::metrics::{Metrics, StoreOp};
use crate::store::{AnyStore, Store};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("[admin] cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin endpoints read.
pub struct Admin {
    metrics: Arc<Metrics>,
    store: Arc<AnyStore>,
    engine: Engine,
    timeout: Duration,
    /// `[admin] token`: kept for the sessions API (SPEC section 9), and
    /// required by `POST /reload` when set.
    token: Option<Vec<u8>>,
    /// What `POST /reload` runs (`sessiongate reload`): the server's reload.
    reload: std::sync::OnceLock<ReloadFn>,
}

/// Reloads the configuration; `Err` carries the logged message.
pub type ReloadFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

impl Admin {
    pub fn new(config: &Config, store: Arc<AnyStore>, metrics: Arc<Metrics>) -> Admin {
        Admin {
            metrics,
            store,
            engine: config.store.engine,
            timeout: config.store.timeout,
            token: config.admin.as_ref().and_then(|a| a.token.clone()),
            reload: std::sync::OnceLock::new(),
        }
    }

    /// The bearer token the sessions API will require, if configured.
    pub fn token(&self) -> Option<&[u8]> {
        self.token.as_deref()
    }

    /// Connects `POST /reload` to the server's reload (once).
    pub fn set_reload(&self, f: ReloadFn) {
        let _ = self.reload.set(f);
    }

    /// Serves one admin request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/reload" && req.method() == Method::POST {
            return self.reload(&req).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => self.ready().await,
            "/metrics" => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not an admin path (/healthz, /readyz, /metrics)\n".into(),
            ),
        }
    }

    /// `POST /reload`: the same reload as SIGHUP, its outcome in the answer.
    async fn reload(self: Arc<Self>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(t) = &self.token {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            let ok = given.is_some_and(|g| {
                g.len() == t.len() && g.iter().zip(t).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            });
            if !ok {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "the admin token is required (Authorization: Bearer)\n".into(),
                );
            }
        }
        let this = self.clone();
        let outcome = tokio::task::spawn_blocking(move || match this.reload.get() {
            Some(f) => f(),
            None => Err("this server cannot reload".into()),
        })
        .await
        .unwrap_or_else(|e| Err(format!("reload failed: {e}")));
        match outcome {
            Ok(()) => text(StatusCode::OK, "configuration reloaded\n".into()),
            Err(e) => text(StatusCode::CONFLICT, format!("{e}\n")),
        }
    }

    async fn ready(&self) -> Response<Full<Bytes>> {
        let engine = self.engine.name();
        let start = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.store.ping()).await;
        self.metrics
            .store_op(StoreOp::Ping)
            .observe(start.elapsed());
        match result {
            Ok(Ok(())) => text(StatusCode::OK, format!("ready: store {engine} answers\n")),
            Ok(Err(e)) => {
                self.metrics.store_errors.inc();
                tracing::warn!(engine, error = %e, "readyz: the store failed its ping");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: store {engine}: {e}\n"),
                )
            }
            Err(_) => {
                self.metrics.store_errors.inc();
                tracing::warn!(engine, "readyz: the store did not answer its ping in time");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: store {engine} did not answer a ping within {:?}\n",
                        self.timeout
                    ),
                )
            }
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Binds `addr` (port 0 picks a free one) with `SO_REUSEPORT`, as the
/// main listener: a new process started beside the old one for a binary
/// upgrade can bind it too.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    crate::server::listen_reuseport(addr, 128).map_err(|source| AdminError::Bind { addr, source })
}

/// Serves the admin endpoints on `listener` until the task is aborted.
pub fn spawn(listener: TcpListener, admin: Arc<Admin>) -> tokio::task::JoinHandle<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "admin listener: /healthz /readyz /metrics");
    }
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "admin connection ended");
                }
            });
        }
    })
}
