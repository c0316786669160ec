//! Load bench of the `file` and `cached_file` engines (a plain `main`, no
//! harness).
//!
//!   cargo bench --bench file_write                    # writes/s and reads/s
//!   cargo bench --bench file_write -- startup 1000000 # start-up after kill -9
//!
//! Writes: W tasks each apply an update to a random one of 10,000 stored
//! sessions (or create a new one), awaiting each durable acknowledgement
//! before the next, for a few seconds; the number printed is acknowledged
//! writes per second. Start-up: a child process stores N sessions, keeps
//! writing, and is killed with SIGKILL; the time to open the store again
//! (redb's crash recovery included) is printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sessiongate::session::{Patch, Policy, Record, SessionKey};
use sessiongate::store::{FileStore, Store, WriteCtx};

const POLICY: Policy = Policy {
    cookie_age_secs: 14 * 86400,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};
const RUN: Duration = Duration::from_secs(3);
const POOL: usize = 10_000;

fn now_ms() -> i64 {
    sessiongate::session::Clock::default().now_ms()
}

fn update(n: u64) -> Patch {
    let mut p = Patch::default();
    p.update.insert("n".into(), n.into());
    p.has_update = true;
    p
}

fn record(n: u64) -> Record {
    let now = now_ms();
    let mut r = Record::new_at(now);
    let mut p = update(n);
    p.update.insert("user_id".into(), 12345.into());
    p.update.insert("cart".into(), serde_json::json!([1, 2, 3]));
    r.apply_patch(&p, now, &POLICY);
    r
}

