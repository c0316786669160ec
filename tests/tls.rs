//! End-to-end TLS (SPEC 2 `[server]`): ALPN `h2` and `http/1.1` on one port,
//! HSTS, `X-Forwarded-Proto: https`, and the plain-HTTP redirect listener,
//! with a self-signed certificate generated at run time.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::e2e::*;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use sessiongate::config::Config;
use sessiongate::server::ServerOptions;
use sessiongate::store::{AnyStore, MemoryStore};
use sessiongate::Server;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A certificate for `localhost` written as PEM files in a fresh directory.
struct Certs {
    dir: TempDir,
    der: CertificateDer<'static>,
}

fn certs() -> Certs {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = TempDir::new("tls");
    dir.write("cert.pem", &ck.cert.pem());
    dir.write("key.pem", &ck.signing_key.serialize_pem());
    Certs {
        dir,
        der: ck.cert.der().clone(),
    }
}

/// TLS configuration text for one route to `up`.
fn tls_config(certs: &Certs, up: &Upstream, server_extra: &str) -> Config {
    let access_log = if server_extra.contains("access_log") {
        ""
    } else {
        "access_log = \"off\""
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = true
cert = "cert.pem"
key = "key.pem"
hsts = "1d"
upstream_timeout = "10s"
shutdown_grace = "5s"
{access_log}
{server_extra}

[session]
secret_key = "{SECRET}"

[store]
clear_expired_interval = "0s"

[[route]]
name = "app"
upstream = "{}"
"#,
        up.url()
    );
    // Relative cert and key paths resolve against the config file's directory.
    Config::parse(&text, &certs.dir.join("sessiongate.toml")).expect("valid TLS config")
}

