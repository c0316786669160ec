//! Test harness: a scripted upstream on port 0, the real `Server` on port 0
//! in front of it, and a small HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;

use sessiongate::config::Config;
use sessiongate::session::Clock;
use sessiongate::store::{AnyStore, MemoryStore};
use sessiongate::Server;

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The `X-Session` data the proxy sent.
    pub fn session(&self) -> Value {
        serde_json::from_str(self.header("x-session").expect("x-session header")).unwrap()
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
type Handler = Arc<dyn Fn(Seen) -> BoxFut + Send + Sync>;

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream got a request")
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// An upstream whose answer the test scripts (synchronously).
pub async fn upstream<F>(f: F) -> Upstream
where
    F: Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    upstream_async(move |s| {
        let f = f.clone();
        Box::pin(async move { f(&s) })
    })
    .await
}

/// An upstream with an async script (to hold a request in flight).
pub async fn upstream_async<F>(f: F) -> Upstream
where
    F: Fn(Seen) -> BoxFut + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let handler: Handler = Arc::new(f);
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let s = Seen {
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        };
                        seen.lock().unwrap().push(s.clone());
                        Ok::<_, Infallible>(handler(s).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, seen }
}

/// A response builder for scripts.
pub fn reply() -> http::response::Builder {
    Response::builder().status(200)
}

pub fn ok() -> Response<Full<Bytes>> {
    text("ok")
}

pub fn text(body: &str) -> Response<Full<Bytes>> {
    reply()
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// A response carrying the given `X-Session-*` directives.
pub fn directives(pairs: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut b = reply();
    for (n, v) in pairs {
        b = b.header(*n, *v);
    }
    b.body(Full::new(Bytes::from_static(b"ok"))).unwrap()
}

/// Configuration text with plain HTTP on port 0 and one route per upstream.
pub fn config(session_extra: &str, routes: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = false
upstream_connect_timeout = "2s"
upstream_timeout = "10s"
shutdown_grace = "5s"
access_log = "off"

[session]
secret_key = "{SECRET}"
{secure}
{session_extra}

[store]
clear_expired_interval = "0s"

{routes}
"#,
        secure = if session_extra.contains("cookie_secure") {
            ""
        } else {
            "cookie_secure = false"
        }
    )
}

pub fn route(upstream: &Upstream, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"app\"\nupstream = \"{}\"\n{extra}\n",
        upstream.url()
    )
}

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener, when the configuration has `[admin]`.
    pub admin: Option<SocketAddr>,
    pub clock: Clock,
    pub store: Arc<AnyStore>,
    /// What the server counts (read by `/metrics` when there is an admin listener).
    pub metrics: Arc<sessiongate::metrics::Metrics>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// Starts the real server for `toml` (parsed as `test.toml`).
pub async fn start(toml: &str) -> Proxy {
    let config = Config::parse(toml, std::path::Path::new("test.toml")).expect("valid test config");
    start_config(config).await
}

pub async fn start_config(config: Config) -> Proxy {
    start_with(config, AnyStore::Memory(MemoryStore::new())).await
}

/// Starts the server with the engine its configuration names.
pub async fn start_engine(toml: &str) -> Proxy {
    let config = Config::parse(toml, std::path::Path::new("test.toml")).expect("valid test config");
    let store = AnyStore::open(&config).await.expect("open the store");
    start_with(config, store).await
}

pub async fn start_with(config: Config, store: AnyStore) -> Proxy {
    start_workers(config, store, 1).await
}

/// Starts the server with its one worker on the test's own runtime, for a
/// test that blocks its thread to line up what the proxy sees next.
#[allow(dead_code)]
pub async fn start_on_this_thread(toml: &str) -> Proxy {
    let config = Config::parse(toml, std::path::Path::new("test.toml")).expect("valid test config");
    start_workers(config, AnyStore::Memory(MemoryStore::new()), 0).await
}

/// Starts the server with `workers` worker threads (0: on this runtime).
pub async fn start_workers(config: Config, store: AnyStore, workers: usize) -> Proxy {
    let clock = Clock::default();
    let store = Arc::new(store);
    let options = sessiongate::server::ServerOptions {
        workers,
        store: Some(store.clone()),
        clock: clock.clone(),
        ..Default::default()
    };
    let server = Server::bind(config, options).await.expect("bind");
    let addr = server.local_addr();
    let admin = server.admin_addr();
    let metrics = server.metrics().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .expect("server run");
    });
    Proxy {
        addr,
        admin,
        clock,
        store,
        metrics,
        shutdown: Some(tx),
        done: Some(done),
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

/// What the client got back.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
    /// The `Set-Cookie` for `sessionid`, if any.
    pub fn session_cookie(&self) -> Option<String> {
        self.set_cookies()
            .into_iter()
            .find(|c| c.starts_with("sessionid="))
    }
    /// `name=value` of every cookie this response set and did not delete,
    /// ready for a `Cookie` header.
    pub fn cookie_jar(&self) -> String {
        self.set_cookies()
            .iter()
            .filter(|c| !c.contains("Max-Age=0"))
            .map(|c| c.split(';').next().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The new session key the response set (panics when none).
    pub fn key(&self) -> String {
        let c = self.session_cookie().expect("a session Set-Cookie");
        let v = c["sessionid=".len()..]
            .split(';')
            .next()
            .unwrap()
            .to_string();
        assert_eq!(v.len(), 32, "key shape: {c}");
        v
    }
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Got {
        let resp = self.client.request(req).await.expect("proxy answered");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// GET `path`, with the session cookie `key` when given.
    pub async fn get(&self, path: &str, key: Option<&str>) -> Got {
        self.send(
            self.req(Method::GET, path, key)
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Got {
        self.send(
            self.req(Method::POST, path, key)
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
    }

    /// A request builder aimed at the proxy.
    pub fn req(&self, method: Method, path: &str, key: Option<&str>) -> http::request::Builder {
        let mut b = Request::builder().method(method).uri(self.url(path));
        if let Some(k) = key {
            b = b.header(
                "cookie",
                HeaderValue::from_str(&format!("sessionid={k}")).unwrap(),
            );
        }
        b
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A request's `Set-Cookie` attributes as (lower-case name, value).
pub fn cookie_attrs(set_cookie: &str) -> Vec<(String, String)> {
    set_cookie
        .split(';')
        .skip(1)
        .map(|p| {
            let p = p.trim();
            match p.split_once('=') {
                Some((k, v)) => (k.to_ascii_lowercase(), v.to_string()),
                None => (p.to_ascii_lowercase(), String::new()),
            }
        })
        .collect()
}

pub fn attr(set_cookie: &str, name: &str) -> Option<String> {
    cookie_attrs(set_cookie)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}
pub mod e2e;
pub mod redis_server;