fn ctx() -> WriteCtx {
    WriteCtx {
        now: now_ms(),
        policy: POLICY,
        touch: false,
        refresh_ms: 0,
        max_size: 0,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sessiongate-bench-{name}-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A cheap per-task pseudo-random sequence.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Update,
    Create,
    Load,
}

async fn rate(
    store: &Arc<FileStore>,
    keys: &Arc<Vec<SessionKey>>,
    tasks: usize,
    kind: Kind,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let start = Instant::now();
    for t in 0..tasks {
        let (store, keys, stop, count) = (store.clone(), keys.clone(), stop.clone(), count.clone());
        handles.push(tokio::spawn(async move {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let i = next(&mut x);
                let k = keys[(i % keys.len() as u64) as usize];
                match kind {
                    Kind::Update => {
                        store.apply(&k, &update(i), ctx()).await.unwrap();
                    }
                    Kind::Create => {
                        store.create(record(i)).await.unwrap();
                    }
                    Kind::Load => {
                        assert!(store.load(&k, now_ms()).await.unwrap().is_some());
                        // A load never waits: let the timer run.
                        tokio::task::yield_now().await;
                    }
                }
                n += 1;
            }
            count.fetch_add(n, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// fdatasync calls per second on a small file in the temp directory: the
/// ceiling one-commit-per-write would have.
fn fsync_rate(dir: &Path) -> f64 {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        f.write_all(b"x").unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn throughput() {
    let probe = temp_dir("fsync");
    let fsyncs = fsync_rate(&probe);
    println!(
        "fsync probe: {fsyncs:.0} fdatasync/s now (so at most {:.0} writes/s for 64 writers that each wait for one)",
        64.0 * fsyncs
    );
    for cached in [false, true] {
        let engine = if cached { "cached_file" } else { "file" };
        let dir = temp_dir(engine);
        let store = Arc::new(FileStore::open(&dir, cached).await.unwrap());
        let mut keys = Vec::with_capacity(POOL);
        let mut batch = Vec::new();
        for i in 0..POOL {
            let s = store.clone();
            batch.push(tokio::spawn(
                async move { s.create(record(i as u64)).await },
            ));
            if batch.len() == 256 {
                for h in batch.drain(..) {
                    keys.push(h.await.unwrap().unwrap());
                }
            }
        }
        for h in batch.drain(..) {
            keys.push(h.await.unwrap().unwrap());
        }
        let keys = Arc::new(keys);
        println!(
            "\n{engine} ({POOL} stored sessions, {}s per run):",
            RUN.as_secs()
        );
        for tasks in [1, 8, 64] {
            let u = rate(&store, &keys, tasks, Kind::Update).await;
            let c = rate(&store, &keys, tasks, Kind::Create).await;
            println!(
                "  {tasks:>2} concurrent writers: {u:>8.0} updates/s  {c:>8.0} creates/s (acknowledged, durable)"
            );
        }
        for tasks in [1, 64] {
            let r = rate(&store, &keys, tasks, Kind::Load).await;
            println!("  {tasks:>2} concurrent readers: {r:>8.0} loads/s");
        }
        store.flush().await.unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
    println!(
        "\nfsync probe at the end: {:.0} fdatasync/s",
        fsync_rate(&probe)
    );
    let _ = std::fs::remove_dir_all(probe);
}

/// The child of `startup`: stores `n` sessions, says so, keeps writing
/// until it is killed.
async fn startup_child(dir: &Path, n: usize) {
    let store = Arc::new(FileStore::open(dir, false).await.unwrap());
    let start = Instant::now();
    let tasks = 1024;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut last = None;
            for i in (t..n).step_by(tasks) {
                last = Some(store.create(record(i as u64)).await.unwrap());
            }
            last
        }));
    }
    let mut keys = Vec::new();
    for h in handles {
        keys.extend(h.await.unwrap());
    }
    eprintln!(
        "child: stored {n} sessions in {:.1}s ({:.0} creates/s)",
        start.elapsed().as_secs_f64(),
        n as f64 / start.elapsed().as_secs_f64()
    );
    println!("ready {}", keys[0].as_str());
    // Keep 64 writers busy until the kill, which lands in the middle of
    // commits and checkpoints. Writer t alone updates keys t, t+64, ...,
    // with a rising `n`, and reports each acknowledged update.
    let keys = Arc::new(keys);
    for t in 0..64 {
        let (store, keys) = (store.clone(), keys.clone());
        tokio::spawn(async move {
            for n in 1u64.. {
                let k = keys[(t + 64 * n as usize) % keys.len()];
                store.apply(&k, &update(n), ctx()).await.unwrap();
                println!("ack {} {n}", k.as_str());
            }
        });
    }
    std::future::pending::<()>().await;
}

async fn startup(n: usize) {
    let dir = temp_dir("startup");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["startup-child", dir.to_str().unwrap(), &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let key = SessionKey::parse(line.trim().strip_prefix("ready ").expect("ready line")).unwrap();
    // The last acknowledged `n` of every updated session.
    let acked = std::thread::spawn(move || {
        let mut last = std::collections::HashMap::new();
        let mut total = 0u64;
        for line in std::io::BufRead::lines(out) {
            let Ok(line) = line else { break };
            let mut w = line.split_whitespace().skip(1);
            if let (Some(k), Some(n)) = (w.next(), w.next()) {
                let n: u64 = n.parse().unwrap();
                let e = last.entry(k.to_string()).or_insert(0);
                *e = n.max(*e);
                total += 1;
            }
        }
        (last, total)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (acked, updates) = acked.join().unwrap();
    let size = std::fs::metadata(dir.join("sessions.redb")).unwrap().len();
    let log = std::fs::metadata(dir.join("sessions.wal")).unwrap().len();
    println!(
        "killed the writer (SIGKILL) with {n} sessions stored; database {:.0} MiB, log {:.1} MiB to replay",
        size as f64 / (1 << 20) as f64,
        log as f64 / (1 << 20) as f64
    );
    for cached in [false, true] {
        let start = Instant::now();
        let store = FileStore::open(&dir, cached).await.unwrap();
        let opened = start.elapsed();
        assert!(store.load(&key, now_ms()).await.unwrap().is_some());
        let first = start.elapsed();
        println!(
            "{}: open after the crash {:.0} ms, first load done at {:.0} ms",
            if cached { "cached_file" } else { "file" },
            opened.as_secs_f64() * 1000.0,
            first.as_secs_f64() * 1000.0
        );
        if !cached {
            // Every acknowledged update is there (a later one that was in
            // flight may be too).
            for (k, n) in &acked {
                let r = store
                    .load(&SessionKey::parse(k).unwrap(), now_ms())
                    .await
                    .unwrap()
                    .unwrap();
                let data: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
                let got = data["n"].as_u64().unwrap();
                assert!(got >= *n, "acknowledged n={n} lost: found {got}");
            }
            println!(
                "{updates} updates were acknowledged after the load; the last acknowledged state of each of the {} sessions they touched is there",
                acked.len()
            );
        }
        store.flush().await.unwrap();
        drop(store);
    }
    let db = redb::Database::open(dir.join("sessions.redb")).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let t = txn
        .open_table(redb::TableDefinition::<&[u8; 32], &[u8]>::new("sessions"))
        .unwrap();
    let len = redb::ReadableTableMetadata::len(&t).unwrap();
    println!("sessions in the file after restart: {len}");
    assert!(len as usize >= n);
    drop(t);
    drop(txn);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        None => rt.block_on(throughput()),
        Some("startup") => {
            // Shows redb's and the log replay's timings.
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let n = args.get(1).map_or(1_000_000, |s| s.parse().unwrap());
            rt.block_on(startup(n))
        }
        Some("startup-child") => {
            let n = args[2].parse().unwrap();
            rt.block_on(startup_child(Path::new(&args[1]), n))
        }
        Some(other) => panic!("unknown mode {other:?} (none, startup N)"),
    }
}
