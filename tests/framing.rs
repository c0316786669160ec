//! Bytes and framing end to end (SPEC 3.1): a raw-socket client in front of
//! the real server, a raw TCP upstream behind it, so both sides see exactly
//! the bytes that crossed the wire.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::e2e::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An upstream that answers every request with `answer` (as given, then
/// closes) and keeps each request head it read, as bytes.
async fn raw_upstream(answer: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                seen.lock().unwrap().push(buf[..end + 4].to_vec());
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, heads)
}

async fn proxy_to(addr: SocketAddr) -> Proxy {
    start(&config(
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\nsession = false\n"),
    ))
    .await
}

/// The request line the upstream got, as bytes.
fn request_line(heads: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
    let heads = heads.lock().unwrap();
    let head = heads.last().expect("the upstream got a request");
    head[..head.windows(2).position(|w| w == b"\r\n").unwrap()].to_vec()
}

#[tokio::test]
async fn raw_utf8_in_a_path_reaches_the_upstream_byte_for_byte() {
    let (addr, heads) = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = proxy_to(addr).await;
    for (sent, forwarded) in [
        // Normalised (the slashes merged, the dot segments resolved), the
        // UTF-8 bytes of "é" and "日本" untouched.
        ("/café//x", "/café/x"),
        ("/a/./日本/../ü/%61%2f?q=é", "/a/ü/a%2F?q=é"),
        ("/%C3%A9//é", "/%C3%A9/é"),
    ] {
        let r = raw_request(
            p.addr,
            &format!("GET {sent} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 200, "{sent}: {}", r.text());
        assert_eq!(
            String::from_utf8_lossy(&request_line(&heads)),
            format!("GET {forwarded} HTTP/1.1"),
            "{sent}"
        );
    }
    p.stop().await;
}

#[tokio::test]
async fn a_response_coded_other_than_chunked_alone_is_a_502_that_says_so() {
    for (answer, coding) in [
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n"[..],
            "gzip, chunked",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n8\r\n3\r\nabc\r\n\r\n0\r\n\r\n",
            "chunked, chunked",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nabc",
            "identity",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "gzip, chunked",
        ),
    ] {
        let (addr, _) = raw_upstream(answer).await;
        let p = proxy_to(addr).await;
        let r = raw_request(p.addr, "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let body = r.text();
        assert_eq!(r.status, 502, "{coding}: {body}");
        assert_one_line(&body);
        assert!(
            body.contains("Transfer-Encoding") && body.contains(coding),
            "{coding}: {body:?}"
        );
        p.stop().await;
    }
    // A single chunked coding (listed with empty elements) still passes.
    let (addr, _) = raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    let p = proxy_to(addr).await;
    let r = raw_request(
        p.addr,
        "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "abc"));
    p.stop().await;
}
