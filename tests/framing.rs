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

/// SPEC 3.1: a request transfer coding other than one `chunked` is a `501`
/// that names it, whatever the coding (hyper's own parser would answer
/// `400` to a final coding other than `chunked`), on a connection's first
/// request and after a keep-alive one alike, and nothing is forwarded. The
/// client reads the answer although it sent a body after the head.
#[tokio::test]
async fn a_request_coded_other_than_chunked_is_a_501_naming_the_coding() {
    let (addr, heads) = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = proxy_to(addr).await;
    for (te, named) in [
        ("identity", "identity"),
        ("Identity", "Identity"),
        ("gzip", "gzip"),
        ("chunked, gzip", "gzip"),
        ("gzip, chunked", "gzip"),
        ("chunked\r\nTransfer-Encoding: identity", "identity"),
    ] {
        let r = raw_request(
            p.addr,
            &format!("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\nhello"),
        )
        .await;
        let body = r.text();
        assert_eq!(r.status, 501, "Transfer-Encoding: {te}: {body}");
        assert_one_line(&body);
        assert!(body.contains(named), "{te}: {body:?}");
        if !te.ends_with("chunked") {
            // Answered before hyper parsed the head: the connection ends.
            assert_eq!(r.header("connection"), Some("close"), "{te}");
        }
    }
    assert!(heads.lock().unwrap().is_empty(), "a request was forwarded");

    // The second request of a keep-alive connection.
    within("two requests on one connection", async {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (rd, mut wr) = s.split();
        let mut rd = tokio::io::BufReader::new(rd);
        let first = read_response(&mut rd).await;
        assert_eq!((first.status, first.text().as_str()), (200, "ok"));
        wr.write_all(b"PUT /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nabc")
            .await
            .unwrap();
        let second = read_response(&mut rd).await;
        assert_eq!(second.status, 501, "{}", second.text());
        assert!(second.text().contains("identity"), "{}", second.text());
        // And the connection ends.
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    })
    .await;
    assert_eq!(heads.lock().unwrap().len(), 1, "only the GET was forwarded");

    // HTTP/1.0 with a coding is faulty framing (RFC 9112 6.1): 400.
    let r = raw_request(
        p.addr,
        "POST /x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nhello",
    )
    .await;
    assert_eq!(r.status, 400);
    // One chunked still passes.
    let r = raw_request(
        p.addr,
        "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    p.stop().await;
}

/// HTTP/2 has no transfer codings: a `transfer-encoding` field makes the
/// request malformed (RFC 9113 8.2.2), reset with PROTOCOL_ERROR by the
/// HTTP/2 layer before the proxy sees it, and never forwarded.
#[tokio::test]
async fn an_h2_request_with_transfer_encoding_is_reset_and_not_forwarded() {
    let (addr, heads) = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = proxy_to(addr).await;
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK: :method GET, :scheme http, :path /, then literal fields
    // without indexing (new names).
    let mut block = vec![0x82, 0x86, 0x84];
    for (n, v) in [(":authority", "x"), ("transfer-encoding", "identity")] {
        block.push(0x00);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x5, 1, &block));
    let reset = within("the stream reset", async {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&out).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // Frames so far: the first RST_STREAM (or GOAWAY) on stream 1 or 0.
            let mut at = 0;
            while buf.len() >= at + 9 {
                let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
                if buf.len() < at + 9 + len {
                    break;
                }
                let kind = buf[at + 3];
                let payload = &buf[at + 9..at + 9 + len];
                if kind == 0x3 || kind == 0x7 || kind == 0x1 {
                    return (kind, payload.to_vec());
                }
                at += 9 + len;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed without a reset");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let (kind, payload) = reset;
    assert_eq!(kind, 0x3, "RST_STREAM, not {kind} {payload:?}");
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        1,
        "PROTOCOL_ERROR"
    );
    assert!(
        heads.lock().unwrap().is_empty(),
        "the request was forwarded"
    );
    p.stop().await;
}

/// The upstream's reason phrase reaches the client as nginx passes it:
/// `499 Client Closed Request` was `499 <none>`, `200 Fine` was `200 OK`;
/// on the server's own HTTP/1.1 path (a GET) and on hyper's (a POST).
#[tokio::test]
async fn the_upstreams_reason_phrase_is_passed_on() {
    for (answer, line) in [
        (
            &b"HTTP/1.1 499 Client Closed Request\r\nContent-Length: 0\r\n\r\n"[..],
            "HTTP/1.1 499 Client Closed Request",
        ),
        (
            b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 Fine",
        ),
        (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        // No phrase, or one that is not text: the standard one.
        (
            b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            b"HTTP/1.1 403 Verboten \xff\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 403 Forbidden",
        ),
    ] {
        let (addr, _) = raw_upstream(answer).await;
        let p = proxy_to(addr).await;
        for req in [
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        ] {
            let got = within("the answer", async {
                let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.unwrap();
                out
            })
            .await;
            let text = String::from_utf8_lossy(&got);
            assert_eq!(text.lines().next(), Some(line), "{req:?}: {text}");
        }
        p.stop().await;
    }
}
