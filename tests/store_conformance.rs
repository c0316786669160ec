//! One conformance suite for every engine with a server side: the same
//! tests, instantiated per engine by `conformance!`. Each engine provides an
//! async constructor returning the store and a guard that keeps its
//! resources (directory, server process) alive for the test.

use std::any::Any;
use std::sync::Arc;

use serde_json::{json, Value};

use sessiongate::session::{Expiry, Patch, Policy, Record, SessionKey};
use sessiongate::store::{AnyStore, Applied, MemoryStore, Store, WriteCtx};

pub type Guard = Box<dyn Any + Send>;

const POLICY: Policy = Policy {
    cookie_age_secs: 3600,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};
/// A fixed "now" far from 0 (Unix ms).
const T0: i64 = 1_800_000_000_000;

fn ctx(now: i64) -> WriteCtx {
    WriteCtx {
        now,
        policy: POLICY,
        touch: false,
        refresh_ms: 0,
        max_size: 0,
    }
}

fn update(v: Value) -> Patch {
    Patch {
        update: v.as_object().unwrap().clone(),
        has_update: true,
        ..Patch::default()
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

pub async fn memory() -> (AnyStore, Guard) {
    (AnyStore::Memory(MemoryStore::new()), Box::new(()))
}

#[path = "common/redis_server.rs"]
mod redis_server;

/// A `redis` store on its own `redis-server` (the guard kills it). Without
/// `redis-server` outside CI, says SKIPPED and runs on the memory engine.
pub async fn redis() -> (AnyStore, Guard) {
    open_redis(false).await
}

pub async fn cached_redis() -> (AnyStore, Guard) {
    open_redis(true).await
}

async fn open_redis(cached: bool) -> (AnyStore, Guard) {
    let Some(server) = redis_server::RedisServer::start().await else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED: this redis conformance test ran on the memory engine\n",
        );
        return memory().await;
    };
    let store = sessiongate::store::RedisStore::open(
        &server.url(),
        std::time::Duration::from_secs(5),
        cached,
    )
    .await
    .expect("open the redis store");
    (AnyStore::Redis(store), Box::new(server))
}

/// A `file` store in a fresh temporary directory (the guard removes it).
pub async fn file() -> (AnyStore, Guard) {
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "sessiongate-conformance-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    let store = sessiongate::store::FileStore::open(&dir, false)
        .await
        .expect("open the file store");
    (AnyStore::File(store), Box::new(RemoveDir(dir)))
}

/// A `cached_file` store in a fresh temporary directory (the guard removes it).
pub async fn cached_file() -> (AnyStore, Guard) {
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "sessiongate-conformance-cached-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    let store = sessiongate::store::FileStore::open(&dir, true)
        .await
        .expect("open the cached_file store");
    (AnyStore::File(store), Box::new(RemoveDir(dir)))
}

/// A `db` store on SQLite in a fresh temporary directory, its table made
/// by `migrate` (the guard removes the directory).
pub async fn db_sqlite() -> (AnyStore, Guard) {
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "sessiongate-conformance-db-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = sessiongate::config::DbUrl::Sqlite(dir.join("sessions.sqlite3"));
    let timeout = std::time::Duration::from_secs(10);
    sessiongate::store::DbStore::migrate(&url, "django_session", timeout)
        .await
        .expect("migrate");
    let store = sessiongate::store::DbStore::open(
        &url,
        "django_session",
        timeout,
        b"conformance-secret-0123456789abcdef",
        &[],
    )
    .await
    .expect("open the db store");
    (AnyStore::Db(Box::new(store)), Box::new(RemoveDir(dir)))
}

