//! The command line (SPEC 1) through the real binary: `check`, `run` (and
//! the bare `--config` form), graceful shutdown on SIGTERM and SIGINT, and
//! `clear-expired`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::e2e::*;
use common::*;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sessiongate"));
    c.env("RUST_LOG", "info")
        // Not inherited from the shell that runs the tests.
        .env_remove("SESSIONGATE_WORKERS")
        .env_remove("SESSIONGATE_CPU_AFFINITY")
        .env_remove("SESSIONGATE_H1")
        .stdin(Stdio::null());
    c
}

/// Runs a command that should finish on its own, bounded by [`LIMIT`].
fn run_bounded(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sessiongate");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(out) => out.expect("wait for sessiongate"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("sessiongate did not exit within {LIMIT:?}");
        }
    }
}

fn check(dir: &Path, config_arg: &str) -> Output {
    let mut c = bin();
    c.current_dir(dir).args(["check", "--config", config_arg]);
    run_bounded(c)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A valid plain-HTTP configuration on port 0 with one route.
fn valid_config(upstream: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
tls = false
shutdown_grace = "10s"

[session]
secret_key = "{SECRET}"
cookie_secure = false

[store]
clear_expired_interval = "0s"

[[route]]
name = "app"
upstream = "{upstream}"
"#
    )
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[test]
fn check_accepts_a_valid_file_and_prints_a_summary() {
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config("http://127.0.0.1:9000"));
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains("app") && summary.contains("127.0.0.1:9000"),
        "the summary names the route and its upstream: {summary:?}"
    );
}

#[test]
fn check_reads_the_certificate_and_key_and_names_the_wrong_file() {
    let dir = TempDir::new("cli");
    let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
    dir.write("cert.pem", &a.cert.pem());
    dir.write("key.pem", &a.signing_key.serialize_pem());
    dir.write("other-key.pem", &b.signing_key.serialize_pem());
    dir.write("garbage.pem", "hello\n");
    let tls = |cert: &str, key: &str| {
        valid_config("http://127.0.0.1:9000").replace(
            "tls = false",
            &format!("tls = true\ncert = \"{cert}\"\nkey = \"{key}\""),
        )
    };
    let path = dir.write("good.toml", &tls("cert.pem", "key.pem"));
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    for (name, cert, key, want) in [
        (
            "mismatch.toml",
            "cert.pem",
            "other-key.pem",
            "[server] key: ",
        ),
        ("notkey.toml", "cert.pem", "garbage.pem", "[server] key: "),
        ("notcert.toml", "garbage.pem", "key.pem", "[server] cert: "),
        ("missing.toml", "nope.pem", "key.pem", "[server] cert: "),
    ] {
        let path = dir.write(name, &tls(cert, key));
        let out = check(dir.path(), path.to_str().unwrap());
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = stderr(&out);
        assert!(
            err.starts_with(&format!("{}: {want}", path.display())),
            "{name}: {err}"
        );
        let named = if want.contains("key") { key } else { cert };
        assert!(err.contains(named), "{name} names {named}: {err}");
        let what = match name {
            "mismatch.toml" => "key does not match certificate",
            "notkey.toml" => "not a PEM private key",
            "notcert.toml" => "not a PEM certificate chain",
            _ => "cannot read",
        };
        assert!(err.contains(what), "{name}: {err}");
    }
}

#[test]
fn check_warns_when_the_admin_listener_is_not_loopback() {
    let dir = TempDir::new("cli");
    let base = valid_config("http://127.0.0.1:9000");
    let path = dir.write(
        "sessiongate.toml",
        &format!("{base}\n[admin]\nlisten = \"0.0.0.0:9901\"\n"),
    );
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("warning: [admin] listen = \"0.0.0.0:9901\" is not a loopback address"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("admin http://0.0.0.0:9901"),
        "{}",
        stdout(&out)
    );
    let path = dir.write(
        "loopback.toml",
        &format!("{base}\n[admin]\nlisten = \"127.0.0.1:9901\"\n"),
    );
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn check_names_a_bad_operations_setting() {
    let dir = TempDir::new("cli");
    let base = valid_config("http://127.0.0.1:9000");
    for (line, want) in [
        (
            "trusted_proxies = [\"10.0.0.0/33\"]",
            "[server] trusted_proxies: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "access_log_format = \"apache\"",
            "[server] access_log_format: \"apache\": expected \"combined\" or \"json\"",
        ),
    ] {
        let text = base.replace("[session]", &format!("{line}\n\n[session]"));
        let path = dir.write("bad.toml", &text);
        let out = check(dir.path(), path.to_str().unwrap());
        assert_eq!(out.status.code(), Some(2), "{line}");
        assert!(stderr(&out).contains(want), "{line}: {}", stderr(&out));
    }
}

/// `check` opens the access log file as `run` will: a path in a missing
/// directory, or a directory, is named; a file that can be created is not
/// left behind by `check`.
#[test]
fn check_opens_the_access_log_file() {
    let dir = TempDir::new("cli");
    let base = valid_config("http://127.0.0.1:9000");
    let missing = dir.path().join("no-such-dir").join("access.log");
    for target in [missing.clone(), dir.path().to_path_buf()] {
        let line = format!("access_log = {:?}", target.display().to_string());
        let path = dir.write(
            "bad.toml",
            &base.replace("[session]", &format!("{line}\n\n[session]")),
        );
        let out = check(dir.path(), path.to_str().unwrap());
        assert_eq!(out.status.code(), Some(2), "{line}: {}", stderr(&out));
        let want = format!("[server] access_log: cannot open {}", target.display());
        assert!(stderr(&out).contains(&want), "{line}: {}", stderr(&out));
    }
    let fine = dir.path().join("access.log");
    let line = format!("access_log = {:?}", fine.display().to_string());
    let path = dir.write(
        "good.toml",
        &base.replace("[session]", &format!("{line}\n\n[session]")),
    );
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!fine.exists(), "check creates no access log file");
}

