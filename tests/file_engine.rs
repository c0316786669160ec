//! The `file` and `cached_file` engines beyond the conformance suite:
//! persistence across reopen, start-up errors, large sweeps, and the real
//! binary killed with SIGKILL during concurrent writes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use sessiongate::session::{Expiry, Patch, Policy, Record, SessionKey};
use sessiongate::store::{Applied, FileStore, Store, StoreError, WriteCtx};

const POLICY: Policy = Policy {
    cookie_age_secs: 3600,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};
const T0: i64 = 1_800_000_000_000;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "sessiongate-file-test-{name}-{}-{}",
            std::process::id(),
            SessionKey::generate().as_str()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn update(v: Value) -> Patch {
    Patch {
        update: v.as_object().unwrap().clone(),
        has_update: true,
        ..Patch::default()
    }
}

fn ctx(now: i64) -> WriteCtx {
    WriteCtx {
        now,
        policy: POLICY,
        touch: false,
        refresh_ms: 0,
        max_size: 0,
    }
}

fn record(v: Value, now: i64) -> Record {
    let mut r = Record::new_at(now);
    r.apply_patch(&update(v), now, &POLICY);
    r
}

fn data(r: &Record) -> Value {
    serde_json::from_slice(&r.data).unwrap()
}

// ---------------------------------------------------------------------------
// The store itself
// ---------------------------------------------------------------------------

