//! TLS to `https://` upstreams (SPEC 7): the client configuration a route's
//! https upstreams share, verified against the system's roots
//! (`rustls-native-certs`, read once per process) and the route's
//! `upstream_ca`, with ALPN `http/1.1` (the pool speaks HTTP/1.1 only).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;

/// How an https upstream is reached: the shared client configuration and
/// the name its certificate must carry (sent as SNI when it is a DNS name).
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The same TLS identity: one pool slot serves both.
    pub fn same(&self, other: &UpstreamTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

/// An `upstream_ca` file that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate", path.display())]
    NotCertificate { path: PathBuf },
    #[error("{}: unusable CA certificate: {source}", path.display())]
    Unusable {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The system's trust anchors, read once (a reload does not re-read them).
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system's CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system CA certificates for https upstreams");
        roots
    })
}

/// The client configuration for a route's https upstreams: the system's
/// roots plus the certificates of `ca` (a PEM file), when given.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, CaFileError> {
    let mut roots = system_roots().clone();
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|source| CaFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|_| CaFileError::NotCertificate {
                path: path.to_path_buf(),
            })?;
        if certs.is_empty() {
            return Err(CaFileError::NotCertificate {
                path: path.to_path_buf(),
            });
        }
        for c in certs {
            roots.add(c).map_err(|source| CaFileError::Unusable {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The name an upstream's certificate must carry: its host (an IP address
/// is checked against the certificate's IP addresses, and sends no SNI).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).ok()
}