/// The structural slips of a first file, said in the file's terms (not
/// serde's "missing field" or "invalid type: map, expected a sequence").
#[test]
fn check_explains_a_missing_section_and_a_single_bracket_route() {
    let dir = TempDir::new("cli");
    let valid = valid_config("http://127.0.0.1:9000");
    let no_server = valid.replace(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\nshutdown_grace = \"10s\"\n",
        "",
    );
    let no_listen = valid.replace("listen = \"127.0.0.1:0\"\n", "");
    let single = valid.replace("[[route]]", "[route]");
    let mixed = format!("{valid}\n[route]\nname = \"b\"\nupstream = \"http://127.0.0.1:9001\"\n");
    for (text, want) in [
        (
            &no_server,
            "1:1: missing section [server] (it needs at least listen",
        ),
        (&no_listen, "missing key `listen`"),
        (&single, "[route] is written [[route]]"),
        (&mixed, "[route] is written [[route]]"),
    ] {
        assert_ne!(text, &valid);
        let path = dir.write("bad.toml", text);
        let out = check(dir.path(), path.to_str().unwrap());
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(stderr(&out).contains(want), "{want}: {}", stderr(&out));
    }
}

#[test]
fn check_reports_an_unknown_key_with_file_line_and_column() {
    let dir = TempDir::new("cli");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\n\n[session]\nsecret_key = \"{SECRET}\"\ncookie_secur = false\n\n[[route]]\nname = \"app\"\nupstream = \"http://127.0.0.1:9000\"\n"
    );
    assert_eq!(text.lines().nth(6), Some("cookie_secur = false"));
    dir.write("sessiongate.toml", &text);
    // A relative path: the message names the file exactly as given.
    let out = check(dir.path(), "sessiongate.toml");
    assert_eq!(out.status.code(), Some(2), "stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.starts_with("sessiongate.toml:7:1: "), "{err:?}");
    assert!(err.contains("cookie_secur"), "{err:?}");
}

#[test]
fn check_names_the_route_of_a_validation_error() {
    let dir = TempDir::new("cli");
    let text = valid_config("http://127.0.0.1:9000").replace(
        "name = \"app\"\nupstream = \"http://127.0.0.1:9000\"",
        "name = \"api\"\nupstream = \"ftp://127.0.0.1:9000\"",
    );
    assert!(text.contains("ftp://"));
    let path = dir.write("sessiongate.toml", &text);
    let shown = path.to_str().unwrap();
    let out = check(dir.path(), shown);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("{shown}: route \"api\": ")),
        "{err:?}"
    );
}

#[test]
fn check_rejects_a_host_prefixed_cookie_with_a_domain() {
    let dir = TempDir::new("cli");
    let text = valid_config("http://127.0.0.1:9000").replace(
        "cookie_secure = false",
        "cookie_secure = true\ncookie_name = \"__Host-sid\"\ncookie_domain = \"example.com\"",
    );
    let path = dir.write("sessiongate.toml", &text);
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("__Host-"), "{}", stderr(&out));
}

#[test]
fn check_refuses_user_key_with_signed_cookies() {
    let dir = TempDir::new("cli");
    let base = valid_config("http://127.0.0.1:9000");
    let signed = base
        .replace(
            "cookie_secure = false",
            "cookie_secure = false\nuser_key = \"_auth_user_id\"",
        )
        .replace("[store]", "[store]\nengine = \"signed_cookies\"");
    let path = dir.write("sessiongate.toml", &signed);
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2), "stdout: {}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("user_key") && err.contains("signed_cookies"),
        "names the key and the engine: {err}"
    );
    // The same user key on the memory engine is fine.
    let memory = signed.replace("engine = \"signed_cookies\"", "engine = \"memory\"");
    let path = dir.write("sessiongate.toml", &memory);
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn check_requires_a_secret_key() {
    let dir = TempDir::new("cli");
    let text =
        valid_config("http://127.0.0.1:9000").replace(&format!("secret_key = \"{SECRET}\"\n"), "");
    assert!(!text.contains("secret_key"));
    let path = dir.write("sessiongate.toml", &text);
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("secret_key"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("make one with `openssl rand -hex 32`"),
        "the error says how to make a key: {}",
        stderr(&out)
    );
}

#[test]
fn check_warns_about_the_public_example_key() {
    let dir = TempDir::new("cli");
    let example = "CHANGE-ME-example-secret-key-0123456789abcdef";
    // The key of the shipped example configuration.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sessiongate.toml"),
    )
    .unwrap();
    assert!(
        shipped.contains(example),
        "the example config's key changed"
    );
    let text = valid_config("http://127.0.0.1:9000").replace(SECRET, example);
    let path = dir.write("sessiongate.toml", &text);
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}: warning: [session] secret_key is the public example key (CHANGE-ME...): anyone can forge session ids and signed cookies with it; make your own with `openssl rand -hex 32`",
            path.display()
        )
    );
    // A key of one's own: no warning.
    let path = dir.write("own.toml", &valid_config("http://127.0.0.1:9000"));
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(stderr(&out), "");
}

#[test]
fn check_says_when_a_listen_host_name_does_not_resolve() {
    let dir = TempDir::new("cli");
    let text = valid_config("http://127.0.0.1:9000").replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"no-such-host.invalid:8443\"",
    );
    let path = dir.write("sessiongate.toml", &text);
    let out = check(dir.path(), path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("[server] listen: the host name \"no-such-host.invalid\" does not resolve"),
        "{err}"
    );
    // A malformed address is still called one.
    let text = valid_config("http://127.0.0.1:9000")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\"");
    let path = dir.write("shape.toml", &text);
    let err = stderr(&check(dir.path(), path.to_str().unwrap()));
    assert!(err.contains("is not an address such as"), "{err}");
}