/// `cached_db`: the `db` store on SQLite with its own `redis-server` in
/// front. Without `redis-server` outside CI, says SKIPPED and runs on the
/// memory engine.
pub async fn cached_db_sqlite() -> (AnyStore, Guard) {
    let Some(server) = redis_server::RedisServer::start().await else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED: this cached_db conformance test ran on the memory engine\n",
        );
        return memory().await;
    };
    let dir = std::env::temp_dir().join(format!(
        "sessiongate-conformance-cdb-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = sessiongate::config::DbUrl::Sqlite(dir.join("sessions.sqlite3"));
    let timeout = std::time::Duration::from_secs(10);
    sessiongate::store::DbStore::migrate(&url, "django_session", timeout)
        .await
        .expect("migrate");
    let store = sessiongate::store::DbStore::open_cached(
        &url,
        "django_session",
        timeout,
        b"conformance-secret-0123456789abcdef",
        &[],
        Some(&server.url()),
    )
    .await
    .expect("open the cached_db store");
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    (
        AnyStore::Db(Box::new(store)),
        Box::new((server, RemoveDir(dir))),
    )
}

#[path = "common/postgres_server.rs"]
mod postgres_server;

/// A `db` store on its own PostgreSQL server (the guard stops it). Without
/// PostgreSQL outside CI, says SKIPPED and runs on the memory engine.
pub async fn db_postgres() -> (AnyStore, Guard) {
    let Some(server) = postgres_server::PgServer::start() else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED: this postgres conformance test ran on the memory engine\n",
        );
        return memory().await;
    };
    server.create_db("sessions").await;
    let url = sessiongate::config::DbUrl::Postgres(server.url("sessions"));
    let timeout = std::time::Duration::from_secs(10);
    sessiongate::store::DbStore::migrate(&url, "django_session", timeout)
        .await
        .expect("migrate");
    let store = sessiongate::store::DbStore::open(
        &url,
        "django_session",
        timeout,
        b"conformance-secret-0123456789abcdef",
        &[],
    )
    .await
    .expect("open the db store");
    (AnyStore::Db(Box::new(store)), Box::new(server))
}

pub async fn load_never_creates<S: Store>(s: &S) {
    let k = SessionKey::generate();
    assert!(s.load(&k, T0).await.unwrap().is_none());
    assert!(s.load(&k, T0).await.unwrap().is_none());
}

pub async fn create_then_load<S: Store>(s: &S) {
    let r = record(json!({"a": 1, "s": "é"}), T0);
    let k = s.create(r.clone()).await.unwrap();
    let got = s.load(&k, T0 + 1).await.unwrap().expect("stored");
    assert_eq!(data(&got), json!({"a": 1, "s": "é"}));
    assert_eq!(got.expires_at, T0 + 3_600_000);
    assert_eq!(got.created, T0);
    let k2 = s.create(r).await.unwrap();
    assert_ne!(k, k2, "fresh keys");
}

pub async fn apply_merges_into_newest_state<S: Store>(s: &S) {
    let k = s.create(record(json!({"a": 1}), T0)).await.unwrap();
    let r = s
        .apply(&k, &update(json!({"b": 2})), ctx(T0 + 1000))
        .await
        .unwrap();
    match r {
        Applied::Saved { key, record } => {
            assert_eq!(key, k);
            assert_eq!(data(&record), json!({"a": 1, "b": 2}));
            assert_eq!(
                record.expires_at,
                T0 + 1000 + 3_600_000,
                "expiry refreshed by a write"
            );
        }
        other => panic!("{other:?}"),
    }
    let del = Patch {
        delete: vec!["a".into()],
        ..Patch::default()
    };
    s.apply(&k, &del, ctx(T0 + 2000)).await.unwrap();
    let got = s.load(&k, T0 + 2000).await.unwrap().unwrap();
    assert_eq!(data(&got), json!({"b": 2}));
}

