//! What the server starts besides its listeners for operations (SPEC 7):
//! the metrics, the access log's writer, and the admin listener. The
//! server holds one [`Ops`] and builds each worker's proxy through it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::access_log::{AccessLog, AccessLogError};
use crate::admin::{Admin, AdminError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::session::Clock;
use crate::store::AnyStore;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

pub struct Ops {
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// The admin endpoints, when `[admin]` is configured (a reload
    /// updates their token and secret).
    pub admin: Option<Arc<Admin>>,
}

/// The admin listener, bound and not yet served.
pub struct AdminListener {
    listener: TcpListener,
    admin: Arc<Admin>,
}

impl AdminListener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves it on the current runtime until the task is aborted.
    /// Connects `POST /reload` to the server's reload.
    pub fn set_reload(&self, f: crate::admin::ReloadFn) {
        self.admin.set_reload(f);
    }

    /// What its endpoints read (kept to serve a moved listener).
    pub fn admin(&self) -> Arc<Admin> {
        self.admin.clone()
    }

    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        crate::admin::spawn(self.listener, self.admin)
    }
}

impl Ops {
    /// Starts the access log's writer and binds the admin listener.
    pub async fn start(
        config: &Config,
        store: &Arc<AnyStore>,
        clock: &Clock,
    ) -> Result<(Ops, Option<AdminListener>), OpsError> {
        let metrics = Arc::new(Metrics::new());
        let access_log = AccessLog::start(
            &config.server.access_log,
            config.server.access_log_format,
            metrics.access_log_dropped.clone(),
        )?;
        if let Some(w) = admin_exposure_warning(config) {
            tracing::warn!("{w}");
        }
        let admin = match &config.admin {
            Some(a) => Some(AdminListener {
                listener: crate::admin::bind(a.listen).await?,
                admin: Arc::new(Admin::new(
                    config,
                    store.clone(),
                    metrics.clone(),
                    clock.clone(),
                )),
            }),
            None => None,
        };
        Ok((
            Ops {
                metrics,
                access_log,
                admin: admin.as_ref().map(|a| a.admin.clone()),
            },
            admin,
        ))
    }

    /// A worker's proxy, counting into these metrics and logging here.
    pub fn proxy(&self, config: &Config, store: Arc<AnyStore>, clock: Clock) -> Proxy {
        Proxy::with_ops(
            config,
            store,
            clock,
            self.metrics.clone(),
            self.access_log.clone(),
        )
    }
}

/// What a worker needs to know about each new connection on `listen`.
pub struct ConnOps {
    proxy_protocol: bool,
    header_read: std::time::Duration,
    trusted: Vec<ipnet::IpNet>,
    /// `sessiongate_connections{listener="main"}`.
    pub gauge: prometheus_client::metrics::gauge::Gauge,
}

impl ConnOps {
    pub fn new(s: &crate::config::ServerConfig, metrics: &Metrics) -> ConnOps {
        ConnOps {
            proxy_protocol: s.proxy_protocol,
            header_read: s.header_read_timeout,
            trusted: s.trusted_proxies.clone(),
            gauge: metrics.connections("main"),
        }
    }

    /// With `proxy_protocol`, reads the PROXY header first (`Err`: the
    /// connection is to be closed); then whether the peer is trusted.
    pub async fn conn_info<R: tokio::io::AsyncRead + Unpin>(
        &self,
        io: &mut R,
        peer: SocketAddr,
        tls: bool,
    ) -> Result<crate::proxy::ConnInfo, crate::proxy_protocol::ProxyHeaderError> {
        let peer = if self.proxy_protocol {
            crate::proxy_protocol::read_header(io, self.header_read)
                .await?
                .unwrap_or(peer)
        } else {
            peer
        };
        let ip = peer.ip().to_canonical();
        let trusted = self.trusted.iter().any(|n| n.contains(&ip));
        Ok(crate::proxy::ConnInfo::with_trust(peer, tls, trusted))
    }
}

/// Counts a connection in `sessiongate_connections{listener}` while held.
pub struct ConnGuard(prometheus_client::metrics::gauge::Gauge);

impl ConnGuard {
    pub fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> ConnGuard {
        gauge.inc();
        ConnGuard(gauge.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The warning `check` (and `run`) give when `[admin] listen` is not a
/// loopback address.
pub fn admin_exposure_warning(config: &Config) -> Option<String> {
    let a = config.admin.as_ref()?;
    (!a.listen.ip().is_loopback()).then(|| {
        format!(
            "[admin] listen = \"{}\" is not a loopback address: /metrics, /readyz and the sessions API are reachable from other hosts",
            a.listen
        )
    })
}