// ---------------------------------------------------------------------------
// clear-expired
// ---------------------------------------------------------------------------

#[test]
fn clear_expired_on_the_memory_engine_reports_zero() {
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config("http://127.0.0.1:9000"));
    let mut c = bin();
    c.args(["clear-expired", "--config", path.to_str().unwrap()]);
    let out = run_bounded(c);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.starts_with("0 ")), "{text:?}");
}

#[test]
fn clear_expired_explains_engines_without_a_sweep() {
    for (engine, extra, why) in [
        (
            "redis",
            "url = \"redis://127.0.0.1:1/0\"",
            "Redis expires each session by itself",
        ),
        ("cached_redis", "url = \"redis://127.0.0.1:1/0\"", "TTL"),
        ("signed_cookies", "", "lives in its browser's cookie"),
    ] {
        let dir = TempDir::new("cli");
        let text = valid_config("http://127.0.0.1:9000").replace(
            "[store]\n",
            &format!("[store]\nengine = \"{engine}\"\n{extra}\n"),
        );
        assert!(text.contains(engine), "the config names the engine");
        let path = dir.write("sessiongate.toml", &text);
        let mut c = bin();
        c.args(["clear-expired", "--config", path.to_str().unwrap()]);
        let out = run_bounded(c);
        assert_eq!(out.status.code(), Some(0), "{engine}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.starts_with("0 expired sessions deleted: "),
            "{engine}: {text:?}"
        );
        assert!(text.contains(why), "{engine}: {text:?}");
    }
}

// ---------------------------------------------------------------------------
// Serving and signals
// ---------------------------------------------------------------------------

/// The real binary serving; killed on drop if it is still running.
struct Running {
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Notified after each new stderr line.
    new_line: Arc<tokio::sync::Notify>,
}

#[test]
fn a_port_in_use_is_named_once_with_a_hint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut c = bin();
    c.args(["demo", "--listen", &addr]);
    let out = run_bounded(c);
    assert!(!out.status.success());
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("sessiongate: "))
        .unwrap_or_else(|| panic!("an error line: {err}"));
    assert_eq!(line.matches(addr.as_str()).count(), 1, "{line}");
    assert_eq!(line.matches("in use").count(), 1, "{line}");
    assert!(line.contains("--listen 127.0.0.1:0"), "{line}");
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.trim_matches('"').parse().ok())
}

/// Starts `sessiongate ARGS` and waits for its "sessiongate listening" log line.
async fn serve(args: &[&str]) -> Running {
    serve_env(args, &[]).await
}

/// [`serve`] with these environment variables (`RUST_LOG` is `info` unless given).
async fn serve_env(args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut child = bin()
        .envs(env.iter().copied())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sessiongate");
    let pipe = child.stderr.take().unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let sink = lines.clone();
    let new_line = Arc::new(tokio::sync::Notify::new());
    let notify = new_line.clone();
    // Keeps draining stderr until the process exits, so it never blocks on it.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if line.contains("sessiongate listening") {
                if let (Some(a), Some(tx)) = (listening_addr(&line), tx.take()) {
                    let _ = tx.send(a);
                }
            }
            sink.lock().unwrap().push(line);
            notify.notify_waiters();
        }
    });
    let mut running = Running {
        pid: child.id(),
        child: Some(child),
        addr: "0.0.0.0:0".parse().unwrap(),
        stderr: lines,
        new_line,
    };
    match tokio::time::timeout(LIMIT, rx).await {
        Ok(Ok(addr)) => running.addr = addr,
        _ => panic!(
            "no \"sessiongate listening addr=...\" line; stderr: {:?}",
            running.stderr.lock().unwrap()
        ),
    }
    running
}