pub async fn unchanged_patch_writes_nothing_unless_touch<S: Store>(s: &S) {
    let k = s.create(record(json!({"a": 1}), T0)).await.unwrap();
    let noop = Patch {
        delete: vec!["absent".into()],
        ..Patch::default()
    };
    assert_eq!(
        s.apply(&k, &noop, ctx(T0 + 5000)).await.unwrap(),
        Applied::Unchanged
    );
    assert_eq!(
        s.load(&k, T0).await.unwrap().unwrap().expires_at,
        T0 + 3_600_000
    );
    let touch = WriteCtx {
        touch: true,
        refresh_ms: 0,
        ..ctx(T0 + 5000)
    };
    assert!(matches!(
        s.apply(&k, &Patch::default(), touch).await.unwrap(),
        Applied::Saved { .. }
    ));
    assert_eq!(
        s.load(&k, T0).await.unwrap().unwrap().expires_at,
        T0 + 5000 + 3_600_000
    );
}

/// SPEC 10: requests that each found the session due for a refresh (they
/// loaded it before any of them wrote) make one write: the others find the
/// newest state just written, and write nothing. After another interval, a
/// refresh writes again.
pub async fn a_burst_of_refreshes_writes_once<S: Store>(s: &S) {
    let k = s.create(record(json!({"a": 1}), T0)).await.unwrap();
    let seen = s.load(&k, T0 + 5000).await.unwrap().unwrap();
    let refresh = |now: i64| WriteCtx {
        refresh_ms: 2000,
        ..ctx(now)
    };
    let first = s
        .apply_seen(&k, &seen, &Patch::default(), refresh(T0 + 5000))
        .await
        .unwrap();
    assert!(matches!(first, Applied::Saved { .. }), "{first:?}");
    for now in [T0 + 5001, T0 + 6999] {
        assert_eq!(
            s.apply_seen(&k, &seen, &Patch::default(), refresh(now))
                .await
                .unwrap(),
            Applied::Unchanged,
            "a second refresh from the same load, at {now}"
        );
        assert_eq!(
            s.apply(&k, &Patch::default(), refresh(now)).await.unwrap(),
            Applied::Unchanged
        );
    }
    assert_eq!(
        s.load(&k, T0 + 6000).await.unwrap().unwrap().expires_at,
        T0 + 5000 + 3_600_000
    );
    // Past the interval (the db engines read a write as made at the end of
    // its signing second: 999 ms more).
    let later = s
        .apply(&k, &Patch::default(), refresh(T0 + 8000))
        .await
        .unwrap();
    assert!(matches!(later, Applied::Saved { .. }), "{later:?}");
    assert_eq!(
        s.load(&k, T0 + 8000).await.unwrap().unwrap().expires_at,
        T0 + 8000 + 3_600_000
    );
}

pub async fn deleted_session_is_missing_and_never_resurrected<S: Store>(s: &S) {
    let k = s.create(record(json!({"a": 1}), T0)).await.unwrap();
    s.delete(&k).await.unwrap();
    s.delete(&k).await.unwrap(); // idempotent
    assert_eq!(
        s.apply(&k, &update(json!({"late": 1})), ctx(T0))
            .await
            .unwrap(),
        Applied::Missing
    );
    assert!(s.load(&k, T0).await.unwrap().is_none(), "no resurrection");
    assert_eq!(
        s.apply(&SessionKey::generate(), &update(json!({"x": 1})), ctx(T0))
            .await
            .unwrap(),
        Applied::Missing
    );
}

/// `max_size`: a patch whose result is over the limit and larger than the
/// stored state is `TooLarge` and writes nothing, in place or with a
/// Cycle-Key (the old key keeps its data); shrinking an oversized session
/// is allowed.
pub async fn over_max_size_is_refused_and_writes_nothing<S: Store>(s: &S) {
    let k = s.create(record(json!({"a": "x"}), T0)).await.unwrap();
    let limited = WriteCtx {
        max_size: 100,
        ..ctx(T0 + 10)
    };
    let big = update(json!({"b": "y".repeat(200)}));
    let got = s.apply(&k, &big, limited).await.unwrap();
    assert!(
        matches!(got, Applied::TooLarge { size } if size > 200),
        "{got:?}"
    );
    let cycled = Patch {
        cycle: true,
        ..big.clone()
    };
    let got = s.apply(&k, &cycled, limited).await.unwrap();
    assert!(matches!(got, Applied::TooLarge { .. }), "{got:?}");
    let r = s
        .load(&k, T0 + 10)
        .await
        .unwrap()
        .expect("the old key still holds");
    assert_eq!(data(&r), json!({"a": "x"}));
    // Written without a limit, then shrunk under one: allowed.
    let Applied::Saved { .. } = s.apply(&k, &big, ctx(T0 + 20)).await.unwrap() else {
        panic!("no limit")
    };
    let shrink = update(json!({"b": "z".repeat(150)}));
    let got = s
        .apply(
            &k,
            &shrink,
            WriteCtx {
                max_size: 100,
                ..ctx(T0 + 30)
            },
        )
        .await
        .unwrap();
    assert!(matches!(got, Applied::Saved { .. }), "{got:?}");
}

