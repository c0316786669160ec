//! The cost of the index of a user's sessions (`[session] user_key`,
//! SPEC 9, issue 18) on the engines inside the process (a plain `main`, no
//! harness):
//!
//!   cargo bench --bench user_sessions             # everything
//!   cargo bench --bench user_sessions -- revoke   # one part: revoke | write | django
//!
//! - revoke: the time to revoke the 10,000 sessions of one user
//!   (`revoke_user`) among 100,000 other users' sessions (memory) or 10,000
//!   (file, cached_file); goal under a second. Three rounds each, fresh
//!   stores.
//! - write: the write path's throughput with `user_key` unset (A) and set
//!   (B), interleaved A B A B in one process so that the machine's load
//!   moves both alike; goal B >= 0.9 A. Two write shapes: an update of a
//!   logged-in session that leaves the user alone (the common write), and a
//!   login (a new session naming its user). memory: one task, back to back;
//!   file: 64 tasks, each awaiting its durable acknowledgement.
//! - django: `db` on SQLite with 10,000 rows written behind sessiongate's
//!   back (as Django's logins write them: 1,000 of one user, 9,000
//!   anonymous): the first listing, which decodes and indexes them all,
//!   the second (nothing to decode), and the revocation after.
//! - `logins N set|unset`: N logins on memory, nothing else, for
//!   `valgrind --tool=callgrind` (instruction counts do not move with the
//!   machine's load): the difference between `set` and `unset` over N is
//!   the index's cost per login.
//!
//! Memory per session with the index: `examples/mem_per_session.rs
//! --user-key _auth_user_id`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use sessiongate::session::{Patch, Policy, Record, SessionKey};
use sessiongate::store::{AnyStore, FileStore, MemoryStore, Store, WriteCtx};

const POLICY: Policy = Policy {
    cookie_age_secs: 14 * 86400,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};
const UID: &str = "_auth_user_id";

fn now_ms() -> i64 {
    sessiongate::session::Clock::default().now_ms()
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

fn patch(v: serde_json::Value) -> Patch {
    Patch {
        update: v.as_object().unwrap().clone(),
        has_update: true,
        ..Patch::default()
    }
}

/// A logged-in session of `user` (the ~100-byte payload of mem_per_session).
fn login(user: u64) -> Record {
    let now = now_ms();
    let mut r = Record::new_at(now);
    r.apply_patch(
        &patch(json!({
            UID: format!("{user:07}"),
            "username": format!("user{user:07}"),
            "cart": ["tea", "milk"],
            "lang": "en",
            "visits": 3
        })),
        now,
        &POLICY,
    );
    r
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "sessiongate-bench-users-{tag}-{}-{}",
            std::process::id(),
            SessionKey::generate().as_str()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    Memory,
    File,
    CachedFile,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::File => "file",
            Engine::CachedFile => "cached_file",
        }
    }

    async fn open(self, indexed: bool) -> (Arc<AnyStore>, Option<TempDir>) {
        let user_key = indexed.then(|| UID.to_string());
        match self {
            Engine::Memory => (
                Arc::new(AnyStore::Memory(MemoryStore::new().with_user_key(user_key))),
                None,
            ),
            Engine::File | Engine::CachedFile => {
                let dir = TempDir::new(self.name());
                let s = FileStore::open_with_user_key(&dir.0, self == Engine::CachedFile, user_key)
                    .await
                    .unwrap();
                (Arc::new(AnyStore::File(s)), Some(dir))
            }
        }
    }
}

/// Creates `records` with `tasks` concurrent writers; their keys.
async fn fill(store: &Arc<AnyStore>, records: Vec<Record>, tasks: usize) -> Vec<SessionKey> {
    let chunk = records.len().div_ceil(tasks.max(1)).max(1);
    let mut handles = Vec::new();
    let mut records = records;
    while !records.is_empty() {
        let part: Vec<Record> = records.drain(..chunk.min(records.len())).collect();
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            let mut keys = Vec::with_capacity(part.len());
            for r in part {
                keys.push(s.create(r).await.unwrap());
            }
            keys
        }));
    }
    let mut keys = Vec::new();
    for h in handles {
        keys.extend(h.await.unwrap());
    }
    keys
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

async fn revoke(engine: Engine) {
    const USER: usize = 10_000;
    let others = if engine == Engine::Memory {
        100_000
    } else {
        10_000
    };
    let mut times = Vec::new();
    for round in 0..3 {
        let (store, _dir) = engine.open(true).await;
        let mut records: Vec<Record> = (0..others as u64).map(|i| login(i + 1)).collect();
        records.extend((0..USER).map(|_| login(0)));
        let tasks = if engine == Engine::Memory { 1 } else { 64 };
        fill(&store, records, tasks).await;
        let user = format!("{:07}", 0);
        assert_eq!(
            store.user_sessions(&user, now_ms()).await.unwrap().len(),
            USER
        );
        let started = Instant::now();
        let n = store.revoke_user(&user, None, now_ms()).await.unwrap();
        let took = started.elapsed();
        assert_eq!(n, USER as u64);
        assert!(store
            .user_sessions(&user, now_ms())
            .await
            .unwrap()
            .is_empty());
        println!(
            "revoke  {:<12} round {round}: {USER} sessions of one user among {others} others: {:.1} ms",
            engine.name(),
            took.as_secs_f64() * 1e3
        );
        times.push(took.as_secs_f64() * 1e3);
    }
    let m = median(times);
    println!(
        "revoke  {:<12} median {m:.1} ms (goal < 1000 ms: {})",
        engine.name(),
        if m < 1000.0 { "met" } else { "NOT met" }
    );
}