impl Running {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{sig} {}", self.pid);
    }

    /// Waits for the process to exit, bounded by [`LIMIT`].
    async fn exit_status(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("still running");
        let waiting = tokio::task::spawn_blocking(move || child.wait());
        match tokio::time::timeout(LIMIT, waiting).await {
            Ok(r) => r.unwrap().expect("wait"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &self.pid.to_string()])
                    .status();
                panic!(
                    "sessiongate did not exit; stderr: {:?}",
                    self.stderr.lock().unwrap()
                );
            }
        }
    }

    /// How many stderr lines so far contain `needle`.
    fn lines_with(&self, needle: &str) -> usize {
        let lines = self.stderr.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits, bounded by [`LIMIT`], until `count` stderr lines contain `needle`.
    async fn wait_for_lines(&self, needle: &str, count: usize) {
        let wait = async {
            loop {
                // Created before the check: a line pushed in between still wakes it.
                let next = self.new_line.notified();
                if self.lines_with(needle) >= count {
                    return;
                }
                next.await;
            }
        };
        if tokio::time::timeout(LIMIT, wait).await.is_err() {
            panic!(
                "{count} lines with {needle:?} expected; stderr: {:?}",
                self.stderr.lock().unwrap()
            );
        }
    }

    fn url(&self, path: &str) -> http::Uri {
        format!("http://{}{path}", self.addr).parse().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn get(url: http::Uri) -> (http::StatusCode, Bytes) {
    let resp = client::<Full<Bytes>>().get(url).await.expect("an answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_config_flag_serves_like_run() {
    let up = upstream(|_| text("served")).await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    let mut s = serve(&["--config", path.to_str().unwrap()]).await;

    let (status, body) = within("a request through the binary", get(s.url("/x"))).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"served");
    assert_eq!(up.last().uri.path(), "/x");

    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let gate = Gate::default();
    let (arrived_tx, mut arrived_rx) = mpsc::unbounded_channel::<()>();
    let g = gate.clone();
    let up = upstream_async(move |_| {
        let g = g.clone();
        let arrived = arrived_tx.clone();
        Box::pin(async move {
            let _ = arrived.send(());
            g.wait().await;
            text("finished")
        })
    })
    .await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    let mut s = serve(&["run", "--config", path.to_str().unwrap()]).await;

    let in_flight = tokio::spawn(get(s.url("/slow")));
    within("the request to reach the upstream", arrived_rx.recv())
        .await
        .unwrap();

    s.signal("TERM");
    // The proxy stops accepting while the request is still held upstream.
    wait_refused(s.addr).await;
    assert!(!in_flight.is_finished());

    gate.open();
    let (status, body) = within("the in-flight response", in_flight).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    let code = s.exit_status().await;
    assert_eq!(
        code.code(),
        Some(0),
        "stderr: {:?}",
        s.stderr.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_0() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    // Two workers: the shutdown is still said once.
    let mut s = serve_env(
        &["run", "--config", path.to_str().unwrap()],
        &[("SESSIONGATE_WORKERS", "2")],
    )
    .await;
    let (status, _) = within("a request", get(s.url("/"))).await;
    assert_eq!(status, 200);

    s.signal("INT");
    let code = s.exit_status().await;
    assert_eq!(
        code.code(),
        Some(0),
        "stderr: {:?}",
        s.stderr.lock().unwrap()
    );
    // The reader of stderr may trail the exit: the last line first.
    s.wait_for_lines("stopped", 1).await;
    assert_eq!(
        s.lines_with("shutting down"),
        1,
        "{:?}",
        s.stderr.lock().unwrap()
    );
    assert_eq!(s.lines_with("SIGINT received"), 1);
}

#[test]
fn an_address_in_use_names_its_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("cli");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    dir.write("cert.pem", &cert.cert.pem());
    dir.write("key.pem", &cert.signing_key.serialize_pem());
    let text = valid_config("http://127.0.0.1:9000").replace(
        "tls = false",
        &format!("tls = true\ncert = \"cert.pem\"\nkey = \"key.pem\"\nredirect_http = \"{addr}\""),
    );
    let path = dir.write("sessiongate.toml", &text);
    let mut c = bin();
    c.args(["run", "--config", path.to_str().unwrap()]);
    let out = run_bounded(c);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot listen on {addr} (redirect_http): ")),
        "{err}"
    );
    let text = valid_config("http://127.0.0.1:9000").replace("127.0.0.1:0", &addr);
    let path = dir.write("listen.toml", &text);
    let mut c = bin();
    c.args(["run", "--config", path.to_str().unwrap()]);
    let err = stderr(&run_bounded(c));
    assert!(
        err.contains(&format!("cannot listen on {addr} (listen): ")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_on_by_default_in_combined_format_and_never_carries_secrets() {
    let up =
        upstream(|_| directives(&[("x-session-update", r#"{"card":"4111-SECRET-DATA"}"#)])).await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    let mut s = serve(&["run", "--config", path.to_str().unwrap()]).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let req = http::Request::get(s.url("/account/page?token=QUERY-SECRET"))
        .header(
            "cookie",
            "sessionid=abcdefghijklmnopqrstuvwxyz012345; other=1",
        )
        .header("referer", "http://shop.test/from?ref=REFERER-SECRET")
        .header("user-agent", "test-agent/1.0")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = within("a request", client.request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    let key = set["sessionid=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));
    let log = s.stderr.lock().unwrap().join("\n");
    let line = log
        .lines()
        .find(|l| l.contains("\"GET /account/page HTTP/1.1\""))
        .unwrap_or_else(|| panic!("an access line: {log}"));
    // nginx's combined format, then the request time in seconds.
    let shape = combined_shape(line);
    assert!(shape, "not a combined line: {line}");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(
            "\"GET /account/page HTTP/1.1\" 200 2 \"http://shop.test/from\" \"test-agent/1.0\" "
        ),
        "{line}"
    );
    for secret in [
        "QUERY-SECRET",
        "REFERER-SECRET",
        "other=1",
        "abcdefghijklmnopqrstuvwxyz012345",
        key.as_str(),
        "SECRET-DATA",
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} must not be logged: {log}"
        );
    }
}

/// `ADDR - - [DD/Mon/YYYY:HH:MM:SS +0000] "..." STATUS BYTES "..." "..." SECS`
fn combined_shape(line: &str) -> bool {
    let Some((head, rest)) = line.split_once(" - - [") else {
        return false;
    };
    let Some((time, rest)) = rest.split_once("] \"") else {
        return false;
    };
    let secs = rest.rsplit(' ').next().unwrap_or("");
    head.parse::<std::net::IpAddr>().is_ok()
        && time.len() == 26
        && time.ends_with(" +0000")
        && secs.parse::<f64>().is_ok()
        && secs.contains('.')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_file() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("cli");
    let text = valid_config(&up.url()).replace(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"10s\"\naccess_log = \"access.log\"\naccess_log_format = \"json\"",
    );
    let path = dir.write("sessiongate.toml", &text);
    let mut s = serve(&["run", "--config", path.to_str().unwrap()]).await;
    let log = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let (status, _) = get(s.url("/first?q=1")).await;
    assert_eq!(status, 200);
    std::fs::rename(&log, &rotated).unwrap();
    s.signal("USR1");
    s.wait_for_lines("access log reopened", 1).await;
    let (status, _) = get(s.url("/second")).await;
    assert_eq!(status, 200);
    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&log).unwrap();
    let path_of = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].clone();
    assert_eq!(old.lines().map(path_of).collect::<Vec<_>>(), ["/first"]);
    assert_eq!(new.lines().map(path_of).collect::<Vec<_>>(), ["/second"]);
}

// ---------------------------------------------------------------------------
// worker tuning: SESSIONGATE_WORKERS, SESSIONGATE_CPU_AFFINITY
// ---------------------------------------------------------------------------

/// `Cpus_allowed_list` of each of `pid`'s worker threads.
fn worker_cpu_lists(pid: u32) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc tasks") {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("sessiongate-wor") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("a Cpus_allowed_list line")
            .trim()
            .to_string();
        lists.push(list);
    }
    lists
}

/// The CPUs this test process may run on, from `/proc/self/status`.
fn usable_cpus() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    list.split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_affinity_auto_pins_each_worker_to_a_cpu_of_its_own() {
    let up = upstream(|_| text("served")).await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    // With one usable CPU the list reads the same pinned or not; the
    // "worker pinned" lines still tell.
    let cpus = usable_cpus();
    let workers = cpus.min(2).to_string();
    let mut s = serve_env(
        &["run", "--config", path.to_str().unwrap()],
        &[
            ("SESSIONGATE_WORKERS", workers.as_str()),
            ("SESSIONGATE_CPU_AFFINITY", "auto"),
        ],
    )
    .await;
    let (status, _) = within("a request through pinned workers", get(s.url("/x"))).await;
    assert_eq!(status, 200);
    s.wait_for_lines("worker pinned", workers.parse().unwrap())
        .await;

    let lists = worker_cpu_lists(s.pid);
    assert_eq!(lists.len().to_string(), workers, "{lists:?}");
    for l in &lists {
        assert!(
            l.parse::<usize>().is_ok(),
            "a single CPU per worker: {lists:?}"
        );
    }
    let mut distinct = lists.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), lists.len(), "one CPU each: {lists:?}");
    assert_eq!(s.lines_with("worker pinned").to_string(), workers);

    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));
}

