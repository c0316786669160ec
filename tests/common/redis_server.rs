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

    async fn launch(
        password: Option<String>,
        tls_port: Option<u16>,
        extra: Vec<String>,
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

    /// `redis://127.0.0.1:PORT` (no password, db 0).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
