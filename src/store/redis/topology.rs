//! Where the sessions live: one Redis server, a Sentinel-managed primary,
//! or a Redis Cluster; parsed from `[store] url` and connected to with the
//! `redis` crate's own clients (no hand-made protocol).
//!
//! - `redis://` / `rediss://`: one server (the crate's own URL syntax);
//! - `redis+sentinel://[user:pass@]h1:26379,h2:26379/<primary name>[/<db>][?sentinel_username=U&sentinel_password=P]`:
//!   every sentinel is asked at once for the current primary on each
//!   (re)connect; the user info and the database are the data nodes'
//!   (the crate's `SentinelNodeConnectionInfo`, used for the primary), the
//!   query's credentials the sentinels' own (`requirepass` on a sentinel);
//! - `redis+cluster://[user:pass@]h1:7000,h2:7001`: any reachable node is
//!   enough to learn the slot map; no database number (Cluster has only 0).
//!
//! `rediss+sentinel://` and `rediss+cluster://` use TLS to every node.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, ConnectionAddr, Pipeline, RedisError};
use redis::{RedisFuture, TlsMode, Value};

use super::slots::{ClusterConn, NodeParams};

/// A malformed `[store] url`.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("[store] url: {0}")]
    Malformed(String),
    #[error("[store] url: {0}")]
    Client(#[source] RedisError),
}

fn bad(msg: impl Into<String>) -> UrlError {
    UrlError::Malformed(msg.into())
}

/// What `[store] url` names, before any connection is made.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub kind: Kind,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sentinels' own credentials (Sentinel only).
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
    /// `host:port` pairs (sentinels, or cluster seed nodes).
    pub hosts: Vec<(String, u16)>,
    /// The primary's name (Sentinel only).
    pub service: String,
    pub db: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Single,
    Sentinel,
    Cluster,
}

const SENTINEL_FORM: &str =
    "redis+sentinel://[user:password@]host:26379[,host:port...]/<primary name>[/<db>][?sentinel_username=U&sentinel_password=P]";
const CLUSTER_FORM: &str = "redis+cluster://[user:password@]host:port[,host:port...]";

/// Parses `url`. A `redis://` or `rediss://` URL is checked by the crate's
/// own parser.
pub fn parse(url: &str) -> Result<Parsed, UrlError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad(format!("{:?} is not a URL (expected redis://, rediss://, redis+sentinel:// or redis+cluster://)", redact(url))))?;
    let (kind, tls) = match scheme {
        "redis" | "redis+unix" | "unix" => (Kind::Single, false),
        "rediss" => (Kind::Single, true),
        "redis+sentinel" => (Kind::Sentinel, false),
        "rediss+sentinel" => (Kind::Sentinel, true),
        "redis+cluster" => (Kind::Cluster, false),
        "rediss+cluster" => (Kind::Cluster, true),
        other => {
            return Err(bad(format!(
                "unknown scheme {other:?} (redis, rediss, redis+sentinel, rediss+sentinel, redis+cluster, rediss+cluster)"
            )))
        }
    };
    if kind == Kind::Single {
        let client = Client::open(url).map_err(UrlError::Client)?;
        let info = client.get_connection_info();
        return Ok(Parsed {
            kind,
            tls,
            username: info.redis.username.clone(),
            password: info.redis.password.clone(),
            sentinel_username: None,
            sentinel_password: None,
            hosts: Vec::new(),
            service: String::new(),
            db: info.redis.db,
        });
    }
    let form = if kind == Kind::Sentinel {
        SENTINEL_FORM
    } else {
        CLUSTER_FORM
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) if kind == Kind::Sentinel => (r, Some(q)),
        _ => (rest, None),
    };
    if rest.contains(['?', '#']) || query.is_some_and(|q| q.contains('#')) {
        let what = if kind == Kind::Sentinel {
            "no fragment and no query but sentinel_username and sentinel_password"
        } else {
            "no query or fragment"
        };
        return Err(bad(format!(
            "a {scheme} URL takes {what} (expected {form})"
        )));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| bad("the user name or password is not UTF-8 once percent-decoded"))
    };
    let (mut sentinel_username, mut sentinel_password) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "sentinel_username" => &mut sentinel_username,
            "sentinel_password" => &mut sentinel_password,
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?} (a {scheme} URL takes sentinel_username and sentinel_password)"
                )))
            }
        };
        *slot = (!value.is_empty()).then(|| decode(value)).transpose()?;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hostlist) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((user, pass)) => (user, Some(pass)),
                None => (u, None),
            };
            let user = (!user.is_empty()).then(|| decode(user)).transpose()?;
            let pass = pass.filter(|p| !p.is_empty()).map(decode).transpose()?;
            (user, pass)
        }
    };
    let default_port = if kind == Kind::Sentinel { 26379 } else { 6379 };
    let mut hosts = Vec::new();
    for h in hostlist.split(',') {
        hosts.push(parse_host(h, default_port, form)?);
    }
    let mut parts = path.split('/');
    let (service, db) = match kind {
        Kind::Sentinel => {
            let service = parts.next().unwrap_or("");
            if service.is_empty() {
                return Err(bad(format!(
                    "a redis+sentinel URL names the primary the sentinels watch (expected {form})"
                )));
            }
            let db = match parts.next() {
                None | Some("") => 0,
                Some(n) => n.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
                    bad(format!(
                        "database {n:?} is not a non-negative integer (expected {form})"
                    ))
                })?,
            };
            (service.to_string(), db)
        }
        _ => {
            if !path.is_empty() {
                return Err(bad(format!(
                    "Redis Cluster has no database number (every node uses database 0): remove \"/{path}\" (expected {form})"
                )));
            }
            (String::new(), 0)
        }
    };
    if parts.any(|p| !p.is_empty()) {
        return Err(bad(format!("too many path segments (expected {form})")));
    }
    Ok(Parsed {
        kind,
        tls,
        username,
        password,
        sentinel_username,
        sentinel_password,
        hosts,
        service,
        db,
    })
}

