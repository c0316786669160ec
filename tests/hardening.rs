//! The request path's edges (issue 15, SPEC 3.1 and 6): what a client may
//! send that must never reach an upstream, and the errors it gets instead.
//! Each test drives the real server on port 0 in front of a scripted (or
//! raw TCP) upstream and asserts what the client and the upstream saw.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::e2e::*;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes a raw upstream received, one entry per connection, as they came,
/// and a signal for each arrival.
#[derive(Clone, Default)]
struct Recorded {
    conns: Arc<Mutex<Vec<Vec<u8>>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Recorded {
    fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Everything received, in lower case, connections apart.
    fn text(&self) -> String {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(c).to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// Waits until what was received contains `needle` (lower case).
    async fn wait_for(&self, needle: &str) {
        within("the upstream to receive the bytes", async {
            loop {
                let arrived = self.arrived.notified();
                if self.text().contains(needle) {
                    return;
                }
                arrived.await;
            }
        })
        .await
    }
}

/// A raw TCP upstream: on each connection it reads the request head, sends
/// `answer` (when given; else closes at once), then records everything
/// else the connection brings until it closes.
async fn raw_upstream(answer: Option<Vec<u8>>) -> (SocketAddr, Recorded) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = Recorded::default();
    let rec2 = rec.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let rec = rec2.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let i = {
                    let mut r = rec.conns.lock().unwrap();
                    r.push(Vec::new());
                    r.len() - 1
                };
                let mut buf = [0u8; 4096];
                let mut head_done = false;
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let all = {
                        let mut r = rec.conns.lock().unwrap();
                        r[i].extend_from_slice(&buf[..n]);
                        r[i].clone()
                    };
                    rec.arrived.notify_waiters();
                    if !head_done && all.windows(4).any(|w| w == b"\r\n\r\n") {
                        head_done = true;
                        match &answer {
                            Some(a) => {
                                if s.write_all(a).await.is_err() {
                                    return;
                                }
                            }
                            None => return,
                        }
                    }
                }
            });
        }
    });
    (addr, rec)
}

fn route_to(addr: SocketAddr, extra: &str) -> String {
    format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\n{extra}\n")
}

