//! Reload (SPEC 7.1), the parts that do not depend on how the server holds
//! its workers: reading the certificate and key with a message that names
//! the wrong file (also what `check` prints), and deciding whether a new
//! configuration may replace the running one.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError, TlsFiles};
use crate::metrics::{Metrics, ReloadResult};

/// A certificate or key file that cannot serve, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate chain", path.display())]
    NotCertificate { path: std::path::PathBuf },
    #[error("{}: not a PEM private key", path.display())]
    NotKey { path: std::path::PathBuf },
    #[error("{}: unusable private key: {source}", path.display())]
    BadKey {
        path: std::path::PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: key does not match certificate {}", key.display(), cert.display())]
    Mismatch {
        key: std::path::PathBuf,
        cert: std::path::PathBuf,
    },
    #[error("{}: {source}", cert.display())]
    Config {
        cert: std::path::PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and checks `[server] cert` and `key`, and builds the TLS
/// configuration (ALPN `h2`, `http/1.1`).
pub fn load_tls(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsFileError> {
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsFileError::NotCertificate {
            path: files.cert.clone(),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::NotCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsFileError::NotKey {
        path: files.key.clone(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    match rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsFileError::Mismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
            })
        }
        Err(rustls::Error::InvalidCertificate(_)) | Err(rustls::Error::NoCertificatesPresented) => {
            return Err(TlsFileError::NotCertificate {
                path: files.cert.clone(),
            })
        }
        Err(source) => {
            return Err(TlsFileError::BadKey {
                path: files.key.clone(),
                source,
            })
        }
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsFileError::Config {
            cert: files.cert.clone(),
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsFileError::Config {
            cert: files.cert.clone(),
            source,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What `check` runs after parsing: the access log file can be written,
/// and the TLS files when `tls = true`. The message has `check`'s shape
/// (`FILE: [server] cert: ...`).
pub fn check_files(config: &Config) -> Result<Option<rustls::ServerConfig>, ConfigError> {
    if let crate::config::AccessLogTarget::File(path) = &config.server.access_log {
        writable(path).map_err(|e| ConfigError::Invalid {
            path: config.source.display().to_string(),
            message: format!("[server] access_log: cannot open {}: {e}", path.display()),
        })?;
    }
    let Some(files) = &config.server.tls else {
        return Ok(None);
    };
    load_tls(files).map(Some).map_err(|e| {
        let key = match e {
            TlsFileError::NotKey { .. }
            | TlsFileError::BadKey { .. }
            | TlsFileError::Mismatch { .. } => "key",
            _ => "cert",
        };
        ConfigError::Invalid {
            path: config.source.display().to_string(),
            message: format!("[server] {key}: {e}"),
        }
    })
}

/// Whether the access log at `path` can be opened for appending, as the
/// server will: an existing file is opened (not changed), a missing one is
/// created and removed again, so `check` leaves no file behind (one owned
/// by the user who ran `check` rather than the service's user).
fn writable(path: &std::path::Path) -> std::io::Result<()> {
    use std::fs::OpenOptions;
    match OpenOptions::new().append(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(path)?;
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// Why a new configuration does not replace the running one.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Invalid: the message `check` prints.
    #[error("{0}")]
    Invalid(#[source] ConfigError),
    /// Valid, but it changes what only a restart can change.
    #[error("reload refused: {0}")]
    Refused(String),
    /// A new address cannot be bound (the message a start prints).
    #[error("{0}")]
    Bind(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ReloadError {
    pub fn result(&self) -> ReloadResult {
        match self {
            ReloadError::Invalid(_) | ReloadError::Bind(_) => ReloadResult::Invalid,
            ReloadError::Refused(_) => ReloadResult::Refused,
        }
    }
}

/// A configuration accepted for reload, with its TLS material read.
pub struct Prepared {
    pub config: Config,
    pub tls: Option<rustls::ServerConfig>,
}

/// Reads `path` again (with `secret_key_file`, `token_file`, the
/// certificate and key) and checks that it may replace `running`: a
/// different `[store]` needs a restart (the sessions live in it).
pub fn prepare(running: &Config, path: &Path) -> Result<Prepared, ReloadError> {
    let config = Config::load(path).map_err(ReloadError::Invalid)?;
    let tls = check_files(&config).map_err(ReloadError::Invalid)?;
    if config.store != running.store {
        return Err(ReloadError::Refused(
            "[store] changed: the store and its sessions are kept across reloads, so a new [store] needs a restart".into(),
        ));
    }
    Ok(Prepared { config, tls })
}

/// Refuses a new configuration that changes what is set up once at start:
/// TLS on or off (the listeners' protocol), an admin listener added or
/// removed, the access log's target and format, the user key (the store's
/// index). A moved `listen`, `redirect_http` or `[admin] listen` is rebound
/// by the reload.
pub fn restart_only_changes(running: &Config, new: &Config) -> Result<(), ReloadError> {
    let (a, b) = (&running.server, &new.server);
    let mut changed = Vec::new();
    if a.tls.is_some() != b.tls.is_some() {
        changed.push("[server] tls (turning TLS on or off)");
    }
    if a.access_log != b.access_log {
        changed.push("[server] access_log");
    }
    if a.access_log_format != b.access_log_format {
        changed.push("[server] access_log_format");
    }
    if running.admin.is_some() != new.admin.is_some() {
        changed.push("[admin] (added or removed)");
    }
    // The engine builds its index of users' sessions when it opens.
    if running.session.user_key != new.session.user_key {
        changed.push("[session] user_key");
    }
    if changed.is_empty() {
        Ok(())
    } else {
        Err(ReloadError::Refused(format!(
            "{} changed: this needs a restart",
            changed.join(", ")
        )))
    }
}

/// The keys a reload accepts but leaves at their start-up values (the
/// listeners' and workers' settings, read once), changed in `new`: the
/// reload says so rather than seem to apply them.
pub fn kept_until_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.server, &new.server);
    [
        (
            "keepalive_timeout",
            a.keepalive_timeout != b.keepalive_timeout,
        ),
        (
            "header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        (
            "h2_max_concurrent_streams",
            a.h2_max_concurrent_streams != b.h2_max_concurrent_streams,
        ),
        ("max_connections", a.max_connections != b.max_connections),
        ("shutdown_grace", a.shutdown_grace != b.shutdown_grace),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
}

/// Logs a reload that took effect and counts it in
/// `sessiongate_config_reloads_total{result="ok"}`.
pub fn record_success(metrics: &Metrics, path: &Path, routes: usize) {
    metrics.reload(ReloadResult::Ok);
    tracing::info!(config = %path.display(), routes, "configuration reloaded");
}

/// Logs a refused reload (the `check` message, or why it needs a
/// restart) and counts it.
pub fn record_failure(metrics: &Metrics, path: &Path, e: &ReloadError) {
    metrics.reload(e.result());
    tracing::error!(config = %path.display(), "reload failed, the running configuration serves on: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let k = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (k.cert.pem(), k.signing_key.serialize_pem())
    }

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        TlsFiles {
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
        }
    }

    fn config(server: &str, admin: &str) -> Config {
        let text = format!(
            "[server]\n{server}\n[session]\nsecret_key = \"0123456789abcdef0123456789abcdef\"\n{admin}\n[[route]]\nupstream = \"http://127.0.0.1:9000\"\n"
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    #[test]
    fn keys_read_once_are_named_when_a_reload_changes_them() {
        let plain = |port: u16| format!("listen = \"127.0.0.1:{port}\"\ntls = false");
        let running = config(&plain(8000), "");
        assert!(kept_until_restart(&running, &config(&plain(8000), "")).is_empty());
        let new = config(
            &format!(
                "{}\nkeepalive_timeout = \"3s\"\nmax_connections = 5",
                plain(8000)
            ),
            "",
        );
        assert_eq!(
            kept_until_restart(&running, &new),
            ["keepalive_timeout", "max_connections"]
        );
        let e = restart_only_changes(
            &running,
            &config(
                &format!("{}\naccess_log_format = \"json\"", plain(8000)),
                "",
            ),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("[server] access_log_format changed"),
            "{e}"
        );
    }

    #[test]
    fn moved_listeners_are_rebound_and_tls_on_or_off_needs_a_restart() {
        let plain = |port: u16| format!("listen = \"127.0.0.1:{port}\"\ntls = false");
        let admin = |port: u16| format!("[admin]\nlisten = \"127.0.0.1:{port}\"");
        let running = config(&plain(8000), &admin(9000));
        // Moved `listen` and `[admin] listen`: a reload rebinds them.
        assert!(restart_only_changes(&running, &config(&plain(8001), &admin(9001))).is_ok());
        let tls = "listen = \"127.0.0.1:8000\"\ntls = true\ncert = \"c.pem\"\nkey = \"k.pem\"";
        let e = restart_only_changes(&running, &config(tls, &admin(9000))).unwrap_err();
        assert!(
            e.to_string()
                .contains("[server] tls (turning TLS on or off) changed: this needs a restart"),
            "{e}"
        );
        let e = restart_only_changes(&running, &config(&plain(8000), "")).unwrap_err();
        assert!(e.to_string().contains("[admin] (added or removed)"), "{e}");
    }

    #[test]
    fn tls_files_name_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("sg-reload-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pair("a.test");
        let (_, other_key) = pair("b.test");
        assert!(load_tls(&files(&dir, &cert, &key)).is_ok());
        let e = load_tls(&files(&dir, &cert, &other_key)).unwrap_err();
        assert!(
            e.to_string()
                .contains("k.pem: key does not match certificate"),
            "{e}"
        );
        let e = load_tls(&files(&dir, &cert, "not a key\n")).unwrap_err();
        assert!(
            e.to_string().ends_with("k.pem: not a PEM private key"),
            "{e}"
        );
        let e = load_tls(&files(&dir, &key, &key)).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("c.pem: not a PEM certificate chain"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
