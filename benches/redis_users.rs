//! The user index on the `redis` engine (SPEC 9), at the store (no proxy,
//! so the index's own cost is not diluted by HTTP):
//! - the write path with `[session] user_key` set against unset, in
//!   alternating rounds of one run (the machine is shared: A and B see the
//!   same load), each round `BENCH_CONCURRENCY` (default 32) writers
//!   patching their own session for `BENCH_SECS` (default 1) seconds;
//! - revoking the 10,000 sessions of one user (`revoke_user`), and listing
//!   them (`user_sessions`), a few times.
//!
//! `cargo bench --bench redis_users`. Starts its own `redis-server`.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use sessiongate::session::{Clock, Expiry, Patch, Policy, Record, SessionKey, Stamp};
use sessiongate::store::{Applied, RedisStore, Store, WriteCtx};

const POLICY: Policy = Policy {
    cookie_age_secs: 3600,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};

fn now() -> i64 {
    Clock::default().now_ms()
}

fn record(data: String) -> Record {
    let t = now();
    Record {
        data: Bytes::from(data),
        expiry: Expiry::Default,
        created: t,
        modified: t,
        expires_at: t + 3_600_000,
        stamp: Stamp::NONE,
    }
}

fn update(n: u64) -> Patch {
    let mut p = Patch {
        has_update: true,
        ..Patch::default()
    };
    p.update.insert("n".into(), n.into());
    p
}

async fn open(url: &str, user_key: Option<&str>) -> Arc<RedisStore> {
    let s = RedisStore::open(url, Duration::from_secs(10), false)
        .await
        .expect("redis store")
        .with_user_key(user_key.map(str::to_string));
    Arc::new(s)
}

/// Writes per second: `concurrency` writers, each on its own session of
/// its own user.
async fn writes(store: &Arc<RedisStore>, keys: &[SessionKey], secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for &k in keys {
        let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let ctx = WriteCtx {
                    now: now(),
                    policy: POLICY,
                    touch: false,
                    refresh_ms: 0,
                    max_size: 0,
                };
                let r = store.apply(&k, &update(n), ctx).await.expect("apply");
                assert!(matches!(r, Applied::Saved { .. }), "{r:?}");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let Some(redis) = redis_server::RedisServer::start().await else {
        eprintln!("no redis-server: nothing measured");
        return;
    };
    let url = redis.url();

    // --- The write path, user_key unset (A) against set (B) ---
    let plain = open(&url, None).await;
    let indexed = open(&url, Some("uid")).await;
    let sessions = |store: Arc<RedisStore>| async move {
        let mut keys = Vec::new();
        for i in 0..concurrency {
            let data = format!(r#"{{"cart":[1,2,3],"uid":"user{i}"}}"#);
            keys.push(store.create(record(data)).await.expect("create"));
        }
        keys
    };
    let keys_a = sessions(plain.clone()).await;
    let keys_b = sessions(indexed.clone()).await;
    // Warm up both.
    writes(&plain, &keys_a, secs / 2.0).await;
    writes(&indexed, &keys_b, secs / 2.0).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // A then B, then B then A: neither always goes first.
        if r % 2 == 0 {
            a.push(writes(&plain, &keys_a, secs).await);
            b.push(writes(&indexed, &keys_b, secs).await);
        } else {
            b.push(writes(&indexed, &keys_b, secs).await);
            a.push(writes(&plain, &keys_a, secs).await);
        }
    }
    println!("write path, {concurrency} writers, {rounds} rounds of {secs} s each (interleaved):");
    println!("  user_key unset: {a:.0?} writes/s");
    println!("  user_key set:   {b:.0?} writes/s");
    let (ma, mb) = (median(&mut a), median(&mut b));
    println!(
        "  median: unset {ma:.0}/s, set {mb:.0}/s: ratio {:.3} (goal >= 0.9)",
        mb / ma
    );

    // --- Revoking the 10,000 sessions of one user ---
    revokes("one server", &indexed).await;
    // And on a three-primary Cluster: the sessions are in every slot.
    if let Some(cluster) = redis_server::ClusterSet::start().await {
        let store = open(&cluster.url(), Some("uid")).await;
        revokes("3-primary cluster", &store).await;
    }
}

async fn revokes(what: &str, indexed: &Arc<RedisStore>) {
    const N: usize = 10_000;
    for run in 1..=3 {
        let made: Vec<SessionKey> = stream::iter(0..N)
            .map(|i| {
                let s = indexed.clone();
                async move {
                    s.create(record(format!(r#"{{"uid":"bulk","i":{i}}}"#)))
                        .await
                        .expect("create")
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        assert_eq!(made.len(), N);
        let t = Instant::now();
        let listed = indexed.user_sessions("bulk", now()).await.expect("list");
        let list_time = t.elapsed();
        assert_eq!(listed.len(), N);
        let t = Instant::now();
        let n = indexed
            .revoke_user("bulk", None, now())
            .await
            .expect("revoke");
        let revoke_time = t.elapsed();
        assert_eq!(n as usize, N);
        println!(
            "{what}, run {run}: revoke_user of {N} sessions: {:.0} ms (goal < 1000 ms); user_sessions listing them: {:.0} ms",
            revoke_time.as_secs_f64() * 1000.0,
            list_time.as_secs_f64() * 1000.0
        );
    }
}
