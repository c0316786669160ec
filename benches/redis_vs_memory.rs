//! Throughput of the `redis` and `cached_redis` engines against the
//! `memory` engine, in one run, through the real proxy: requests that carry
//! a live session (read: the upstream changes nothing; write: the upstream
//! sends an `X-Session-Update`).
//!
//! A plain `main` (needs `harness = false` for its `[[bench]]` entry):
//! `cargo bench --bench redis_vs_memory`. `BENCH_SECS` (default 3) and
//! `BENCH_CONCURRENCY` (default 32) tune it. Starts its own `redis-server`;
//! without one it measures the memory engine only.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use sessiongate::config::Config;
use sessiongate::server::ServerOptions;
use sessiongate::store::{AnyStore, MemoryStore};
use sessiongate::Server;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

/// Answers `ok`; echoes `x-echo-update` as `x-session-update`.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut b = Response::builder();
                    if let Some(v) = req.headers().get("x-echo-update") {
                        b = b.header("x-session-update", v.clone());
                    }
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(b.body(Full::new(Bytes::from_static(b"ok"))).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn config(engine: &str, url: &str, up: SocketAddr) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = false

[session]
secret_key = "{SECRET}"
cookie_secure = false

[store]
engine = "{engine}"
url = "{url}"
clear_expired_interval = "0s"

[[route]]
upstream = "http://{up}"
"#
    );
    Config::parse(&text, Path::new("bench.toml")).expect("bench config")
}

async fn proxy(engine: &str, url: &str, up: SocketAddr) -> SocketAddr {
    let config = config(engine, url, up);
    let server = if engine == "memory" {
        Server::bind(
            config,
            ServerOptions::with_store(Arc::new(AnyStore::Memory(MemoryStore::new()))),
        )
        .await
    } else {
        Server::bind(config, ServerOptions::workers(1)).await
    }
    .expect("bind");
    let addr = server.local_addr();
    tokio::spawn(async move {
        let _ = server.run(std::future::pending()).await;
    });
    addr
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn request(
    client: &HttpClient,
    addr: SocketAddr,
    cookie: Option<&str>,
    update: Option<&str>,
) -> Response<Bytes> {
    let mut b = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/"));
    if let Some(c) = cookie {
        b = b.header("cookie", format!("sessionid={c}"));
    }
    if let Some(u) = update {
        b = b.header("x-echo-update", u);
    }
    let resp = client
        .request(b.body(Full::default()).unwrap())
        .await
        .expect("proxy answered");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, body)
}

/// Requests per second with `concurrency` clients for `secs`, each on its
/// own live session.
async fn measure(addr: SocketAddr, write: bool, concurrency: usize, secs: f64) -> f64 {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut keys = Vec::new();
    for _ in 0..concurrency {
        let r = request(
            &client,
            addr,
            None,
            Some(r#"{"user":"bench","cart":[1,2,3]}"#),
        )
        .await;
        let c = r
            .headers()
            .get("set-cookie")
            .expect("a session")
            .to_str()
            .unwrap();
        keys.push(
            c["sessionid=".len()..]
                .split(';')
                .next()
                .unwrap()
                .to_string(),
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for key in keys {
        let (client, done, stop) = (client.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let update = write.then(|| format!(r#"{{"n":{n}}}"#));
                let r = request(&client, addr, Some(&key), update.as_deref()).await;
                assert_eq!(r.status(), 200, "{:?}", r.body());
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

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let up = upstream().await;
    let redis = redis_server::RedisServer::start().await;
    let url = redis.as_ref().map(|r| r.url()).unwrap_or_default();
    let mut engines = vec!["memory"];
    if redis.is_some() {
        engines.extend(["redis", "cached_redis"]);
    }
    println!("{concurrency} clients, {secs}s per case, one live session per client");
    for write in [false, true] {
        let what = if write {
            "write (X-Session-Update)"
        } else {
            "read (no directive)"
        };
        let mut base = 0.0;
        for engine in &engines {
            let addr = proxy(engine, &url, up).await;
            // Warm-up, then the measured run.
            measure(addr, write, concurrency, secs / 5.0).await;
            let rps = measure(addr, write, concurrency, secs).await;
            if *engine == "memory" {
                base = rps;
            }
            println!(
                "{what:26} {engine:13} {rps:>9.0} req/s   {:.2} x memory",
                rps / base
            );
        }
    }
}