/// No worker of `s` is pinned: none logged a pin, and (when the process may
/// use more than one CPU, so that the lists differ) each may run on several.
fn assert_unpinned(s: &Running, cpus: usize) {
    assert_eq!(s.lines_with("worker pinned"), 0);
    if cpus > 1 {
        let lists = worker_cpu_lists(s.pid);
        assert!(
            lists.iter().all(|l| l.parse::<usize>().is_err()),
            "{lists:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_not_pinned_by_default_nor_when_cpus_are_fewer_than_workers() {
    let up = upstream(|_| text("served")).await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    let config = path.to_str().unwrap();
    let cpus = usable_cpus();
    let log = ("RUST_LOG", "info,sessiongate::server=debug");

    // A blank value is the same as none.
    let mut s = serve_env(
        &["run", "--config", config],
        &[
            log,
            ("SESSIONGATE_WORKERS", "2"),
            ("SESSIONGATE_CPU_AFFINITY", " "),
        ],
    )
    .await;
    s.wait_for_lines("worker started", 2).await;
    assert_eq!(worker_cpu_lists(s.pid).len(), 2);
    assert_unpinned(&s, cpus);
    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));

    let more = cpus + 1;
    let workers = more.to_string();
    let mut s = serve_env(
        &["run", "--config", config],
        &[
            log,
            ("SESSIONGATE_WORKERS", workers.as_str()),
            ("SESSIONGATE_CPU_AFFINITY", "auto"),
        ],
    )
    .await;
    s.wait_for_lines("fewer usable CPUs than workers", 1).await;
    s.wait_for_lines("worker started", more).await;
    let (status, _) = within("a request through unpinned workers", get(s.url("/x"))).await;
    assert_eq!(status, 200);
    assert_unpinned(&s, cpus);
    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));
}

#[test]
fn a_bad_worker_setting_is_an_error_naming_the_variable() {
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config("http://127.0.0.1:9"));
    for (name, value, expected) in [
        ("SESSIONGATE_WORKERS", "two", "SESSIONGATE_WORKERS=\"two\""),
        ("SESSIONGATE_WORKERS", "0", "SESSIONGATE_WORKERS=\"0\""),
        (
            "SESSIONGATE_CPU_AFFINITY",
            "pinned",
            "SESSIONGATE_CPU_AFFINITY=\"pinned\"",
        ),
        ("SESSIONGATE_H1", "hyperr", "SESSIONGATE_H1=\"hyperr\""),
    ] {
        for command in ["run", "check"] {
            let mut c = bin();
            c.env(name, value)
                .args([command, "--config", path.to_str().unwrap()]);
            let out = run_bounded(c);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} with {name}={value}: {}",
                stderr(&out)
            );
            let err = stderr(&out);
            assert!(
                err.contains(expected),
                "{command} with {name}={value}: {err}"
            );
            assert!(!err.contains("sessiongate listening"), "{err}");
        }
    }
}

#[test]
fn check_reports_the_worker_settings() {
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config("http://127.0.0.1:9000"));
    let mut c = bin();
    c.current_dir(dir.path())
        .env("SESSIONGATE_WORKERS", "3")
        .env("SESSIONGATE_CPU_AFFINITY", "auto")
        .args(["check", "--config", path.to_str().unwrap()]);
    let out = run_bounded(c);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stdout(&out).contains("workers 3, CPU affinity auto"),
        "{}",
        stdout(&out)
    );
    let out = check(dir.path(), path.to_str().unwrap());
    assert!(
        stdout(&out).contains("CPU affinity off"),
        "the default: {}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_worker_count_means_the_default() {
    let up = upstream(|_| text("served")).await;
    let dir = TempDir::new("cli");
    let path = dir.write("sessiongate.toml", &valid_config(&up.url()));
    let mut s = serve_env(
        &["run", "--config", path.to_str().unwrap()],
        &[("SESSIONGATE_WORKERS", "")],
    )
    .await;
    let (status, body) = within("a request", get(s.url("/x"))).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"served");
    let default = std::thread::available_parallelism().map_or(1, |n| n.get());
    s.wait_for_lines(&format!("workers={default}"), 1).await;
    s.signal("TERM");
    assert_eq!(s.exit_status().await.code(), Some(0));
}

