//! A throwaway `redis-server` for one test: a free port on 127.0.0.1, no
//! persistence, killed on drop.
//!
//! When `redis-server` cannot be started, the test fails under `CI` (set
//! and not `false`/`0`), and otherwise is skipped with a loud message on
//! stderr: [`RedisServer::start`] returns `None` and the test returns early.
//!
//! Self-contained (no `crate::common` imports) so that other test files can
//! include it with `#[path]`.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Readiness polling: up to this many attempts, this far apart.
const READY_ATTEMPTS: usize = 250;
const READY_EVERY: Duration = Duration::from_millis(20);

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

/// Fails the test under CI, else says loudly that it is skipped.
fn unavailable(why: &str) -> Option<RedisServer> {
    if in_ci() {
        panic!("redis-server could not be started (CI must not skip): {why}");
    }
    // Straight to the stream: the test harness hides `eprintln!` of
    // passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: redis-server not available: {why} ***\n"
    );
    None
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

pub struct RedisServer {
    /// The plain-TCP port.
    pub port: u16,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    pub tls_port: Option<u16>,
    password: Option<String>,
    extra: Vec<String>,
    /// Sentinel mode: this configuration (without `port`) is written to a
    /// file in `dir` and the server runs `redis-server FILE --sentinel`.
    sentinel_conf: Option<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// A plain server without a password.
    pub async fn start() -> Option<RedisServer> {
        Self::launch(None, None, Vec::new()).await
    }

    /// A server that requires `password` (`requirepass`).
    pub async fn start_with_password(password: &str) -> Option<RedisServer> {
        Self::launch(Some(password.to_string()), None, Vec::new()).await
    }