fn parse_host(h: &str, default_port: u16, form: &str) -> Result<(String, u16), UrlError> {
    if h.is_empty() {
        return Err(bad(format!(
            "an empty host in the host list (expected {form})"
        )));
    }
    let (host, port) = if let Some(r) = h.strip_prefix('[') {
        let (host, after) = r
            .split_once(']')
            .ok_or_else(|| bad(format!("host {h:?}: unclosed '['")))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(bad(format!("host {h:?}: expected [address]:port"))),
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, p)) => (host, Some(p)),
            None => (h, None),
        }
    };
    if host.is_empty() || host.contains([' ', '@', '/', '[', ']']) {
        return Err(bad(format!("host {h:?} is not a host name or address")));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("host {h:?}: port {p:?} is not a port number")))?,
    };
    Ok((host.to_string(), port))
}

/// `url` with any password replaced, for messages.
fn redact(url: &str) -> String {
    // A query may hold sentinel_password.
    let url = url.split_once('?').map_or(url, |(u, _)| u);
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!("{}://***@{}", &url[..s], &url[a + 1..]),
        _ => url.to_string(),
    }
}

/// Checks `url` as `sessiongate check` does.
pub fn validate(url: &str) -> Result<(), UrlError> {
    parse(url).map(|_| ())
}

/// A connected client of one of the three kinds.
pub(super) enum Target {
    Single(Client),
    /// One client per sentinel, asked all at once (see [`Target::connect`]);
    /// each locked while in use (the crate's client wants `&mut`); and the
    /// watch on which primary they name.
    Sentinel(Vec<tokio::sync::Mutex<SentinelClient>>, Arc<PrimaryWatch>),
    /// The crate's client, and what the fast path's own node connections
    /// need (see [`super::slots`]).
    Cluster(ClusterClient, Arc<NodeParams>),
}