/// SPEC 3.1: the names of every route's `forward` table are removed on
/// every route, with or without sessions.
#[tokio::test]
async fn forward_names_of_every_route_are_stripped_on_every_route() {
    let up = upstream(|_| ok()).await;
    let routes = format!(
        "[[route]]\nname = \"app\"\npath = \"/app\"\nupstream = \"{u}\"\nforward = {{ \"X-User\" = \"username\" }}\n\
         [[route]]\nname = \"static\"\npath = \"/static\"\nupstream = \"{u}\"\nsession = false\n\
         [[route]]\nname = \"other\"\npath = \"/other\"\nupstream = \"{u}\"\nforward = {{ \"X-Role\" = \"role\" }}\n",
        u = up.url()
    );
    let p = start(&config("", &routes)).await;
    for path in ["/static/x", "/other/y", "/app/z"] {
        let got = p
            .send(
                p.req(Method::GET, path, None)
                    .header("x-user", "admin")
                    .header("x-role", "root")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        let seen = up.last();
        assert_eq!(seen.uri.path(), path);
        assert_eq!(seen.header("x-user"), None, "X-User reached {path}");
        assert_eq!(seen.header("x-role"), None, "X-Role reached {path}");
    }
    p.stop().await;
}

/// SPEC 3.1 as a CGI, WSGI, PHP or Rack upstream reads it: `X_User` and
/// `X-User` are one variable there (`HTTP_X_USER`), so a name with `_` that
/// reads as one the proxy owns (the `X-Session` space, a `forward` name,
/// the forwarding fields) never reaches the upstream. From a peer that is
/// not a trusted proxy, every forwarding field goes too (`X-Forwarded-*`,
/// `Forwarded`, `X-Real-IP`). Other names, with `_` or not, pass.
#[tokio::test]
async fn underscore_aliases_and_the_clients_forwarding_fields_never_reach_the_upstream() {
    let up = upstream(|_| ok()).await;
    let routes = format!(
        "[[route]]\nname = \"app\"\npath = \"/app\"\nupstream = \"{u}\"\nforward = {{ \"X-User\" = \"username\" }}\n\
         [[route]]\nname = \"static\"\npath = \"/static\"\nupstream = \"{u}\"\nsession = false\n",
        u = up.url()
    );
    let p = start(&config("", &routes)).await;
    for path in ["/app/z", "/static/x"] {
        let got = p
            .send(
                p.req(Method::GET, path, None)
                    .header("x_user", "admin")
                    .header("x_session", "{\"username\": \"admin\"}")
                    .header("X_Session_Id", "forged")
                    .header("x_forwarded_for", "6.6.6.6")
                    .header("x_forwarded-proto", "https")
                    .header("x-forwarded-port", "443")
                    .header("x-forwarded-prefix", "/admin")
                    .header("forwarded", "for=1.1.1.1;proto=https")
                    .header("x-real-ip", "1.1.1.1")
                    .header("x_real_ip", "1.1.1.1")
                    .header("my_header", "kept")
                    .header("x-forwarded", "kept too")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        let seen = up.last();
        assert_eq!(seen.uri.path(), path);
        let names: Vec<&str> = seen.headers.keys().map(|k| k.as_str()).collect();
        for gone in [
            "x_user",
            "x_session",
            "x_session_id",
            "x_forwarded_for",
            "x_forwarded-proto",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "forwarded",
            "x-real-ip",
            "x_real_ip",
        ] {
            assert!(!names.contains(&gone), "{gone} reached {path}: {names:?}");
        }
        assert_eq!(seen.header("my_header"), Some("kept"), "{path}");
        assert_eq!(seen.header("x-forwarded"), Some("kept too"), "{path}");
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "{path}");
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{path}");
        assert_eq!(seen.header("x-user"), None, "{path}");
    }
    p.stop().await;
}

/// RFC 9112 3.2.2: an absolute-form target with an empty path has the path
/// "/": `GET http://a?x=1` reaches the upstream as `GET /?x=1`, and a
/// `login_required` redirect names `/?x=1`.
#[tokio::test]
async fn an_absolute_form_target_with_an_empty_path_goes_upstream_as_slash() {
    let (addr, rec) = raw_upstream(Some(
        // One answer a connection (`raw_upstream`), so none is reused.
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_vec(),
    ))
    .await;
    let routes = format!(
        "[[route]]\nname = \"app\"\npath = \"/\"\nupstream = \"http://{addr}\"\n\
         [[route]]\nname = \"private\"\nhost = \"private.test\"\nupstream = \"http://{addr}\"\nlogin_required = [\"user_id\"]\n"
    );
    let p = start(&config("", &routes)).await;
    for method in ["GET", "POST"] {
        let r = raw_request(
            p.addr,
            &format!("{method} http://example.com?x=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 200, "{method}");
        rec.wait_for(&format!(
            "{} /?x=1 http/1.1\r\n",
            method.to_ascii_lowercase()
        ))
        .await;
    }
    let r = raw_request(
        p.addr,
        "GET http://private.test?x=1 HTTP/1.1\r\nHost: private.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/login?next=/%3Fx%3D1"));
    p.stop().await;
}

/// The 101 a raw upstream answers to anything.
const SWITCH_H2C: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";

/// Sends an `Upgrade: h2c` request, then (on the same connection) a request
/// carrying a forged `X-Session`, over any stream; returns the status of
/// the first answer, once what the proxy did with the second is known.
async fn h2c_then_forged<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, rec: &Recorded) -> u16 {
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    // The status line and head only: a 101 has no body to read.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within("the answer to the h2c upgrade", s.read(&mut b)).await;
        assert_eq!(n.unwrap(), 1, "closed in the head");
        head.push(b[0]);
    }
    let status: u16 = String::from_utf8_lossy(&head)[9..12].parse().unwrap();
    let forged = b"GET /after HTTP/1.1\r\nHost: example.com\r\nX-Session: {\"user_id\": 1}\r\nConnection: close\r\n\r\n";
    s.write_all(forged).await.unwrap();
    if status == 101 {
        // A tunnel: the forged request goes to the upstream as it is.
        rec.wait_for("get /after").await;
    } else {
        // The proxy parses it as a request of its own and answers it.
        let mut rest = Vec::new();
        let _ = within("the proxy to finish", s.read_to_end(&mut rest)).await;
    }
    status
}