    /// A server that also listens with TLS (server certificate and key as
    /// PEM files; clients are not asked for certificates).
    pub async fn start_tls(cert: &str, key: &str, ca: &str) -> Option<RedisServer> {
        let extra = vec![
            "--tls-cert-file".into(),
            cert.into(),
            "--tls-key-file".into(),
            key.into(),
            "--tls-ca-cert-file".into(),
            ca.into(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        Self::launch(None, Some(free_port()), extra).await
    }

    /// A plain server with extra command-line options.
    pub async fn start_with(extra: Vec<String>) -> Option<RedisServer> {
        Self::launch(None, None, extra).await
    }

    async fn launch(
        password: Option<String>,
        tls_port: Option<u16>,
        extra: Vec<String>,
    ) -> Option<RedisServer> {
        Self::launch_as(password, tls_port, extra, None).await
    }

    async fn launch_as(
        password: Option<String>,
        tls_port: Option<u16>,
        extra: Vec<String>,
        sentinel_conf: Option<String>,
    ) -> Option<RedisServer> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sessiongate-redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return unavailable(&format!("cannot create {}: {e}", dir.display()));
        }
        let mut last = String::new();
        // A port picked free can be taken before redis binds it: try a few.
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                tls_port,
                password: password.clone(),
                extra: extra.clone(),
                sentinel_conf: sentinel_conf.clone(),
                dir: dir.clone(),
                child: None,
            };
            match s.spawn_and_wait().await {
                Ok(()) => return Some(s),
                Err(e) if e.contains("No such file") || e.contains("not found") => {
                    return unavailable(&e)
                }
                Err(e) => last = e,
            }
        }
        unavailable(&last)
    }

    fn command(&self) -> Command {
        if let Some(conf) = &self.sentinel_conf {
            let path = self.dir.join(format!("sentinel-{}.conf", self.port));
            let mut text = format!(
                "port {}\nbind 127.0.0.1\ndir {}\n{conf}\n",
                self.port,
                self.dir.display()
            );
            if let Some(p) = &self.password {
                text.push_str(&format!("requirepass {p}\n"));
            }
            if let Some(t) = self.tls_port {
                text.push_str(&format!("tls-port {t}\n"));
            }
            std::fs::write(&path, text).expect("write the sentinel configuration");
            let mut c = Command::new("redis-server");
            c.arg(&path)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            return c;
        }
        let mut c = Command::new("redis-server");
        c.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &self.dir.to_string_lossy()]);
        if let Some(p) = &self.password {
            c.args(["--requirepass", p]);
        }
        if let Some(t) = self.tls_port {
            c.args(["--tls-port", &t.to_string()]);
        }
        c.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let child = self
            .command()
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        self.child = Some(child);
        for _ in 0..READY_ATTEMPTS {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().ok().flatten() {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                ));
            }
            if self.answers().await {
                return Ok(());
            }
            tokio::time::sleep(READY_EVERY).await;
        }
        self.kill();
        Err(format!(
            "redis-server on port {} did not answer PING within {:?}",
            self.port,
            READY_EVERY * READY_ATTEMPTS as u32
        ))
    }

    /// One PING on the plain port: `+PONG`, or `-NOAUTH` from a server
    /// with a password, means it is serving.
    async fn answers(&self) -> bool {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            let reply = &buf[..n];
            Some(reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH"))
        };
        tokio::time::timeout(Duration::from_millis(500), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// A client of this server (plain port, with its password if it has one).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// One command on this server, on a new connection (a connection
    /// failure is an error too: Sentinel kills clients when it reconfigures
    /// a server).
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut c = self.client().get_multiplexed_async_connection().await?;
        cmd.query_async(&mut c).await
    }

    /// `CONFIG RESETSTAT`: [`RedisServer::session_commands`] counts from 0.
    pub async fn reset_stats(&self) {
        let _: () = self
            .query(redis::cmd("CONFIG").arg("RESETSTAT"))
            .await
            .unwrap();
    }

    /// The calls since [`RedisServer::reset_stats`] of every command that
    /// touches data, the engine's own and those its scripts make (`INFO`
    /// counts both alike); the connection's bookkeeping (`CLIENT`, `HELLO`,
    /// `PING`, `INFO`, `CONFIG`, `CLUSTER`, ...) is left out.
    pub async fn session_commands(&self) -> std::collections::BTreeMap<String, u64> {
        let info: String = self
            .query(redis::cmd("INFO").arg("commandstats"))
            .await
            .unwrap();
        let mut calls = command_calls(&info);
        calls.retain(|c, _| {
            !matches!(
                c.as_str(),
                "client"
                    | "hello"
                    | "ping"
                    | "info"
                    | "config"
                    | "cluster"
                    | "readonly"
                    | "select"
                    | "auth"
                    | "command"
            )
        });
        calls
    }

    /// `redis://[:PASSWORD@]127.0.0.1:PORT` (the plain port, db 0).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`RedisServer::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid} failed");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port(s), empty. Panics when it
    /// cannot (a server that ran once must be able to run again).
    pub async fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        // The old socket may linger for a moment.
        for _ in 0..20 {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }

    /// [`RedisServer::restart`], as a replica of the server on `port`
    /// (what Sentinel would make of a returning primary, without waiting
    /// for it to notice).
    pub async fn restart_as_replica_of(&mut self, port: u16) {
        self.extra
            .extend(["--replicaof".into(), "127.0.0.1".into(), port.to_string()]);
        self.restart().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 50 ms, up to `limit`; panics with `what` after that.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The name the sentinels of [`SentinelSet`] watch.
pub const SENTINEL_SERVICE: &str = "mymaster";

/// Test certificates (also for the https upstream tests); here because some
/// test files include this file alone.
#[path = "pki.rs"]
pub mod pki;

/// A CA and a server certificate for 127.0.0.1 (and localhost), as PEM files
/// in `dir`: `(ca, cert, key)` paths.
pub fn tls_files(dir: &std::path::Path) -> (String, String, String) {
    pki::ca_and_leaf(dir, &["127.0.0.1", "localhost"])
}

/// Passwords (and TLS) for [`SentinelSet::start_secure`].
#[derive(Clone)]
pub struct Secure {
    /// `requirepass` (and `masterauth`) of the primary and the replica.
    pub data_password: String,
    /// `requirepass` of the sentinels.
    pub sentinel_password: String,
    /// `(ca, cert, key)` PEM paths: every node and sentinel also listens
    /// with TLS, and replication and the sentinels' links use it
    /// (`tls-replication yes`), so the sentinels name the primary by its
    /// TLS port.
    pub tls: Option<(String, String, String)>,
}

impl Secure {
    fn tls_args(&self) -> Vec<String> {
        match &self.tls {
            None => Vec::new(),
            Some((ca, cert, key)) => [
                "--tls-cert-file",
                cert,
                "--tls-key-file",
                key,
                "--tls-ca-cert-file",
                ca,
                "--tls-auth-clients",
                "no",
                "--tls-replication",
                "yes",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }
}

/// A primary, one replica and three sentinels (quorum 2) that fail over
/// quickly (`down-after-milliseconds` 400, `failover-timeout` 2000): all on
/// free ports, each in its own temp dir, killed on drop.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    secure: Option<Secure>,
}

impl SentinelSet {
    pub async fn start() -> Option<SentinelSet> {
        Self::start_as(None).await
    }

    /// With passwords on the data nodes and on the sentinels, and TLS when
    /// `secure.tls` is given; [`SentinelSet::url`] then carries them.
    pub async fn start_secure(secure: Secure) -> Option<SentinelSet> {
        Self::start_as(Some(secure)).await
    }

    async fn start_as(secure: Option<Secure>) -> Option<SentinelSet> {
        let tls = secure.as_ref().is_some_and(|s| s.tls.is_some());
        let data_node = |replica_of: Option<u16>| {
            let mut extra = Vec::new();
            let mut password = None;
            if let Some(s) = &secure {
                password = Some(s.data_password.clone());
                extra.extend(["--masterauth".to_string(), s.data_password.clone()]);
                extra.extend(s.tls_args());
            }
            if let Some(p) = replica_of {
                extra.extend(["--replicaof".into(), "127.0.0.1".into(), p.to_string()]);
            }
            RedisServer::launch(password, tls.then(free_port), extra)
        };
        let primary = data_node(None).await?;
        // Replication (and the sentinels) use the TLS port when there is one.
        let primary_port = primary.tls_port.unwrap_or(primary.port);
        let replica = data_node(Some(primary_port)).await?;
        wait_until("the replica syncs", Duration::from_secs(20), || async {
            let info: String = replica
                .query(redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        })
        .await;
        let mut conf = format!(
            "sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds {SENTINEL_SERVICE} 400\n\
             sentinel failover-timeout {SENTINEL_SERVICE} 2000\n\
             sentinel parallel-syncs {SENTINEL_SERVICE} 1"
        );
        let mut sentinel_password = None;
        if let Some(s) = &secure {
            conf.push_str(&format!(
                "\nsentinel auth-pass {SENTINEL_SERVICE} {}\nsentinel sentinel-pass {}",
                s.data_password, s.sentinel_password
            ));
            sentinel_password = Some(s.sentinel_password.clone());
            // The same options as on the command line, as configuration lines.
            for pair in s.tls_args().chunks(2) {
                conf.push_str(&format!(
                    "\n{} {}",
                    pair[0].trim_start_matches("--"),
                    pair[1]
                ));
            }
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(
                RedisServer::launch_as(
                    sentinel_password.clone(),
                    tls.then(free_port),
                    Vec::new(),
                    Some(conf.clone()),
                )
                .await?,
            );
        }
        let set = SentinelSet {
            primary,
            replica,
            sentinels,
            secure,
        };
        // A failover needs every sentinel to know the replica and the two
        // other sentinels (learned from INFO and hello messages).
        for s in &set.sentinels {
            wait_until(
                "the sentinels know each other and the replica",
                Duration::from_secs(30),
                || async {
                    let others: redis::RedisResult<Vec<redis::Value>> = s
                        .query(
                            redis::cmd("SENTINEL")
                                .arg("SENTINELS")
                                .arg(SENTINEL_SERVICE),
                        )
                        .await;
                    let replicas: redis::RedisResult<Vec<redis::Value>> = s
                        .query(redis::cmd("SENTINEL").arg("REPLICAS").arg(SENTINEL_SERVICE))
                        .await;
                    matches!((others, replicas), (Ok(o), Ok(r)) if o.len() == 2 && r.len() == 1)
                },
            )
            .await;
        }
        Some(set)
    }

    /// `redis+sentinel://` with the three sentinels, database 0; for
    /// [`SentinelSet::start_secure`], `rediss+sentinel://` (with TLS, to the
    /// sentinels' TLS ports), the data nodes' password as the user info and
    /// the sentinels' in the query.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.tls_port.unwrap_or(s.port)))
            .collect();
        let hosts = hosts.join(",");
        match &self.secure {
            None => format!("redis+sentinel://{hosts}/{SENTINEL_SERVICE}/0"),
            Some(s) => format!(
                "{}://:{}@{hosts}/{SENTINEL_SERVICE}/0?sentinel_password={}",
                if s.tls.is_some() {
                    "rediss+sentinel"
                } else {
                    "redis+sentinel"
                },
                s.data_password,
                s.sentinel_password
            ),
        }
    }

    /// The port the sentinels name as the primary now (the first that
    /// answers within 500 ms).
    pub async fn primary_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            // Bounded: a paused sentinel accepts connections and never answers.
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("GET-MASTER-ADDR-BY-NAME").arg(SENTINEL_SERVICE);
            let ask = s.query::<(String, String)>(&cmd);
            if let Ok(Ok((_, port))) = tokio::time::timeout(Duration::from_millis(500), ask).await {
                return port.parse().ok();
            }
        }
        None
    }
}

/// Three primaries (no replicas) joined by `redis-cli --cluster create`,
/// covering all 16384 slots; free ports, temp dirs, killed on drop.
pub struct ClusterSet {
    pub nodes: Vec<RedisServer>,
    /// The nodes' password, and whether the URL uses TLS.
    secure: Option<(String, bool)>,
}

impl ClusterSet {
    pub async fn start() -> Option<ClusterSet> {
        Self::start_as(None, None).await
    }

    /// Every node requires `password` (and uses it as `masterauth`); with
    /// `tls` (`(ca, cert, key)` PEM paths) every node also listens with TLS
    /// and the cluster bus uses it (`tls-cluster yes`), so the slot map a
    /// TLS client gets names the TLS ports. [`ClusterSet::url`] is then
    /// `rediss+cluster://:PASSWORD@` the TLS ports.
    pub async fn start_secure(
        password: &str,
        tls: Option<(String, String, String)>,
    ) -> Option<ClusterSet> {
        Self::start_as(Some(password.to_string()), tls).await
    }

    async fn start_as(
        password: Option<String>,
        tls: Option<(String, String, String)>,
    ) -> Option<ClusterSet> {
        let mut extra: Vec<String> = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(p) = &password {
            extra.extend(["--masterauth".to_string(), p.clone()]);
        }
        if let Some((ca, cert, key)) = &tls {
            for (k, v) in [
                ("--tls-cert-file", cert.as_str()),
                ("--tls-key-file", key),
                ("--tls-ca-cert-file", ca),
                ("--tls-auth-clients", "no"),
                ("--tls-replication", "yes"),
                ("--tls-cluster", "yes"),
            ] {
                extra.extend([k.to_string(), v.to_string()]);
            }
        }
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(
                RedisServer::launch(
                    password.clone(),
                    tls.is_some().then(free_port),
                    extra.clone(),
                )
                .await?,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(p) = &password {
            create.args(["-a", p, "--no-auth-warning"]);
        }
        let out = create
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                unavailable(&format!("cannot run redis-cli: {e}"));
                return None;
            }
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let secure = password.map(|p| (p, tls.is_some()));
        let set = ClusterSet { nodes, secure };
        for n in &set.nodes {
            wait_until(
                "the cluster is ok on every node",
                Duration::from_secs(30),
                || async {
                    let info: String = n
                        .query(redis::cmd("CLUSTER").arg("INFO"))
                        .await
                        .unwrap_or_default();
                    info.contains("cluster_state:ok")
                },
            )
            .await;
        }
        Some(set)
    }

    /// `redis+cluster://` naming every node (see [`ClusterSet::start_secure`]).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port)))
            .collect();
        let hosts = hosts.join(",");
        match &self.secure {
            None => format!("redis+cluster://{hosts}"),
            Some((p, true)) => format!("rediss+cluster://:{p}@{hosts}"),
            Some((p, false)) => format!("redis+cluster://:{p}@{hosts}"),
        }
    }

    /// `redis://` URLs of the nodes (for the crate's cluster client).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// The node's cluster id.
    pub async fn id(&self, i: usize) -> String {
        self.nodes[i]
            .query(redis::cmd("CLUSTER").arg("MYID"))
            .await
            .unwrap()
    }

    /// The index of the node that serves `slot` now.
    pub async fn owner(&self, slot: u16) -> usize {
        let out: String = self.nodes[0]
            .query(redis::cmd("CLUSTER").arg("NODES"))
            .await
            .unwrap();
        for line in out.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap();
            for range in &f[8..] {
                let (lo, hi) = match range.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(u16::MAX), b.parse().unwrap_or(0)),
                    None => match range.parse::<u16>() {
                        Ok(v) => (v, v),
                        Err(_) => continue,
                    },
                };
                if (lo..=hi).contains(&slot) {
                    return self.nodes.iter().position(|n| n.port == port).unwrap();
                }
            }
        }
        panic!("no node serves slot {slot}");
    }

    /// Slot migration, step 1: `to` imports `slot`, `from` migrates it.
    /// Until [`ClusterSet::finish_migration`], a key still on `from` is
    /// served there and a key already moved gets `ASK` to `to`.
    pub async fn begin_migration(&self, slot: u16, from: usize, to: usize) {
        let (from_id, to_id) = (self.id(from).await, self.id(to).await);
        let () = self.nodes[to]
            .query(
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("IMPORTING")
                    .arg(&from_id),
            )
            .await
            .unwrap();
        let () = self.nodes[from]
            .query(
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("MIGRATING")
                    .arg(&to_id),
            )
            .await
            .unwrap();
    }

    /// Slot migration, step 2: every key of `slot` moves (`MIGRATE`).
    /// Returns how many keys moved.
    pub async fn move_keys(&self, slot: u16, from: usize, to: usize) -> usize {
        let keys: Vec<String> = self.nodes[from]
            .query(
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(1000),
            )
            .await
            .unwrap();
        if !keys.is_empty() {
            let () = self.nodes[from]
                .query(
                    redis::cmd("MIGRATE")
                        .arg("127.0.0.1")
                        .arg(self.nodes[to].port)
                        .arg("")
                        .arg(0)
                        .arg(5000)
                        .arg("KEYS")
                        .arg(&keys),
                )
                .await
                .unwrap();
        }
        keys.len()
    }

    /// Slot migration, step 3: every node is told `to` owns `slot`
    /// (clients still asking `from` get `MOVED`).
    pub async fn finish_migration(&self, slot: u16, to: usize) {
        let to_id = self.id(to).await;
        for i in std::iter::once(to).chain((0..self.nodes.len()).filter(|i| *i != to)) {
            let () = self.nodes[i]
                .query(
                    redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(slot)
                        .arg("NODE")
                        .arg(&to_id),
                )
                .await
                .unwrap();
        }
    }

    /// How many keys each node holds.
    pub async fn sizes(&self) -> Vec<i64> {
        let mut v = Vec::new();
        for n in &self.nodes {
            v.push(n.query(&redis::cmd("DBSIZE")).await.unwrap());
        }
        v
    }
}

/// Command counts as [`RedisServer::session_commands`] gives them, for
/// comparing: `calls(&[("evalsha", 10), ("hget", 10)])`.
pub fn calls(counts: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    counts.iter().map(|(c, n)| (c.to_string(), *n)).collect()
}

/// `INFO commandstats` as the calls of each command (`client|setinfo`
/// counts as `client`).
fn command_calls(info: &str) -> std::collections::BTreeMap<String, u64> {
    let mut calls = std::collections::BTreeMap::new();
    for line in info.lines() {
        let Some((name, stats)) = line
            .trim()
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let name = name.split('|').next().unwrap_or(name);
        let n: u64 = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no calls in {line:?}"));
        *calls.entry(name.to_string()).or_insert(0) += n;
    }
    calls
}