async fn survives_reopen(cached: bool) {
    let dir = TempDir::new("reopen");
    let store_dir = dir.path().join("a/b/sessions"); // created on open
    let (kept, cycled_old, cycled_new, deleted, short);
    {
        let s = FileStore::open(&store_dir, cached).await.unwrap();
        kept = s.create(record(json!({"a": 1}), T0)).await.unwrap();
        s.apply(&kept, &update(json!({"b": [1, "x"]})), ctx(T0 + 1))
            .await
            .unwrap();
        cycled_old = s.create(record(json!({"c": 1}), T0)).await.unwrap();
        let p = Patch {
            cycle: true,
            ..update(json!({"d": 2}))
        };
        let Applied::Saved { key, .. } = s.apply(&cycled_old, &p, ctx(T0 + 2)).await.unwrap()
        else {
            panic!("cycle saves")
        };
        cycled_new = key;
        deleted = s.create(record(json!({"e": 1}), T0)).await.unwrap();
        s.delete(&deleted).await.unwrap();
        short = {
            let mut r = record(json!({"f": 1}), T0);
            r.expiry = Expiry::Seconds(10);
            r.touch(T0, &POLICY);
            s.create(r).await.unwrap()
        };
        // No flush: dropping the store is enough (every write was durable).
    }
    let s = FileStore::open(&store_dir, cached).await.unwrap();
    let got = s.load(&kept, T0 + 5).await.unwrap().expect("kept");
    assert_eq!(data(&got), json!({"a": 1, "b": [1, "x"]}));
    assert_eq!(got.created, T0);
    assert_eq!(got.modified, T0 + 1);
    assert_eq!(got.expires_at, T0 + 1 + 3_600_000);
    assert!(s.load(&cycled_old, T0 + 5).await.unwrap().is_none());
    assert_eq!(
        data(&s.load(&cycled_new, T0 + 5).await.unwrap().unwrap()),
        json!({"c": 1, "d": 2})
    );
    assert!(s.load(&deleted, T0 + 5).await.unwrap().is_none());
    let r = s
        .load(&short, T0 + 5)
        .await
        .unwrap()
        .expect("not yet expired");
    assert_eq!(r.expiry, Expiry::Seconds(10));
    assert!(s.load(&short, T0 + 10_000).await.unwrap().is_none());
    // The expiry index came back too.
    assert_eq!(s.clear_expired(T0 + 10_000).await.unwrap(), 1);
    assert_eq!(s.clear_expired(T0 + 10_000).await.unwrap(), 0);
    s.flush().await.unwrap();
    drop(s);
    // And once more after a flush.
    let s = FileStore::open(&store_dir, !cached).await.unwrap();
    assert!(s.load(&kept, T0 + 5).await.unwrap().is_some());
    assert!(s.load(&short, T0 + 5).await.unwrap().is_none(), "swept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_survives_close_and_reopen() {
    survives_reopen(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_file_survives_close_and_reopen() {
    survives_reopen(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_file_reads_through_and_follows_writes() {
    let dir = TempDir::new("cached");
    let k = {
        let s = FileStore::open(dir.path(), false).await.unwrap();
        s.create(record(json!({"a": 1}), T0)).await.unwrap()
    };
    let s = FileStore::open(dir.path(), true).await.unwrap();
    assert_eq!(s.cached_len(), 0, "filled on a miss, not at open");
    assert!(s.load(&SessionKey::generate(), T0).await.unwrap().is_none());
    assert_eq!(s.cached_len(), 0, "absent keys are not cached");
    assert_eq!(
        data(&s.load(&k, T0).await.unwrap().unwrap()),
        json!({"a": 1})
    );
    assert_eq!(s.cached_len(), 1);
    s.apply(&k, &update(json!({"b": 2})), ctx(T0))
        .await
        .unwrap();
    assert_eq!(
        data(&s.load(&k, T0).await.unwrap().unwrap()),
        json!({"a": 1, "b": 2})
    );
    let k2 = s.create(record(json!({"n": 2}), T0)).await.unwrap();
    assert_eq!(s.cached_len(), 2, "written records are cached");
    s.delete(&k).await.unwrap();
    assert!(s.load(&k, T0).await.unwrap().is_none());
    assert_eq!(s.cached_len(), 1);
    assert_eq!(s.clear_expired(T0 + 3_600_000).await.unwrap(), 1);
    assert!(
        s.load(&k2, T0).await.unwrap().is_none(),
        "swept from memory too"
    );
    assert_eq!(s.cached_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_under_a_regular_file_is_a_clear_open_error() {
    let dir = TempDir::new("notdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("sub");
    let Err(e) = FileStore::open(&bad, false).await else {
        panic!("opened under a regular file")
    };
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Open(_)), "{msg}");
    assert!(msg.contains(bad.to_str().unwrap()), "names the path: {msg}");
    assert!(msg.contains("os error"), "says the OS error: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_open_of_the_same_store_is_refused() {
    let dir = TempDir::new("twice");
    let _first = FileStore::open(dir.path(), false).await.unwrap();
    let Err(e) = FileStore::open(dir.path(), true).await else {
        panic!("two writers on one file")
    };
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Open(_)), "{msg}");
    assert!(msg.contains("sessions.redb"), "{msg}");
    assert!(msg.contains("another sessiongate process"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_file_is_a_clear_open_error() {
    let dir = TempDir::new("damaged");
    {
        let s = FileStore::open(dir.path(), false).await.unwrap();
        s.create(record(json!({"a": 1}), T0)).await.unwrap();
    }
    let file = dir.path().join("sessions.redb");
    let original = std::fs::read(&file).unwrap();
    for cut in [0usize, 9, 200, 4096, 8192, original.len() / 2] {
        // Garbage from byte `cut` on.
        let mut bytes = original.clone();
        for (i, b) in bytes.iter_mut().enumerate().skip(cut) {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        std::fs::write(&file, &bytes).unwrap();
        let Err(e) = FileStore::open(dir.path(), false).await else {
            continue; // redb may accept a header it can repair
        };
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Open(_)), "{msg}");
        assert!(msg.contains("sessions.redb"), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_sweep_counts_exactly_and_keeps_writers_going() {
    let dir = TempDir::new("sweep");
    let s = Arc::new(FileStore::open(dir.path(), true).await.unwrap());
    let expired = 25_000; // more than one sweep chunk
    let mut tasks = Vec::new();
    for t in 0..64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (t..expired).step_by(64) {
                let mut r = record(json!({"x": 1}), T0);
                r.expiry = Expiry::Seconds(10);
                r.touch(T0, &POLICY);
                s.create(r).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let live = s.create(record(json!({"live": 1}), T0)).await.unwrap();
    let now = T0 + 20_000;
    let sweep = {
        let s = s.clone();
        tokio::spawn(async move { s.clear_expired(now).await.unwrap() })
    };
    // Writes go on during the sweep.
    for i in 0..20 {
        s.apply(&live, &update(json!({ format!("w{i}"): i })), ctx(now))
            .await
            .unwrap();
    }
    assert_eq!(sweep.await.unwrap(), expired as u64);
    assert_eq!(s.clear_expired(now).await.unwrap(), 0);
    let got = s.load(&live, now).await.unwrap().unwrap();
    assert_eq!(data(&got).as_object().unwrap().len(), 21);
}

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// An upstream that answers `?n=N` with `X-Session-Update: {"kN": N}`,
/// `&expiry=S` with `X-Session-Expiry: S`, and echoes the `X-Session`
/// header it received as the body.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut resp = Response::builder().status(200);
                    for pair in req.uri().query().unwrap_or("").split('&') {
                        match pair.split_once('=') {
                            Some(("n", n)) => {
                                let n: u64 = n.parse().unwrap();
                                resp = resp.header(
                                    "x-session-update",
                                    json!({ format!("k{n}"): n }).to_string(),
                                );
                            }
                            Some(("expiry", s)) => resp = resp.header("x-session-expiry", s),
                            _ => {}
                        }
                    }
                    let seen = req
                        .headers()
                        .get("x-session")
                        .map(|v| v.as_bytes().to_vec())
                        .unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(
                        resp.body(Full::new(Bytes::from(seen))).unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn write_config(dir: &Path, store_path: &Path, upstream: SocketAddr) -> PathBuf {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = false
upstream_connect_timeout = "2s"
upstream_timeout = "10s"
shutdown_grace = "5s"

[session]
secret_key = "{SECRET}"
cookie_secure = false

[store]
engine = "file"
path = {path}
clear_expired_interval = "0s"

[[route]]
name = "app"
upstream = "http://{upstream}"
"#,
        path = toml_string(store_path),
    );
    let f = dir.join("sessiongate.toml");
    std::fs::write(&f, text).unwrap();
    f
}

fn toml_string(p: &Path) -> String {
    let s = p.to_str().expect("a UTF-8 temp path");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The real binary, serving; its stderr is collected.
struct Running {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_binary(config: &Path) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("sessiongate listening") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                if let (Some(tx), Some(a)) = (tx.take(), addr) {
                    let _ = tx.send(a);
                }
            }
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let Ok(addr) = rx.recv_timeout(Duration::from_secs(30)) else {
        let _ = child.kill();
        panic!(
            "the binary did not start listening:\n{}",
            log.lock().unwrap()
        );
    };
    Running { child, addr, log }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path` with an optional session key: (status, new session key if a
/// cookie was set, body).
async fn get(
    c: &HttpClient,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
) -> Result<(u16, Option<String>, String), String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(k) = key {
        req = req.header("cookie", format!("sessionid={k}"));
    }
    let resp = c
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("sessionid="))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
        .filter(|v| !v.is_empty());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, cookie, String::from_utf8_lossy(&body).into_owned()))
}

fn kill(child: &mut Child, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_writes_loses_no_acknowledged_session() {
    let dir = TempDir::new("kill9");
    let up = upstream().await;
    let config = write_config(dir.path(), &dir.path().join("store"), up);
    let mut proxy = start_binary(&config);
    let addr = proxy.addr;

    // Every acknowledged session and the data its responses confirmed.
    type Acked = Arc<Mutex<Vec<(String, serde_json::Map<String, Value>)>>>;
    let acked: Acked = Arc::default();
    let target = 200;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0.. {
                let n = t * 1_000_000 + i * 2;
                // A new session...
                let Ok((200, Some(key), _)) = get(&c, addr, &format!("/?n={n}"), None).await else {
                    return; // the proxy is gone
                };
                let mut expect = serde_json::Map::new();
                expect.insert(format!("k{n}"), json!(n));
                let slot = {
                    let mut a = acked.lock().unwrap();
                    a.push((key.clone(), expect.clone()));
                    a.len() - 1
                };
                // ...and an update of it.
                let m = n + 1;
                let Ok((200, _, _)) = get(&c, addr, &format!("/?n={m}"), Some(&key)).await else {
                    return;
                };
                expect.insert(format!("k{m}"), json!(m));
                acked.lock().unwrap()[slot].1 = expect;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < target {
        assert!(
            Instant::now() < deadline,
            "too slow: {}",
            proxy.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Requests are in flight on all 16 tasks right now.
    kill(&mut proxy.child, "-KILL");
    proxy.child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= target);
    drop(proxy);

    let proxy = start_binary(&config);
    let c = client();
    for (key, expect) in &acked {
        let (status, cookie, body) = get(&c, proxy.addr, "/?read=1", Some(key)).await.unwrap();
        assert_eq!(status, 200);
        assert!(cookie.is_none(), "the session was adopted, no new cookie");
        let seen: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("session {} lost or torn ({e}): {body:?}", &key[..6]));
        let seen = seen.as_object().unwrap();
        for (k, v) in expect {
            assert_eq!(seen.get(k), Some(v), "acknowledged {k} lost: {seen:?}");
        }
    }
    eprintln!(
        "{} acknowledged sessions all found after SIGKILL and restart",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_expired_command_deletes_and_counts() {
    let dir = TempDir::new("clear");
    let up = upstream().await;
    let config = write_config(dir.path(), &dir.path().join("store"), up);
    let mut proxy = start_binary(&config);
    let c = client();
    let mut short = Vec::new();
    for n in 0..5 {
        let (s, k, _) = get(&c, proxy.addr, &format!("/?n={n}&expiry=1"), None)
            .await
            .unwrap();
        assert_eq!(s, 200);
        short.push(k.expect("a session cookie"));
    }
    let (_, long, _) = get(&c, proxy.addr, "/?n=100", None).await.unwrap();
    let long = long.unwrap();
    let written = Instant::now();
    // Stop the proxy cleanly (SIGTERM) so clear-expired can open the store.
    kill(&mut proxy.child, "-TERM");
    let status = proxy.child.wait().unwrap();
    assert!(status.success(), "{}", proxy.log.lock().unwrap());
    drop(proxy);

    let clear = || {
        let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["clear-expired", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let early = clear();
    if written.elapsed() < Duration::from_millis(900) {
        assert_eq!(early.trim(), "0 expired sessions deleted");
    }
    // The short sessions end 1 s after their write.
    let wait = Duration::from_millis(1100).saturating_sub(written.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(clear().trim(), "5 expired sessions deleted");
    assert_eq!(clear().trim(), "0 expired sessions deleted");

    let proxy = start_binary(&config);
    let (_, cookie, body) = get(&c, proxy.addr, "/", Some(&long)).await.unwrap();
    assert!(cookie.is_none());
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"k100": 100})
    );
    let (_, _, body) = get(&c, proxy.addr, "/", Some(&short[0])).await.unwrap();
    assert!(
        body.is_empty() || body == "{}",
        "an expired session is not served: {body:?}"
    );
}

#[test]
fn run_with_an_unusable_store_directory_fails_clearly() {
    let dir = TempDir::new("unusable");
    let plain = dir.path().join("plain-file");
    std::fs::write(&plain, b"not a directory").unwrap();
    let store = plain.join("sub");
    let config = write_config(dir.path(), &store, "127.0.0.1:9".parse().unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sessiongate run kept running with an unusable store directory");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(store.to_str().unwrap()),
        "names the path: {err}"
    );
    assert!(err.contains("Not a directory"), "says why: {err}");
}
