//! A throwaway PostgreSQL server for one test: its own data directory in
//! the temp dir, a free port on 127.0.0.1, password authentication
//! (scram-sha-256), `fsync = off`; stopped and removed on drop. It can be
//! stopped and started again on the same port (outage tests).
//!
//! `initdb` runs once per machine into a template directory
//! (`$TMPDIR/sessiongate-pg-template-15`), which each server copies; as
//! root, the server runs as the `postgres` user (PostgreSQL refuses root).
//!
//! When PostgreSQL cannot be started, the test fails under `CI` (set and
//! not `false`/`0`), and otherwise is skipped with a loud message on
//! stderr: [`PgServer::start`] returns `None` and the test returns early.
//!
//! Self-contained so that test files can include it with `#[path]`.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub const USER: &str = "sg";
pub const PASSWORD: &str = "sg-test-password";

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

fn unavailable(why: &str) -> Option<PgServer> {
    if in_ci() {
        panic!("PostgreSQL could not be started (CI must not skip): {why}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: PostgreSQL not available: {why} ***\n"
    );
    None
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

/// A command for PostgreSQL's tools: as `postgres` when we are root.
fn pg_cmd(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn chown_postgres(p: &Path) -> Result<(), String> {
    if is_root() {
        let mut c = Command::new("chown");
        c.args(["-R", "postgres:postgres"]).arg(p);
        run(c, "chown")?;
    }
    Ok(())
}

static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The initdb'd template data directory (made once, then reused).
fn template(bin: &Path) -> Result<PathBuf, String> {
    let mut t = TEMPLATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = &*t {
        return Ok(p.clone());
    }
    let dir = std::env::temp_dir().join("sessiongate-pg-template-15");
    if !dir.join("data/PG_VERSION").exists() {
        let work =
            std::env::temp_dir().join(format!("sessiongate-pg-initdb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
        std::fs::write(work.join("pw"), PASSWORD).map_err(|e| e.to_string())?;
        chown_postgres(&work)?;
        let mut c = pg_cmd(bin, "initdb");
        c.arg("-D")
            .arg(work.join("data"))
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", work.join("pw").display()));
        run(c, "initdb")?;
        // Another test binary may have won the race: keep theirs.
        if std::fs::rename(&work, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&work);
        }
    }
    *t = Some(dir.clone());
    Ok(dir)
}

pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    running: bool,
}

impl PgServer {
    pub fn start() -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            return unavailable(
                "no /usr/lib/postgresql/*/bin with initdb and pg_ctl (apt-get install postgresql)",
            );
        };
        match Self::launch(bin) {
            Ok(s) => Some(s),
            Err(e) => unavailable(&e),
        }
    }

    fn launch(bin: PathBuf) -> Result<PgServer, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let template = template(&bin)?;
        let dir = std::env::temp_dir().join(format!(
            "sessiongate-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut c = Command::new("cp");
        c.arg("-a").arg(template.join("data")).arg(dir.join("data"));
        run(c, "copy the template")?;
        chown_postgres(&dir)?;
        let mut s = PgServer {
            port: free_port(),
            bin,
            dir,
            running: false,
        };
        s.start_again()?;
        Ok(s)
    }

    /// Starts the stopped server on its port again (waits until it accepts).
    pub fn start_again(&mut self) -> Result<(), String> {
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
                self.port,
                self.dir.display()
            ))
            .arg("start");
        run(c, "pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&mut self) {
        let mut c = pg_cmd(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "fast", "stop"]);
        run(c, "pg_ctl stop").expect("stop PostgreSQL");
        self.running = false;
    }

    /// `postgres://sg:...@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (empty).
    pub async fn create_db(&self, name: &str) {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let mut c = pg_cmd(&self.bin, "pg_ctl");
            c.arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-m", "immediate", "stop"]);
            let _ = run(c, "pg_ctl stop");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
