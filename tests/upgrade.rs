//! A real HTTP/1.1 upgrade (WebSocket) passes through the proxy:
//! `Upgrade`/`Connection: upgrade` reach the upstream, its 101 reaches the
//! client, and bytes then flow both ways.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that accepts `Upgrade: websocket` and then echoes every byte.
async fn echo_upgrade_upstream() -> std::net::SocketAddr {
    echo_upgrade_upstream_at(None).await
}

/// The same, switching protocols only for requests to `path` when given.
async fn echo_upgrade_upstream_at(path: Option<&'static str>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let asked = path.is_none_or(|p| req.uri().path() == p)
                        && req
                            .headers()
                            .get("upgrade")
                            .is_some_and(|v| v == "websocket")
                        && req.headers().get("connection").is_some_and(|v| {
                            v.to_str().unwrap().to_ascii_lowercase().contains("upgrade")
                        });
                    if !asked {
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"plain",
                        ))));
                    }
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let io = on.await.unwrap();
                        let mut io = TokioIo::new(io);
                        let mut buf = [0u8; 64];
                        loop {
                            let n = io.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            io.write_all(&buf[..n]).await.unwrap();
                        }
                    });
                    Ok(Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .body(Full::default())
                        .unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed in the head"
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Asks the proxy to upgrade `path` to WebSocket (the upstream echoes), checks the 101
/// and one echoed message, and returns the 101's head.
async fn upgrade_and_echo(p: &common::Proxy, path: &str) -> String {
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut s))
        .await
        .expect("101 in time");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");
    head
}

#[tokio::test]
async fn upgrade_passes_through_on_session_and_plain_routes() {
    let up = echo_upgrade_upstream().await;
    for session in [true, false] {
        let routes = format!("[[route]]\nupstream = \"http://{up}\"\nsession = {session}\n");
        let p = common::start(&common::config("", &routes)).await;
        let head = upgrade_and_echo(&p, "/ws").await;
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("upgrade: websocket"), "{head}");
        assert!(lower.contains("connection: upgrade"), "{head}");
        p.stop().await;
    }
}

#[tokio::test]
async fn upgrade_fails_over_to_the_next_upstream_and_its_path() {
    let dead = common::e2e::dead_addr().await;
    let up = echo_upgrade_upstream_at(Some("/base/ws")).await;
    let routes = format!(
        "[[route]]\npath = \"/chat\"\nstrip_prefix = true\nupstreams = [\"http://{dead}\", \"http://{up}/base\"]\n"
    );
    let p = common::start(&common::config("", &routes)).await;
    // The route's first request tries the dead upstream first.
    upgrade_and_echo(&p, "/chat/ws").await;
    p.stop().await;
}

/// README (known gaps): an upgraded connection gives its `max_connections`
/// slot back when the tunnel starts, so open WebSockets do not lock other
/// clients out (before, the tunnel held the slot until it closed).
#[tokio::test]
async fn a_tunnel_gives_back_its_connection_slot() {
    let up = echo_upgrade_upstream().await;
    let routes = format!("[[route]]\nupstream = \"http://{up}\"\n");
    let toml = common::config("", &routes).replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nmax_connections = 1",
    );
    assert!(toml.contains("max_connections = 1"), "{toml}");
    let p = common::start(&toml).await;
    let mut ws = TcpStream::connect(p.addr).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
    )
    .await
    .unwrap();
    let head = common::e2e::within("the 101", read_head(&mut ws)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The tunnel stays open; another client is served.
    let r = common::e2e::within(
        "a second client, with the tunnel open",
        common::e2e::raw_request(
            p.addr,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        ),
    )
    .await;
    assert!(r.status > 0);
    drop(ws);
    p.stop().await;
}