impl Target {
    pub(super) fn open(url: &str, timeout: Duration) -> Result<(Target, Parsed), UrlError> {
        let p = parse(url)?;
        let target = match p.kind {
            Kind::Single => Target::Single(Client::open(url).map_err(UrlError::Client)?),
            Kind::Sentinel => {
                let mut clients = Vec::with_capacity(p.hosts.len());
                let mut plain = Vec::with_capacity(p.hosts.len());
                for (h, port) in &p.hosts {
                    let addr = if p.tls {
                        ConnectionAddr::TcpTls {
                            host: h.clone(),
                            port: *port,
                            insecure: false,
                            tls_params: None,
                        }
                    } else {
                        ConnectionAddr::Tcp(h.clone(), *port)
                    };
                    plain.push(
                        Client::open(redis::ConnectionInfo {
                            addr: addr.clone(),
                            redis: redis::RedisConnectionInfo {
                                username: p.sentinel_username.clone(),
                                password: p.sentinel_password.clone(),
                                ..Default::default()
                            },
                        })
                        .map_err(UrlError::Client)?,
                    );
                    let mut b = SentinelClientBuilder::new(
                        [addr],
                        p.service.clone(),
                        SentinelServerType::Master,
                    )
                    .map_err(UrlError::Client)?
                    .set_client_to_redis_db(p.db);
                    if p.tls {
                        b = b
                            .set_client_to_redis_tls_mode(TlsMode::Secure)
                            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                    }
                    if let Some(u) = &p.username {
                        b = b.set_client_to_redis_username(u.clone());
                    }
                    if let Some(pw) = &p.password {
                        b = b.set_client_to_redis_password(pw.clone());
                    }
                    if let Some(u) = &p.sentinel_username {
                        b = b.set_client_to_sentinel_username(u.clone());
                    }
                    if let Some(pw) = &p.sentinel_password {
                        b = b.set_client_to_sentinel_password(pw.clone());
                    }
                    clients.push(tokio::sync::Mutex::new(
                        b.build().map_err(UrlError::Client)?,
                    ));
                }
                let watch = PrimaryWatch {
                    sentinels: plain,
                    service: p.service.clone(),
                    timeout,
                    start: Instant::now(),
                    next_ms: AtomicU64::new(0),
                    busy: AtomicBool::new(false),
                    named: Mutex::new(None),
                    version: AtomicU64::new(0),
                    conn: tokio::sync::Mutex::new(None),
                    node: redis::RedisConnectionInfo {
                        db: p.db,
                        username: p.username.clone(),
                        password: p.password.clone(),
                        ..Default::default()
                    },
                    tls: p.tls,
                };
                Target::Sentinel(clients, Arc::new(watch))
            }
            Kind::Cluster => {
                let scheme = if p.tls { "rediss" } else { "redis" };
                let nodes: Vec<String> = p
                    .hosts
                    .iter()
                    .map(|(h, port)| {
                        if h.contains(':') {
                            format!("{scheme}://[{h}]:{port}")
                        } else {
                            format!("{scheme}://{h}:{port}")
                        }
                    })
                    .collect();
                let mut b = ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Redirections and slot-map refreshes are retried within
                    // `[store] timeout` (the caller's bound).
                    .retries(8)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if p.tls {
                    b = b.tls(TlsMode::Secure);
                }
                if let Some(u) = &p.username {
                    b = b.username(u.clone());
                }
                if let Some(pw) = &p.password {
                    b = b.password(pw.clone());
                }
                let params = Arc::new(NodeParams {
                    tls: p.tls,
                    username: p.username.clone(),
                    password: p.password.clone(),
                    timeout,
                });
                Target::Cluster(b.build().map_err(UrlError::Client)?, params)
            }
        };
        Ok((target, p))
    }

    pub(super) async fn connect(&self, config: &AsyncConnectionConfig) -> Result<Conn, RedisError> {
        match self {
            Target::Single(c) => c
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Single),
            // Every sentinel at once, the first primary found wins: asked in
            // turn (as the crate's one multi-sentinel client does), a sentinel
            // that hangs (its host gone without a reset, often the host of the
            // dead primary) would hold every reconnection until the timeout.
            // Each answer is checked by the crate, which connects to the
            // named primary and asks its ROLE.
            Target::Sentinel(clients, watch) => {
                // The primary the watch knows, first: a sentinel slower to
                // learn of a promotion could still name the old one, which
                // answers ROLE as a primary until it is demoted.
                if let Some(c) = watch.connect_named(config).await {
                    return Ok(Conn::Single(c));
                }
                let asks = clients.iter().map(|c| {
                    Box::pin(async move {
                        c.lock()
                            .await
                            .get_async_connection_with_config(config)
                            .await
                    })
                });
                futures_util::future::select_ok(asks)
                    .await
                    .map(|(c, _)| Conn::Single(c))
            }
            Target::Cluster(c, params) => ClusterConn::connect(c, params.clone())
                .await
                .map(Conn::Cluster),
        }
    }
}

/// How often the sentinels are asked which primary they name, while the
/// store is in use.
const PRIMARY_CHECK: Duration = Duration::from_millis(200);

