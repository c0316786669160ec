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
    admin: Option<(TcpListener, Arc<Admin>)>,
    admin_addr: Option<SocketAddr>,
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

impl Ops {
    /// Starts the access log's writer and binds the admin listener (not
    /// served until [`Ops::spawn_admin`]).
    pub async fn start(config: &Config, store: &Arc<AnyStore>) -> Result<Ops, OpsError> {
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
            Some(a) => {
                let l = crate::admin::bind(a.listen).await?;
                Some((
                    l,
                    Arc::new(Admin::new(config, store.clone(), metrics.clone())),
                ))
            }
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|(l, _)| l.local_addr().ok());
        Ok(Ops {
            metrics,
            access_log,
            admin,
            admin_addr,
        })
    }

    /// The admin listener's address, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Serves the admin listener on the current runtime (once).
    pub fn spawn_admin(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.admin
            .take()
            .map(|(l, admin)| crate::admin::spawn(l, admin))
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

/// What the server learns about a new connection on `listen` before it
/// serves it: with `proxy_protocol`, the PROXY header is read first (a
/// connection without a valid one is refused, `Err`); then whether the peer
/// is a trusted proxy.
pub async fn conn_info<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    peer: SocketAddr,
    tls: bool,
    server: &crate::config::ServerConfig,
) -> Result<crate::proxy::ConnInfo, crate::proxy_protocol::ProxyHeaderError> {
    let peer = if server.proxy_protocol {
        crate::proxy_protocol::read_header(io, server.header_read_timeout)
            .await?
            .unwrap_or(peer)
    } else {
        peer
    };
    Ok(crate::proxy::ConnInfo::with_trust(
        peer,
        tls,
        server.is_trusted(peer.ip()),
    ))
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
