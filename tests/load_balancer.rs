//! Behind a load balancer (SPEC 7.4): `trusted_proxies` (real-IP
//! recursive) and the PROXY protocol v1/v2 decide the client address that
//! the upstream gets in `X-Forwarded-For` and the access log shows.

mod common;

use std::net::SocketAddr;

use common::e2e::*;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy with a JSON access log in `dir` and these `[server]` lines.
async fn start_logged(dir: &TempDir, up: &Upstream, server_extra: &str) -> Proxy {
    let log = dir.join("access.log");
    let toml = config_with(
        &format!(
            "access_log = \"{}\"\naccess_log_format = \"json\"\n{server_extra}",
            log.display()
        ),
        "",
        &route(up, ""),
    );
    start(&toml).await
}

/// The access log's lines (after the proxy stopped: every line written).
fn log_lines(dir: &TempDir) -> Vec<Value> {
    std::fs::read_to_string(dir.join("access.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn get_with(addr: SocketAddr, extra: &str) -> String {
    let _ = addr;
    format!("GET /who HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n")
}

#[tokio::test]
async fn an_untrusted_peer_cannot_choose_its_address() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("lb");
    let p = start_logged(&dir, &up, "").await;
    let r = raw_request(
        p.addr,
        &get_with(
            p.addr,
            "X-Forwarded-For: 203.0.113.5\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.test"));
    p.stop().await;
    assert_eq!(log_lines(&dir)[0]["remote_addr"], "127.0.0.1");
}

#[tokio::test]
async fn a_trusted_peer_passes_the_client_address_on() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("lb");
    let p = start_logged(
        &dir,
        &up,
        "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n",
    )
    .await;
    // Rightmost untrusted: 10.0.0.2 is a trusted hop, 203.0.113.5 the client,
    // 198.51.100.1 whatever the client claimed.
    let r = raw_request(
        p.addr,
        &get_with(
            p.addr,
            "X-Forwarded-For: 198.51.100.1, 203.0.113.5\r\nX-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.1, 203.0.113.5, 10.0.0.2, 127.0.0.1"),
        "the peer is appended"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
    // Every hop trusted: the leftmost.
    let r = raw_request(p.addr, &get_with(p.addr, "X-Forwarded-For: 10.1.1.1\r\n")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.last().header("x-forwarded-for"),
        Some("10.1.1.1, 127.0.0.1")
    );
    assert_eq!(up.last().header("x-forwarded-proto"), Some("http"));
    // No header: the peer itself.
    let r = raw_request(p.addr, &get_with(p.addr, "")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("127.0.0.1"));
    p.stop().await;
    let lines = log_lines(&dir);
    let addrs: Vec<&str> = lines
        .iter()
        .map(|l| l["remote_addr"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["203.0.113.5", "10.1.1.1", "127.0.0.1"]);
}

/// Sends `header` then a request on one connection; the response, or
/// `None` when the proxy closed the connection without one.
async fn send_after(addr: SocketAddr, header: &[u8]) -> Option<RawResponse> {
    within("an exchange after a PROXY header", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(get_with(addr, "X-Forwarded-For: 6.6.6.6\r\n").as_bytes());
        if s.write_all(&bytes).await.is_err() {
            return None;
        }
        let mut first = [0u8; 1];
        match s.peek(&mut first).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(read_response(&mut s).await),
        }
    })
    .await
}

#[tokio::test]
async fn the_proxy_protocol_gives_the_client_address() {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("lb");
    let p = start_logged(&dir, &up, "proxy_protocol = true\n").await;

    let v1 = send_after(p.addr, b"PROXY TCP4 192.0.2.10 127.0.0.1 5555 80\r\n").await;
    assert_eq!(v1.expect("served").status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("192.0.2.10"));

    let src: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let v2 = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
        .build()
        .unwrap();
    assert_eq!(send_after(p.addr, &v2).await.expect("served").status, 200);
    assert_eq!(up.last().header("x-forwarded-for"), Some("2001:db8::7"));

    // LOCAL (the balancer's own health check): the real peer.
    let local = Builder::new(Version::Two | Command::Local, 0)
        .build()
        .unwrap();
    assert_eq!(
        send_after(p.addr, &local).await.expect("served").status,
        200
    );
    assert_eq!(up.last().header("x-forwarded-for"), Some("127.0.0.1"));

    // No header, or a broken one: closed before anything is forwarded.
    let before = up.count();
    assert!(send_after(p.addr, b"").await.is_none());
    assert!(send_after(p.addr, b"PROXY TCP4 not an address\r\n")
        .await
        .is_none());
    assert_eq!(up.count(), before);

    p.stop().await;
    let addrs: Vec<String> = log_lines(&dir)
        .iter()
        .map(|l| l["remote_addr"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(addrs, ["192.0.2.10", "2001:db8::7", "127.0.0.1"]);
}

#[tokio::test]
async fn a_proxy_protocol_listener_drops_a_connection_that_sends_nothing_valid() {
    let up = upstream(|_| ok()).await;
    let p = start(&config_with("proxy_protocol = true\n", "", &route(&up, ""))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = within("the connection to close", s.read_to_end(&mut buf)).await;
    assert!(
        n.is_err() || buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(up.count(), 0);
    p.stop().await;
}
