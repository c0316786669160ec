//! The redis engines' end-to-end scenarios, shared by the test binaries
//! of the three topologies (`redis_engine`, `redis_sentinel`,
//! `redis_cluster`): proxy instances (the real `Server`), an upstream that
//! echoes directives and can hold requests, and the SPEC 4/5 behaviours,
//! each run against whatever `[store] url` the caller gives.
//!
//! Included with `#[path]` next to `mod common;`.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::{Barrier, Notify};

use crate::common::{self, upstream_async, Got, Upstream, SECRET};
use sessiongate::config::Config;
use sessiongate::Server;

/// Direct access to the Redis the sessions are in, for what an operator
/// might do behind sessiongate's back.
pub enum Raw {
    /// One server (or the current Sentinel primary).
    Single(String),
    /// Cluster seed nodes (`redis://h:p`).
    Cluster(Vec<String>),
}

impl Raw {
    /// `DEL key`; how many keys were deleted.
    pub async fn del(&self, key: &str) -> i64 {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        match self {
            Raw::Single(url) => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut c = client.get_multiplexed_async_connection().await.unwrap();
                cmd.query_async(&mut c).await.unwrap()
            }
            Raw::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::new(nodes.clone()).unwrap();
                let mut c = client.get_async_connection().await.unwrap();
                cmd.query_async(&mut c).await.unwrap()
            }
        }
    }
}

/// The bound for every wait: a hang fails the test instead of blocking it.
pub const LIMIT: Duration = Duration::from_secs(30);

pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {LIMIT:?}"))
}

// ---------------------------------------------------------------------------
// An upstream that echoes directives, and can hold requests in flight
// ---------------------------------------------------------------------------

/// Controls for requests held by the upstream.
pub struct Hold {
    /// Notified when a request with `x-hold` arrives.
    pub arrived: Notify,
    /// Releases one held request.
    pub gate: Notify,
    /// Requests with `x-wait` meet here.
    barrier: Option<Barrier>,
}