async fn connect(addr: SocketAddr, certs: &Certs, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    within(
        "the TLS handshake",
        TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("TLS handshake with the generated certificate")
}

fn alpn(s: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    s.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

fn assert_served_over_tls(resp: &http::Response<hyper::body::Incoming>, up: &Upstream) {
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("strict-transport-security")
            .and_then(|v| v.to_str().ok()),
        Some("max-age=86400")
    );
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn h2_is_negotiated_and_serves_with_hsts() {
    let certs = certs();
    let up = upstream(|_| text("over h2")).await;
    let p = start_config(tls_config(&certs, &up, "")).await;

    let tls = connect(p.addr, &certs, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/h2", p.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within("the h2 response", send.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_served_over_tls(&resp, &up);
    assert_eq!(up.last().uri.path(), "/h2");
    let body = within("the body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"over h2");
    p.stop().await;
}

#[tokio::test]
async fn http1_is_negotiated_when_only_http1_is_offered() {
    let certs = certs();
    let up = upstream(|_| text("over http/1.1")).await;
    let p = start_config(tls_config(&certs, &up, "")).await;

    let tls = connect(p.addr, &certs, &[b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/h1")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = within("the http/1.1 response", send.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_served_over_tls(&resp, &up);
    assert_eq!(up.last().header("x-forwarded-host"), Some("localhost"));
    let body = within("the body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"over http/1.1");
    p.stop().await;
}

#[tokio::test]
async fn redirect_listener_answers_308_to_https() {
    let certs = certs();
    let up = upstream(|_| ok()).await;
    let config = tls_config(&certs, &up, "redirect_http = \"127.0.0.1:0\"");
    let store = Arc::new(AnyStore::Memory(MemoryStore::new()));
    let server = Server::bind(config, ServerOptions::with_store(store))
        .await
        .expect("bind");
    let tls_port = server.local_addr().port();
    let redirect = server.redirect_addr().expect("a redirect listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let r = raw_request(
        redirect,
        "GET /x?y=1 HTTP/1.1\r\nHost: example.com\r\nCookie: sessionid=abcdefghijklmnopqrstuvwxyz012345\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 308, "{r:?}");
    let want = format!("https://example.com:{tls_port}/x?y=1");
    assert_eq!(r.header("location"), Some(want.as_str()));
    assert!(r.header("set-cookie").is_none(), "{r:?}");
    // An absolute-form target: its authority wins over Host; an empty
    // path is "/".
    for (target, want) in [
        (
            "http://other.test/abs?x",
            format!("https://other.test:{tls_port}/abs?x"),
        ),
        (
            "http://other.test?x",
            format!("https://other.test:{tls_port}/?x"),
        ),
    ] {
        let r = raw_request(
            redirect,
            &format!("GET {target} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 308, "{target}");
        assert_eq!(r.header("location"), Some(want.as_str()), "{target}");
    }
    // `OPTIONS *` names nothing to move.
    let r = raw_request(
        redirect,
        "OPTIONS * HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(up.count(), 0, "a redirect never reaches the upstream");

    let _ = stop.send(());
    within("the server to stop", done)
        .await
        .unwrap()
        .expect("server run");
}

#[tokio::test]
async fn a_client_silent_in_its_tls_handshake_does_not_hold_the_shutdown() {
    let certs = certs();
    let up = upstream(|_| ok()).await;
    // Both far longer than the test's bound: waiting on the handshake
    // instead of dropping it would fail it.
    let mut config = tls_config(&certs, &up, "header_read_timeout = \"60s\"");
    config.server.shutdown_grace = std::time::Duration::from_secs(60);
    let store = Arc::new(AnyStore::Memory(MemoryStore::new()));
    let server = Server::bind(config, ServerOptions::with_store(store))
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    // Connected, never says a word; and a connection whose handshake is
    // done (idle: closed at once by the drain), which shows the server runs.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let _idle = connect(addr, &certs, &[b"http/1.1"]).await;
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(10), done)
        .await
        .expect("the server stops without waiting on the silent handshake")
        .unwrap()
        .unwrap();
}

/// Plain HTTP sent to the TLS port gets a readable 400, as nginx answers,
/// not a failed handshake; TLS still works on the same port after it.
#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_readable_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = certs();
    let up = upstream(|_| text("over tls")).await;
    let log = certs.dir.join("plain-http-access.log");
    let p = start_config(tls_config(
        &certs,
        &up,
        &format!("access_log = {:?}", log.display().to_string()),
    ))
    .await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"GET /plain?q=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: agent-x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("the 400", c.read_to_end(&mut answer)).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(
            "\r\n\r\nthis port speaks HTTPS: use https:// in the address, not http://\n"
        ),
        "{answer}"
    );
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    let tls = connect(p.addr, &certs, &[b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
    p.stop().await;
    // Logged as every answered request is (nginx logs its 400 too).
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("\"GET /plain HTTP/1.1\" 400 65 \"-\" \"agent-x\""),
        "{text}"
    );
}

/// SPEC 3.1 over TLS: a final transfer coding other than `chunked` is a
/// `501` naming it (not hyper's `400`), and nothing is forwarded.
#[tokio::test]
async fn a_request_coded_identity_over_tls_is_a_501() {
    use tokio::io::AsyncWriteExt;
    let certs = certs();
    let up = upstream(|_| ok()).await;
    let p = start_config(tls_config(&certs, &up, "")).await;
    let mut tls = connect(p.addr, &certs, &[b"http/1.1"]).await;
    tls.write_all(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: identity\r\n\r\nhello",
    )
    .await
    .unwrap();
    let r = within("the answer", read_response(&mut tls)).await;
    assert_eq!(r.status, 501, "{}", r.text());
    assert!(r.text().contains("identity"), "{}", r.text());
    assert_one_line(&r.text());
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    p.stop().await;
}

/// SPEC 2 `hsts`: Strict-Transport-Security on TLS responses, those the
/// connection layer answers before any route included (a malformed head,
/// a head over 64 KiB, a transfer coding the proxy does not take).
#[tokio::test]
async fn refused_heads_over_tls_carry_hsts_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = certs();
    let up = upstream(|_| text("never")).await;
    let p = start_config(tls_config(&certs, &up, "")).await;
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    for (head, status) in [
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
            "400",
        ),
        (big.as_str(), "431"),
        (
            "POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n",
            "501",
        ),
    ] {
        let mut tls = connect(p.addr, &certs, &[b"http/1.1"]).await;
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = within("the answer", tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(text.starts_with(&format!("http/1.1 {status} ")), "{text}");
        assert!(
            text.contains("\r\nstrict-transport-security: max-age=86400\r\n"),
            "{text}"
        );
    }
    assert_eq!(up.count(), 0);
    p.stop().await;
}
