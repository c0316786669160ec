//! https upstreams (SPEC 7): an upstream whose certificate comes from a
//! test CA works with `upstream_ca` (sessions and directives as on http,
//! SNI from the upstream's host, connections kept alive); without it (an
//! unknown issuer) or under another name it is a 502 whose log line says
//! why, counted as an upstream `connect` error, and the next upstream of
//! the route takes the request; `check` names a bad `upstream_ca` file.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use common::e2e::*;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sessiongate::config::Config;
use tokio::net::TcpListener;

/// Everything the proxy logs in this test binary, for the tests that look
/// for a log line (the server's workers run on threads of their own: a
/// global subscriber sees them).
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("sessiongate=debug")
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .init();
        buf
    })
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines(needle: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&log().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A test CA and a certificate it issued for `localhost` (only), as PEM
/// files in `dir`: `ca.pem`, `cert.pem`, `key.pem`.
fn pki(dir: &TempDir) {
    common::redis_server::pki::ca_and_leaf(dir.path(), &["localhost"]);
}

/// An HTTP/1.1 upstream over TLS with the certificate in `dir`, counting
/// the TCP connections it accepts and the handshakes that succeed.
struct TlsUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
    /// The SNI name of each successful handshake.
    sni: Arc<Mutex<Vec<Option<String>>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TlsUpstream {
    fn count(&self, c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }
}

async fn tls_upstream<F>(dir: &TempDir, f: F) -> TlsUpstream
where
    F: Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = TlsUpstream {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::default(),
        handshakes: Arc::default(),
        sni: Arc::default(),
        seen: Arc::default(),
    };
    let (accepted, handshakes, sni, seen) = (
        up.accepted.clone(),
        up.handshakes.clone(),
        up.sni.clone(),
        up.seen.clone(),
    );
    let f = Arc::new(f);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let (acceptor, handshakes, sni, seen, f) = (
                acceptor.clone(),
                handshakes.clone(),
                sni.clone(),
                seen.clone(),
                f.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let (_, session) = tls.get_ref();
                sni.lock()
                    .unwrap()
                    .push(session.server_name().map(str::to_string));
                assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (seen, f) = (seen.clone(), f.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let s = Seen {
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        };
                        seen.lock().unwrap().push(s.clone());
                        Ok::<_, Infallible>(f(&s))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    up
}

/// The proxy's configuration in `dir` (so that a relative `upstream_ca`
/// resolves there), with an admin listener for `/metrics`.
fn proxy_config(dir: &TempDir, route: &str) -> Config {
    let text = config_with(
        "",
        "",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\nname = \"app\"\n{route}\n"),
    );
    Config::parse(&text, &dir.join("sessiongate.toml")).expect("valid config")
}

async fn metric_line(admin: SocketAddr, prefix: &str, has: &str) -> Option<String> {
    let r = raw_request(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    r.text()
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(has))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_upstream_ca_carries_sessions_over_kept_alive_connections() {
    log();
    let dir = TempDir::new("https-up");
    pki(&dir);
    let up = tls_upstream(&dir, |s| match s.uri.path() {
        "/login" => directives(&[("X-Session-Update", r#"{"user": "ann"}"#)]),
        "/upload" => text(&format!("{} bytes", s.body.len())),
        "/big" => text(&"x".repeat(300_000)),
        _ => text(s.header("x-session").unwrap_or("none")),
    })
    .await;
    let config = proxy_config(
        &dir,
        &format!(
            "upstream = \"https://localhost:{}\"\nupstream_ca = \"ca.pem\"\npreserve_host = false",
            up.addr.port()
        ),
    );
    let proxy = start_config(config).await;

    let login = proxy.get("/login", None).await;
    assert_eq!(login.status, 200, "{}", login.body);
    let key = login.key();
    for _ in 0..5 {
        let me = proxy.get("/me", Some(&key)).await;
        assert_eq!(me.status, 200, "{}", me.body);
        let data: serde_json::Value = serde_json::from_str(&me.body).unwrap();
        assert_eq!(data["user"], "ann", "the upstream saw the session");
    }
    // A request body and a response body larger than a TLS record (16 KiB)
    // and than a socket buffer, both ways over the same connection.
    let body = "y".repeat(500_000);
    let got = proxy.post("/upload", Some(&key), &body).await;
    assert_eq!(
        (got.status.as_u16(), got.body.as_str()),
        (200, "500000 bytes")
    );
    let got = proxy.get("/big", Some(&key)).await;
    assert_eq!((got.status.as_u16(), got.body.len()), (200, 300_000));
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 8);
    assert_eq!(
        seen[0].header("host"),
        Some(format!("localhost:{}", up.addr.port()).as_str()),
        "preserve_host = false: the upstream's own Host"
    );
    // Eight requests, one after another: one connection, one handshake.
    assert_eq!(up.count(&up.accepted), 1, "connections accepted");
    assert_eq!(up.count(&up.handshakes), 1, "TLS handshakes");
    assert_eq!(
        up.sni.lock().unwrap().as_slice(),
        [Some("localhost".to_string())],
        "SNI is the upstream's host"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_a_502_that_the_log_explains_and_the_metrics_count_as_connect() {
    log();
    let dir = TempDir::new("https-up");
    pki(&dir);
    let up = tls_upstream(&dir, |_| ok()).await;
    // No upstream_ca: the test CA is in no system store.
    let config = proxy_config(
        &dir,
        &format!("upstream = \"https://localhost:{}\"", up.addr.port()),
    );
    let proxy = start_config(config).await;
    let got = proxy.get("/unknown-ca", None).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.body, "the upstream's TLS certificate was refused\n");
    assert_eq!(up.count(&up.handshakes), 0);
    assert!(up.seen.lock().unwrap().is_empty(), "nothing was forwarded");
    let lines = log_lines("the upstream's TLS certificate was refused");
    assert!(
        lines.iter().any(|l| l.contains("UnknownIssuer")),
        "the log names rustls's reason: {lines:#?}"
    );
    let admin = proxy.admin.expect("admin listener");
    let line = metric_line(
        admin,
        "sessiongate_upstream_errors_total{route=\"app\"",
        "kind=\"connect\"",
    )
    .await
    .expect("upstream connect errors exposed");
    assert!(line.ends_with(" 1"), "{line}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_mismatch_is_a_502_and_the_next_upstream_takes_the_request() {
    log();
    let dir = TempDir::new("https-up");
    pki(&dir);
    let up = tls_upstream(&dir, |_| text("from the upstream")).await;
    let port = up.addr.port();
    // The certificate names localhost, not 127.0.0.1.
    let mismatch = proxy_config(
        &dir,
        &format!("upstream = \"https://127.0.0.1:{port}\"\nupstream_ca = \"ca.pem\""),
    );
    let proxy = start_config(mismatch).await;
    let got = proxy.get("/mismatch", None).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.body, "the upstream's TLS certificate was refused\n");
    let lines = log_lines("the upstream's TLS certificate was refused");
    assert!(
        lines.iter().any(
            |l| l.contains("certificate not valid for name \\\"127.0.0.1\\\"")
                || l.contains("certificate not valid for name \"127.0.0.1\"")
        ),
        "the log names the mismatch: {lines:#?}"
    );
    proxy.stop().await;

    // The refused upstream is skipped as a failed one: the request goes on
    // to the next, and every request succeeds.
    let both = proxy_config(
        &dir,
        &format!(
            "upstreams = [\"https://127.0.0.1:{port}\", \"https://localhost:{port}\"]\nupstream_ca = \"ca.pem\""
        ),
    );
    let proxy = start_config(both).await;
    for _ in 0..4 {
        let got = proxy.get("/either", None).await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.body, "from the upstream");
    }
    proxy.stop().await;
}

#[test]
fn check_names_a_bad_upstream_ca_file() {
    let dir = TempDir::new("https-up-check");
    pki(&dir);
    dir.write("garbage.pem", "hello\n");
    let run = |ca: &str| {
        let text = config_with(
            "",
            "",
            &format!("[[route]]\nname = \"app\"\nupstream = \"https://localhost:9443\"\nupstream_ca = \"{ca}\"\n"),
        );
        let path = dir.write("sessiongate.toml", &text);
        Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .expect("run sessiongate check")
    };
    let good = run("ca.pem");
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    for (ca, what) in [
        ("missing.pem", "cannot read"),
        ("garbage.pem", "not a PEM certificate"),
    ] {
        let out = run(ca);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{ca}: {err}");
        assert!(
            err.contains("route \"app\": upstream_ca: ") && err.contains(ca) && err.contains(what),
            "{ca}: {err}"
        );
    }
}

/// A TLS upstream that switches every request to WebSocket and echoes.
async fn tls_echo_upgrade_upstream(dir: &TempDir) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut io = TokioIo::new(on.await.unwrap());
                        let mut buf = [0u8; 64];
                        loop {
                            let n = io.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            io.write_all(&buf[..n]).await.unwrap();
                        }
                    });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .body(Full::<Bytes>::default())
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_goes_over_tls_to_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    log();
    let dir = TempDir::new("https-up-ws");
    pki(&dir);
    let up = tls_echo_upgrade_upstream(&dir).await;
    let config = proxy_config(
        &dir,
        &format!(
            "upstream = \"https://localhost:{}\"\nupstream_ca = \"ca.pem\"",
            up.port()
        ),
    );
    let proxy = start_config(config).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    within("the 101", async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed in the head");
            head.push(b[0]);
        }
    })
    .await;
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("the echo", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    proxy.stop().await;
}
