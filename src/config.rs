//! Configuration: the TOML schema of SPEC section 2, parsed strictly
//! (`deny_unknown_fields`), then validated into a [`Config`] the rest of the
//! program uses without re-checking anything.
//!
//! Parse errors are reported as `FILE:LINE:COL: message`; checks made after
//! parsing name the route (`FILE: route "NAME": message`) or the section.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// An error in the configuration file, already formatted for a person.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A TOML or schema error with its position.
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
    /// A check made after parsing: names the route or the section.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

// ---------------------------------------------------------------------------
// Value types: durations and sizes
// ---------------------------------------------------------------------------

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"14d"`, or an
/// integer number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

/// The longest duration a setting may hold (about 31,700 years): far beyond any
/// use, and far from overflowing the clock arithmetic it feeds.
const MAX_DURATION_SECS: u64 = 1_000_000_000_000;

/// Parses a duration string; also used for CLI flags and tests.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: expected e.g. \"30s\", \"5m\", \"14d\""
        ));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: bad number"))?;
    let unit_secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h, d or w)"
            ))
        }
    };
    let secs = value * unit_secs;
    if !secs.is_finite() || secs > MAX_DURATION_SECS as f64 {
        return Err(format!("invalid duration {s:?}: too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"5m\", \"14d\", or an integer of seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                if v < 0 {
                    return Err(E::custom("a duration cannot be negative"));
                }
                self.visit_u64(v as u64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                // The same bound as for strings.
                if v > MAX_DURATION_SECS {
                    return Err(E::custom(format!("invalid duration {v}: too large")));
                }
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte size written as `"10MiB"`, `"512KB"`, `"1G"`, or an integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. \"10MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "kib" => 1 << 10,
        "KB" | "kb" => 1000,
        "M" | "MiB" | "mib" => 1 << 20,
        "MB" | "mb" => 1_000_000,
        "G" | "GiB" | "gib" => 1 << 30,
        "GB" | "gb" => 1_000_000_000,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"10MiB\", or an integer of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    server: RawServer,
    session: RawSession,
    #[serde(default)]
    store: RawStore,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
    admin: Option<RawAdmin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    token: Option<String>,
    token_file: Option<String>,
}

fn default_true() -> bool {
    true
}
fn secs(n: u64) -> Dur {
    Dur(Duration::from_secs(n))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    #[serde(default = "default_true")]
    tls: bool,
    cert: Option<String>,
    key: Option<String>,
    redirect_http: Option<String>,
    #[serde(default)]
    hsts: Dur,
    #[serde(default = "d_header_read")]
    header_read_timeout: Dur,
    #[serde(default = "d_connect")]
    upstream_connect_timeout: Dur,
    #[serde(default = "d_upstream")]
    upstream_timeout: Dur,
    #[serde(default = "d_grace")]
    shutdown_grace: Dur,
    #[serde(default = "d_body")]
    max_request_body: Size,
    #[serde(default = "d_keepalive")]
    keepalive_timeout: Dur,
    #[serde(default = "d_max_connections")]
    max_connections: usize,
    #[serde(default = "d_h2_streams")]
    h2_max_concurrent_streams: u32,
    #[serde(default)]
    max_upstream_connections: usize,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default = "d_access_log")]
    access_log: String,
    #[serde(default = "d_access_log_format")]
    access_log_format: String,
    #[serde(default = "d_client_body")]
    client_body_timeout: Dur,
}
fn d_keepalive() -> Dur {
    secs(75)
}
fn d_max_connections() -> usize {
    10_000
}
fn d_h2_streams() -> u32 {
    100
}
fn d_access_log() -> String {
    "stderr".into()
}
fn d_access_log_format() -> String {
    "combined".into()
}
fn d_client_body() -> Dur {
    secs(60)
}
fn d_header_read() -> Dur {
    secs(10)
}
fn d_connect() -> Dur {
    secs(5)
}
fn d_upstream() -> Dur {
    secs(60)
}
fn d_grace() -> Dur {
    secs(30)
}
fn d_body() -> Size {
    Size(10 << 20)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    #[serde(default = "d_cookie_name")]
    cookie_name: String,
    #[serde(default = "d_cookie_age")]
    cookie_age: Dur,
    #[serde(default)]
    cookie_domain: String,
    #[serde(default = "d_cookie_path")]
    cookie_path: String,
    #[serde(default = "default_true")]
    cookie_secure: bool,
    #[serde(default = "default_true")]
    cookie_httponly: bool,
    #[serde(default = "d_samesite")]
    cookie_samesite: String,
    #[serde(default)]
    expire_at_browser_close: bool,
    #[serde(default)]
    save_every_request: bool,
    #[serde(default)]
    absolute_timeout: Dur,
    #[serde(default = "d_max_session")]
    max_session_size: Size,
    #[serde(default)]
    user_key: String,
    #[serde(default)]
    refresh_interval: Dur,
    secret_key: Option<String>,
    secret_key_file: Option<String>,
    #[serde(default)]
    secret_key_fallbacks: Vec<String>,
}
fn d_max_session() -> Size {
    Size(64 << 10)
}
fn d_cookie_name() -> String {
    "sessionid".into()
}
fn d_cookie_age() -> Dur {
    secs(14 * 86400)
}
fn d_cookie_path() -> String {
    "/".into()
}
fn d_samesite() -> String {
    "Lax".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "d_engine")]
    engine: String,
    path: Option<String>,
    url: Option<String>,
    #[serde(default = "d_store_timeout")]
    timeout: Dur,
    #[serde(default = "default_true")]
    encrypt: bool,
    #[serde(default = "d_sweep")]
    clear_expired_interval: Dur,
    #[serde(default = "d_table")]
    table: String,
    cache_url: Option<String>,
    format: Option<String>,
}
fn d_table() -> String {
    "django_session".into()
}
impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            engine: d_engine(),
            path: None,
            url: None,
            timeout: d_store_timeout(),
            encrypt: true,
            clear_expired_interval: d_sweep(),
            table: d_table(),
            cache_url: None,
            format: None,
        }
    }
}
fn d_engine() -> String {
    "memory".into()
}
fn d_store_timeout() -> Dur {
    secs(1)
}
fn d_sweep() -> Dur {
    secs(300)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    host: Option<String>,
    #[serde(default = "d_cookie_path")]
    path: String,
    upstream: Option<String>,
    upstreams: Option<Vec<String>>,
    upstream_ca: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default = "default_true")]
    preserve_host: bool,
    #[serde(default = "default_true")]
    session: bool,
    #[serde(default)]
    login_required: Vec<String>,
    #[serde(default = "d_login_url")]
    login_url: String,
    #[serde(default)]
    forward: BTreeMap<String, String>,
    #[serde(default)]
    cookie_passthrough: bool,
}
fn d_login_url() -> String {
    "/login".into()
}

// ---------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages); empty when built in code.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub store: StoreConfig,
    pub routes: Vec<RouteConfig>,
    /// `[admin]`: no admin listener without it.
    pub admin: Option<AdminConfig>,
}

/// `[admin]` (SPEC 7.2).
#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `token` or the contents of `token_file` (for the sessions API).
    pub token: Option<Vec<u8>>,
}

impl fmt::Debug for AdminConfig {
    // Never print the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where the access log goes (`[server] access_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stderr,
    File(PathBuf),
}

