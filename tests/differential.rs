//! The same raw upstream bytes read by hyper's HTTP/1.1 client and by the
//! project's client (through the real proxy, end to end): status, body,
//! trailers and whether it failed (before the head or in the body) are
//! compared case by case. Where the two differ by design, the table says
//! what each does and why; every other case must agree.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::e2e::*;
use common::*;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a client made of a response.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// A whole response: status, body, trailer fields (name: value, in order).
    Whole(u16, Vec<u8>, Vec<(String, String)>),
    /// No response: the head could not be read (through the proxy: its 502).
    HeadError,
    /// The head came, the body broke off.
    BodyError(u16),
    /// Through the proxy: the connection closed with no response at all.
    /// hyper's server writes the head with the first piece of the body, so
    /// a body that breaks off at once may take the head with it; the client
    /// sees a failed exchange either way, never a short body as whole.
    Closed,
}

impl Outcome {
    /// Whether `ours` is what the project should give when `want` is
    /// expected (the two ways a broken body can reach a client count alike).
    fn matches(&self, want: &Outcome) -> bool {
        match (self, want) {
            (Closed, BodyError(_)) => true,
            (a, b) => a == b,
        }
    }
}

use Outcome::*;

/// An upstream that answers each connection's request head with `bytes`,
/// then closes the connection.
async fn upstream(bytes: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
                // Wait for the peer to close, so nothing it still sends
                // makes the kernel reset what was written.
                while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn trailer_list(t: &HeaderMap) -> Vec<(String, String)> {
    t.iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect()
}

/// One GET with hyper's HTTP/1.1 client on a new connection to `addr`.
async fn hyper_get(addr: SocketAddr) -> Outcome {
    match hyper_get_text(addr).await.0 {
        Closed => HeadError,
        o => o,
    }
}

async fn hyper_get_text(addr: SocketAddr) -> (Outcome, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/x").header("host", "x");
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).unwrap());
    outcome(resp.await).await
}

/// What a response (or the failure to get one) amounts to, and its body
/// as text.
async fn outcome(
    resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> (Outcome, String) {
    let Ok(resp) = resp else {
        return (Closed, String::new());
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let (mut data, mut trailers) = (Vec::new(), Vec::new());
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) if f.is_data() => data.extend_from_slice(f.data_ref().unwrap()),
            Ok(f) => trailers.extend(trailer_list(f.trailers_ref().unwrap())),
            Err(_) => return (BodyError(status), String::new()),
        }
    }
    let text = String::from_utf8_lossy(&data).into_owned();
    (Whole(status, data, trailers), text)
}

