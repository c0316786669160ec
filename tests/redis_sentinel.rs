//! The `redis` and `cached_redis` engines behind Redis Sentinel: a primary,
//! a replica and three sentinels on free ports, started for each test: every
//! redis scenario runs on it, then the primary is killed (and the first
//! sentinel hangs) and sessiongate follows the promoted replica. A second
//! set has passwords on the data nodes and on the sentinels, and TLS.
//!
//! Without `redis-server` this test says SKIPPED and passes, except under
//! `CI`, where it fails.

mod common;
#[path = "common/redis_suite.rs"]
mod redis_suite;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use common::redis_server::{tls_files, wait_until, Secure, SentinelSet, SENTINEL_SERVICE};
use redis_suite::{echo, Instance, Raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_keeps_every_session_rule_and_follows_a_failover_without_a_wrong_session() {
    let Some(mut set) = SentinelSet::start().await else {
        return;
    };
    let url = set.url();
    let raw = Raw::Single(set.primary.url());
    for engine in ["redis", "cached_redis"] {
        redis_suite::conformance(engine, &url, &raw).await;
    }

    // The failover. Two instances (one per engine) read and write one
    // session in a loop while the primary is killed and a sentinel
    // promotes the replica.
    let (up, _) = echo(None).await;
    let up = Arc::new(up);
    let a = Arc::new(Instance::start("redis", &url, "1s", &up).await);
    let b = Arc::new(Instance::start("cached_redis", &url, "1s", &up).await);
    let k = a.post(None, &[("update", r#"{"user":"ann"}"#)]).await.key();
    // Replication is asynchronous: the session must reach the replica
    // before the primary dies (README: what a failover can lose).
    let rkey = format!("sessiongate:s:{k}");
    wait_until(
        "the session reaches the replica",
        Duration::from_secs(10),
        || async {
            let d: Option<String> = set
                .replica
                .query(redis::cmd("HGET").arg(&rkey).arg("d"))
                .await
                .unwrap_or(None);
            d.as_deref() == Some(r#"{"user":"ann"}"#)
        },
    )
    .await;

    let served = Arc::new(AtomicUsize::new(0));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let lp = {
        let (a, b, k, up) = (a.clone(), b.clone(), k.clone(), up.clone());
        let (served, unavailable, stop) = (served.clone(), unavailable.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let inst = if i.is_multiple_of(2) { &a } else { &b };
                // Reads, and writes of a key nobody reads back (a write
                // acknowledged by the old primary just before it died may be
                // lost with it).
                let got = if i.is_multiple_of(3) {
                    inst.post(Some(&k), &[("update", &format!(r#"{{"w":{i}}}"#))])
                        .await
                } else {
                    inst.get("/", Some(&k)).await
                };
                if check(i, &got, &k, &up) {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    unavailable.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let served_since = |n: usize, what: &'static str| {
        let served = served.clone();
        let lp = &lp;
        async move {
            let at = served.load(Ordering::Relaxed);
            wait_until(what, Duration::from_secs(30), || async {
                assert!(!lp.is_finished(), "the client loop failed ({what})");
                served.load(Ordering::Relaxed) >= at + n
            })
            .await;
        }
    };
    served_since(3, "sessions served before the failover").await;
    let old = set.primary.port;
    let killed = Instant::now();
    // The primary's host goes away with its sentinel, the first one listed:
    // that sentinel hangs (paused: connections open, nothing answers) and
    // the two others must elect and promote, and be found.
    set.sentinels[0].pause();
    set.primary.kill();
    let replica = set.replica.port;
    wait_until(
        "a sentinel promotes the replica",
        Duration::from_secs(30),
        || async { set.primary_port().await == Some(replica) },
    )
    .await;
    let promoted = killed.elapsed();
    // Serving again after the promotion, without a restart.
    served_since(5, "sessions served after the promotion").await;
    let serving = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    lp.await.expect("the client loop");
    assert_ne!(old, replica);

    // Writes go to the new primary and are read back on both instances.
    let r = a.post(Some(&k), &[("update", r#"{"after":1}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    b.get("/", Some(&k)).await;
    assert_eq!(up.last().session()["after"], json!(1));
    let on_new: i64 = set
        .replica
        .query(redis::cmd("EXISTS").arg(&rkey))
        .await
        .unwrap();
    assert_eq!(on_new, 1);
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "failover: promoted {promoted:?} after the kill, serving {serving:?} after it; {} served, {} answered 503\n",
            served.load(Ordering::Relaxed),
            unavailable.load(Ordering::Relaxed)
        )
        .as_bytes(),
    );

    // A switchover: the old primary comes back (empty) as a replica of the
    // new one; then an operator's SENTINEL FAILOVER
    // hands it the primary role again. The sentinels kill the clients of
    // both servers (and a demoted primary refuses writes): sessiongate
    // follows, with the same rules meanwhile.
    set.sentinels[0].resume();
    let t = Instant::now();
    set.primary.restart_as_replica_of(replica).await;
    wait_until(
        "the old primary syncs as a replica",
        Duration::from_secs(40),
        || async {
            let info: String = set
                .primary
                .query(redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            info.contains("role:slave") && info.contains("master_link_status:up")
        },
    )
    .await;
    wait_until(
        "the sentinels see the replica",
        Duration::from_secs(30),
        || async {
            let replicas: Vec<std::collections::HashMap<String, String>> = set.sentinels[1]
                .query(redis::cmd("SENTINEL").arg("REPLICAS").arg(SENTINEL_SERVICE))
                .await
                .unwrap_or_default();
            replicas.iter().any(|r| {
                r.get("port") == Some(&old.to_string())
                    && r.get("flags").map(String::as_str) == Some("slave")
            })
        },
    )
    .await;
    let ready = t.elapsed();
    // Refused (NOGOODSLAVE) until a sentinel has fresh INFO from the
    // replica: asked again until it accepts.
    wait_until(
        "a sentinel accepts SENTINEL FAILOVER",
        Duration::from_secs(30),
        || async {
            let r: redis::RedisResult<()> = set.sentinels[1]
                .query(redis::cmd("SENTINEL").arg("FAILOVER").arg(SENTINEL_SERVICE))
                .await;
            r.is_ok()
        },
    )
    .await;
    let started = Instant::now();
    let (mut i, mut after) = (0u64, 0);
    while after < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not serving after the switchover"
        );
        i += 1;
        let inst = if i.is_multiple_of(2) { &a } else { &b };
        let got = if i.is_multiple_of(3) {
            inst.post(Some(&k), &[("update", &format!(r#"{{"s":{i}}}"#))])
                .await
        } else {
            inst.get("/", Some(&k)).await
        };
        // Counted once the switchover is complete: the sentinels name the
        // old primary and have demoted the other server. Until then that
        // server is still a primary and takes writes, which its demotion
        // then discards (README: what a failover can lose).
        if check(i, &got, &k, &up) && set.primary_port().await == Some(old) && demoted(&set).await {
            after += 1;
        }
    }
    let switched = t.elapsed();
    // Writes reach the primary again (a first write may still find the
    // demoted server: READONLY, a 503, and the connection is replaced).
    let mut r = a.post(Some(&k), &[("update", r#"{"back":1}"#)]).await;
    for _ in 0..3 {
        if r.status != 503 {
            break;
        }
        r = a.post(Some(&k), &[("update", r#"{"back":1}"#)]).await;
    }
    assert_eq!(r.status, 200, "{}", r.body);
    let on_old: Option<String> = set
        .primary
        .query(redis::cmd("HGET").arg(&rkey).arg("d"))
        .await
        .unwrap();
    assert!(
        on_old.unwrap().contains(r#""back":1"#),
        "written to the primary again"
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("switchover: replica ready {ready:?} after its restart, switched and serving {switched:?} after it\n").as_bytes(),
    );

    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
}

/// `rediss+sentinel://:DATA@sentinels/mymaster/0?sentinel_password=SENT`:
/// the sentinels and the data nodes each require their own password, and
/// every link (to the sentinels, to the primary, replication) is TLS under a
/// private CA. Sessions work on both engines, through a switchover to the
/// replica too; each password is needed where it belongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_with_passwords_on_sentinels_and_data_nodes_over_tls() {
    let dir = std::env::temp_dir().join(format!("sessiongate-sentinel-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = tls_files(&dir);
    let secure = Secure {
        data_password: "data-pw_1".into(),
        sentinel_password: "sentinel-pw_2".into(),
        tls: Some((ca.clone(), cert, key)),
    };
    let Some(set) = SentinelSet::start_secure(secure).await else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    // The private CA, trusted the way a deployment does it (the native
    // root store reads SSL_CERT_FILE); no test in this binary uses another
    // CA.
    std::env::set_var("SSL_CERT_FILE", &ca);
    let url = set.url();
    assert!(url.starts_with("rediss+sentinel://:data-pw_1@"), "{url}");
    for engine in ["redis", "cached_redis"] {
        redis_suite::shared_lifecycle(engine, &url).await;
    }
    redis_suite::forty_across_two("redis", &url).await;

    // Each password where it belongs: a configuration error at start,
    // without the password in the message.
    let (up, _) = echo(None).await;
    let sentinels = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    for (bad, what) in [
        (
            format!("rediss+sentinel://:data-pw_1@{sentinels}/{SENTINEL_SERVICE}/0"),
            "no sentinel password",
        ),
        (
            format!("rediss+sentinel://:data-pw_1@{sentinels}/{SENTINEL_SERVICE}/0?sentinel_password=wrong-s"),
            "a wrong sentinel password",
        ),
        (
            format!("rediss+sentinel://:wrong-d@{sentinels}/{SENTINEL_SERVICE}/0?sentinel_password=sentinel-pw_2"),
            "a wrong data password",
        ),
        (
            format!("rediss+sentinel://{sentinels}/{SENTINEL_SERVICE}/0?sentinel_password=sentinel-pw_2"),
            "no data password",
        ),
    ] {
        let e = Instance::try_start("redis", &bad, "5s", &up)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the proxy started"));
        assert!(e.to_lowercase().contains("auth"), "{what}: {e}");
        assert!(!e.contains("wrong-") && !e.contains("-pw_"), "{what}: {e}");
    }
    // Plain text to the TLS ports: no session is served (503), nothing else.
    let plain = url.replacen("rediss+sentinel", "redis+sentinel", 1);
    if let Ok(i) = Instance::try_start("redis", &plain, "1s", &up).await {
        let r = i.post(None, &[("update", r#"{"x":1}"#)]).await;
        assert_eq!(r.status, 503, "{}", r.body);
        i.stop().await;
    }

    // A switchover: the promoted replica is reached with the data password
    // and TLS as well.
    let a = Instance::start("redis", &url, "1s", &up).await;
    let b = Instance::start("cached_redis", &url, "1s", &up).await;
    let k = a.post(None, &[("update", r#"{"user":"ann"}"#)]).await.key();
    let rkey = format!("sessiongate:s:{k}");
    wait_until(
        "the session reaches the replica",
        Duration::from_secs(10),
        || async {
            let d: Option<String> = set
                .replica
                .query(redis::cmd("HGET").arg(&rkey).arg("d"))
                .await
                .unwrap_or(None);
            d.is_some()
        },
    )
    .await;
    let replica = set.replica.tls_port.unwrap();
    wait_until(
        "a sentinel accepts SENTINEL FAILOVER",
        Duration::from_secs(30),
        || async {
            let r: redis::RedisResult<()> = set.sentinels[1]
                .query(redis::cmd("SENTINEL").arg("FAILOVER").arg(SENTINEL_SERVICE))
                .await;
            r.is_ok()
        },
    )
    .await;
    wait_until(
        "the sentinels name the replica",
        Duration::from_secs(30),
        || async { set.primary_port().await == Some(replica) },
    )
    .await;
    let mut n = 0u64;
    wait_until(
        "a write through each instance lands on the promoted replica",
        Duration::from_secs(30),
        || {
            n += 1;
            let (a, b, k, rkey, set) = (&a, &b, &k, &rkey, &set);
            async move {
                let w = format!(r#"{{"after":{n}}}"#);
                let ra = a.post(Some(k), &[("update", &w)]).await;
                let rb = b.get("/", Some(k)).await;
                let on_new: Option<String> = set
                    .replica
                    .query(redis::cmd("HGET").arg(rkey).arg("d"))
                    .await
                    .unwrap_or(None);
                ra.status == 200
                    && rb.status == 200
                    && on_new.is_some_and(|d| d.contains(&format!(r#""after":{n}"#)))
            }
        },
    )
    .await;
    b.get("/", Some(&k)).await;
    assert_eq!(up.last().session()["user"], json!("ann"));
    a.stop().await;
    b.stop().await;
    drop(set);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether the promoted replica of the first failover is a replica again.
async fn demoted(set: &SentinelSet) -> bool {
    let info: String = set
        .replica
        .query(redis::cmd("INFO").arg("replication"))
        .await
        .unwrap_or_default();
    info.contains("role:slave")
}

/// One response during a failover: `200` with the right, non-new session,
/// or `503`; never a new or deleted cookie. `true` when served.
fn check(i: u64, got: &common::Got, k: &str, up: &common::Upstream) -> bool {
    for c in got.set_cookies() {
        assert!(
            c.starts_with(&format!("sessionid={k};")),
            "request {i}: a new or deleted cookie: {c}"
        );
    }
    match got.status.as_u16() {
        200 => {
            let s = up.last();
            assert_eq!(
                s.header("x-session-new"),
                Some("false"),
                "request {i}: an empty session"
            );
            assert_eq!(
                s.session()["user"],
                json!("ann"),
                "request {i}: a wrong session"
            );
            true
        }
        503 => {
            assert!(got.body.contains("session store"), "{}", got.body);
            false
        }
        s => panic!("request {i}: {s} {}", got.body),
    }
}

/// SPEC 11 "follows the promoted replica ... never a wrong or empty
/// session": in a switchover (`SENTINEL FAILOVER`) the old primary stays
/// up, and takes writes until Sentinel demotes it, seconds later, when it
/// resyncs from the new one and drops them. sessiongate must write to the
/// promoted primary well before that: the sentinels are asked which primary
/// they name while the store is in use, and a move replaces the
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_is_followed_before_the_old_primary_is_demoted() {
    let Some(set) = SentinelSet::start().await else {
        return;
    };
    let url = set.url();
    let (up, _) = echo(None).await;
    let a = Instance::start("redis", &url, "1s", &up).await;
    let k = a.post(None, &[("update", r#"{"n":0}"#)]).await.key();
    let rkey = format!("sessiongate:s:{k}");
    let old = set.primary_port().await.expect("a primary");
    // Refused (NOGOODSLAVE) until a sentinel has fresh INFO from the
    // replica: asked again until it accepts.
    wait_until(
        "a sentinel accepts SENTINEL FAILOVER",
        Duration::from_secs(30),
        || async {
            let r: redis::RedisResult<()> = set.sentinels[0]
                .query(redis::cmd("SENTINEL").arg("FAILOVER").arg(SENTINEL_SERVICE))
                .await;
            r.is_ok()
        },
    )
    .await;
    wait_until(
        "the sentinels name the promoted replica",
        Duration::from_secs(30),
        || async { set.primary_port().await.is_some_and(|p| p != old) },
    )
    .await;
    // Writes until one lands on the promoted primary; until then the old
    // primary must still be one (not yet demoted): a write it took after
    // that would be lost.
    let old_is_primary = || async {
        let info: String = set
            .primary
            .query(redis::cmd("INFO").arg("replication"))
            .await
            .unwrap_or_default();
        info.contains("role:master")
    };
    let mut n = 0;
    let last = loop {
        n += 1;
        // Asked before the write: a write that lands on the promoted
        // primary must come while the old one still takes writes too.
        let old_still_primary = old_is_primary().await;
        let got = a
            .post(Some(&k), &[("update", &format!(r#"{{"n":{n}}}"#))])
            .await;
        assert!(
            got.status == 200 || got.status == 503,
            "write {n}: {}",
            got.status
        );
        let on_new: Option<String> = set
            .replica
            .query(redis::cmd("HGET").arg(&rkey).arg("d"))
            .await
            .unwrap_or(None);
        if got.status == 200 && on_new.as_deref() == Some(format!(r#"{{"n":{n}}}"#).as_str()) {
            assert!(
                old_still_primary,
                "write {n}: sessiongate followed the promoted primary only once Sentinel had demoted the old one (every write before was lost)"
            );
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Once the old primary is a replica of the new one, the session is the
    // last write acknowledged.
    wait_until(
        "Sentinel demotes the old primary",
        Duration::from_secs(60),
        || async { !old_is_primary().await },
    )
    .await;
    let got = a.get("/", Some(&k)).await;
    assert_eq!(got.status, 200);
    assert_eq!(up.last().session(), serde_json::json!({ "n": last }));
    a.stop().await;
}