/// `[server] access_log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// nginx's `combined`, then the request time in seconds.
    Combined,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub redirect_http: Option<SocketAddr>,
    pub hsts: Duration,
    pub header_read_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_request_body: u64,
    /// An idle client connection is closed after this.
    pub keepalive_timeout: Duration,
    /// Client connections held at once (all workers together).
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// Connections per upstream address (each worker's share); 0: no limit.
    pub max_upstream_connections: usize,
    /// Peers whose `X-Forwarded-For`/`-Proto`/`-Host` are believed (SPEC 7.4).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `listen` expects a PROXY protocol (v1 or v2) header first.
    pub proxy_protocol: bool,
    pub access_log: AccessLogTarget,
    pub access_log_format: AccessLogFormat,
    /// The longest silence while reading a request body (-> 408).
    pub client_body_timeout: Duration,
}

impl ServerConfig {
    /// Whether `ip` is one of `trusted_proxies`.
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
    Omit,
}

#[derive(Clone)]
pub struct SessionConfig {
    pub cookie_name: String,
    pub cookie_age: Duration,
    pub cookie_domain: String,
    pub cookie_path: String,
    pub cookie_secure: bool,
    pub cookie_httponly: bool,
    pub cookie_samesite: SameSite,
    pub expire_at_browser_close: bool,
    pub save_every_request: bool,
    pub absolute_timeout: Duration,
    /// The longest session JSON a change may make (0: no limit).
    pub max_session_size: u64,
    /// The session key that names the user (SPEC 9); `None`: no user index.
    pub user_key: Option<String>,
    /// Sliding expiry (SPEC 10): refresh a persistent session whose last
    /// write is older than this; zero: off.
    pub refresh_interval: Duration,
    pub secret_key: Vec<u8>,
    pub secret_key_fallbacks: Vec<Vec<u8>>,
}

impl fmt::Debug for SessionConfig {
    // Never print secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("cookie_name", &self.cookie_name)
            .field("cookie_age", &self.cookie_age)
            .field("cookie_domain", &self.cookie_domain)
            .field("cookie_path", &self.cookie_path)
            .field("cookie_secure", &self.cookie_secure)
            .field("cookie_httponly", &self.cookie_httponly)
            .field("cookie_samesite", &self.cookie_samesite)
            .field("expire_at_browser_close", &self.expire_at_browser_close)
            .field("save_every_request", &self.save_every_request)
            .field("absolute_timeout", &self.absolute_timeout)
            .field("max_session_size", &self.max_session_size)
            .field("user_key", &self.user_key)
            .field("refresh_interval", &self.refresh_interval)
            .field("secret_key", &"<redacted>")
            .field("secret_key_fallbacks", &self.secret_key_fallbacks.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Memory,
    File,
    CachedFile,
    SignedCookies,
    Redis,
    CachedRedis,
    /// Django's `db` engine (SPEC 8): SQLite or PostgreSQL.
    Db,
    /// `db` with Redis (`cache_url`) in front.
    CachedDb,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::File => "file",
            Engine::CachedFile => "cached_file",
            Engine::SignedCookies => "signed_cookies",
            Engine::Redis => "redis",
            Engine::CachedRedis => "cached_redis",
            Engine::Db => "db",
            Engine::CachedDb => "cached_db",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub engine: Engine,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub timeout: Duration,
    pub encrypt: bool,
    pub clear_expired_interval: Duration,
    /// `db`: where the table lives (parsed from `url`).
    pub db: Option<DbUrl>,
    /// `db`: the sessions table (Django's `django_session`).
    pub table: String,
    /// `cached_db`: the Redis server in front of the table.
    pub cache_url: Option<String>,
    /// `signed_cookies` with `format = "django"`: Django's cookie format.
    pub django_format: bool,
}

/// The database of the `db` engine.
#[derive(Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// `sqlite://relative/path` (to the config file's directory) or
    /// `sqlite:///absolute/path`.
    Sqlite(PathBuf),
    /// `postgres://user:password@host:port/name` (or `postgresql://`), as written.
    Postgres(String),
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            // The URL may carry a password.
            DbUrl::Postgres(_) => f.write_str("postgres://<redacted>"),
        }
    }
}