/// SPEC 3.1: only WebSocket upgrades are relayed. `Upgrade: h2c` is
/// removed, and the upstream's `101` to it is a 502: the client's next
/// bytes never reach the upstream raw.
#[tokio::test]
async fn h2c_upgrade_is_not_relayed_and_its_101_is_a_502() {
    let (addr, rec) = raw_upstream(Some(SWITCH_H2C.to_vec())).await;
    let p = start(&config("", &route_to(addr, ""))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let first = h2c_then_forged(&mut s, &rec).await;
    let seen = rec.text();
    assert!(
        !seen.contains("x-session: {\"user_id\""),
        "forged X-Session reached the upstream raw: {seen}"
    );
    assert!(
        !seen.contains("upgrade: h2c"),
        "Upgrade: h2c reached the upstream: {seen}"
    );
    assert!(!seen.contains("http2-settings"), "{seen}");
    assert_eq!(
        first, 502,
        "a 101 to a request that was not a WebSocket upgrade"
    );
    p.stop().await;
}

/// The same over TLS.
#[tokio::test]
async fn h2c_upgrade_is_not_relayed_over_tls() {
    let (addr, rec) = raw_upstream(Some(SWITCH_H2C.to_vec())).await;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = TempDir::new("hardening-tls");
    dir.write("cert.pem", &ck.cert.pem());
    dir.write("key.pem", &ck.signing_key.serialize_pem());
    let text = config("", &route_to(addr, "")).replace(
        "tls = false",
        "tls = true\ncert = \"cert.pem\"\nkey = \"key.pem\"",
    );
    let cfg = sessiongate::config::Config::parse(&text, &dir.join("sessiongate.toml")).unwrap();
    let p = start_config(cfg).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let mut s = within(
        "the TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        ),
    )
    .await
    .unwrap();
    let first = h2c_then_forged(&mut s, &rec).await;
    let seen = rec.text();
    assert!(
        !seen.contains("x-session: {\"user_id\""),
        "forged X-Session reached the upstream raw over TLS: {seen}"
    );
    assert!(!seen.contains("upgrade: h2c"), "{seen}");
    assert_eq!(first, 502);
    p.stop().await;
}

/// SPEC 3.1: TRACE is answered 405 (with `Allow`) and never forwarded;
/// OPTIONS follows Max-Forwards.
#[tokio::test]
async fn trace_is_refused_and_options_follow_max_forwards() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = raw_request(
        p.addr,
        "TRACE / HTTP/1.1\r\nHost: example.com\r\nMax-Forwards: 3\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405);
    assert!(r
        .header("allow")
        .is_some_and(|a| a.contains("GET") && !a.contains("TRACE")));
    assert_one_line(&r.text());

    let r = raw_request(
        p.addr,
        "OPTIONS * HTTP/1.1\r\nHost: example.com\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("allow").is_some_and(|a| a.contains("OPTIONS")));
    let r = raw_request(
        p.addr,
        "OPTIONS /x HTTP/1.1\r\nHost: example.com\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.count(),
        0,
        "TRACE or OPTIONS with Max-Forwards: 0 was forwarded"
    );

    let r = raw_request(
        p.addr,
        "OPTIONS /x HTTP/1.1\r\nHost: example.com\r\nMax-Forwards: 5\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().method, Method::OPTIONS);
    assert_eq!(up.last().header("max-forwards"), Some("4"));
    p.stop().await;
}

/// SPEC 3.1: a Host or absolute-form authority that is not `host[:port]`,
/// or carries userinfo, is a 400 and never reaches the upstream.
#[tokio::test]
async fn invalid_hosts_are_refused() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    for host in [
        "a b", "a/b", "user@a", "a:b:c", "a:", "a:8x", "a:123456", ":80", "[::1", "[zz]:1",
    ] {
        let r = raw_request(
            p.addr,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 400, "Host: {host}");
        assert!(r.text().contains("Host"), "{host}: {}", r.text());
        assert_one_line(&r.text());
    }
    let r = raw_request(
        p.addr,
        "GET http://user:pw@example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "absolute-form target with userinfo");
    assert_eq!(up.count(), 0, "an invalid authority was forwarded");

    for host in ["[::1]:8080", "example.com:8080", "127.0.0.1", "a-b.example"] {
        let r = raw_request(
            p.addr,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 200, "Host: {host}");
        assert_eq!(up.last().header("x-forwarded-host"), Some(host));
    }
    p.stop().await;
}

/// SPEC 3.1: a request transfer coding other than one `chunked` is a 501
/// naming it, never forwarded (also when the final coding is not
/// `chunked`, which hyper's parser alone would answer 400).
#[tokio::test]
async fn request_transfer_codings_other_than_chunked_are_501() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    for (te, named) in [("gzip, chunked", "gzip"), ("chunked, chunked", "chunked")] {
        let r = raw_request(
            p.addr,
            &format!("POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: {te}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 501, "Transfer-Encoding: {te}");
        assert!(r.text().contains(named), "{te}: {}", r.text());
        assert_one_line(&r.text());
    }
    for te in ["identity", "gzip"] {
        let r = raw_request(
            p.addr,
            &format!("POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: {te}\r\nConnection: close\r\n\r\nhello"),
        )
        .await;
        // A final coding other than chunked: hyper's parser would answer
        // 400; the connection layer answers 501 before hyper sees it.
        assert_eq!(r.status, 501, "Transfer-Encoding: {te}");
        assert!(r.text().contains(te), "{te}: {}", r.text());
    }
    assert_eq!(
        up.count(),
        0,
        "a request with a dropped coding was forwarded"
    );
    // A single chunked is fine.
    let r = raw_request(
        p.addr,
        "POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&up.last().body[..], b"hello");
    p.stop().await;
}

/// SPEC 3.1 and 6: a broken request body is the client's fault (400),
/// one that stalls past `client_body_timeout` a 408, not an upstream 502
/// or 504.
#[tokio::test]
async fn broken_or_stalled_request_bodies_are_the_clients_fault() {
    let up = upstream(|_| ok()).await;
    let p = start(&config_with(
        "client_body_timeout = \"200ms\"",
        "",
        &route(&up, ""),
    ))
    .await;

    // A bad chunk size.
    let r = raw_request(
        p.addr,
        "POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nxx\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().starts_with("request body"), "{}", r.text());
    assert_one_line(&r.text());

    // Cut short: the client ends its side before Content-Length.
    let r = within("a cut-short body", async {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        read_response(&mut s).await
    })
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().starts_with("request body"), "{}", r.text());

    // Cut short before the last chunk.
    let r = within("a chunked body cut short", async {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        read_response(&mut s).await
    })
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().starts_with("request body"), "{}", r.text());

    // Stalled: three bytes of a hundred, then silence.
    let r = within("a stalled body", async {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        read_response(&mut s).await
    })
    .await;
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.text().contains("request body stalled"), "{}", r.text());
    assert_one_line(&r.text());
    p.stop().await;
}

/// SPEC 6: an upstream head over the limit is said to be one.
#[tokio::test]
async fn an_oversized_upstream_head_is_named() {
    let mut answer = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    answer.extend(std::iter::repeat_n(b'a', 1 << 20));
    answer.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    let (addr, _rec) = raw_upstream(Some(answer)).await;
    let p = start(&config("", &route_to(addr, ""))).await;
    let got = p.get("/", None).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.body, "upstream response head too large\n");
    p.stop().await;
}

/// An idempotent request nothing of which was acted on (the upstream
/// closed without a byte of an answer) goes to the next upstream; a POST
/// that was sent is not sent again.
#[tokio::test]
async fn idempotent_requests_go_to_the_next_upstream_when_nothing_was_acted_on() {
    let (dead, rec) = raw_upstream(None).await;
    let good = upstream(|_| ok()).await;
    let routes = format!(
        "[[route]]\nname = \"app\"\nupstreams = [\"http://{dead}\", \"{}\"]\n",
        good.url()
    );
    let p = start(&config("", &routes)).await;
    // Round-robin: the first request starts at the closing upstream.
    let got = p.get("/first", None).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(good.last().uri.path(), "/first");
    assert_eq!(rec.connections(), 1, "the first upstream had it first");
    // The second starts at the good one.
    assert_eq!(p.get("/second", None).await.status, StatusCode::OK);
    // The third starts at the closing one again: a POST is not retried.
    let got = p.post("/third", None, "once").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    assert_one_line(&got.body);
    assert!(
        good.requests().iter().all(|s| s.uri.path() != "/third"),
        "a POST that was sent went to a second upstream"
    );
    p.stop().await;
}

/// SPEC 2: a change that makes the session larger than max_session_size
/// is a 502 naming the size and the limit; the stored session is as before.
#[tokio::test]
async fn a_session_change_over_max_session_size_is_refused_and_changes_nothing() {
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(2000));
    let up = upstream(move |s| match s.uri.path() {
        "/login" => directives(&[("x-session-update", "{\"user_id\": 1}")]),
        "/grow" => directives(&[("x-session-update", &big)]),
        _ => ok(),
    })
    .await;
    let p = start(&config("max_session_size = \"1KiB\"", &route(&up, ""))).await;
    let key = p.get("/login", None).await.key();
    let got = p.get("/grow", Some(&key)).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(got.body.contains("1024"), "{}", got.body);
    assert!(got.body.contains("max_session_size"), "{}", got.body);
    assert_one_line(&got.body);
    assert!(got.session_cookie().is_none());
    p.get("/look", Some(&key)).await;
    assert_eq!(up.last().session(), serde_json::json!({"user_id": 1}));
    p.stop().await;
}

/// SPEC 6: `upstream_timeout` is the upstream's time to answer; a client
/// slow to send its body (within `client_body_timeout`) is not an
/// upstream timeout.
#[tokio::test]
async fn a_slow_client_body_is_not_an_upstream_timeout() {
    let up = upstream(|s| text(&format!("{} bytes", s.body.len()))).await;
    let p = start(&config_with(
        "upstream_timeout = \"300ms\"\nclient_body_timeout = \"10s\"",
        "",
        &route(&up, ""),
    ))
    .await;
    let r = within("a slow upload", async {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 6\r\nConnection: close\r\n\r\nabc")
            .await
            .unwrap();
        // There is no event for "the upstream timeout would have fired":
        // the client pauses for twice its length.
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        s.write_all(b"def").await.unwrap();
        read_response(&mut s).await
    })
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "6 bytes");
    p.stop().await;
}

/// An HTTP/2 request with neither `:authority` nor `Host` is malformed
/// (RFC 9113 8.3.1), as an HTTP/1.1 one without `Host` is: `400`, not
/// forwarded with the upstream's own address as its Host.
#[tokio::test]
async fn an_h2_request_without_authority_or_host_is_refused() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    for (uri, host, status) in [
        ("/x", None, 400),
        ("/x", Some("app"), 200),
        ("http://app/x", None, 200),
    ] {
        let mut req = http::Request::get(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
        let resp = within("the h2 response", resp).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{uri} {host:?}");
    }
    assert_eq!(up.count(), 2, "the one without a host never went upstream");
    p.stop().await;
}

/// The same for HTTP/2's `:authority`.
#[tokio::test]
async fn an_h2_authority_with_userinfo_is_refused() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (uri, status) in [
        ("http://user:pw@example.com/x", 400),
        ("http://[::1]:8080/x", 200),
    ] {
        let req = http::Request::get(uri)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = within("the h2 response", send.send_request(req))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{uri}");
    }
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().header("x-forwarded-host"), Some("[::1]:8080"));
    p.stop().await;
}