/// The same GET through the proxy, over HTTP/1.1. Its 502 with an
/// upstream error line is the project's client failing on the head. With
/// `trailers`, a whole response is asked for again over HTTP/2 (prior
/// knowledge) for its trailer fields: over HTTP/1.1 hyper's server sends
/// only trailers a `Trailer` field declared, and `Trailer` is hop-by-hop
/// (SPEC 3.1), so an HTTP/1.1 client of the proxy never gets any.
async fn proxy_get(proxy: &Proxy, trailers: bool) -> Outcome {
    let (status, body) = match hyper_get_text(proxy.addr).await {
        (Whole(502, _, _), text) if text.starts_with("upstream") => {
            assert_one_line(&text);
            return HeadError;
        }
        (Whole(status, body, t), _) => {
            assert_eq!(t, Vec::new(), "trailers over HTTP/1.1");
            if !trailers {
                return Whole(status, body, t);
            }
            (status, body)
        }
        (o, _) => return o,
    };
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://x/x").body(Empty::<Bytes>::new());
    match outcome(send.send_request(req.unwrap()).await).await.0 {
        Whole(s2, b2, trailers) if (s2, &b2) == (status, &body) => Whole(status, body, trailers),
        other => panic!("over HTTP/2: {other:?}, over HTTP/1.1: {status} {body:?}"),
    }
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// What hyper's client gives.
    hyper: Outcome,
    /// What the project gives, when it differs by design (and why).
    ours: Option<(Outcome, &'static str)>,
}

fn ok(status: u16, body: &str) -> Outcome {
    Whole(status, body.as_bytes().to_vec(), Vec::new())
}

fn cases() -> Vec<Case> {
    let case = |name, bytes: &[u8], hyper| Case {
        name,
        bytes: bytes.to_vec(),
        hyper,
        ours: None,
    };
    let differs = |name, bytes: &[u8], hyper, ours, why| Case {
        name,
        bytes: bytes.to_vec(),
        hyper,
        ours: Some((ours, why)),
    };
    let big = |n: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
            "a".repeat(n)
        )
        .into_bytes()
    };
    vec![
        case(
            "content-length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            ok(200, "hello"),
        ),
        case(
            "content-length as a list of one value",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
            ok(200, "hello"),
        ),
        case(
            "chunked with extensions and a trailer",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n\
              5;a=b\r\nhello\r\n6 ; q=\"x y\"\r\n world\r\n0;end\r\nx-t: 1\r\n\r\n",
            Whole(200, b"hello world".to_vec(), vec![("x-t".into(), "1".into())]),
        ),
        case(
            "chunked, upper-case size, leading zeros",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n000A\r\n0123456789\r\n00\r\n\r\n",
            ok(200, "0123456789"),
        ),
        case(
            "close-delimited",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            ok(200, "until the end"),
        ),
        case(
            "HTTP/1.0 close-delimited",
            b"HTTP/1.0 200 OK\r\n\r\nold",
            ok(200, "old"),
        ),
        case(
            "1xx before the final response",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n\
              HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            ok(201, "ok"),
        ),
        case(
            "204 with a Content-Length has no body",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            ok(204, ""),
        ),
        case(
            "Transfer-Encoding and Content-Length: chunked wins",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            ok(200, "ok"),
        ),
        case(
            "bare LF line ends",
            b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
            ok(200, "ok"),
        ),
        case(
            "obs-fold in a field",
            b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
            HeadError,
        ),
        case(
            "two different Content-Lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
            HeadError,
        ),
        case(
            "Content-Length not a number",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
            HeadError,
        ),
        case(
            "a space before the colon",
            b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
            HeadError,
        ),
        case("a status code below 100", b"HTTP/1.1 099 Odd\r\n\r\n", HeadError),
        case("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", HeadError),
        case("nothing at all", b"", HeadError),
        case(
            "the head cut short",
            b"HTTP/1.1 200 OK\r\nContent-Len",
            HeadError,
        ),
        case(
            "body shorter than Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            BodyError(200),
        ),
        case(
            "invalid chunk size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
            BodyError(200),
        ),
        case(
            "chunk size over 64 bits",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nok\r\n0\r\n\r\n",
            BodyError(200),
        ),
        case(
            "chunked body without its last chunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
            BodyError(200),
        ),
        case("a 60 KB head", &big(60_000), ok(200, "ok")),
        differs(
            "a 100 KB head",
            &big(100_000),
            ok(200, "ok"),
            HeadError,
            "heads are limited to 64 KiB (hyper's client buffers about 400 KB)",
        ),
        differs(
            "gzip, chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n\x1f\x8b\r\n0\r\n\r\n",
            Whole(200, b"\x1f\x8b".to_vec(), Vec::new()),
            HeadError,
            "hyper passes the gzip-coded bytes on as the content; the proxy decodes no coding \
             but chunked and refuses rather than mislabel the body",
        ),
        differs(
            "identity",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nraw",
            ok(200, "raw"),
            HeadError,
            "hyper reads a body to the close when the final coding is not chunked \
             (RFC 9112 6.3); the proxy refuses every coding but one chunked",
        ),
        differs(
            "chunked, chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n7\r\n2\r\nok\r\n\r\n0\r\n\r\n",
            ok(200, "2\r\nok\r\n"),
            HeadError,
            "hyper removes one chunked layer and hands the inner framing on as content",
        ),
        // RFC 9112 6.1: faulty framing.
        case(
            "Transfer-Encoding in HTTP/1.0",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            HeadError,
        ),
        differs(
            "trailers that name framing, cookies or the session",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\
              content-length: 5\r\nset-cookie: a=b\r\nx-session-update: {}\r\nx-kept: 1\r\n\r\n",
            Whole(
                200,
                b"ok".to_vec(),
                vec![
                    ("content-length".into(), "5".into()),
                    ("set-cookie".into(), "a=b".into()),
                    ("x-session-update".into(), "{}".into()),
                    ("x-kept".into(), "1".into()),
                ],
            ),
            Whole(200, b"ok".to_vec(), vec![("x-kept".into(), "1".into())]),
            "such fields never reach a client from a trailer (RFC 9110 6.5.1; SPEC 3.1, 3.3)",
        ),
    ]
}

#[tokio::test]
async fn hyper_and_the_project_read_the_same_upstream_bytes_alike() {
    let mut seen = Vec::new();
    for c in cases() {
        let addr = upstream(c.bytes.clone()).await;
        let by_hyper = within(c.name, hyper_get(addr)).await;
        assert_eq!(by_hyper, c.hyper, "{}: hyper's client", c.name);
        let proxy = start(&config(
            "",
            &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\nsession = false\n"),
        ))
        .await;
        let trailers = [
            &c.hyper,
            &c.ours.as_ref().map_or(HeadError, |o| o.0.clone()),
        ]
        .iter()
        .any(|o| matches!(o, Whole(_, _, t) if !t.is_empty()));
        let ours = within(c.name, proxy_get(&proxy, trailers)).await;
        let (want, why) = c.ours.clone().unwrap_or((c.hyper.clone(), "the same"));
        assert!(
            ours.matches(&want),
            "{}: the project's client gave {ours:?}, expected {want:?} ({why})",
            c.name
        );
        if c.ours.is_some() {
            assert_ne!(ours, by_hyper, "{}: listed as a difference", c.name);
        }
        proxy.stop().await;
        seen.push(c.name);
    }
    assert!(seen.len() >= 25);
}