impl DbUrl {
    fn parse(base: &Path, url: &str) -> Result<DbUrl, String> {
        if let Some(rest) = url.strip_prefix("sqlite://") {
            if rest.is_empty() || rest == "/" {
                return Err("[store] url: \"sqlite://\" needs a file path, e.g. \"sqlite://var/sessions.sqlite3\"".into());
            }
            return Ok(DbUrl::Sqlite(resolve(base, rest)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DbUrl::Postgres(url.to_string()));
        }
        Err("[store] url: engine \"db\" needs a \"sqlite://PATH\" or \"postgres://user:password@host:port/name\" URL".into())
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The configured name, or `#N` (1-based) when none was given.
    pub name: String,
    /// Lower-case host name without port.
    pub host: Option<String>,
    /// Normalised prefix: starts with `/`, no trailing `/` except for the root.
    pub path: String,
    pub upstreams: Vec<Upstream>,
    pub strip_prefix: bool,
    pub preserve_host: bool,
    pub session: bool,
    pub login_required: Vec<String>,
    pub login_url: String,
    /// Header name -> session key.
    pub forward: Vec<(HeaderName, String)>,
    /// `session = false` only: the session cookie and the upstream's
    /// `Set-Cookie` for it pass untouched (a Django app's routes, SPEC 8).
    pub cookie_passthrough: bool,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http://host:port` or `https://host:port` as written (normalised,
    /// without a trailing slash).
    pub base: String,
    /// Where to connect: the host and port as written (443 added to an
    /// `https://` URL without one, 80 is the default of `http://`).
    pub authority: http::uri::Authority,
    /// `https://`.
    pub https: bool,
    /// For `https://`: the client configuration and the certificate's
    /// name (set once the route's `upstream_ca` is read).
    pub tls: Option<crate::proxy::upstream_tls::UpstreamTls>,
    /// `Host` for the upstream when `preserve_host = false`.
    pub host_value: http::HeaderValue,
    /// Path prefix of the upstream URL ("" when none).
    pub path: String,
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` names the file in messages and
    /// anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            let message = e.message().trim().replace('\n', " ");
            let at = text.lines().nth(line - 1).unwrap_or("");
            ConfigError::Parse {
                path: shown.clone(),
                line,
                col,
                message: explain(message, at),
            }
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        validate(raw, &base, path).map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })
    }
}

impl Config {
    /// What `check` and `run` warn about in a valid configuration.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let example = |k: &[u8]| k.starts_with(EXAMPLE_SECRET_PREFIX);
        if example(&self.session.secret_key)
            || self.session.secret_key_fallbacks.iter().any(|k| example(k))
        {
            out.push(
                "[session] secret_key is the public example key (CHANGE-ME...): anyone can forge session ids and signed cookies with it; make your own with `openssl rand -hex 32`".to_string(),
            );
        }
        out
    }
}

/// toml's message, said in the file's terms where it speaks serde's:
/// `at` is the line the error points at.
fn explain(message: String, at: &str) -> String {
    if at.trim_start().starts_with("[route]") {
        // `invalid type: map, expected a sequence`, or `duplicate key`
        // after a `[[route]]`.
        return "[route] is written [[route]]: each route is one table of an array, even when there is one".into();
    }
    match message.strip_prefix("missing field `") {
        Some(rest) => {
            let key = rest.trim_end_matches('`');
            match key {
                "server" => {
                    "missing section [server] (it needs at least listen = \"ADDRESS:PORT\")".into()
                }
                "session" => "missing section [session] (it needs at least secret_key)".into(),
                _ => format!("missing key `{key}`"),
            }
        }
        None => message,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map(|i| before[i + 1..].chars().count() + 1)
        .unwrap_or_else(|| before.chars().count() + 1);
    (line, col)
}

fn valid_table_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 63
        && !t.as_bytes()[0].is_ascii_digit()
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let shape = || format!("[server] {what}: {s:?} is not an address such as \"127.0.0.1:8443\"");
    // `host:port` with a host name: say whether the name or the shape is wrong.
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(shape());
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(shape());
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it.next().ok_or_else(|| {
            format!("[server] {what}: the host name {host:?} resolves to no address")
        }),
        Err(e) => Err(format!(
            "[server] {what}: the host name {host:?} does not resolve ({e}); use an IP address such as \"127.0.0.1:{port}\" or a name in /etc/hosts"
        )),
    }
}

/// The secret of the example configuration, public in the repository.
const EXAMPLE_SECRET_PREFIX: &[u8] = b"CHANGE-ME";