pub async fn cycle_moves_data_to_a_new_key<S: Store>(s: &S) {
    let k = s.create(record(json!({"cart": [1]}), T0)).await.unwrap();
    let p = Patch {
        cycle: true,
        ..update(json!({"user": "ann"}))
    };
    let Applied::Saved { key, record } = s.apply(&k, &p, ctx(T0 + 10)).await.unwrap() else {
        panic!("cycle saves")
    };
    assert_ne!(key, k);
    assert_eq!(data(&record), json!({"cart": [1], "user": "ann"}));
    assert!(
        s.load(&k, T0 + 10).await.unwrap().is_none(),
        "old key deleted"
    );
    assert_eq!(
        data(&s.load(&key, T0 + 10).await.unwrap().unwrap()),
        json!({"cart": [1], "user": "ann"})
    );
    assert_eq!(
        s.apply(&k, &update(json!({"x": 1})), ctx(T0 + 20))
            .await
            .unwrap(),
        Applied::Missing
    );
}

pub async fn expiry_is_enforced_and_swept<S: Store>(s: &S) {
    let short = {
        let mut r = record(json!({"a": 1}), T0);
        r.expiry = Expiry::Seconds(10);
        r.touch(T0, &POLICY);
        r
    };
    let k_short = s.create(short).await.unwrap();
    let k_long = s.create(record(json!({"b": 1}), T0)).await.unwrap();
    assert!(s.load(&k_short, T0 + 9_000).await.unwrap().is_some());
    assert!(
        s.load(&k_short, T0 + 10_000).await.unwrap().is_none(),
        "expired at its end"
    );
    assert_eq!(
        s.apply(&k_short, &update(json!({"x": 1})), ctx(T0 + 11_000))
            .await
            .unwrap(),
        Applied::Missing,
        "an expired session is not written"
    );
    let swept = s.clear_expired(T0 + 20_000).await.unwrap();
    assert!(swept <= 1, "only the expired one: {swept}");
    assert!(
        s.load(&k_long, T0 + 20_000).await.unwrap().is_some(),
        "live one kept"
    );
    // Everything is gone once the long one expires too.
    let later = T0 + 3_600_000 + 1;
    s.clear_expired(later).await.unwrap();
    assert!(s.load(&k_long, later).await.unwrap().is_none());
}

pub async fn forty_concurrent_disjoint_patches<S: Store>(s: Arc<S>) {
    let k = s.create(record(json!({"start": 0}), T0)).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..40 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let p = update(json!({ format!("k{n}"): n }));
            assert!(matches!(
                s.apply(&k, &p, ctx(T0 + n)).await.unwrap(),
                Applied::Saved { .. }
            ));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = data(&s.load(&k, T0 + 100).await.unwrap().unwrap());
    assert_eq!(got.as_object().unwrap().len(), 41, "{got}");
}

