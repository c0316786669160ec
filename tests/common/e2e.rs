//! Helpers for the end-to-end tests of the proxy path, TLS and the CLI:
//! bounded waits, a gate to hold an upstream, channel-backed bodies, an
//! upstream that sees the raw `Incoming` body, a raw HTTP/1.1 client and
//! unique temporary directories.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// The bound for every wait in these tests: a hang fails instead of blocking.
pub const LIMIT: Duration = Duration::from_secs(15);

/// Awaits `f`, failing the test when it takes longer than [`LIMIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {LIMIT:?} waiting for: {what}"),
    }
}

/// Asserts the SPEC 6 shape of an error body: one line of text.
pub fn assert_one_line(body: &str) {
    assert!(
        body.ends_with('\n') && !body[..body.len() - 1].contains(['\n', '\r']),
        "error body is not a single line: {body:?}"
    );
    assert!(body.trim().len() > 3, "error body says nothing: {body:?}");
}

/// A gate an upstream handler waits on until the test opens it.
#[derive(Clone)]
pub struct Gate {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            tx: std::sync::Arc::new(watch::channel(false).0),
        }
    }
}

impl Gate {
    pub fn open(&self) {
        self.tx.send_replace(true);
    }
    /// Resolves once the gate is open (at once if it already is).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// A request or response body fed by the test, chunk by chunk. It ends when
/// the sender is dropped.
pub struct ChanBody {
    rx: mpsc::Receiver<Bytes>,
}

pub fn chan_body() -> (mpsc::Sender<Bytes>, ChanBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChanBody { rx })
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// A pooled HTTP/1.1 client for any body type.
pub fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// An upstream on port 0 whose handler gets the request with its body
/// still streaming (the harness's `upstream` collects whole bodies).
pub async fn streaming_upstream<F, Fut, B>(f: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An address nothing listens on: bound on port 0, then closed.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Waits until a new TCP connection to `addr` is refused (the listener is
/// closed). There is no event to wait on from outside the server, so this
/// retries, bounded by [`LIMIT`].
pub async fn wait_refused(addr: SocketAddr) {
    within("new connections to be refused", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                // Queued in the backlog of a listener being closed.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("unexpected connect error: {e}"),
                Ok(s) => {
                    drop(s);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` (bytes as given) on a new connection and reads one response.
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    within("a raw HTTP/1.1 exchange", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        read_response(&mut s).await
    })
    .await
}

/// Reads one HTTP/1.1 response (Content-Length, chunked, or to EOF).
pub async fn read_response<R: AsyncRead + Unpin>(r: R) -> RawResponse {
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').expect("header line");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                // Trailers (none expected) and the final CRLF.
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await.unwrap();
            resp.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = resp.header("content-length") {
        let mut body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut body).await.unwrap();
        resp.body = body;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut resp.body).await.unwrap();
    }
    resp
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "sessiongate-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    /// Writes `text` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Full configuration text on plain HTTP, port 0, with extra `[server]`
/// and `[session]` lines (keys not set here) and the given routes.
pub fn config_with(server_extra: &str, session_extra: &str, routes: &str) -> String {
    let has = |k: &str| server_extra.lines().any(|l| l.trim_start().starts_with(k));
    let mut server = String::new();
    for (k, v) in [
        ("upstream_connect_timeout", "\"2s\""),
        ("upstream_timeout", "\"10s\""),
        ("shutdown_grace", "\"5s\""),
        ("access_log", "\"off\""),
    ] {
        if !has(k) {
            server.push_str(&format!("{k} = {v}\n"));
        }
    }
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = false
{server}{server_extra}

[session]
secret_key = "{secret}"
cookie_secure = false
{session_extra}

[store]
clear_expired_interval = "0s"

{routes}
"#,
        secret = super::SECRET
    )
}