fn validate(raw: RawFile, base: &Path, file: &Path) -> Result<Config, String> {
    // [server]
    let s = raw.server;
    let listen = parse_addr("listen", &s.listen)?;
    let tls = if s.tls {
        let cert = s
            .cert
            .ok_or("[server] cert: required when tls = true (or set tls = false)")?;
        let key = s
            .key
            .ok_or("[server] key: required when tls = true (or set tls = false)")?;
        Some(TlsFiles {
            cert: resolve(base, &cert),
            key: resolve(base, &key),
        })
    } else {
        None
    };
    let redirect_http = match s.redirect_http.as_deref() {
        None | Some("") => None,
        Some(a) => {
            if tls.is_none() {
                return Err(
                    "[server] redirect_http: needs tls = true (it redirects to https)".into(),
                );
            }
            Some(parse_addr("redirect_http", a)?)
        }
    };
    if s.max_request_body.0 == 0 {
        return Err("[server] max_request_body: must be greater than 0".into());
    }
    let server = ServerConfig {
        listen,
        tls,
        redirect_http,
        hsts: s.hsts.0,
        header_read_timeout: nonzero("[server] header_read_timeout", s.header_read_timeout.0)?,
        upstream_connect_timeout: nonzero(
            "[server] upstream_connect_timeout",
            s.upstream_connect_timeout.0,
        )?,
        upstream_timeout: nonzero("[server] upstream_timeout", s.upstream_timeout.0)?,
        shutdown_grace: s.shutdown_grace.0,
        max_request_body: s.max_request_body.0,
        trusted_proxies: s
            .trusted_proxies
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<_, _>>()?,
        proxy_protocol: s.proxy_protocol,
        access_log: match s.access_log.as_str() {
            "off" => AccessLogTarget::Off,
            "stderr" => AccessLogTarget::Stderr,
            "" => {
                return Err(
                    "[server] access_log: expected \"off\", \"stderr\" or a file path".into(),
                )
            }
            p => AccessLogTarget::File(resolve(base, p)),
        },
        access_log_format: match s.access_log_format.as_str() {
            "combined" => AccessLogFormat::Combined,
            "json" => AccessLogFormat::Json,
            other => {
                return Err(format!(
                    "[server] access_log_format: {other:?}: expected \"combined\" or \"json\""
                ))
            }
        },
        keepalive_timeout: nonzero("[server] keepalive_timeout", s.keepalive_timeout.0)?,
        max_connections: match s.max_connections {
            0 => return Err("[server] max_connections: must be at least 1".into()),
            n => n,
        },
        h2_max_concurrent_streams: match s.h2_max_concurrent_streams {
            0 => return Err("[server] h2_max_concurrent_streams: must be at least 1".into()),
            n => n,
        },
        max_upstream_connections: s.max_upstream_connections,
        client_body_timeout: nonzero("[server] client_body_timeout", s.client_body_timeout.0)?,
    };

    // [session]
    let ss = raw.session;
    let mut key_file = None;
    let secret_key = match (ss.secret_key, ss.secret_key_file) {
        (Some(_), Some(_)) => {
            return Err("[session]: set secret_key or secret_key_file, not both".into())
        }
        (Some(k), None) => k.into_bytes(),
        (None, Some(f)) => {
            let p = resolve(base, &f);
            let text = std::fs::read(&p).map_err(|e| {
                format!(
                    "[session] secret_key_file: cannot read {}: {e}",
                    p.display()
                )
            })?;
            let mut text = text;
            while text.last().is_some_and(|b| b.is_ascii_whitespace()) {
                text.pop();
            }
            key_file = Some(p);
            text
        }
        (None, None) => {
            return Err(
                "[session] secret_key: required (or secret_key_file), at least 32 bytes; make one with `openssl rand -hex 32`".into(),
            )
        }
    };
    if secret_key.len() < 32 {
        return Err(match key_file {
            Some(p) => format!(
                "[session] secret_key_file: {} holds {} bytes (trailing whitespace aside); the key must be at least 32",
                p.display(),
                secret_key.len()
            ),
            None => format!(
                "[session] secret_key: must be at least 32 bytes, got {}",
                secret_key.len()
            ),
        });
    }
    for (i, k) in ss.secret_key_fallbacks.iter().enumerate() {
        if k.len() < 32 {
            return Err(format!(
                "[session] secret_key_fallbacks[{i}]: must be at least 32 bytes"
            ));
        }
    }
    let name = ss.cookie_name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(format!(
            "[session] cookie_name: {name:?} is not a valid cookie name"
        ));
    }
    let samesite = match ss.cookie_samesite.as_str() {
        "Strict" | "strict" => SameSite::Strict,
        "Lax" | "lax" => SameSite::Lax,
        "None" | "none" => SameSite::None,
        "" => SameSite::Omit,
        other => {
            return Err(format!(
                "[session] cookie_samesite: {other:?} must be \"Strict\", \"Lax\", \"None\" or \"\""
            ))
        }
    };
    if samesite == SameSite::None && !ss.cookie_secure {
        return Err(
            "[session] cookie_samesite = \"None\" requires cookie_secure = true (browsers reject it otherwise)"
                .into(),
        );
    }
    if !ss.cookie_path.starts_with('/')
        || ss
            .cookie_path
            .bytes()
            .any(|b| b == b';' || !(0x21..0x7f).contains(&b))
    {
        return Err(format!(
            "[session] cookie_path: {:?} must start with \"/\"",
            ss.cookie_path
        ));
    }
    if ss
        .cookie_domain
        .bytes()
        .any(|b| b == b';' || !(0x21..0x7f).contains(&b))
    {
        return Err(format!(
            "[session] cookie_domain: {:?} is not a domain",
            ss.cookie_domain
        ));
    }
    // Browsers match the prefixes in any case (RFC 6265bis 4.1.3): a
    // `__host-` cookie that breaks the rules is refused by them as well.
    let prefixed = |p: &str| {
        name.get(..p.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(p))
    };
    if prefixed("__Host-") {
        if !ss.cookie_secure {
            return Err(
                "[session] cookie_name: the __Host- prefix requires cookie_secure = true".into(),
            );
        }
        if ss.cookie_path != "/" {
            return Err(
                "[session] cookie_name: the __Host- prefix requires cookie_path = \"/\"".into(),
            );
        }
        if !ss.cookie_domain.is_empty() {
            return Err("[session] cookie_name: the __Host- prefix requires cookie_domain = \"\" (no domain)".into());
        }
    }
    if prefixed("__Secure-") && !ss.cookie_secure {
        return Err(
            "[session] cookie_name: the __Secure- prefix requires cookie_secure = true".into(),
        );
    }
    if ss.cookie_age.0.as_secs() == 0 {
        return Err("[session] cookie_age: must be at least 1s".into());
    }
    const CENTURY: u64 = 100 * 365 * 86400;
    if ss.cookie_age.0.as_secs() > CENTURY {
        return Err("[session] cookie_age: must be at most 100 years".into());
    }
    if ss.absolute_timeout.0.as_secs() > CENTURY {
        return Err("[session] absolute_timeout: must be at most 100 years".into());
    }
    if ss.refresh_interval.0.as_secs() > CENTURY {
        return Err("[session] refresh_interval: must be at most 100 years".into());
    }
    if !ss.refresh_interval.0.is_zero() && ss.refresh_interval.0 >= ss.cookie_age.0 {
        return Err(format!(
            "[session] refresh_interval: must be shorter than cookie_age ({}s), or a session expires before its refresh is due",
            ss.cookie_age.0.as_secs()
        ));
    }
    if !ss.refresh_interval.0.is_zero() && ss.save_every_request {
        return Err("[session] refresh_interval: not with save_every_request = true (every request already refreshes the session)".into());
    }
    let user_key =
        match ss.user_key.as_str() {
            "" => None,
            "_session_expiry" => return Err(
                "[session] user_key: \"_session_expiry\" is the expiry Django keeps, not a user"
                    .into(),
            ),
            k => Some(k.to_owned()),
        };
    let session = SessionConfig {
        cookie_name: name,
        cookie_age: ss.cookie_age.0,
        cookie_domain: ss.cookie_domain,
        cookie_path: ss.cookie_path,
        cookie_secure: ss.cookie_secure,
        cookie_httponly: ss.cookie_httponly,
        cookie_samesite: samesite,
        expire_at_browser_close: ss.expire_at_browser_close,
        save_every_request: ss.save_every_request,
        absolute_timeout: ss.absolute_timeout.0,
        max_session_size: ss.max_session_size.0,
        user_key,
        refresh_interval: ss.refresh_interval.0,
        secret_key,
        secret_key_fallbacks: ss
            .secret_key_fallbacks
            .into_iter()
            .map(String::into_bytes)
            .collect(),
    };

    // [store]
    let st = raw.store;
    let engine = match st.engine.as_str() {
        "memory" => Engine::Memory,
        "file" => Engine::File,
        "cached_file" => Engine::CachedFile,
        "signed_cookies" => Engine::SignedCookies,
        "redis" => Engine::Redis,
        "cached_redis" => Engine::CachedRedis,
        "db" => Engine::Db,
        "cached_db" => Engine::CachedDb,
        other => {
            return Err(format!(
                "[store] engine: unknown engine {other:?} (memory, file, cached_file, signed_cookies, redis, cached_redis, db, cached_db)"
            ))
        }
    };
    if matches!(engine, Engine::File | Engine::CachedFile) && st.path.is_none() {
        return Err(format!(
            "[store] path: required for engine {:?}",
            engine.name()
        ));
    }
    if matches!(engine, Engine::Redis | Engine::CachedRedis) && st.url.is_none() {
        return Err(format!(
            "[store] url: required for engine {:?}",
            engine.name()
        ));
    }
    let db = if matches!(engine, Engine::Db | Engine::CachedDb) {
        let url = st.url.as_deref().ok_or_else(|| {
            format!(
                "[store] url: required for engine {:?} (e.g. \"sqlite://var/sessions.sqlite3\")",
                engine.name()
            )
        })?;
        Some(DbUrl::parse(base, url)?)
    } else {
        None
    };
    if !valid_table_name(&st.table) {
        return Err(format!(
            "[store] table: {:?} is not a plain SQL table name (letters, digits and _, not starting with a digit, at most 63 bytes)",
            st.table
        ));
    }
    if let (Engine::Redis | Engine::CachedRedis, Some(url)) = (engine, &st.url) {
        crate::store::redis::validate_url(url).map_err(|e| e.to_string())?;
    }
    let cache_url = match (engine, st.cache_url) {
        (Engine::CachedDb, Some(u)) => Some(u),
        (Engine::CachedDb, None) => {
            return Err("[store] cache_url: required for engine \"cached_db\" (e.g. \"redis://127.0.0.1:6379/1\")".into())
        }
        (_, Some(_)) => {
            return Err("[store] cache_url: only for engine \"cached_db\"".into())
        }
        (_, None) => None,
    };
    let django_format = match st.format.as_deref() {
        None | Some("sessiongate") => false,
        Some("django") if engine == Engine::SignedCookies => true,
        Some("django") => {
            return Err("[store] format: \"django\" is only for engine \"signed_cookies\" (engine \"db\" always uses Django's format)".into())
        }
        Some(other) => {
            return Err(format!(
                "[store] format: unknown format {other:?} (\"sessiongate\" or \"django\")"
            ))
        }
    };
    if engine == Engine::SignedCookies && session.user_key.is_some() {
        return Err("[session] user_key: not with engine \"signed_cookies\" (the sessions live in the browsers, so there is no server-side index of a user's sessions to end)".into());
    }
    let store = StoreConfig {
        django_format,
        cache_url,
        db,
        table: st.table,
        engine,
        path: st.path.map(|p| resolve(base, &p)),
        url: st.url,
        timeout: nonzero("[store] timeout", st.timeout.0)?,
        encrypt: st.encrypt,
        clear_expired_interval: st.clear_expired_interval.0,
    };

    // [[route]]
    if raw.routes.is_empty() {
        return Err("no [[route]]: at least one route is required".into());
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.into_iter().enumerate() {
        let label = match &r.name {
            Some(n) => n.clone(),
            None => format!("#{}", i + 1),
        };
        let route =
            validate_route(r, label.clone(), base).map_err(|m| format!("route {label:?}: {m}"))?;
        routes.push(route);
    }
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[..i] {
            if a.host == b.host && a.path == b.path {
                return Err(format!(
                    "route {:?}: same host and path as route {:?}",
                    a.name, b.name
                ));
            }
            if a.name == b.name {
                return Err(format!("route {:?}: the name is used twice", a.name));
            }
        }
    }

    // [admin]
    let admin = match raw.admin {
        None => None,
        Some(a) => {
            let listen = parse_addr("listen", &a.listen)
                .map_err(|m| m.replacen("[server]", "[admin]", 1))?;
            let token = match (a.token, a.token_file) {
                (Some(_), Some(_)) => {
                    return Err("[admin]: set token or token_file, not both".into())
                }
                (Some(t), None) if t.is_empty() => None,
                (Some(t), None) => Some(t.into_bytes()),
                (None, Some(f)) => {
                    let p = resolve(base, &f);
                    let mut t = std::fs::read(&p).map_err(|e| {
                        format!("[admin] token_file: cannot read {}: {e}", p.display())
                    })?;
                    while t.last().is_some_and(|b| b.is_ascii_whitespace()) {
                        t.pop();
                    }
                    if t.is_empty() {
                        return Err(format!("[admin] token_file: {} is empty", p.display()));
                    }
                    Some(t)
                }
                (None, None) => None,
            };
            Some(AdminConfig { listen, token })
        }
    };
    if let Some(a) = &admin {
        if a.listen.port() != 0
            && (a.listen == server.listen || Some(a.listen) == server.redirect_http)
        {
            return Err(
                "[admin] listen: must differ from [server] listen and redirect_http".into(),
            );
        }
    }

    Ok(Config {
        source: file.to_path_buf(),
        server,
        session,
        store,
        routes,
        admin,
    })
}