/// `apply_seen` with the record a request loaded: applied to the newest
/// state whatever happened since the load, as `apply` is.
pub async fn a_write_from_a_stale_load_keeps_every_change<S: Store>(s: &S) {
    // Fresh: the write lands on what was loaded.
    let k = s.create(record(json!({"a": 1}), T0)).await.unwrap();
    let seen = s.load(&k, T0 + 1).await.unwrap().unwrap();
    let got = s
        .apply_seen(&k, &seen, &update(json!({"b": 2})), ctx(T0 + 2))
        .await
        .unwrap();
    assert!(
        matches!(&got, Applied::Saved { key, record } if *key == k && data(record) == json!({"a": 1, "b": 2})),
        "{got:?}"
    );
    // Stale: another write landed between the load and this one.
    let seen = s.load(&k, T0 + 3).await.unwrap().unwrap();
    s.apply(&k, &update(json!({"c": 3})), ctx(T0 + 4))
        .await
        .unwrap();
    s.apply_seen(&k, &seen, &update(json!({"d": 4})), ctx(T0 + 5))
        .await
        .unwrap();
    assert_eq!(
        data(&s.load(&k, T0 + 6).await.unwrap().unwrap()),
        json!({"a": 1, "b": 2, "c": 3, "d": 4}),
        "neither change lost"
    );
    // Stale, and the patch looks like no change against what was loaded
    // but is one against the newest state.
    let seen = s.load(&k, T0 + 7).await.unwrap().unwrap();
    s.apply(&k, &update(json!({"a": 9})), ctx(T0 + 8))
        .await
        .unwrap();
    let got = s
        .apply_seen(&k, &seen, &update(json!({"a": 1})), ctx(T0 + 9))
        .await
        .unwrap();
    assert!(matches!(got, Applied::Saved { .. }), "{got:?}");
    assert_eq!(
        data(&s.load(&k, T0 + 10).await.unwrap().unwrap())["a"],
        json!(1)
    );
    // Cycled away, then deleted, since the load: never written back.
    let seen = s.load(&k, T0 + 11).await.unwrap().unwrap();
    let cycle = Patch {
        cycle: true,
        ..Patch::default()
    };
    let Applied::Saved { key: moved, .. } = s.apply(&k, &cycle, ctx(T0 + 12)).await.unwrap() else {
        panic!("cycle saves")
    };
    assert_eq!(
        s.apply_seen(&k, &seen, &update(json!({"late": 1})), ctx(T0 + 13))
            .await
            .unwrap(),
        Applied::Missing
    );
    assert!(
        s.load(&k, T0 + 13).await.unwrap().is_none(),
        "no resurrection"
    );
    let seen = s.load(&moved, T0 + 14).await.unwrap().unwrap();
    s.delete(&moved).await.unwrap();
    assert_eq!(
        s.apply_seen(&moved, &seen, &update(json!({"late": 1})), ctx(T0 + 15))
            .await
            .unwrap(),
        Applied::Missing
    );
    assert!(s.load(&moved, T0 + 15).await.unwrap().is_none());
}

pub async fn replace_and_clear<S: Store>(s: &S) {
    let k = s.create(record(json!({"a": 1}), T0)).await.unwrap();
    let p = Patch {
        replace: Some(json!({"r": 1}).as_object().unwrap().clone()),
        ..Patch::default()
    };
    s.apply(&k, &p, ctx(T0)).await.unwrap();
    assert_eq!(
        data(&s.load(&k, T0).await.unwrap().unwrap()),
        json!({"r": 1})
    );
    let p = Patch {
        clear: true,
        ..Patch::default()
    };
    s.apply(&k, &p, ctx(T0)).await.unwrap();
    let got = s
        .load(&k, T0)
        .await
        .unwrap()
        .expect("an emptied session is kept");
    assert_eq!(data(&got), json!({}));
}