#[test]
fn check_accepts_sentinel_and_cluster_urls_and_explains_malformed_ones() {
    for (url, want) in [
        (
            "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/2",
            None,
        ),
        ("rediss+cluster://10.0.0.1:7000,10.0.0.2:7001", None),
        (
            "redis+cluster://10.0.0.1:7000/1",
            Some("Redis Cluster has no database number"),
        ),
        (
            "redis+sentinel://10.0.0.1:26379",
            Some("names the primary the sentinels watch"),
        ),
        (
            "redis+sentinel://10.0.0.1:26379/mymaster/x",
            Some("database \"x\" is not a non-negative integer"),
        ),
        ("redis+cluster://h1:7000,,h2", Some("an empty host")),
        (
            "redis+cluster://h1:70000",
            Some("port \"70000\" is not a port"),
        ),
        (
            "redis+sentinal://h1/m",
            Some("unknown scheme \"redis+sentinal\""),
        ),
    ] {
        let dir = TempDir::new("cli");
        let text = valid_config("http://127.0.0.1:9000").replace(
            "[store]\n",
            &format!("[store]\nengine = \"cached_redis\"\nurl = \"{url}\"\n"),
        );
        let path = dir.write("sessiongate.toml", &text);
        let out = check(dir.path(), path.to_str().unwrap());
        match want {
            None => assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out)),
            Some(msg) => {
                assert_ne!(out.status.code(), Some(0), "{url}");
                let err = stderr(&out);
                assert!(
                    err.contains("[store] url") && err.contains(msg),
                    "{url}: {err}"
                );
                assert!(!err.contains("pw"), "{err}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The first hour: what a newcomer reads
// ---------------------------------------------------------------------------

#[test]
fn with_no_config_at_the_default_path_it_says_so_and_points_to_demo() {
    let dir = TempDir::new("cli");
    for args in [&["check"][..], &["run"], &["clear-expired"], &[]] {
        let mut c = bin();
        c.current_dir(dir.path()).args(args);
        let out = run_bounded(c);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            stderr(&out).trim(),
            "sessiongate: no configuration file at config/sessiongate.toml (the default path); pass --config FILE, or try `sessiongate demo` to see it work",
            "{args:?}"
        );
    }
    // A path given on purpose that does not exist is named as it was given.
    let out = check(dir.path(), "missing.toml");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("missing.toml: cannot read"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn demo_offers_no_config_flag() {
    let mut c = bin();
    c.args(["demo", "--config", "x.toml"]);
    let out = run_bounded(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected argument '--config'"),
        "{}",
        stderr(&out)
    );
    let mut c = bin();
    c.args(["--config", "x.toml", "demo"]);
    let out = run_bounded(c);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out).trim(),
        "sessiongate: demo takes no --config: it runs on its own built-in configuration"
    );
    // The help of demo does not list it; the commands that read a file do.
    let mut c = bin();
    c.args(["demo", "--help"]);
    assert!(!stdout(&run_bounded(c)).contains("--config"));
    let mut c = bin();
    c.args(["check", "--help"]);
    assert!(stdout(&run_bounded(c)).contains("--config <FILE>"));
}

#[test]
fn demo_listen_takes_a_host_name() {
    let mut child = bin()
        .args(["demo", "--listen", "localhost:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("https://localhost:") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let line = rx.recv_timeout(LIMIT);
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("the demo started on localhost:0 and printed its URL");
    let port: u16 = line
        .split("https://localhost:")
        .nth(1)
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    assert_ne!(port, 0, "a free port was picked");
    // A name that does not resolve is said in plain words.
    let mut c = bin();
    c.args(["demo", "--listen", "no-such-host.invalid:0"]);
    let out = run_bounded(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--listen no-such-host.invalid:0: not an address such as 127.0.0.1:8443, or a host name that does not resolve"),
        "{}",
        stderr(&out)
    );
}

/// Every `sessiongate COMMAND` the README shows is a command `--help` lists.
#[test]
fn the_commands_the_readme_shows_exist() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut c = bin();
    c.arg("--help");
    let help = stdout(&run_bounded(c));
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        listed.contains(&"demo") && listed.contains(&"check"),
        "{help}"
    );
    // Command lines: in code blocks, lines that run `sessiongate` (or a
    // path to it); in prose, `sessiongate WORD` between backticks.
    let mut shown = std::collections::BTreeSet::new();
    let mut in_code = false;
    let word_after = |rest: &str| -> Option<String> {
        let w: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '-')
            .collect();
        (!w.is_empty() && !w.starts_with('-')).then_some(w)
    };
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            let mut tokens = line.split_whitespace();
            if let Some(first) = tokens.next() {
                if first == "sessiongate" || first.ends_with("/sessiongate") {
                    if let Some(w) = tokens.next().and_then(word_after) {
                        shown.insert(w);
                    }
                }
            }
        } else {
            for (i, _) in line.match_indices("`sessiongate ") {
                if let Some(w) = word_after(&line[i + "`sessiongate ".len()..]) {
                    shown.insert(w);
                }
            }
        }
    }
    assert!(shown.contains("run") && shown.contains("demo"), "{shown:?}");
    for word in &shown {
        assert!(
            listed.contains(&word.as_str()),
            "README shows `sessiongate {word}`, which --help does not list: {listed:?}"
        );
    }
}