/// A CIDR (`10.0.0.0/8`) or a single address (a /32 or /128).
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let t = s.trim();
    t.parse::<ipnet::IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("[server] trusted_proxies: {s:?} is not a CIDR such as \"10.0.0.0/8\" or an address")
        })
}

fn nonzero(what: &str, d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("{what}: must be greater than 0"))
    } else {
        Ok(d)
    }
}

fn validate_route(r: RawRoute, name: String, base: &Path) -> Result<RouteConfig, String> {
    let list = match (r.upstream, r.upstreams) {
        (Some(_), Some(_)) => return Err("set upstream or upstreams, not both".into()),
        (Some(u), None) => vec![u],
        (None, Some(v)) if !v.is_empty() => v,
        _ => return Err("upstream: required (or upstreams = [...])".into()),
    };
    let mut upstreams = list
        .iter()
        .map(|u| parse_upstream(u))
        .collect::<Result<Vec<_>, _>>()?;
    let https = upstreams.iter().any(|u| u.https);
    let ca = r.upstream_ca.filter(|c| !c.is_empty());
    if ca.is_some() && !https {
        return Err("upstream_ca: only for https:// upstreams".into());
    }
    if https {
        // One client configuration (roots, the CA file read now: by
        // `check`, at start and at each reload) for the route's upstreams.
        let ca = ca.map(|c| resolve(base, &c));
        let config = crate::proxy::upstream_tls::client_config(ca.as_deref())
            .map_err(|e| format!("upstream_ca: {e}"))?;
        for u in upstreams.iter_mut().filter(|u| u.https) {
            let server_name = crate::proxy::upstream_tls::server_name(u.authority.host())
                .ok_or_else(|| {
                    format!("upstream: {:?}: the host is not a valid TLS name", u.base)
                })?;
            u.tls = Some(crate::proxy::upstream_tls::UpstreamTls {
                config: config.clone(),
                server_name,
            });
        }
    }
    if !r.path.starts_with('/') {
        return Err(format!("path: {:?} must start with \"/\"", r.path));
    }
    let mut path = r.path.clone();
    while path.len() > 1 && path.ends_with('/') {
        path.pop();
    }
    let host = match r.host {
        Some(h) if !h.is_empty() => {
            let h = h.to_ascii_lowercase();
            // Without its port, and without a trailing dot (the request's
            // Host is read so too).
            let h = strip_port(&h);
            let h = h.strip_suffix('.').unwrap_or(h).to_string();
            if h.is_empty() || h.bytes().any(|b| b <= 0x20 || b == b'/') {
                return Err(format!("host: {h:?} is not a host name"));
            }
            Some(h)
        }
        _ => None,
    };
    let mut forward = Vec::new();
    for (header, key) in r.forward {
        let hn = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("forward: {header:?} is not a valid header name"))?;
        // CGI, WSGI, PHP and Rack read `X_User` and `X-User` as one
        // variable: a name with `_` would let a client's `X-User` pass for
        // it (the proxy removes client names that read as its own).
        if header.contains('_') {
            return Err(format!(
                "forward: {header:?}: use - rather than _ in a header name (upstreams read both as the same variable)"
            ));
        }
        let reserved = crate::proxy::headers::is_hop_by_hop(&hn)
            || hn.as_str().starts_with("x-session")
            || hn.as_str().starts_with("x-forwarded-")
            || [
                http::header::HOST,
                http::header::COOKIE,
                http::header::CONTENT_LENGTH,
                http::header::CONTENT_TYPE,
                http::header::EXPECT,
                http::header::AUTHORIZATION,
            ]
            .contains(&hn);
        if reserved {
            return Err(format!(
                "forward: {header:?} cannot be set from the session (reserved or framing header)"
            ));
        }
        if forward.iter().any(|(n, _)| *n == hn) {
            return Err(format!("forward: {header:?} is listed twice"));
        }
        forward.push((hn, key));
    }
    if !r.session && (!r.login_required.is_empty() || !forward.is_empty()) {
        return Err("login_required and forward need session = true".into());
    }
    if !r.login_url.starts_with('/') && !r.login_url.starts_with("http") {
        return Err(format!(
            "login_url: {:?} must be a path or an URL",
            r.login_url
        ));
    }
    if r.login_url.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(format!(
            "login_url: {:?} must be visible ASCII",
            r.login_url
        ));
    }
    if r.cookie_passthrough && r.session {
        return Err(
            "cookie_passthrough: only for a route with session = false (the session cookie belongs to the app behind it)".into(),
        );
    }
    Ok(RouteConfig {
        cookie_passthrough: r.cookie_passthrough,
        name,
        host,
        path,
        upstreams,
        strip_prefix: r.strip_prefix,
        preserve_host: r.preserve_host,
        session: r.session,
        login_required: r.login_required,
        login_url: r.login_url,
        forward,
    })
}

