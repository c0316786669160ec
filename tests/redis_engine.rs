//! The `redis` and `cached_redis` engines end to end: real proxy instances
//! (the real `Server`, opened from its configuration) sharing one real
//! `redis-server` started on a free port for each test.
//!
//! Without `redis-server` these tests say SKIPPED and pass, except under
//! `CI`, where they fail.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::{Barrier, Notify};

use common::redis_server::RedisServer;
use common::{upstream_async, Got, Upstream, SECRET};
use sessiongate::config::Config;
use sessiongate::session::{Record, SessionKey};
use sessiongate::store::{RedisStore, Store, StoreError};
use sessiongate::Server;

/// The bound for every wait: a hang fails the test instead of blocking it.
const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {LIMIT:?}"))
}

// ---------------------------------------------------------------------------
// An upstream that echoes directives, and can hold requests in flight
// ---------------------------------------------------------------------------

/// Controls for requests held by the upstream.
struct Hold {
    /// Notified when a request with `x-hold` arrives.
    arrived: Notify,
    /// Releases one held request.
    gate: Notify,
    /// Requests with `x-wait` meet here.
    barrier: Option<Barrier>,
}

/// Each request header `x-echo-NAME: V` comes back as the response header
/// `x-session-NAME: V`; `x-hold` waits for the gate, `x-wait` at the barrier.
async fn echo(barrier: Option<usize>) -> (Upstream, Arc<Hold>) {
    let hold = Arc::new(Hold {
        arrived: Notify::new(),
        gate: Notify::new(),
        barrier: barrier.map(Barrier::new),
    });
    let h = hold.clone();
    let up = upstream_async(move |s| {
        let h = h.clone();
        Box::pin(async move {
            if s.header("x-hold").is_some() {
                h.arrived.notify_one();
                h.gate.notified().await;
            }
            if s.header("x-wait").is_some() {
                h.barrier.as_ref().expect("a barrier").wait().await;
            }
            let mut b = common::reply();
            for (name, value) in &s.headers {
                if let Some(rest) = name.as_str().strip_prefix("x-echo-") {
                    b = b.header(format!("x-session-{rest}"), value.clone());
                }
            }
            b.body(Full::new(Bytes::from_static(b"ok"))).unwrap()
        })
    })
    .await;
    (up, hold)
}

// ---------------------------------------------------------------------------
// A proxy instance on the redis engines
// ---------------------------------------------------------------------------

struct Instance {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// `/` is a session route, `/static` is not (`session = false`).
fn config_text(engine: &str, url: &str, timeout: &str, up: &Upstream) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = false
upstream_connect_timeout = "2s"
upstream_timeout = "20s"
shutdown_grace = "5s"
access_log = "off"

[session]
secret_key = "{SECRET}"
cookie_secure = false

[store]
engine = "{engine}"
url = "{url}"
timeout = "{timeout}"
clear_expired_interval = "0s"

[[route]]
name = "app"
upstream = "{up}"

[[route]]
name = "static"
path = "/static"
upstream = "{up}"
session = false
"#,
        up = up.url()
    )
}

