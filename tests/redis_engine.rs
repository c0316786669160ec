//! The `redis` and `cached_redis` engines end to end: real proxy instances
//! (the real `Server`, opened from its configuration) sharing one real
//! `redis-server` started on a free port for each test.
//!
//! Without `redis-server` these tests say SKIPPED and pass, except under
//! `CI`, where they fail.

mod common;
#[path = "common/redis_suite.rs"]
mod redis_suite;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::redis_server::{calls, tls_files, RedisServer};
use redis_suite::{assert_store_503, echo, seen, Instance, Raw};
use sessiongate::session::{Record, SessionKey};
use sessiongate::store::{RedisStore, Store, StoreError};

// ---------------------------------------------------------------------------
// The shared scenarios (tests/common/redis_suite.rs) on one server each
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sessions_are_shared_read_updated_cycled_flushed_across_instances() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::shared_lifecycle("redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_sessions_are_shared_read_updated_cycled_flushed_across_instances() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::shared_lifecycle("cached_redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_forty_concurrent_disjoint_updates_across_two_instances_all_survive() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::forty_across_two("redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_forty_concurrent_disjoint_updates_across_two_instances_all_survive() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::forty_across_two("cached_redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flush_or_cycle_on_one_instance_makes_an_in_flight_write_on_another_400() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::ended_elsewhere_gives_400("redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_flush_or_cycle_on_one_instance_makes_an_in_flight_write_on_another_400() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::ended_elsewhere_gives_400("cached_redis", &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_never_serves_a_session_another_instance_changed_or_deleted() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::never_stale("cached_redis", &redis.url(), &Raw::Single(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_serves_a_session_another_instance_changed_or_deleted() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::never_stale("redis", &redis.url(), &Raw::Single(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cycle_key_racing_patches_keeps_every_acknowledged_one() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    redis_suite::cycle_under_concurrent_patches("redis", &redis.url()).await;
    redis_suite::cycle_under_concurrent_patches("cached_redis", &redis.url()).await;
}

// ---------------------------------------------------------------------------
// Redis down, hung, restarted
// ---------------------------------------------------------------------------

async fn killed_and_restarted(engine: &str) {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let (up, _) = echo(None).await;
    let a = Instance::start(engine, &redis.url(), "500ms", &up).await;
    let k = a.post(None, &[("update", r#"{"u":1}"#)]).await.key();
    a.get("/", Some(&k)).await;

    redis.kill();
    let t = Instant::now();
    let r = a.get("/", Some(&k)).await;
    assert_store_503(&r, "load with redis down");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let r = a.post(None, &[("update", r#"{"v":1}"#)]).await;
    assert_store_503(&r, "create with redis down");
    assert!(r.session_cookie().is_none());
    // Routes without sessions do not notice.
    let r = a.get("/static/app.css", Some(&k)).await;
    assert_eq!(r.status, 200, "session = false route: {}", r.body);
    // Nor does a visitor without a session who writes nothing.
    assert_eq!(a.get("/", None).await.status, 200);

    // Back on the same port (empty): works again without restarting the proxy.
    redis.restart().await;
    let r = a.get("/", Some(&k)).await;
    assert_eq!(r.status, 200, "first request after restart: {}", r.body);
    assert_eq!(
        seen(&up),
        (json!({}), "true".into()),
        "the old session is gone"
    );
    let r = a.post(None, &[("update", r#"{"v":2}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let k2 = r.key();
    a.get("/", Some(&k2)).await;
    assert_eq!(seen(&up), (json!({"v": 2}), "false".into()));

    // Killed again with a live connection and restarted before any request:
    // a read goes through on the first try.
    redis.kill();
    redis.restart().await;
    let r = a.get("/", Some(&k2)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(seen(&up).1, "true");
    a.stop().await;
}

/// SPEC 5 "Redis down -> 503": not while Redis is up. A connection Redis
/// closed while it was idle (its `timeout`, `CLIENT KILL`, a restart the
/// proxy did not see) costs no request a 503: a write, as a read, gets one
/// more attempt on a new connection.
async fn connections_redis_closed_cost_no_request(engine: &str) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (up, _) = echo(None).await;
    let a = Instance::start(engine, &redis.url(), "2s", &up).await;
    let k = a.post(None, &[("update", r#"{"u":1}"#)]).await.key();
    for (n, write) in ["a write on an existing session", "a new session", "a read"]
        .into_iter()
        .enumerate()
    {
        let _: redis::Value = redis
            .query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal"))
            .await
            .expect("CLIENT KILL");
        let r = match n {
            0 => a.post(Some(&k), &[("update", r#"{"u":2}"#)]).await,
            1 => a.post(None, &[("update", r#"{"v":1}"#)]).await,
            _ => a.get("/", Some(&k)).await,
        };
        assert_eq!(r.status, 200, "{engine}: {write}: {}", r.body);
    }
    assert_eq!(seen(&up), (json!({"u": 2}), "false".into()), "{engine}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_redis_closed_cost_no_request() {
    connections_redis_closed_cost_no_request("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_connections_redis_closed_cost_no_request() {
    connections_redis_closed_cost_no_request("cached_redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_gives_503_on_session_routes_only_and_recovers_on_restart() {
    killed_and_restarted("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_killed_gives_503_on_session_routes_only_and_recovers_on_restart() {
    killed_and_restarted("cached_redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_gives_503_within_the_timeout_then_recovers() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (up, _) = echo(None).await;
    let a = Instance::start("cached_redis", &redis.url(), "300ms", &up).await;
    let k = a.post(None, &[("update", r#"{"u":1}"#)]).await.key();

    redis.pause();
    let t = Instant::now();
    let r = a.get("/", Some(&k)).await;
    let took = t.elapsed();
    // Resume before asserting, so a failure does not leave it frozen.
    let r2 = a.post(None, &[("update", r#"{"v":1}"#)]).await;
    let r3 = a.get("/static/x", None).await;
    redis.resume();
    assert_store_503(&r, "load with redis hung");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "bounded by the store timeout: {took:?}"
    );
    assert_store_503(&r2, "create with redis hung");
    assert_eq!(r3.status, 200);

    let r = a.get("/", Some(&k)).await;
    assert_eq!(r.status, 200, "after resume: {}", r.body);
    assert_eq!(seen(&up), (json!({"u": 1}), "false".into()));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down_and_serves_once_it_is_up() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    redis.kill();
    let (up, _) = echo(None).await;
    let a = Instance::start("redis", &redis.url(), "500ms", &up).await;
    let r = a.post(None, &[("update", r#"{"v":1}"#)]).await;
    assert_store_503(&r, "redis not up yet");
    assert_eq!(a.get("/static/x", None).await.status, 200);
    redis.restart().await;
    let r = a.post(None, &[("update", r#"{"v":1}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    a.get("/", Some(&r.key())).await;
    assert_eq!(seen(&up), (json!({"v": 1}), "false".into()));
    a.stop().await;
}

// ---------------------------------------------------------------------------
// URLs: password, database number, TLS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_password_and_database_number_works() {
    let pw = "pw-Secret_7";
    let Some(redis) = RedisServer::start_with_password(pw).await else {
        return;
    };
    let port = redis.port;
    let url = format!("redis://:{pw}@127.0.0.1:{port}/3");
    let (up, _) = echo(None).await;
    let a = Instance::start("redis", &url, "5s", &up).await;
    let b = Instance::start("cached_redis", &url, "5s", &up).await;
    let k = a.post(None, &[("update", r#"{"x":1}"#)]).await.key();
    b.get("/", Some(&k)).await;
    assert_eq!(seen(&up), (json!({"x": 1}), "false".into()));

    // The session lives in database 3, not 0.
    let exists = |db: u32| {
        let url = format!("redis://:{pw}@127.0.0.1:{port}/{db}");
        let k = k.clone();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("EXISTS")
                .arg(format!("sessiongate:s:{k}"))
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    assert_eq!(exists(3).await, 1);
    assert_eq!(exists(0).await, 0);

    // A wrong password or database is a configuration error at start, and
    // the message does not repeat the password.
    let bad = format!("redis://:wrong-pw@127.0.0.1:{port}/3");
    let e = Instance::try_start("redis", &bad, "5s", &up)
        .await
        .err()
        .expect("a wrong password fails at start");
    assert!(!e.contains("wrong-pw"), "{e}");
    assert!(e.to_lowercase().contains("auth"), "{e}");
    let none = Instance::try_start("redis", &format!("redis://127.0.0.1:{port}/3"), "5s", &up)
        .await
        .err()
        .expect("a missing password fails at start");
    assert!(none.to_lowercase().contains("auth"), "{none}");
    let e = Instance::try_start(
        "redis",
        &format!("redis://:{pw}@127.0.0.1:{port}/99"),
        "5s",
        &up,
    )
    .await
    .err()
    .expect("database 99 does not exist");
    assert!(!e.contains(pw), "{e}");
    assert!(e.contains("database"), "{e}");
    assert!(
        Instance::try_start("redis", "http://nope", "5s", &up)
            .await
            .is_err(),
        "not a redis url"
    );
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------
// Two stores on one server, with a clock under the test's control
// ---------------------------------------------------------------------------

const T0: i64 = 1_800_000_000_000;
const POLICY: sessiongate::session::Policy = sessiongate::session::Policy {
    cookie_age_secs: 3600,
    expire_at_browser_close: false,
    absolute_timeout_ms: 0,
};

fn ctx(now: i64) -> sessiongate::store::WriteCtx {
    sessiongate::store::WriteCtx {
        now,
        policy: POLICY,
        touch: false,
        refresh_ms: 0,
        max_size: 0,
    }
}

fn update(v: Value) -> sessiongate::session::Patch {
    sessiongate::session::Patch {
        update: v.as_object().unwrap().clone(),
        has_update: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_copy_never_decides_expired_or_unchanged_alone() {
    use sessiongate::session::{Expiry, Patch};
    use sessiongate::store::Applied;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let t = Duration::from_secs(5);
    let a = RedisStore::open(&redis.url(), t, true).await.unwrap();
    let b = RedisStore::open(&redis.url(), t, true).await.unwrap();
    assert!(a.is_cached());

    // A holds a copy that ends at T0+10s; B extends the session at T0+5s.
    let mut r = Record::new_at(T0);
    r.apply_patch(
        &Patch {
            expiry: Some(Expiry::Seconds(10)),
            ..update(json!({"a": 1}))
        },
        T0,
        &POLICY,
    );
    let k = a.create(r).await.unwrap();
    assert!(a.load(&k, T0).await.unwrap().is_some());
    assert!(matches!(
        b.apply(&k, &update(json!({"b": 2})), ctx(T0 + 5_000))
            .await
            .unwrap(),
        Applied::Saved { .. }
    ));
    // At T0+12s A's copy says "expired"; Redis says live until T0+15s.
    let Applied::Saved { record, .. } = a
        .apply(&k, &update(json!({"c": 3})), ctx(T0 + 12_000))
        .await
        .unwrap()
    else {
        panic!("the session is live")
    };
    assert_eq!(record.data.as_ref(), br#"{"a":1,"b":2,"c":3}"#);
    assert_eq!(record.expires_at, T0 + 22_000);

    // A's copy lacks "d", which B just added: deleting it is a change.
    assert!(a.load(&k, T0 + 12_000).await.unwrap().is_some());
    b.apply(&k, &update(json!({"d": 4})), ctx(T0 + 13_000))
        .await
        .unwrap();
    let del = Patch {
        delete: vec!["d".into()],
        ..Patch::default()
    };
    assert!(matches!(
        a.apply(&k, &del, ctx(T0 + 14_000)).await.unwrap(),
        Applied::Saved { .. }
    ));
    let got = b.load(&k, T0 + 14_000).await.unwrap().unwrap();
    assert_eq!(got.data.as_ref(), br#"{"a":1,"b":2,"c":3}"#);
    // Deleting it again changes nothing, and says so.
    assert_eq!(
        a.apply(&k, &del, ctx(T0 + 14_000)).await.unwrap(),
        Applied::Unchanged
    );
    // Flushed by B while A holds a copy: A reports it missing.
    b.delete(&k).await.unwrap();
    assert_eq!(
        a.apply(&k, &update(json!({"late": 1})), ctx(T0 + 15_000))
            .await
            .unwrap(),
        Applied::Missing
    );
    assert!(a.load(&k, T0 + 15_000).await.unwrap().is_none());
    assert_eq!(a.clear_expired(T0 + 99_000_000).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_use_tls_and_verify_the_server() {
    let dir = std::env::temp_dir().join(format!("sessiongate-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = tls_files(&dir);
    let Some(redis) = RedisServer::start_tls(&cert, &key, &ca).await else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let tls_url = format!("rediss://127.0.0.1:{}", redis.tls_port.unwrap());
    let timeout = Duration::from_secs(1);
    let k = SessionKey::generate();
    let now = 1_800_000_000_000;

    // TLS to a plain-text port: the handshake fails, the store is unavailable.
    let s = RedisStore::open(
        &format!("rediss://127.0.0.1:{}", redis.port),
        timeout,
        false,
    )
    .await
    .expect("opens while it cannot connect");
    match s.load(&k, now).await {
        Err(StoreError::Unavailable(e)) => eprintln!("TLS to a plain port: {e}"),
        other => panic!("TLS to a plain port: {other:?}"),
    }
    // A server certificate from an unknown CA is refused.
    let s = RedisStore::open(&tls_url, timeout, false)
        .await
        .expect("opens while it cannot connect");
    match s.load(&k, now).await {
        Err(StoreError::Unavailable(e)) => {
            assert!(e.to_lowercase().contains("certificate"), "{e}")
        }
        other => panic!("an unknown CA: {other:?}"),
    }

    // Trusting the CA the way a deployment with a private CA does
    // (SSL_CERT_FILE, read by the native root store): sessions work over TLS.
    // Only this test in this binary uses TLS.
    std::env::set_var("SSL_CERT_FILE", &ca);
    let (up, _) = echo(None).await;
    let a = Instance::start("cached_redis", &tls_url, "5s", &up).await;
    let r = a.post(None, &[("update", r#"{"tls":true}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    a.get("/", Some(&r.key())).await;
    assert_eq!(seen(&up), (json!({"tls": true}), "false".into()));
    let s = RedisStore::open(&tls_url, timeout, false).await.unwrap();
    let mut rec = Record::new_at(now);
    rec.touch(
        now,
        &sessiongate::session::Policy {
            cookie_age_secs: 60,
            expire_at_browser_close: false,
            absolute_timeout_ms: 0,
        },
    );
    let k = s.create(rec.clone()).await.unwrap();
    assert_eq!(s.load(&k, now).await.unwrap(), Some(rec));
    a.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A write reads the session once: the request's load, then the
/// compare-and-set from what it loaded, not a second `HMGET` before it (one
/// round trip to Redis fewer). Inside Redis the compare-and-set makes three
/// calls (`HGET` of the version, one `HSET`, `PEXPIRE`): no `HDEL` of an
/// entry the session does not have. A read is one command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reads_the_session_from_redis_once() {
    for (engine, write, read) in [
        (
            "redis",
            &[
                ("evalsha", 10),
                ("hget", 10),
                ("hmget", 10),
                ("hset", 10),
                ("pexpire", 10),
            ][..],
            &[("hmget", 10)][..],
        ),
        // The load checks the cached copy's version (an HGET, no script);
        // the write starts from the copy.
        (
            "cached_redis",
            &[("evalsha", 10), ("hget", 20), ("hset", 10), ("pexpire", 10)][..],
            &[("hget", 10)][..],
        ),
    ] {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let (up, _) = echo(None).await;
        let a = Instance::start(engine, &redis.url(), "5s", &up).await;
        let k = a.post(None, &[("update", r#"{"n":0}"#)]).await.key();
        // Once, so that the scripts are loaded.
        assert_eq!(
            a.post(Some(&k), &[("update", r#"{"n":0}"#)]).await.status,
            200
        );
        redis.reset_stats().await;
        redis_suite::ten_writes(&a, &k).await;
        let calls = redis.session_commands().await;
        assert_eq!(calls, self::calls(write), "{engine}: 10 writes");
        redis.reset_stats().await;
        for _ in 0..10 {
            assert_eq!(a.get("/", Some(&k)).await.status, 200);
        }
        assert_eq!(seen(&up).0, json!({"n": 10}));
        let calls = redis.session_commands().await;
        assert_eq!(calls, self::calls(read), "{engine}: 10 reads");
        a.stop().await;
    }
}

/// `cached_redis` whose copy of a session is gone by the time of the write
/// (pruned, or another instance's cache): the write starts from the
/// request's loaded record, as `redis` does, reading nothing first, and a
/// write that landed since the load is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_without_its_copy_writes_from_the_loaded_record() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let t = Duration::from_secs(5);
    let a = RedisStore::open(&redis.url(), t, true).await.unwrap();
    let b = RedisStore::open(&redis.url(), t, true).await.unwrap();
    let t0 = sessiongate::session::Clock::default().now_ms();
    let mut r = Record::new_at(t0);
    r.apply_patch(&update(json!({"a": 1})), t0, &POLICY);
    let k = a.create(r).await.unwrap();
    let data = |r: Record| serde_json::from_slice::<Value>(&r.data).unwrap();
    // Once, so that the script is loaded.
    a.apply(&k, &update(json!({"w": 0})), ctx(t0 + 1))
        .await
        .unwrap();

    // Loaded on A; B, which holds no copy, writes from it: no read first.
    let seen = a.load(&k, t0 + 1).await.unwrap().unwrap();
    redis.reset_stats().await;
    b.apply_seen(&k, &seen, &update(json!({"b": 2})), ctx(t0 + 2))
        .await
        .unwrap();
    assert_eq!(
        redis.session_commands().await,
        calls(&[("evalsha", 1), ("hget", 1), ("hset", 1), ("pexpire", 1)]),
        "the compare-and-set alone"
    );

    // Stale: A wrote after the load B writes from.
    let seen = a.load(&k, t0 + 3).await.unwrap().unwrap();
    a.apply(&k, &update(json!({"c": 3})), ctx(t0 + 4))
        .await
        .unwrap();
    let c = RedisStore::open(&redis.url(), t, true).await.unwrap();
    c.apply_seen(&k, &seen, &update(json!({"d": 4})), ctx(t0 + 5))
        .await
        .unwrap();
    for s in [&a, &b, &c] {
        assert_eq!(
            data(s.load(&k, t0 + 6).await.unwrap().unwrap()),
            json!({"a": 1, "w": 0, "b": 2, "c": 3, "d": 4}),
            "neither change lost, on every instance"
        );
    }
}

/// A write that keeps no user entry deletes the one the stored hash has:
/// `u` and `x` left by an instance with a user key, or fields that make no
/// entry (an `x` alone, as another program might leave). When the state it
/// starts from has neither, it sends no `HDEL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_an_entry_deletes_a_leftover_one_and_only_then() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let t = Duration::from_secs(5);
    let indexed = RedisStore::open(&redis.url(), t, false)
        .await
        .unwrap()
        .with_user_key(Some("uid".into()));
    let plain = RedisStore::open(&redis.url(), t, false).await.unwrap();
    let fields = |k: &SessionKey| {
        let cmd = redis::cmd("HKEYS")
            .arg(format!("sessiongate:s:{}", k.as_str()))
            .clone();
        let server = &redis;
        async move {
            let mut f: Vec<String> = server.query(&cmd).await.unwrap();
            f.sort();
            f
        }
    };
    let t0 = sessiongate::session::Clock::default().now_ms();
    let mut r = Record::new_at(t0);
    r.apply_patch(&update(json!({"uid": "ann"})), t0, &POLICY);
    let k = indexed.create(r).await.unwrap();
    assert_eq!(fields(&k).await, ["d", "m", "u", "v", "x"]);

    // Loaded and written by the instance without a user key.
    let seen = plain.load(&k, t0 + 1).await.unwrap().unwrap();
    plain
        .apply_seen(&k, &seen, &update(json!({"n": 1})), ctx(t0 + 2))
        .await
        .unwrap();
    assert_eq!(fields(&k).await, ["d", "m", "v"], "the leftover entry");

    // An `x` alone: no entry, but not nothing.
    let _: () = redis
        .query(
            redis::cmd("HSET")
                .arg(format!("sessiongate:s:{}", k.as_str()))
                .arg("x")
                .arg("zz"),
        )
        .await
        .unwrap();
    let seen = plain.load(&k, t0 + 3).await.unwrap().unwrap();
    plain
        .apply_seen(&k, &seen, &update(json!({"n": 2})), ctx(t0 + 4))
        .await
        .unwrap();
    assert_eq!(fields(&k).await, ["d", "m", "v"], "an x alone");

    // Nothing to delete: no HDEL.
    let seen = plain.load(&k, t0 + 5).await.unwrap().unwrap();
    redis.reset_stats().await;
    plain
        .apply_seen(&k, &seen, &update(json!({"n": 3})), ctx(t0 + 6))
        .await
        .unwrap();
    let calls = redis.session_commands().await;
    assert!(!calls.contains_key("hdel"), "{calls:?}");
    let got = plain.load(&k, t0 + 7).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&got.data).unwrap(),
        json!({"uid": "ann", "n": 3})
    );
}

/// A write from a loaded record whose session is in a user index reads
/// nothing more either: the entry's user is derived from the data, and the
/// compare-and-set checks it against the stored one. Where they differ (the
/// user key was changed in between), the write is made from the stored
/// entry, so the session stays in its user's set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_loaded_record_keeps_the_user_index() {
    use sessiongate::store::Applied;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let t = Duration::from_secs(5);
    let open = |user_key: &str| {
        let url = redis.url();
        let user_key = user_key.to_string();
        async move {
            RedisStore::open(&url, t, false)
                .await
                .unwrap()
                .with_user_key(Some(user_key))
        }
    };
    let by_uid = open("uid").await;
    let t0 = sessiongate::session::Clock::default().now_ms();
    let mut r = Record::new_at(t0);
    r.apply_patch(&update(json!({"uid": "ann", "name": "bob"})), t0, &POLICY);
    let k = by_uid.create(r).await.unwrap();

    // Same user key: one HMGET (the load) and one script a write (after a
    // first write, which loads the script).
    by_uid
        .apply(&k, &update(json!({"n": 0})), ctx(t0))
        .await
        .unwrap();
    let seen = by_uid.load(&k, t0 + 1).await.unwrap().unwrap();
    redis.reset_stats().await;
    let got = by_uid
        .apply_seen(&k, &seen, &update(json!({"n": 1})), ctx(t0 + 2))
        .await
        .unwrap();
    assert!(matches!(got, Applied::Saved { .. }), "{got:?}");
    assert_eq!(
        redis.session_commands().await,
        calls(&[("evalsha", 1), ("hget", 2), ("hset", 1), ("pexpire", 1)]),
        "no HMGET before the script; in it the version and the user checked, one HSET"
    );
    let ids =
        |v: Vec<sessiongate::store::UserSession>| v.into_iter().map(|s| s.key).collect::<Vec<_>>();
    assert_eq!(ids(by_uid.user_sessions("ann", t0 + 3).await.unwrap()), [k]);

    // Loaded under another user key, whose user ("bob") is not the stored
    // entry's ("ann"): the script refuses the derived entry, and the write
    // moves the session to bob's set.
    let by_name = open("name").await;
    let seen = by_name.load(&k, t0 + 4).await.unwrap().unwrap();
    let got = by_name
        .apply_seen(&k, &seen, &update(json!({"n": 2})), ctx(t0 + 5))
        .await
        .unwrap();
    assert!(matches!(got, Applied::Saved { .. }), "{got:?}");
    assert_eq!(
        ids(by_name.user_sessions("bob", t0 + 6).await.unwrap()),
        [k]
    );
    let server = &redis;
    let members = |user: &str| {
        let set = format!("{}{user}", sessiongate::store::redis::USER_PREFIX);
        async move {
            let mut m: Vec<String> = server.query(redis::cmd("SMEMBERS").arg(set)).await.unwrap();
            m.sort();
            m
        }
    };
    assert_eq!(
        members("ann").await,
        Vec::<String>::new(),
        "moved out of ann's set"
    );

    // An unchanged patch from a derived entry: nothing written.
    let seen = by_name.load(&k, t0 + 7).await.unwrap().unwrap();
    let noop = sessiongate::session::Patch {
        delete: vec!["absent".into()],
        ..Default::default()
    };
    assert_eq!(
        by_name
            .apply_seen(&k, &seen, &noop, ctx(t0 + 8))
            .await
            .unwrap(),
        Applied::Unchanged
    );

    // Cycle-Key from a record loaded under a changed user key: the new key
    // is in the new user's set.
    let mut r = Record::new_at(t0);
    r.apply_patch(&update(json!({"uid": "cy", "name": "dee"})), t0, &POLICY);
    let old = by_uid.create(r).await.unwrap();
    assert_eq!(members("cy").await, [old.as_str().to_string()]);
    let seen = by_name.load(&old, t0 + 9).await.unwrap().unwrap();
    let cycle = sessiongate::session::Patch {
        cycle: true,
        ..update(json!({"n": 3}))
    };
    let Applied::Saved { key: new, .. } = by_name
        .apply_seen(&old, &seen, &cycle, ctx(t0 + 10))
        .await
        .unwrap()
    else {
        panic!("cycle saves")
    };
    assert_ne!(new, old);
    assert_eq!(
        ids(by_name.user_sessions("dee", t0 + 11).await.unwrap()),
        [new]
    );
    assert!(by_name.load(&old, t0 + 11).await.unwrap().is_none());
}