fn parse_upstream(u: &str) -> Result<Upstream, String> {
    let uri: http::Uri = u
        .parse()
        .map_err(|_| format!("upstream: {u:?} is not an URL such as \"http://127.0.0.1:9000\""))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "upstream: {u:?} must start with http:// or https://"
            ))
        }
    };
    let written = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("upstream: {u:?} has no host"))?;
    // `user:password@` would be ignored (nothing sends it), and it is not
    // echoed back here either.
    if let Some((_, host)) = written.as_str().rsplit_once('@') {
        return Err(format!(
            "upstream: \"{}://…@{host}\" must not carry a user name or password",
            uri.scheme_str().unwrap_or("http")
        ));
    }
    let authority = match (https, written.port_u16()) {
        (true, None) => format!("{}:443", written.host())
            .parse()
            .map_err(|_| format!("upstream: {u:?} has an invalid host"))?,
        _ => written.clone(),
    };
    if uri.query().is_some() {
        return Err(format!("upstream: {u:?} must not have a query"));
    }
    let mut path = uri.path().to_string();
    while path.ends_with('/') {
        path.pop();
    }
    let host_value = http::HeaderValue::from_str(written.as_str())
        .map_err(|_| format!("upstream: {u:?} has an invalid host"))?;
    Ok(Upstream {
        base: format!("{}://{written}", if https { "https" } else { "http" }),
        authority,
        https,
        tls: None,
        host_value,
        path,
    })
}