/// "trying the next upstream" is said only when there is a next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trying_the_next_upstream_is_logged_only_when_there_is_one() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("cli");
    // One upstream, unreachable: a 502 and no such line.
    let path = dir.write("one.toml", &valid_config(&dead));
    let s = serve(&["run", "--config", path.to_str().unwrap()]).await;
    let (status, _) = within("a request", get(s.url("/"))).await;
    assert_eq!(status, 502);
    s.wait_for_lines("upstream", 1).await;
    assert_eq!(s.lines_with("trying the next upstream"), 0);
    drop(s);
    // Two, the first unreachable: served, and the line says what happened.
    let text = valid_config(&dead).replace(
        &format!("upstream = \"{dead}\""),
        &format!("upstreams = [\"{dead}\", \"{}\"]", up.url()),
    );
    let path = dir.write("two.toml", &text);
    let s = serve(&["run", "--config", path.to_str().unwrap()]).await;
    for _ in 0..2 {
        let (status, _) = within("a request", get(s.url("/"))).await;
        assert_eq!(status, 200);
    }
    s.wait_for_lines("trying the next upstream", 1).await;
}

// ---------------------------------------------------------------------------
// the allocator
// ---------------------------------------------------------------------------

/// The proxy's resident memory (Linux's `VmRSS`), in bytes.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kb * 1024
}

/// Issue 15: with glibc's allocator the memory of 10,000 connections stayed
/// resident after they closed (about 300 MB); the binary's jemalloc gives it back.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_of_a_burst_of_connections_goes_back_to_the_system() {
    // Enough for the second burst to be well over 20 % of what the process
    // holds before it: it grows the process by less than the first (it
    // reuses what the first left, about 1.9 KB a connection with 4,000 of
    // them once, against 6.6 MB needed), so 8,000.
    const CONNS: usize = 8000;
    // This process holds one end of each connection too.
    let open_files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if open_files < (CONNS + 200) as u64 {
        eprintln!("skipped: open files limit {open_files}");
        return;
    }
    let dir = TempDir::new("alloc");
    // No route matches host "x": sessiongate answers 404 itself, no upstream needed.
    let text = valid_config("http://127.0.0.1:9").replace(
        "name = \"app\"",
        "name = \"app\"\nhost = \"no-such-host.invalid\"",
    );
    let path = dir.write("sessiongate.toml", &text);
    let s = serve(&["run", "--config", path.to_str().unwrap()]).await;

    // The first burst also grows what stays (tables sized by the most
    // connections seen, the allocator's metadata): the goal is measured
    // from the level after it (BENCHMARKS.md, idle connections).
    let first = rss(s.pid);
    let conns = idle_burst(s.addr, CONNS).await;
    let held = rss(s.pid).saturating_sub(first);
    // Each idle connection holds its task at least, over 2 KiB (and no read
    // buffer: the server's own HTTP/1.1 path reads a head into one only when
    // it comes).
    assert!(
        held > CONNS as u64 * 2 * 1024,
        "{CONNS} idle connections hold {held} bytes"
    );
    drop(conns);
    let before = settle(s.pid, "the first burst", |now| {
        now.saturating_sub(first) * 2 <= held
    })
    .await;

    let conns = idle_burst(s.addr, CONNS).await;
    let idle = rss(s.pid);
    let held = idle.saturating_sub(before);
    eprintln!("RSS {first} at start, {before} before the second burst, +{held} with it");
    // More than the 20 % the check below allows, or it could not fail.
    assert!(
        held > before / 5,
        "{CONNS} idle connections hold {held} bytes, {before} before"
    );
    drop(conns);
    // Back within 20 % of where it was before the burst (issue 15).
    settle(s.pid, "the second burst", |now| {
        now.saturating_sub(before) * 5 <= before
    })
    .await;
}

/// Opens `n` keep-alive connections, each after one answered request.
async fn idle_burst(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = Vec::with_capacity(n);
    within("a burst of idle keep-alive connections", async {
        for _ in 0..n {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"\n") {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            assert!(
                got.starts_with(b"HTTP/1.1 404"),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            conns.push(c);
        }
    })
    .await;
    conns
}

/// Polls the RSS of `pid` until `back` holds of it (jemalloc purges freed
/// pages about a second after they are freed; RSS has no change
/// notification), bounded by LIMIT; returns it.
async fn settle(pid: u32, what: &str, back: impl Fn(u64) -> bool) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let now = rss(pid);
        if back(now) {
            return now;
        }
        assert!(
            start.elapsed() < LIMIT,
            "RSS still {now} {LIMIT:?} after {what} closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// the server's own HTTP/1.1 path against hyper's
// ---------------------------------------------------------------------------

/// An upstream that answers by path on keep-alive connections: framings
/// the client side must re-frame, and `/echo`, the head it received.
async fn framing_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => {
                                buf.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                            _ => return,
                        }
                    };
                    let head: Vec<u8> = buf.drain(..end + 4).collect();
                    let text = String::from_utf8_lossy(&head).to_string();
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < len {
                        let n = s.read(&mut chunk).await.unwrap();
                        assert!(n > 0);
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    buf.drain(..len);
                    if text
                        .to_ascii_lowercase()
                        .contains("transfer-encoding: chunked")
                    {
                        // Bodies here have no trailers: the last chunk ends them.
                        let end = loop {
                            if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                                break i + 5;
                            }
                            let n = s.read(&mut chunk).await.unwrap();
                            assert!(n > 0);
                            buf.extend_from_slice(&chunk[..n]);
                        };
                        buf.drain(..end);
                    }
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    let reply: Vec<u8> = match path.as_str() {
                        "/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello".to_vec(),
                        "/chunked" => b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
                        "/204" => b"HTTP/1.1 204 No Content\r\nX-B: 1\r\n\r\n".to_vec(),
                        "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v\"\r\n\r\n".to_vec(),
                        "/odd" => b"HTTP/1.1 599 Whatever\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        "/big" => {
                            let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n".to_vec();
                            r.extend((0..300_000).map(|i| b'a' + (i % 26) as u8));
                            r
                        }
                        "/until-close" => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nread until the upstream closes").await;
                            return;
                        }
                        _ => {
                            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", head.len()).into_bytes();
                            r.extend_from_slice(&head);
                            r
                        }
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `script` in one write and reads until the server closes; `date`
/// values are blanked.
async fn exchange(addr: SocketAddr, script: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(script).await.unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got).await;
    let text = String::from_utf8_lossy(&got).to_string();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("\r\ndate: ") {
        out.push_str(&rest[..i + 8]);
        rest = &rest[(i + 8 + 29).min(rest.len())..];
    }
    out.push_str(rest);
    // And the session's expiry date the upstream echoes.
    let mut blank = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("x-session-expiry-date: ") {
        blank.push_str(&rest[..i + 23]);
        rest = &rest[(i + 23 + 20).min(rest.len())..];
    }
    blank.push_str(rest);
    blank
}

