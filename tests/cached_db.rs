//! `cached_db` (SPEC 8): Redis in front of the `db` table. Two instances
//! (two stores on one table and one Redis) never see stale data; reads come
//! from Redis when it holds the session (which is why Django's own writes,
//! which bypass it, call for `db` instead: README).

use std::time::Duration;

use serde_json::{json, Value};
use sessiongate::config::DbUrl;
use sessiongate::session::{Patch, Policy, Record, SessionKey};
use sessiongate::store::{Applied, DbStore, Store, WriteCtx};

#[path = "common/redis_server.rs"]
mod redis_server;

const SECRET: &[u8] = b"cached-db-secret-0123456789abcdef";
const POLICY: Policy = Policy {
    cookie_age_secs: 3600,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};

fn now() -> i64 {
    sessiongate::session::Clock::default().now_ms()
}

fn update(v: Value) -> Patch {
    Patch {
        update: v.as_object().unwrap().clone(),
        has_update: true,
        ..Patch::default()
    }
}

fn ctx() -> WriteCtx {
    WriteCtx {
        now: now(),
        policy: POLICY,
        touch: false,
        refresh_ms: 0,
        max_size: 0,
    }
}

fn data(r: &Record) -> Value {
    serde_json::from_slice(&r.data).unwrap()
}

struct Two {
    a: DbStore,
    b: DbStore,
    file: std::path::PathBuf,
    redis: redis_server::RedisServer,
    dir: std::path::PathBuf,
}

impl Drop for Two {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn two() -> Option<Two> {
    let redis = redis_server::RedisServer::start().await?;
    let dir = std::env::temp_dir().join(format!(
        "sessiongate-cached-db-{}-{}",
        std::process::id(),
        SessionKey::generate().as_str()
    ));
    let file = dir.join("s.sqlite3");
    let url = DbUrl::Sqlite(file.clone());
    let t = Duration::from_secs(5);
    DbStore::migrate(&url, "django_session", t).await.unwrap();
    let redis_url = redis.url();
    let open = || DbStore::open_cached(&url, "django_session", t, SECRET, &[], Some(&redis_url));
    let a = open().await.unwrap();
    let b = open().await.unwrap();
    Some(Two {
        a,
        b,
        file,
        redis,
        dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_see_stale_data() {
    let Some(t) = two().await else { return };
    let mut r = Record::new_at(now());
    r.apply_patch(&update(json!({"n": 0})), now(), &POLICY);
    let k = t.a.create(r).await.unwrap();
    // b reads (and fills the cache), a writes, b sees the write.
    for n in 1..=5 {
        assert_eq!(
            data(&t.b.load(&k, now()).await.unwrap().unwrap())["n"],
            n - 1
        );
        let w = if n % 2 == 0 { &t.a } else { &t.b };
        assert!(matches!(
            w.apply(&k, &update(json!({ "n": n })), ctx())
                .await
                .unwrap(),
            Applied::Saved { .. }
        ));
        assert_eq!(data(&t.a.load(&k, now()).await.unwrap().unwrap())["n"], n);
        assert_eq!(data(&t.b.load(&k, now()).await.unwrap().unwrap())["n"], n);
    }
    // a cycles the key: b no longer finds the old one, finds the new one.
    let p = Patch {
        cycle: true,
        ..Patch::default()
    };
    let Applied::Saved { key: k2, .. } = t.a.apply(&k, &p, ctx()).await.unwrap() else {
        panic!()
    };
    assert!(t.b.load(&k, now()).await.unwrap().is_none());
    assert_eq!(data(&t.b.load(&k2, now()).await.unwrap().unwrap())["n"], 5);
    assert_eq!(
        t.b.apply(&k, &update(json!({"late": 1})), ctx())
            .await
            .unwrap(),
        Applied::Missing
    );
    // a deletes: b sees it gone.
    t.a.delete(&k2).await.unwrap();
    assert!(t.b.load(&k2, now()).await.unwrap().is_none());
    assert_eq!(
        t.b.apply(&k2, &update(json!({"late": 1})), ctx())
            .await
            .unwrap(),
        Applied::Missing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_from_redis_when_it_holds_the_session() {
    let Some(t) = two().await else { return };
    let mut r = Record::new_at(now());
    r.apply_patch(&update(json!({"a": 1})), now(), &POLICY);
    let k = t.a.create(r).await.unwrap();
    assert!(t.b.load(&k, now()).await.unwrap().is_some());
    // A writer that bypasses the cache (Django's own saves do) is not seen:
    // the README says to use `db` when Django writes the table too.
    let c = rusqlite::Connection::open(&t.file).unwrap();
    c.execute("DELETE FROM django_session", []).unwrap();
    assert!(
        t.b.load(&k, now()).await.unwrap().is_some(),
        "served from Redis"
    );
    // Through sessiongate the write goes to the table, then Redis.
    t.a.delete(&k).await.unwrap();
    assert!(t.b.load(&k, now()).await.unwrap().is_none());
}

/// `/readyz` on `cached_db` (SPEC 7.2): the store is ready when the table
/// and the Redis in front of it both answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_needs_the_table_and_redis() {
    let Some(mut t) = two().await else { return };
    t.a.ping().await.expect("ready");
    t.redis.kill();
    let e = t.a.ping().await.expect_err("not ready without its Redis");
    assert!(
        matches!(e, sessiongate::store::StoreError::Unavailable(_)),
        "{e}"
    );
    t.redis.restart().await;
    // Reconnection has no event to wait on from outside: asked again,
    // bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = t.a.ping().await {
        assert!(std::time::Instant::now() < deadline, "not ready again: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