/// Removes a `:port` suffix from a host (keeps IPv6 brackets).
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(i) => &host[..i + 2],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    fn minimal(extra_session: &str, routes: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\n\n[session]\nsecret_key = \"{SECRET}\"\n{extra_session}\n\n{routes}"
        )
    }

    const ROUTE: &str = "[[route]]\nname = \"app\"\nupstream = \"http://127.0.0.1:9000\"\n";

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("14d").unwrap(),
            Duration::from_secs(14 * 86400)
        );
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn integer_durations_have_the_strings_bound() {
        let text = |v: &str| {
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\nupstream_timeout = {v}\n\n[session]\nsecret_key = \"{SECRET}\"\n\n{ROUTE}"
            )
        };
        let c = parse(&text("1000000000000")).unwrap();
        assert_eq!(
            c.server.upstream_timeout,
            Duration::from_secs(1_000_000_000_000)
        );
        for v in ["1000000000001", "9223372036854775807"] {
            let e = parse(&text(v)).unwrap_err().to_string();
            assert!(
                e.starts_with("test.toml:4:") && e.contains("too large"),
                "{e}"
            );
        }
        assert!(parse_duration("1000000000001s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1KB").unwrap(), 1000);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(parse_size("ten").is_err());
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(&minimal("", ROUTE)).unwrap();
        assert_eq!(c.session.cookie_name, "sessionid");
        assert_eq!(c.session.cookie_age, Duration::from_secs(14 * 86400));
        assert!(c.session.cookie_secure);
        assert_eq!(c.store.engine, Engine::Memory);
        assert_eq!(c.server.max_request_body, 10 << 20);
        assert_eq!(c.routes[0].path, "/");
        assert!(c.routes[0].session && c.routes[0].preserve_host);
    }

    #[test]
    fn body_timeout_and_session_size() {
        let c = parse(&minimal("", ROUTE)).unwrap();
        assert_eq!(c.server.client_body_timeout, Duration::from_secs(60));
        assert_eq!(c.session.max_session_size, 64 << 10);
        let c = parse(&minimal("max_session_size = \"8KiB\"", ROUTE)).unwrap();
        assert_eq!(c.session.max_session_size, 8 << 10);
        let text =
            minimal("", ROUTE).replace("tls = false", "tls = false\nclient_body_timeout = \"0s\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("client_body_timeout"), "{e}");
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let text = minimal("cookie_secur = false", ROUTE);
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("test.toml:7:1: "), "{e}");
        assert!(e.contains("cookie_secur"), "{e}");
    }

    #[test]
    fn bad_duration_has_position() {
        let text = minimal("cookie_age = \"2 fortnights\"", ROUTE);
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("test.toml:7:"), "{e}");
        assert!(e.contains("duration"), "{e}");
    }

    #[test]
    fn host_prefix_rules_are_checked() {
        let e = parse(&minimal(
            "cookie_name = \"__Host-sid\"\ncookie_domain = \"example.com\"",
            ROUTE,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("__Host-") && e.contains("domain"), "{e}");
        let e = parse(&minimal(
            "cookie_name = \"__Host-sid\"\ncookie_secure = false",
            ROUTE,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cookie_secure"), "{e}");
        let e = parse(&minimal(
            "cookie_name = \"__Host-sid\"\ncookie_path = \"/app\"",
            ROUTE,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cookie_path"), "{e}");
        assert!(parse(&minimal("cookie_name = \"__Host-sid\"", ROUTE)).is_ok());
        // In any case, as browsers match them.
        for name in ["__host-sid", "__HOST-sid", "__secure-sid", "__SECURE-sid"] {
            let e = parse(&minimal(
                &format!("cookie_name = \"{name}\"\ncookie_secure = false"),
                ROUTE,
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("prefix requires cookie_secure"), "{name}: {e}");
        }
    }

    #[test]
    fn an_upstream_with_userinfo_is_refused_without_echoing_it() {
        for u in [
            "http://u:secret@127.0.0.1:9000",
            "https://secret@app.internal/x",
        ] {
            let e = parse(&minimal(
                "",
                &format!("[[route]]\nname = \"app\"\nupstream = \"{u}\"\n"),
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("must not carry a user name or password"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn a_refresh_interval_must_come_before_the_cookie_expires() {
        for interval in ["14d", "15d"] {
            let e = parse(&minimal(
                &format!("refresh_interval = \"{interval}\""),
                ROUTE,
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("must be shorter than cookie_age (1209600s)"),
                "{e}"
            );
        }
        assert!(parse(&minimal("refresh_interval = \"13d\"", ROUTE)).is_ok());
    }

    #[test]
    fn a_short_secret_key_file_is_named() {
        let path = std::env::temp_dir().join(format!("sg-short-key-{}", std::process::id()));
        std::fs::write(&path, "too short\n").unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\n\n[session]\nsecret_key_file = \"{}\"\n\n{ROUTE}",
            path.display()
        );
        let e = parse(&text).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains(&format!(
                "secret_key_file: {} holds 9 bytes",
                path.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn forward_names_with_underscores_are_refused() {
        let e = parse(&minimal(
            "",
            "[[route]]\nname = \"app\"\nupstream = \"http://127.0.0.1:9000\"\nforward = { \"X_User\" = \"u\" }\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("use - rather than _"), "{e}");
    }

    #[test]
    fn samesite_none_needs_secure() {
        let e = parse(&minimal(
            "cookie_samesite = \"None\"\ncookie_secure = false",
            ROUTE,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cookie_secure"), "{e}");
    }

    #[test]
    fn https_upstreams_get_port_443_and_a_tls_name() {
        let c = parse(&minimal(
            "",
            "[[route]]\nupstreams = [\"https://app.internal\", \"https://[::1]:9443/base\", \"http://b:80\"]\n",
        ))
        .unwrap();
        let u = &c.routes[0].upstreams;
        assert_eq!(u[0].base, "https://app.internal");
        assert_eq!(u[0].authority.as_str(), "app.internal:443");
        assert_eq!(u[0].host_value, "app.internal");
        assert_eq!(
            u[0].tls.as_ref().unwrap().server_name.to_str(),
            "app.internal"
        );
        assert_eq!(u[1].authority.as_str(), "[::1]:9443");
        assert_eq!(u[1].path, "/base");
        assert_eq!(u[1].tls.as_ref().unwrap().server_name.to_str(), "::1");
        assert!(u[2].tls.is_none() && !u[2].https);
        let e = parse(&minimal(
            "",
            "[[route]]\nname = \"p\"\nupstream = \"http://b:80\"\nupstream_ca = \"ca.pem\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("route \"p\": upstream_ca: only for https:// upstreams"),
            "{e}"
        );
    }

    #[test]
    fn short_or_missing_secret() {
        let text =
            "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\n[session]\n".to_string() + ROUTE;
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("secret_key"), "{e}");
        let text = text.replace("[session]\n", "[session]\nsecret_key = \"short\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("32 bytes"), "{e}");
    }

    #[test]
    fn route_errors_name_the_route() {
        let e = parse(&minimal(
            "",
            "[[route]]\nname = \"api\"\nupstream = \"ftp://x\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("test.toml: route \"api\": upstream"), "{e}");
        let e = parse(&minimal("", "[[route]]\nname = \"api\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("route \"api\"") && e.contains("upstream"), "{e}");
    }

    #[test]
    fn tls_needs_cert() {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[session]\nsecret_key = \"{SECRET}\"\n{ROUTE}"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("cert"), "{e}");
    }

    #[test]
    fn route_path_and_host_normalised() {
        let c = parse(&minimal(
            "",
            "[[route]]\nhost = \"App.Example.com:8443\"\npath = \"/app/\"\nupstreams = [\"http://a:1\", \"http://b:2/base/\"]\nforward = { \"X-User\" = \"username\" }\n",
        ))
        .unwrap();
        let r = &c.routes[0];
        assert_eq!(r.host.as_deref(), Some("app.example.com"));
        assert_eq!(r.path, "/app");
        assert_eq!(r.upstreams[1].path, "/base");
        assert_eq!(r.forward[0].0.as_str(), "x-user");
    }

    #[test]
    fn strip_port_cases() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