impl Instance {
    async fn try_start(
        engine: &str,
        url: &str,
        timeout: &str,
        up: &Upstream,
    ) -> Result<Instance, String> {
        let text = config_text(engine, url, timeout, up);
        let config = Config::parse(&text, Path::new("test.toml")).expect("valid test config");
        let server = Server::bind(config, sessiongate::server::ServerOptions::workers(1))
            .await
            .map_err(|e| e.to_string())?;
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .expect("server run");
        });
        Ok(Instance {
            addr,
            shutdown: Some(tx),
            done: Some(done),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn start(engine: &str, url: &str, timeout: &str, up: &Upstream) -> Instance {
        Self::try_start(engine, url, timeout, up)
            .await
            .expect("the proxy starts")
    }

    /// A request with the session cookie `key` (when given) and extra headers.
    async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Got {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path));
        if let Some(k) = key {
            b = b.header("cookie", format!("sessionid={k}"));
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(Full::default()).unwrap();
        let resp = bounded("proxy response", self.client.request(req))
            .await
            .expect("the proxy answered");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Got {
        self.send(Method::GET, path, key, &[]).await
    }

    /// POST `/` carrying directives for the upstream to send back.
    async fn post(&self, key: Option<&str>, directives: &[(&str, &str)]) -> Got {
        let hs: Vec<(String, &str)> = directives
            .iter()
            .map(|(n, v)| (format!("x-echo-{n}"), *v))
            .collect();
        let hs: Vec<(&str, &str)> = hs.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        self.send(Method::POST, "/", key, &hs).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.done.take() {
            bounded("shutdown", d).await.unwrap();
        }
    }
}

/// What the upstream saw in the last request: (X-Session, X-Session-New).
fn seen(up: &Upstream) -> (Value, String) {
    let s = up.last();
    (s.session(), s.header("x-session-new").unwrap().to_string())
}

fn assert_store_503(r: &Got, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", r.body);
    assert!(
        r.body.ends_with('\n') && r.body.lines().count() == 1,
        "{what}: one line: {:?}",
        r.body
    );
    assert!(r.body.contains("session store"), "{what}: {}", r.body);
}

// ---------------------------------------------------------------------------
// Sharing across instances
// ---------------------------------------------------------------------------

async fn shared_lifecycle(engine: &str) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (up, _) = echo(None).await;
    let a = Instance::start(engine, &redis.url(), "5s", &up).await;
    let b = Instance::start(engine, &redis.url(), "5s", &up).await;

    // Written through A (non-ASCII data, sent escaped by the upstream).
    let r = a
        .post(
            None,
            &[("update", r#"{"user":"ann","name":"Zo\u00eb \ud83d\ude00"}"#)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let k = r.key();

    // Read through B: the exact canonical bytes.
    let r = b.get("/", Some(&k)).await;
    assert_eq!(r.status, 200);
    let s = up.last();
    assert_eq!(
        s.header("x-session"),
        Some(r#"{"name":"Zo\u00eb \ud83d\ude00","user":"ann"}"#)
    );
    assert_eq!(s.header("x-session-new"), Some("false"));
    let id_b = s.header("x-session-id").unwrap().to_string();
    a.get("/", Some(&k)).await;
    assert_eq!(up.last().header("x-session-id"), Some(id_b.as_str()));

    // Updated through B, seen through A.
    let r = b
        .post(Some(&k), &[("update", r#"{"n":2}"#), ("delete", "name")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.key(), k);
    a.get("/", Some(&k)).await;
    assert_eq!(seen(&up), (json!({"user": "ann", "n": 2}), "false".into()));

    // An expiry set through A holds on B.
    assert_eq!(a.post(Some(&k), &[("expiry", "300")]).await.status, 200);
    b.get("/", Some(&k)).await;
    assert_eq!(up.last().header("x-session-expiry-age"), Some("300"));

    // Cycled through A: the old key is dead on B, the new one carries the data.
    let r = a.post(Some(&k), &[("cycle-key", "1")]).await;
    assert_eq!(r.status, 200);
    let k2 = r.key();
    assert_ne!(k2, k);
    b.get("/", Some(&k)).await;
    assert_eq!(seen(&up), (json!({}), "true".into()), "old key after cycle");
    b.get("/", Some(&k2)).await;
    assert_eq!(seen(&up), (json!({"user": "ann", "n": 2}), "false".into()));
    assert_ne!(up.last().header("x-session-id"), Some(id_b.as_str()));

    // Flushed through B: gone on A.
    let r = b.post(Some(&k2), &[("flush", "1")]).await;
    assert_eq!(r.status, 200);
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));
    a.get("/", Some(&k2)).await;
    assert_eq!(seen(&up), (json!({}), "true".into()), "after flush");

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sessions_are_shared_read_updated_cycled_flushed_across_instances() {
    shared_lifecycle("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_sessions_are_shared_read_updated_cycled_flushed_across_instances() {
    shared_lifecycle("cached_redis").await;
}

// ---------------------------------------------------------------------------
// 40 concurrent disjoint updates, 20 through each instance
// ---------------------------------------------------------------------------

async fn forty_across_two(engine: &str) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // Every one of the 40 requests has loaded the session and reached the
    // upstream before any of them answers: a blind overwrite would lose keys.
    let (up, _) = echo(Some(40)).await;
    let a = Arc::new(Instance::start(engine, &redis.url(), "10s", &up).await);
    let b = Arc::new(Instance::start(engine, &redis.url(), "10s", &up).await);
    let k = a.post(None, &[("update", r#"{"k0":0}"#)]).await.key();
    let mut tasks = Vec::new();
    for n in 1..=40 {
        let inst = if n % 2 == 0 { a.clone() } else { b.clone() };
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let update = format!(r#"{{"k{n}": {n}}}"#);
            let r = inst
                .send(
                    Method::POST,
                    "/",
                    Some(&k),
                    &[("x-wait", "1"), ("x-echo-update", &update)],
                )
                .await;
            assert_eq!(r.status, 200, "request {n}: {}", r.body);
        }));
    }
    for t in tasks {
        bounded("40 requests", t).await.unwrap();
    }
    b.get("/", Some(&k)).await;
    let data = up.last().session();
    let obj = data.as_object().unwrap();
    assert_eq!(obj.len(), 41, "every key kept: {data}");
    for n in 0..=40 {
        assert_eq!(obj[&format!("k{n}")], json!(n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_forty_concurrent_disjoint_updates_across_two_instances_all_survive() {
    forty_across_two("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_forty_concurrent_disjoint_updates_across_two_instances_all_survive() {
    forty_across_two("cached_redis").await;
}

// ---------------------------------------------------------------------------
// Flush or Cycle-Key on A while a request on B is in flight
// ---------------------------------------------------------------------------

async fn ended_elsewhere_gives_400(engine: &str) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (up, hold) = echo(None).await;
    let a = Instance::start(engine, &redis.url(), "5s", &up).await;
    let b = Arc::new(Instance::start(engine, &redis.url(), "5s", &up).await);
    for ender in ["flush", "cycle-key"] {
        let k = a.post(None, &[("update", r#"{"user":1}"#)]).await.key();
        let slow = {
            let b = b.clone();
            let k = k.clone();
            tokio::spawn(async move {
                b.send(
                    Method::POST,
                    "/",
                    Some(&k),
                    &[("x-hold", "1"), ("x-echo-update", r#"{"late":1}"#)],
                )
                .await
            })
        };
        bounded("held request arrives", hold.arrived.notified()).await;
        let r = a.post(Some(&k), &[(ender, "1")]).await;
        assert_eq!(r.status, 200, "{ender}");
        hold.gate.notify_one();
        let r = bounded("held request", slow).await.unwrap();
        assert_eq!(r.status, 400, "{ender}: {}", r.body);
        assert!(r.body.contains("concurrent"), "{}", r.body);
        assert!(r.set_cookies().is_empty(), "{ender}");
        // Not resurrected, on either instance.
        b.get("/", Some(&k)).await;
        assert_eq!(seen(&up), (json!({}), "true".into()), "{ender} on B");
        a.get("/", Some(&k)).await;
        assert_eq!(seen(&up), (json!({}), "true".into()), "{ender} on A");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flush_or_cycle_on_one_instance_makes_an_in_flight_write_on_another_400() {
    ended_elsewhere_gives_400("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_flush_or_cycle_on_one_instance_makes_an_in_flight_write_on_another_400() {
    ended_elsewhere_gives_400("cached_redis").await;
}

// ---------------------------------------------------------------------------
// cached_redis never serves what another instance changed or deleted
// ---------------------------------------------------------------------------

async fn never_stale(engine: &str) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (up, hold) = echo(None).await;
    let a = Arc::new(Instance::start(engine, &redis.url(), "5s", &up).await);
    let b = Instance::start(engine, &redis.url(), "5s", &up).await;

    let k = a.post(None, &[("update", r#"{"a":1}"#)]).await.key();
    a.get("/", Some(&k)).await; // A holds it.
    assert_eq!(
        b.post(Some(&k), &[("update", r#"{"b":2}"#)]).await.status,
        200
    );
    a.get("/", Some(&k)).await;
    assert_eq!(seen(&up).0, json!({"a": 1, "b": 2}), "change made on B");

    // A request on A deletes "c" while B adds it: A's copy (loaded when its
    // request started) has no "c", so "nothing to delete" must be checked
    // against Redis, not decided on the copy.
    let held = {
        let a = a.clone();
        let k = k.clone();
        tokio::spawn(async move {
            a.send(
                Method::POST,
                "/",
                Some(&k),
                &[("x-hold", "1"), ("x-echo-delete", "c")],
            )
            .await
        })
    };
    bounded("held request arrives", hold.arrived.notified()).await;
    assert_eq!(
        b.post(Some(&k), &[("update", r#"{"c":3}"#)]).await.status,
        200
    );
    hold.gate.notify_one();
    assert_eq!(bounded("held", held).await.unwrap().status, 200);
    b.get("/", Some(&k)).await;
    assert_eq!(
        seen(&up).0,
        json!({"a": 1, "b": 2}),
        "delete of a key A had not seen"
    );

    // A's copy is older than Redis when it writes: the compare-and-set
    // catches it and the patch is applied to the newest state.
    let held = {
        let a = a.clone();
        let k = k.clone();
        tokio::spawn(async move {
            a.send(
                Method::POST,
                "/",
                Some(&k),
                &[("x-hold", "1"), ("x-echo-update", r#"{"d":4}"#)],
            )
            .await
        })
    };
    bounded("held request arrives", hold.arrived.notified()).await;
    assert_eq!(
        b.post(Some(&k), &[("update", r#"{"e":5}"#)]).await.status,
        200
    );
    hold.gate.notify_one();
    assert_eq!(bounded("held", held).await.unwrap().status, 200);
    b.get("/", Some(&k)).await;
    assert_eq!(
        seen(&up).0,
        json!({"a": 1, "b": 2, "d": 4, "e": 5}),
        "both kept"
    );

    // An expiry changed on B.
    assert_eq!(b.post(Some(&k), &[("expiry", "120")]).await.status, 200);
    a.get("/", Some(&k)).await;
    assert_eq!(up.last().header("x-session-expiry-age"), Some("120"));

    // Flushed on B: A must not serve its copy.
    a.get("/", Some(&k)).await;
    assert_eq!(b.post(Some(&k), &[("flush", "1")]).await.status, 200);
    a.get("/", Some(&k)).await;
    assert_eq!(seen(&up), (json!({}), "true".into()), "flushed on B");

    // Cycled on B: A must not serve the old key.
    let k2 = a.post(None, &[("update", r#"{"z":1}"#)]).await.key();
    a.get("/", Some(&k2)).await;
    let k3 = b.post(Some(&k2), &[("cycle-key", "1")]).await.key();
    a.get("/", Some(&k2)).await;
    assert_eq!(seen(&up), (json!({}), "true".into()), "cycled on B");
    a.get("/", Some(&k3)).await;
    assert_eq!(seen(&up), (json!({"z": 1}), "false".into()));

    // Deleted behind everyone's back (an operator's DEL): not served.
    let k4 = a.post(None, &[("update", r#"{"y":1}"#)]).await.key();
    a.get("/", Some(&k4)).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let n: i64 = redis::cmd("DEL")
        .arg(format!("sessiongate:s:{k4}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "the documented key layout");
    a.get("/", Some(&k4)).await;
    assert_eq!(seen(&up), (json!({}), "true".into()), "deleted in redis");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_redis_never_serves_a_session_another_instance_changed_or_deleted() {
    never_stale("cached_redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_serves_a_session_another_instance_changed_or_deleted() {
    never_stale("redis").await;
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

/// A CA and a server certificate for 127.0.0.1, as PEM files in `dir`.
fn tls_files(dir: &Path) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sessiongate test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.to_string_lossy().into_owned()
    };
    (
        write("ca.pem", ca_cert.pem()),
        write("cert.pem", leaf.pem()),
        write("key.pem", leaf_key.serialize_pem()),
    )
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