/// Every exchange the own path serves (and hands over) is answered byte
/// for byte as hyper's server answers it (`SESSIONGATE_H1=hyper`), and the
/// upstream sees the same requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_own_http1_path_answers_byte_for_byte_as_hyper_does() {
    let up = framing_upstream().await;
    let dir = TempDir::new("h1");
    let text = valid_config(&format!("http://{up}")).replace(
        "name = \"app\"",
        "name = \"static\"\npath = \"/static\"\nsession = false\nupstream = \"http://{UP}\"\n\n[[route]]\nname = \"app\"",
    ).replace("{UP}", &up.to_string());
    let path = dir.write("sessiongate.toml", &text);
    let args = ["run", "--config", path.to_str().unwrap()];
    let own = serve(&args).await;
    let hyper = serve_env(&args, &[("SESSIONGATE_H1", "hyper")]).await;
    let close = "GET /len HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let cases: Vec<(String, usize)> = vec![
        // Pipelined, every framing.
        (format!("GET /len HTTP/1.1\r\nHost: a\r\n\r\nGET /chunked HTTP/1.1\r\nHost: a\r\n\r\nGET /204 HTTP/1.1\r\nHost: a\r\n\r\nGET /304 HTTP/1.1\r\nHost: a\r\n\r\nGET /odd HTTP/1.1\r\nHost: a\r\n\r\nGET /until-close HTTP/1.1\r\nHost: a\r\n\r\nGET /big HTTP/1.1\r\nHost: a\r\n\r\n{close}"), 8),
        // What the upstream sees: the session's fields, X-Forwarded-*, cookies joined, bytes kept.
        (format!("GET /caf\u{e9}//x/../echo?q=1 HTTP/1.1\r\nHost: a:8\r\nCookie: a=1\r\nCookie: sessionid=forged\r\nX-Session: {{\"user_id\": 1}}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Odd: \u{e9}t\u{e9}\r\n\r\nGET /static/echo HTTP/1.1\r\nHost: a\r\nX-Session-Id: x\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: a\r\n\r\nGET http://a/echo HTTP/1.1\r\nHost: b\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n{close}"), 6),
        // Handed to hyper midway: a body, then simple requests again.
        (format!("GET /len HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /echo HTTP/1.1\r\nHost: a\r\n\r\n{close}"), 4),
        (format!("GET /len HTTP/1.1\r\nHost: a\r\n\r\nHEAD /len HTTP/1.1\r\nHost: a\r\n\r\n{close}"), 3),
        (format!("GET /len HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{close}"), 3),
        // HTTP/1.0 with keep-alive: hyper's (the own path takes only HTTP/1.1).
        (format!("GET /echo HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n{close}"), 2),
        (format!("GET /echo HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\nGET /chunked HTTP/1.1\r\nHost: a\r\n\r\n{close}"), 3),
        // Refused: by the proxy (keep-alive), by hyper's parser, for a coding.
        (format!("GET /len HTTP/1.1\r\n\r\nTRACE / HTTP/1.1\r\nHost: a\r\n\r\nGET /len HTTP/1.1\r\nHost: a b\r\n\r\n{close}"), 4),
        ("GET /len HTTP/1.1\r\nHost: a\r\n\r\nNOT A REQUEST\r\n\r\n".to_string(), 2),
        ("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_string(), 1),
        ("GET /len HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n".to_string() + close, 2),
    ];
    // Where the two differ: a pipelined head with a coding the proxy does
    // not decode is judged on the own path (hyper's parser alone refuses it
    // with a bare 400, SPEC 3.1 names it with a 501).
    let gzip = "GET /len HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n";
    let mine = exchange(own.addr, gzip.as_bytes()).await;
    assert!(
        mine.contains("HTTP/1.1 501 Not Implemented") && mine.contains("gzip (only chunked)"),
        "{mine:?}"
    );
    // And a first head hyper's parser would refuse with an empty body: the
    // own path says what happened (SPEC 6), with the same status.
    let big = format!(
        "GET /len HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "x".repeat(70_000)
    );
    let mine = exchange(own.addr, big.as_bytes()).await;
    let theirs = exchange(hyper.addr, big.as_bytes()).await;
    assert!(
        mine.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n")
            && mine.ends_with("\r\n\r\nrequest head too large (over 64 KiB or 100 fields)\n"),
        "{mine:?}"
    );
    assert!(
        theirs.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{theirs:?}"
    );
    for (script, responses) in &cases {
        let mine = exchange(own.addr, script.as_bytes()).await;
        let theirs = exchange(hyper.addr, script.as_bytes()).await;
        // Status lines (a request line in an echoed head ends in a CR).
        let short = |s: &str| s.chars().take(3000).collect::<String>();
        let heads = mine.matches("HTTP/1.1 ").count() + mine.matches("HTTP/1.0 ").count();
        assert_eq!(
            heads,
            *responses,
            "responses to {script:?}: {}",
            short(&mine)
        );
        if mine != theirs {
            let at = mine
                .bytes()
                .zip(theirs.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            let at = mine.floor_char_boundary(at.saturating_sub(200));
            panic!(
                "to {script:?}, from byte {at}: own {:?}, hyper {:?}",
                short(&mine[at..]),
                short(&theirs[at..])
            );
        }
    }
}