/// Which primary the sentinels name, asked every [`PRIMARY_CHECK`] while
/// the store is used (by a task of its own, never on a request's path).
/// A connection is checked (`ROLE`) only when it is made; after a
/// switchover (`SENTINEL FAILOVER`, or a failover while the old primary
/// stays up) the old primary keeps taking writes until Sentinel demotes
/// it, seconds later, and those writes are then lost. Each connection
/// remembers the watch's version when it was made; one made before the
/// named primary last changed is replaced.
pub(super) struct PrimaryWatch {
    /// A plain client to each sentinel, with the sentinels' credentials.
    sentinels: Vec<Client>,
    service: String,
    timeout: Duration,
    start: Instant,
    /// When the next check may run (ms since `start`).
    next_ms: AtomicU64,
    /// A check is running.
    busy: AtomicBool,
    /// The primary the last answer named.
    named: Mutex<Option<(String, u16)>>,
    /// Bumped each time `named` changes (its first answer included).
    version: AtomicU64,
    /// The connection to the sentinel that answered last, kept.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// How to reach a data node (the URL's TLS, user, password, database).
    node: redis::RedisConnectionInfo,
    tls: bool,
}

impl PrimaryWatch {
    /// Changes whenever the named primary does (see [`PrimaryWatch::named`]).
    pub(super) fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// The primary the sentinels named last (`None` before a first answer).
    pub(super) fn named(&self) -> Option<(String, u16)> {
        self.named.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a check (in a task of its own) when one is due.
    pub(super) fn poll(self: &Arc<Self>) {
        let now = self.start.elapsed().as_millis() as u64;
        if now < self.next_ms.load(Ordering::Relaxed)
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(me.timeout, me.ask()).await {
                Ok(Ok(named)) => me.saw(named),
                Ok(Err(e)) => tracing::debug!(error = %e, "redis sentinel: primary not asked"),
                Err(_) => tracing::debug!("redis sentinel: no answer on the primary in time"),
            }
            let next = me.start.elapsed() + PRIMARY_CHECK;
            me.next_ms.store(next.as_millis() as u64, Ordering::Relaxed);
            me.busy.store(false, Ordering::Release);
        });
    }

    /// `SENTINEL get-master-addr-by-name` on the kept connection, else on
    /// the first sentinel to answer.
    pub(super) async fn ask(&self) -> Result<(String, u16), RedisError> {
        let mut kept = self.conn.lock().await;
        let cmd = || {
            let mut c = redis::cmd("SENTINEL");
            c.arg("get-master-addr-by-name").arg(&self.service);
            c
        };
        if let Some(c) = kept.as_mut() {
            match cmd().query_async(c).await {
                Ok(named) => return Ok(named),
                Err(_) => *kept = None,
            }
        }
        // A sentinel that hangs fails its call within half the timeout, and
        // the next check asks them all again.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout / 2)
            .set_response_timeout(self.timeout / 2);
        let config = &config;
        let asks = self.sentinels.iter().map(|client| {
            Box::pin(async move {
                let mut c = client
                    .get_multiplexed_async_connection_with_config(config)
                    .await?;
                let named: (String, u16) = cmd().query_async(&mut c).await?;
                Ok::<_, RedisError>((named, c))
            })
        });
        let ((named, c), _) = futures_util::future::select_ok(asks).await?;
        *kept = Some(c);
        Ok(named)
    }

    /// A connection to the primary the sentinels named last, when it
    /// answers `ROLE` as a primary; `None` otherwise (no answer yet, or it
    /// is not one): the caller then asks the sentinels itself.
    async fn connect_named(&self, config: &AsyncConnectionConfig) -> Option<MultiplexedConnection> {
        // A quarter of the store's timeout at most: a named primary that
        // does not answer leaves time to ask the sentinels.
        tokio::time::timeout(self.timeout / 4, self.connect_named_inner(config))
            .await
            .ok()
            .flatten()
    }

    async fn connect_named_inner(
        &self,
        config: &AsyncConnectionConfig,
    ) -> Option<MultiplexedConnection> {
        let (host, port) = self.named()?;
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host, port)
        };
        let client = Client::open(redis::ConnectionInfo {
            addr,
            redis: self.node.clone(),
        })
        .ok()?;
        let mut c = client
            .get_multiplexed_async_connection_with_config(config)
            .await
            .ok()?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut c).await.ok()?;
        match role.first() {
            Some(Value::BulkString(r)) if r == b"master" => Some(c),
            _ => None,
        }
    }

    pub(super) fn saw(&self, named: (String, u16)) {
        let mut last = self.named.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&named) {
            return;
        }
        if let Some(was) = last.as_ref() {
            tracing::info!(
                from = %format!("{}:{}", was.0, was.1),
                to = %format!("{}:{}", named.0, named.1),
                "redis sentinel: the primary moved; reconnecting"
            );
        }
        *last = Some(named);
        self.version.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where the store points, for logs (never the password).
