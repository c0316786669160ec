//! The `redis` and `cached_redis` engines on a real Redis Cluster: three
//! primaries on free ports joined by `redis-cli --cluster create`, started
//! once per test (the scenarios run in turn on it); the second test's
//! cluster requires a password and speaks TLS.
//!
//! Without `redis-server`/`redis-cli` this test says SKIPPED and passes,
//! except under `CI`, where it fails.

mod common;
#[path = "common/redis_suite.rs"]
mod redis_suite;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use common::redis_server::{calls, tls_files, wait_until, ClusterSet};
use redis_suite::{echo, Instance, Raw};
use sessiongate::store::redis::{direct_commands, fallback_commands};

/// Commands this process's proxies sent to node `i` on the fast path (its
/// slot's primary, without the crate's cluster task) and had answered there.
fn direct(cluster: &ClusterSet, i: usize) -> u64 {
    let n = &cluster.nodes[i];
    direct_commands(&format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_every_session_rule_spreads_sessions_and_follows_a_slot_migration() {
    let Some(cluster) = ClusterSet::start().await else {
        return;
    };
    let url = cluster.url();
    let raw = Raw::Cluster(cluster.seeds());

    // SPEC 4/5 on Cluster, both engines: sharing, the 40 concurrent patches
    // across two instances, SessionInterrupted, the never-stale cache,
    // Cycle-Key racing patches (the new key is in another slot).
    for engine in ["redis", "cached_redis"] {
        redis_suite::conformance(engine, &url, &raw).await;
    }

    spread_over_every_primary(&cluster).await;
    a_write_reads_the_session_once(&cluster).await;
    slot_migration_under_a_client_loop(&cluster).await;
    a_hung_node_gives_503_then_recovers(&cluster).await;
}

/// A write on Cluster reads the session once, as on one server: the load's
/// `HMGET`, then the compare-and-set from what it loaded, which makes three
/// calls inside Redis and no `HDEL` (counted over the three nodes).
async fn a_write_reads_the_session_once(cluster: &ClusterSet) {
    let (up, _) = echo(None).await;
    let a = Instance::start("redis", &cluster.url(), "5s", &up).await;
    let k = a.post(None, &[("update", r#"{"n":0}"#)]).await.key();
    assert_eq!(
        a.post(Some(&k), &[("update", r#"{"n":0}"#)]).await.status,
        200
    );
    for n in &cluster.nodes {
        n.reset_stats().await;
    }
    redis_suite::ten_writes(&a, &k).await;
    let mut got = std::collections::BTreeMap::new();
    for n in &cluster.nodes {
        for (c, k) in n.session_commands().await {
            *got.entry(c).or_insert(0) += k;
        }
    }
    assert_eq!(
        got,
        calls(&[
            ("evalsha", 10),
            ("hget", 10),
            ("hmget", 10),
            ("hset", 10),
            ("pexpire", 10)
        ]),
        "10 writes on Cluster: the load's HMGET, then three calls in the script"
    );
    a.stop().await;
}

/// `rediss+cluster://:PASSWORD@` three primaries that require the password
/// and speak TLS (clients and the cluster bus) under a private CA: the
/// session rules hold, sessions spread over every node (the crate follows
/// the slot map's TLS ports), a missing or wrong password is a start-up
/// error, and plain text to the TLS ports serves no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_a_password_over_tls() {
    let dir = std::env::temp_dir().join(format!("sessiongate-cluster-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = tls_files(&dir);
    let Some(cluster) =
        ClusterSet::start_secure("cluster-pw_3", Some((ca.clone(), cert, key))).await
    else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    // The private CA through the native root store; the other test in this
    // binary uses no TLS.
    std::env::set_var("SSL_CERT_FILE", &ca);
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://:cluster-pw_3@"), "{url}");
    for engine in ["redis", "cached_redis"] {
        redis_suite::shared_lifecycle(engine, &url).await;
    }
    redis_suite::cycle_under_concurrent_patches("redis", &url).await;
    spread_over_every_primary(&cluster).await;

    let (up, _) = echo(None).await;
    let hosts = url.split('@').nth(1).unwrap();
    for (bad, what) in [
        (format!("rediss+cluster://{hosts}"), "no password"),
        (
            format!("rediss+cluster://:wrong-pw@{hosts}"),
            "a wrong password",
        ),
    ] {
        match Instance::try_start("redis", &bad, "2s", &up).await {
            Err(e) => {
                assert!(e.to_lowercase().contains("auth"), "{what}: {e}");
                assert!(
                    !e.contains("wrong-pw") && !e.contains("cluster-pw"),
                    "{what}: {e}"
                );
            }
            Ok(i) => panic!("{what}: the proxy started ({})", {
                i.stop().await;
                "stopped"
            }),
        }
    }
    let plain = url.replacen("rediss+cluster", "redis+cluster", 1);
    if let Ok(i) = Instance::try_start("redis", &plain, "1s", &up).await {
        let r = i.post(None, &[("update", r#"{"x":1}"#)]).await;
        assert_eq!(r.status, 503, "{}", r.body);
        i.stop().await;
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The node holding a session stops answering (SIGSTOP): that session's
/// requests answer 503 within `[store] timeout`, sessionless routes and the
/// sessions on the other nodes keep working, and once the node answers again the session is served, with
/// its data, without a restart.
async fn a_hung_node_gives_503_then_recovers(cluster: &ClusterSet) {
    let (up, _) = echo(None).await;
    for engine in ["redis", "cached_redis"] {
        let a = Instance::start(engine, &cluster.url(), "500ms", &up).await;
        let k = a.post(None, &[("update", r#"{"u":1}"#)]).await.key();
        let slot: u16 = cluster.nodes[0]
            .query(
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(format!("sessiongate:s:{k}")),
            )
            .await
            .unwrap();
        let owner = cluster.owner(slot).await;
        // A session on another node.
        let other = loop {
            let o = a.post(None, &[("update", r#"{"o":1}"#)]).await.key();
            let s: u16 = cluster.nodes[0]
                .query(
                    redis::cmd("CLUSTER")
                        .arg("KEYSLOT")
                        .arg(format!("sessiongate:s:{o}")),
                )
                .await
                .unwrap();
            if cluster.owner(s).await != owner {
                break o;
            }
        };
        let node = &cluster.nodes[owner];
        node.pause();
        let r = a.get("/", Some(&k)).await;
        redis_suite::assert_store_503(&r, engine);
        assert!(r.set_cookies().is_empty(), "{engine}: no cookie on a 503");
        assert_eq!(
            a.get("/static", None).await.status,
            200,
            "{engine}: sessionless route"
        );
        // The other nodes' sessions are still served (until the cluster
        // itself declares the node failed, after cluster-node-timeout).
        let r = a.get("/", Some(&other)).await;
        assert_eq!(
            r.status, 200,
            "{engine}: a session on a healthy node: {}",
            r.body
        );
        assert_eq!(up.last().session(), json!({"o": 1}));
        node.resume();
        wait_until(
            "the session is served again",
            Duration::from_secs(20),
            || async { a.get("/", Some(&k)).await.status == 200 },
        )
        .await;
        assert_eq!(up.last().session(), json!({"u": 1}), "{engine}");
        assert_eq!(up.last().header("x-session-new"), Some("false"));
        a.stop().await;
    }
}

/// Sessions land on every primary, and each primary's commands go to it
/// on the fast path (once the slot table is learnt, in the background).
async fn spread_over_every_primary(cluster: &ClusterSet) {
    let (up, _) = echo(None).await;
    let a = Instance::start("redis", &cluster.url(), "5s", &up).await;
    let total = || {
        (0..cluster.nodes.len())
            .map(|i| direct(cluster, i))
            .sum::<u64>()
    };
    let t0 = total();
    wait_until(
        "the slot table is learnt",
        Duration::from_secs(10),
        || async {
            a.post(None, &[("update", r#"{"w":1}"#)]).await;
            total() > t0
        },
    )
    .await;
    let before = cluster.sizes().await;
    let direct_before: Vec<u64> = (0..cluster.nodes.len())
        .map(|i| direct(cluster, i))
        .collect();
    for n in 0..30 {
        let r = a
            .post(None, &[("update", &format!(r#"{{"n":{n}}}"#))])
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let after = cluster.sizes().await;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(
            a > b,
            "node {i} got none of 30 new sessions: {before:?} -> {after:?}"
        );
    }
    let direct_after: Vec<u64> = (0..cluster.nodes.len())
        .map(|i| direct(cluster, i))
        .collect();
    for (i, (b, a)) in direct_before.iter().zip(&direct_after).enumerate() {
        assert!(
            a > b,
            "node {i}: no command on the fast path: {direct_before:?} -> {direct_after:?}"
        );
    }
    a.stop().await;
}

/// The session's slot moves from its node to another while two instances
/// keep updating and reading it: through `MIGRATING`/`IMPORTING` (served
/// by the old node), after its key moved (`ASK`), and after the slot is
/// reassigned (`MOVED`). Every request succeeds and no update is lost.
/// The session's commands go to its node on the fast path before, are
/// handed to the crate's cluster connection on the redirects, and go on
/// the fast path again, to the new node, once the slot moved (each
/// instance rebuilt its slot table).
async fn slot_migration_under_a_client_loop(cluster: &ClusterSet) {
    let (up, _) = echo(None).await;
    let up = Arc::new(up);
    let a = Arc::new(Instance::start("redis", &cluster.url(), "5s", &up).await);
    let b = Arc::new(Instance::start("cached_redis", &cluster.url(), "5s", &up).await);
    let k = a.post(None, &[("update", r#"{"i0":0}"#)]).await.key();
    let rkey = format!("sessiongate:s:{k}");
    let slot: u16 = cluster.nodes[0]
        .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&rkey))
        .await
        .unwrap();
    let from = cluster.owner(slot).await;
    let to = (from + 1) % cluster.nodes.len();

    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let lp = {
        let (a, b, k, done, stop, up) = (
            a.clone(),
            b.clone(),
            k.clone(),
            done.clone(),
            stop.clone(),
            up.clone(),
        );
        tokio::spawn(async move {
            let mut i: usize = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (w, r) = if i.is_multiple_of(2) {
                    (&a, &b)
                } else {
                    (&b, &a)
                };
                let got = w
                    .post(Some(&k), &[("update", &format!(r#"{{"i{i}":{i}}}"#))])
                    .await;
                assert_eq!(got.status, 200, "update {i}: {}", got.body);
                let got = r.get("/", Some(&k)).await;
                assert_eq!(got.status, 200, "read {i}: {}", got.body);
                let s = up.last().session();
                assert_eq!(s.get(format!("i{i}")), Some(&json!(i)), "read {i}: {s}");
                done.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    let progress = |what: &'static str| {
        let done = done.clone();
        let lp_alive = &lp;
        async move {
            let at = done.load(Ordering::Relaxed);
            wait_until(what, Duration::from_secs(20), || async {
                assert!(!lp_alive.is_finished(), "the client loop failed ({what})");
                done.load(Ordering::Relaxed) >= at + 3
            })
            .await;
        }
    };
    progress("requests before the migration").await;
    let (on_from, on_to) = (direct(cluster, from), direct(cluster, to));
    progress("requests before the migration").await;
    assert!(
        direct(cluster, from) > on_from,
        "the session's commands take the fast path"
    );
    assert_eq!(direct(cluster, to), on_to, "nothing else goes to {to}");
    cluster.begin_migration(slot, from, to).await;
    progress("requests while the slot is migrating").await;
    assert!(cluster.move_keys(slot, from, to).await >= 1);
    let handed_over = fallback_commands();
    progress("requests after the key moved (ASK)").await;
    assert!(
        fallback_commands() > handed_over,
        "ASK: the fast path hands the commands to the crate"
    );
    assert_eq!(
        direct(cluster, to),
        on_to,
        "ASK is not followed on the fast path"
    );
    cluster.finish_migration(slot, to).await;
    progress("requests after the slot moved (MOVED)").await;
    // Both instances' tables name the new node: a few requests in a row,
    // all on the fast path to it, none handed over.
    wait_until(
        "the fast path resumes for the moved slot",
        Duration::from_secs(20),
        || async {
            let (f, d, at) = (
                fallback_commands(),
                direct(cluster, to),
                done.load(Ordering::Relaxed),
            );
            while done.load(Ordering::Relaxed) < at + 2 {
                assert!(!lp.is_finished(), "the client loop failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            fallback_commands() == f && direct(cluster, to) > d
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let last = lp.await.expect("the client loop");

    let here: i64 = cluster.nodes[to]
        .query(redis::cmd("EXISTS").arg(&rkey))
        .await
        .unwrap();
    assert_eq!(here, 1, "the session now lives on the other node");
    a.get("/", Some(&k)).await;
    let s = up.last().session();
    let obj = s.as_object().unwrap();
    assert_eq!(obj.len(), last + 1, "every update kept: {s}");
    for i in 0..=last {
        assert_eq!(obj[&format!("i{i}")], json!(i));
    }
    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
}