/// One round of the write path: ops per second.
async fn write_round(engine: Engine, indexed: bool, shape: &str) -> f64 {
    let (store, _dir) = engine.open(indexed).await;
    let (tasks, per_task) = match engine {
        Engine::Memory => (1usize, 200_000usize),
        _ => (64, 300),
    };
    let pool = 10_000.min(tasks * per_task);
    let keys = Arc::new(fill(&store, (0..pool as u64).map(login).collect(), tasks).await);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (s, keys) = (store.clone(), keys.clone());
        let shape = shape.to_string();
        handles.push(tokio::spawn(async move {
            let mut x = t as u64 * 7919 + 1;
            for i in 0..per_task {
                // xorshift: a different session each time.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if shape == "update" {
                    let k = &keys[(x % keys.len() as u64) as usize];
                    let p = patch(json!({"visits": i}));
                    s.apply(k, &p, ctx()).await.unwrap();
                } else {
                    s.create(login(x % 1_000_000)).await.unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    (tasks * per_task) as f64 / started.elapsed().as_secs_f64()
}

async fn write(engine: Engine) {
    let rounds = if engine == Engine::Memory { 6 } else { 4 };
    for shape in ["update", "login"] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let ra = write_round(engine, false, shape).await;
            let rb = write_round(engine, true, shape).await;
            println!(
                "write   {:<12} {shape:<6} round {round}: unset {ra:>10.0}/s   set {rb:>10.0}/s   {:.3}x",
                engine.name(),
                rb / ra
            );
            a.push(ra);
            b.push(rb);
        }
        let ratios: Vec<f64> = a.iter().zip(&b).map(|(x, y)| y / x).collect();
        let r = median(ratios);
        println!(
            "write   {:<12} {shape:<6} median: unset {:.0}/s, set {:.0}/s, ratio of pairs {r:.3}x (goal >= 0.9x: {})",
            engine.name(),
            median(a),
            median(b),
            if r >= 0.9 { "met" } else { "NOT met" }
        );
    }
}

/// Rows Django wrote (not through sessiongate, so not in its index).
async fn django() {
    use sessiongate::store::db::{django::SESSION_SALT, naive_utc_text, Signer};
    use sessiongate::store::DbStore;
    const SECRET: &[u8] = b"bench-secret-0123456789abcdef0123456789";
    let dir = TempDir::new("django");
    let file = dir.0.join("sessions.sqlite3");
    let url = sessiongate::config::DbUrl::Sqlite(file.clone());
    let t = std::time::Duration::from_secs(60);
    DbStore::migrate(&url, "django_session", t).await.unwrap();
    let signer = Signer::new(SESSION_SALT, SECRET, &[]);
    let now = now_ms();
    {
        let mut c = rusqlite::Connection::open(&file).unwrap();
        let tx = c.transaction().unwrap();
        for i in 0..10_000u64 {
            let data = if i % 10 == 0 {
                json!({UID: "42", "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                       "_auth_user_hash": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"})
            } else {
                json!({"cart": ["tea", "milk"], "lang": "en", "visits": i})
            };
            let text = serde_json::to_vec(&data).unwrap();
            tx.execute(
                "INSERT INTO django_session VALUES (?1, ?2, ?3)",
                rusqlite::params![
                    SessionKey::generate().as_str(),
                    signer.dumps(&text, now / 1000),
                    naive_utc_text(now + 86_400_000)
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let store = DbStore::open(&url, "django_session", t, SECRET, &[])
        .await
        .unwrap()
        .with_user_key(Some(UID.into()))
        .await
        .unwrap();
    let at = Instant::now();
    let first = store.user_sessions("42", now).await.unwrap().len();
    let first_ms = at.elapsed().as_secs_f64() * 1000.0;
    let at = Instant::now();
    let second = store.user_sessions("42", now).await.unwrap().len();
    let second_ms = at.elapsed().as_secs_f64() * 1000.0;
    let at = Instant::now();
    let revoked = store.revoke_user("42", None, now).await.unwrap();
    let revoke_ms = at.elapsed().as_secs_f64() * 1000.0;
    assert_eq!((first, second, revoked), (1000, 1000, 1000));
    println!(
        "django  db (SQLite)   10,000 rows Django wrote, 1,000 of one user: first listing {first_ms:.1} ms, second {second_ms:.1} ms, revoking them {revoke_ms:.1} ms"
    );
}

/// `logins N set|unset`: N store-level logins on memory.
async fn logins(n: u64, indexed: bool) {
    let (store, _dir) = Engine::Memory.open(indexed).await;
    for i in 0..n {
        store.create(login(i % 1_000_000)).await.unwrap();
    }
    println!(
        "{n} logins, user_key {}",
        if indexed { "set" } else { "unset" }
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "logins") {
        let n = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000);
        let indexed = args.get(i + 2).map(String::as_str) == Some("set");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        return rt.block_on(logins(n, indexed));
    }
    let part = std::env::args()
        .skip(1)
        .find(|a| a == "revoke" || a == "write" || a == "django");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engines = [Engine::Memory, Engine::File, Engine::CachedFile];
        if part.as_deref() == Some("django") {
            return django().await;
        }
        if part.as_deref() != Some("write") {
            for e in engines {
                revoke(e).await;
            }
        }
        if part.as_deref() != Some("revoke") {
            for e in engines {
                write(e).await;
            }
        }
        if part.is_none() {
            django().await;
        }
    });
}