pub(super) struct Where<'a>(pub &'a Parsed, pub &'a Target);

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts = || {
            self.0
                .hosts
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self.1 {
            Target::Single(c) => {
                let i = c.get_connection_info();
                write!(f, "{} db {}", i.addr, i.redis.db)
            }
            Target::Sentinel(..) => write!(
                f,
                "primary {:?} db {} via sentinels {}",
                self.0.service,
                self.0.db,
                hosts()
            ),
            Target::Cluster(..) => write!(f, "cluster via {}", hosts()),
        }
    }
}

/// One connection: multiplexed to one server (or the Sentinel-named
/// primary), or the crate's cluster connection, which follows `MOVED` and
/// `ASK` and keeps one multiplexed connection per node, behind the fast
/// path of [`super::slots`] (one slot's commands straight to its primary).
#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConn),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        parse(url).unwrap_err().to_string()
    }

    #[test]
    fn sentinel_urls() {
        let p = parse("redis+sentinel://u:p%40ss@h1:26379,h2,[::1]:5/mymaster/3").unwrap();
        assert_eq!(p.kind, Kind::Sentinel);
        assert!(!p.tls);
        assert_eq!(p.username.as_deref(), Some("u"));
        assert_eq!(p.password.as_deref(), Some("p@ss"));
        assert_eq!(
            p.hosts,
            vec![
                ("h1".to_string(), 26379),
                ("h2".to_string(), 26379),
                ("::1".to_string(), 5)
            ]
        );
        assert_eq!((p.service.as_str(), p.db), ("mymaster", 3));
        let p = parse("rediss+sentinel://:pw@h1/m").unwrap();
        assert!(p.tls);
        assert_eq!((p.username, p.password, p.db), (None, Some("pw".into()), 0));
        assert!(err("redis+sentinel://h1:26379").contains("names the primary"));
        assert!(err("redis+sentinel://h1:26379/m/x").contains("\"x\" is not"));
        assert!(err("redis+sentinel://h1:26379/m/-1").contains("not a non-negative"));
        assert!(err("redis+sentinel://h1:26379/m/0/1").contains("too many"));
        assert!(err("redis+sentinel://h1:99999/m").contains("port \"99999\""));
        assert!(err("redis+sentinel://h1,,h2/m").contains("empty host"));
        assert!(err("redis+sentinel://h1/m?x=1").contains("unknown query parameter \"x\""));
        assert!(err("redis+sentinel://h1/m#f").contains("no fragment"));
        let p = parse("redis+sentinel://:data@h1/m/2?sentinel_password=s%26p&sentinel_username=sv")
            .unwrap();
        assert_eq!(p.password.as_deref(), Some("data"));
        assert_eq!(p.sentinel_password.as_deref(), Some("s&p"));
        assert_eq!(p.sentinel_username.as_deref(), Some("sv"));
        assert_eq!((p.service.as_str(), p.db), ("m", 2));
        let p = parse("rediss+sentinel://h1/m?sentinel_password=x").unwrap();
        assert!(p.tls);
        assert_eq!((p.password, p.sentinel_password), (None, Some("x".into())));
    }

    #[test]
    fn cluster_urls() {
        let p = parse("redis+cluster://h1:7000,h2:7001,h3").unwrap();
        assert_eq!(p.kind, Kind::Cluster);
        assert_eq!(p.hosts.len(), 3);
        assert_eq!(p.hosts[2], ("h3".to_string(), 6379));
        assert!(parse("rediss+cluster://:pw@h1:7000/").is_ok());
        let e = err("redis+cluster://h1:7000/0");
        assert!(e.contains("Redis Cluster has no database number"), "{e}");
        assert!(err("redis+cluster://").contains("empty host"));
        assert!(err("redis+cluster://h1?sentinel_password=x").contains("no query"));
    }

    #[test]
    fn other_urls() {
        assert!(parse("redis://127.0.0.1:6379/2").is_ok());
        assert!(err("redis+sentinal://h/m").contains("unknown scheme"));
        let e = err("h1:6379");
        assert!(e.contains("not a URL"), "{e}");
        assert!(!err("http://u:secret@h").contains("secret"));
        assert!(parse("redis://h:notaport").is_err());
    }
}