/// Instantiates the whole suite for one engine constructor.
macro_rules! conformance {
    ($engine:ident, $ctor:path) => {
        mod $engine {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn load_never_creates() {
                let (s, _g) = $ctor().await;
                super::load_never_creates(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn create_then_load() {
                let (s, _g) = $ctor().await;
                super::create_then_load(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn apply_merges_into_newest_state() {
                let (s, _g) = $ctor().await;
                super::apply_merges_into_newest_state(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unchanged_patch_writes_nothing_unless_touch() {
                let (s, _g) = $ctor().await;
                super::unchanged_patch_writes_nothing_unless_touch(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_burst_of_refreshes_writes_once() {
                let (s, _g) = $ctor().await;
                super::a_burst_of_refreshes_writes_once(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deleted_session_is_missing_and_never_resurrected() {
                let (s, _g) = $ctor().await;
                super::deleted_session_is_missing_and_never_resurrected(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cycle_moves_data_to_a_new_key() {
                let (s, _g) = $ctor().await;
                super::cycle_moves_data_to_a_new_key(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn over_max_size_is_refused_and_writes_nothing() {
                let (s, _g) = $ctor().await;
                super::over_max_size_is_refused_and_writes_nothing(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expiry_is_enforced_and_swept() {
                let (s, _g) = $ctor().await;
                super::expiry_is_enforced_and_swept(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn forty_concurrent_disjoint_patches() {
                let (s, _g) = $ctor().await;
                super::forty_concurrent_disjoint_patches(Arc::new(s)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_write_from_a_stale_load_keeps_every_change() {
                let (s, _g) = $ctor().await;
                super::a_write_from_a_stale_load_keeps_every_change(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replace_and_clear() {
                let (s, _g) = $ctor().await;
                super::replace_and_clear(&s).await;
            }
        }
    };
}

conformance!(memory_engine, memory);
conformance!(redis_engine, redis);
conformance!(cached_redis_engine, cached_redis);
// Further engines: one line each, e.g. `conformance!(file_engine, file);`
// with `pub async fn file() -> (AnyStore, Guard)` above.
conformance!(file_engine, file);
conformance!(cached_file_engine, cached_file);
conformance!(db_sqlite_engine, db_sqlite);
conformance!(db_postgres_engine, db_postgres);
conformance!(cached_db_sqlite_engine, cached_db_sqlite);

// ---------------------------------------------------------------------------
// The user index (SPEC 9): the engines that keep one, with `user_key = "uid"`.
// Redis and db join with one line each once they keep it.
// ---------------------------------------------------------------------------

const UID: &str = "uid";

pub async fn memory_users() -> (AnyStore, Guard) {
    (
        AnyStore::Memory(MemoryStore::new().with_user_key(Some(UID.into()))),
        Box::new(()),
    )
}

async fn file_users_at(cached: bool) -> (AnyStore, Guard) {
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "sessiongate-conformance-users-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    let store = sessiongate::store::FileStore::open_with_user_key(&dir, cached, Some(UID.into()))
        .await
        .expect("open the file store");
    (AnyStore::File(store), Box::new(RemoveDir(dir)))
}

pub async fn file_users() -> (AnyStore, Guard) {
    file_users_at(false).await
}

pub async fn cached_file_users() -> (AnyStore, Guard) {
    file_users_at(true).await
}

async fn keys_of<S: Store>(s: &S, user: &str, now: i64) -> Vec<SessionKey> {
    let mut k: Vec<_> = s
        .user_sessions(user, now)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.key)
        .collect();
    k.sort();
    k
}

fn sorted(mut k: Vec<SessionKey>) -> Vec<SessionKey> {
    k.sort();
    k
}

/// The index follows creation, a login as another user, Cycle-Key, the
/// user key's deletion, delete and the sweep; 42 and "42" are one user;
/// listings carry the record's times, oldest first.
pub async fn user_index_follows_every_change<S: Store>(s: &S) {
    let a = s.create(record(json!({UID: 42}), T0)).await.unwrap();
    let b = s.create(record(json!({UID: "42"}), T0 + 1)).await.unwrap();
    let c = s.create(record(json!({"cart": 1}), T0)).await.unwrap();
    let listed = s.user_sessions("42", T0 + 1).await.unwrap();
    assert_eq!(listed.iter().map(|u| u.key).collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(listed[0].created, T0);
    assert_eq!(listed[0].last_write, T0);
    assert_eq!(listed[0].expires_at, T0 + 3_600_000);
    s.apply(&c, &update(json!({UID: "bob"})), ctx(T0 + 2))
        .await
        .unwrap();
    s.apply(&a, &update(json!({UID: "bob"})), ctx(T0 + 2))
        .await
        .unwrap();
    assert_eq!(keys_of(s, "42", T0 + 2).await, vec![b]);
    assert_eq!(keys_of(s, "bob", T0 + 2).await, sorted(vec![a, c]));
    let mut cycle = update(json!({"n": 1}));
    cycle.cycle = true;
    let Applied::Saved { key: a2, .. } = s.apply(&a, &cycle, ctx(T0 + 3)).await.unwrap() else {
        panic!("cycled")
    };
    assert_eq!(keys_of(s, "bob", T0 + 3).await, sorted(vec![a2, c]));
    let mut logout = Patch::default();
    logout.delete.push(UID.into());
    s.apply(&a2, &logout, ctx(T0 + 4)).await.unwrap();
    assert_eq!(keys_of(s, "bob", T0 + 4).await, vec![c]);
    s.delete(&c).await.unwrap();
    assert!(keys_of(s, "bob", T0 + 4).await.is_empty());
    // b expires at T0 + 1 + 1h: not listed after, and swept.
    let end = T0 + 1 + 3_600_000;
    assert_eq!(keys_of(s, "42", end - 1).await, vec![b]);
    assert!(keys_of(s, "42", end).await.is_empty());
    assert!(s.clear_expired(end).await.unwrap() >= 1);
    assert_eq!(s.revoke_user("42", None, end).await.unwrap(), 0);
}

/// Revoking a user ends the user's sessions but the kept one, counts the
/// live ones, and leaves other users alone; a write of a revoked session
/// is Missing and does not bring it back.
pub async fn revoke_user_ends_exactly_that_users_sessions<S: Store>(s: &S) {
    let keys: Vec<_> =
        futures_util::future::join_all((0..5).map(|_| s.create(record(json!({UID: "alice"}), T0))))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let bob = s.create(record(json!({UID: "bob"}), T0)).await.unwrap();
    let expired = s
        .create(record(json!({UID: "alice"}), T0 - 3_600_000))
        .await
        .unwrap();
    assert_eq!(s.revoke_user("alice", Some(&keys[0]), T0).await.unwrap(), 4);
    assert_eq!(keys_of(s, "alice", T0).await, vec![keys[0]]);
    assert_eq!(keys_of(s, "bob", T0).await, vec![bob]);
    assert!(
        s.load(&expired, T0 - 1).await.unwrap().is_none(),
        "ended too"
    );
    for k in &keys[1..] {
        assert!(s.load(k, T0).await.unwrap().is_none());
        let got = s
            .apply(k, &update(json!({"late": 1})), ctx(T0))
            .await
            .unwrap();
        assert_eq!(got, Applied::Missing);
        assert!(s.load(k, T0).await.unwrap().is_none(), "not resurrected");
    }
    let first = keys[0];
    let n = s
        .revoke_matching(&move |k: &SessionKey| *k == first, T0)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(keys_of(s, "alice", T0).await.is_empty());
    assert_eq!(keys_of(s, "bob", T0).await, vec![bob]);
}

macro_rules! user_index {
    ($engine:ident, $ctor:path) => {
        mod $engine {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn user_index_follows_every_change() {
                let (s, _g) = $ctor().await;
                super::user_index_follows_every_change(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn revoke_user_ends_exactly_that_users_sessions() {
                let (s, _g) = $ctor().await;
                super::revoke_user_ends_exactly_that_users_sessions(&s).await;
            }
        }
    };
}

user_index!(memory_user_index, memory_users);
user_index!(file_user_index, file_users);
user_index!(cached_file_user_index, cached_file_users);
// The whole contract holds with the index on, too.
conformance!(memory_engine_with_user_key, memory_users);
conformance!(file_engine_with_user_key, file_users);
conformance!(cached_file_engine_with_user_key, cached_file_users);