/// Each request header `x-echo-NAME: V` comes back as the response header
/// `x-session-NAME: V`; `x-hold` waits for the gate, `x-wait` at the barrier.
pub async fn echo(barrier: Option<usize>) -> (Upstream, Arc<Hold>) {
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

pub struct Instance {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// `/` is a session route, `/static` is not (`session = false`).
pub fn config_text(engine: &str, url: &str, timeout: &str, up: &Upstream) -> String {
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
    pub async fn try_start(
        engine: &str,
        url: &str,
        timeout: &str,
        up: &Upstream,
    ) -> Result<Instance, String> {
        Self::try_start_text(&config_text(engine, url, timeout, up)).await
    }

    /// An instance from a whole configuration text (see [`config_text`]).
    pub async fn try_start_text(text: &str) -> Result<Instance, String> {
        let config = Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())?;
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

    pub async fn start(engine: &str, url: &str, timeout: &str, up: &Upstream) -> Instance {
        Self::try_start(engine, url, timeout, up)
            .await
            .expect("the proxy starts")
    }

    /// A request with the session cookie `key` (when given) and extra headers.
    pub async fn send(
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

    pub async fn get(&self, path: &str, key: Option<&str>) -> Got {
        self.send(Method::GET, path, key, &[]).await
    }

    /// POST `/` carrying directives for the upstream to send back.
    pub async fn post(&self, key: Option<&str>, directives: &[(&str, &str)]) -> Got {
        let hs: Vec<(String, &str)> = directives
            .iter()
            .map(|(n, v)| (format!("x-echo-{n}"), *v))
            .collect();
        let hs: Vec<(&str, &str)> = hs.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        self.send(Method::POST, "/", key, &hs).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.done.take() {
            bounded("shutdown", d).await.unwrap();
        }
    }
}

/// What the upstream saw in the last request: (X-Session, X-Session-New).
pub fn seen(up: &Upstream) -> (Value, String) {
    let s = up.last();
    (s.session(), s.header("x-session-new").unwrap().to_string())
}

pub fn assert_store_503(r: &Got, what: &str) {
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

pub async fn shared_lifecycle(engine: &str, url: &str) {
    let (up, _) = echo(None).await;
    let a = Instance::start(engine, url, "5s", &up).await;
    let b = Instance::start(engine, url, "5s", &up).await;

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

// ---------------------------------------------------------------------------
// 40 concurrent disjoint updates, 20 through each instance
// ---------------------------------------------------------------------------

pub async fn forty_across_two(engine: &str, url: &str) {
    // Every one of the 40 requests has loaded the session and reached the
    // upstream before any of them answers: a blind overwrite would lose keys.
    let (up, _) = echo(Some(40)).await;
    let a = Arc::new(Instance::start(engine, url, "10s", &up).await);
    let b = Arc::new(Instance::start(engine, url, "10s", &up).await);
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

// ---------------------------------------------------------------------------
// Flush or Cycle-Key on A while a request on B is in flight
// ---------------------------------------------------------------------------

pub async fn ended_elsewhere_gives_400(engine: &str, url: &str) {
    let (up, hold) = echo(None).await;
    let a = Instance::start(engine, url, "5s", &up).await;
    let b = Arc::new(Instance::start(engine, url, "5s", &up).await);
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

// ---------------------------------------------------------------------------
// cached_redis never serves what another instance changed or deleted
// ---------------------------------------------------------------------------

pub async fn never_stale(engine: &str, url: &str, raw: &Raw) {
    let (up, hold) = echo(None).await;
    let a = Arc::new(Instance::start(engine, url, "5s", &up).await);
    let b = Instance::start(engine, url, "5s", &up).await;

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
    let n = raw.del(&format!("sessiongate:s:{k4}")).await;
    assert_eq!(n, 1, "the documented key layout");
    a.get("/", Some(&k4)).await;
    assert_eq!(seen(&up), (json!({}), "true".into()), "deleted in redis");
    b.stop().await;
}

// ---------------------------------------------------------------------------
// Cycle-Key racing 20 patches, across two instances
// ---------------------------------------------------------------------------

/// A Cycle-Key and 20 disjoint updates of one session released at once
/// (half through each instance): every update answered 200 is in the
/// session under its new key, every one answered 400 (the session had
/// moved) is not, and the old key is dead.
pub async fn cycle_under_concurrent_patches(engine: &str, url: &str) {
    let (up, _) = echo(Some(21)).await;
    let a = Arc::new(Instance::start(engine, url, "10s", &up).await);
    let b = Arc::new(Instance::start(engine, url, "10s", &up).await);
    let k = a.post(None, &[("update", r#"{"k0":0}"#)]).await.key();
    let mut tasks = Vec::new();
    for n in 0..=20 {
        let inst = if n % 2 == 0 { a.clone() } else { b.clone() };
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let update = format!(r#"{{"k{n}": {n}}}"#);
            let h: [(&str, &str); 2] = if n == 0 {
                [("x-wait", "1"), ("x-echo-cycle-key", "1")]
            } else {
                [("x-wait", "1"), ("x-echo-update", &update)]
            };
            inst.send(Method::POST, "/", Some(&k), &h).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(bounded("21 requests", t).await.unwrap());
    }
    let cycled = &results[0];
    assert_eq!(cycled.status, 200, "the cycle: {}", cycled.body);
    let k2 = cycled.key();
    assert_ne!(k2, k);
    b.get("/", Some(&k2)).await;
    let data = up.last().session();
    let obj = data.as_object().unwrap();
    assert_eq!(obj["k0"], json!(0), "{data}");
    for (n, r) in results.iter().enumerate().skip(1) {
        match r.status.as_u16() {
            200 => assert_eq!(
                obj.get(&format!("k{n}")),
                Some(&json!(n)),
                "update {n} answered 200 but lost: {data}"
            ),
            400 => assert!(
                obj.get(&format!("k{n}")).is_none(),
                "update {n} answered 400 but applied: {data}"
            ),
            s => panic!("update {n}: {s} {}", r.body),
        }
    }
    a.get("/", Some(&k)).await;
    assert_eq!(
        seen(&up),
        (json!({}), "true".into()),
        "the old key after the cycle"
    );
    a.get("/", Some(&k2)).await;
    assert_eq!(up.last().session(), data, "the same on the other instance");
}

/// Every shared scenario, in turn, on one topology.
pub async fn conformance(engine: &str, url: &str, raw: &Raw) {
    shared_lifecycle(engine, url).await;
    forty_across_two(engine, url).await;
    ended_elsewhere_gives_400(engine, url).await;
    never_stale(engine, url, raw).await;
    cycle_under_concurrent_patches(engine, url).await;
}

/// Ten writes to the session `key` through `a` (updates of `n` to 1..=10),
/// each answered 200.
pub async fn ten_writes(a: &Instance, key: &str) {
    for n in 1..=10 {
        let r = a
            .post(Some(key), &[("update", &format!(r#"{{"n":{n}}}"#))])
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}
