//! End-to-end proxy behaviour on plain HTTP (SPEC 2, 3.1 and 6): routing,
//! header hygiene in both directions, body limits and streaming, upstream
//! failures, timeouts and graceful shutdown. The real server runs on port 0
//! in front of upstreams the tests script.

mod common;

use bytes::Bytes;
use common::e2e::*;
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A syntactically valid session key that names no session.
const SOME_KEY: &str = "abcdefghijklmnopqrstuvwxyz012345";

fn route_to(name: &str, up: &Upstream, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nupstream = \"{}\"\n{extra}\n",
        up.url()
    )
}

/// GET `path` with the given request headers.
async fn get_with(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, path, None);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    within(
        &format!("GET {path}"),
        p.send(b.body(Full::default()).unwrap()),
    )
    .await
}

fn session_headers(h: &HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("x-session"))
        .collect()
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_route_is_a_one_line_404() {
    let up = upstream(|_| ok()).await;
    let p = start(&config(
        "",
        &route_to("app", &up, "host = \"app.example.com\""),
    ))
    .await;

    let hit = get_with(&p, "/x", &[("host", "app.example.com")]).await;
    assert_eq!(hit.status, 200, "the host route serves its own host");

    let miss = get_with(&p, "/x", &[("host", "other.example.com")]).await;
    assert_eq!(miss.status, StatusCode::NOT_FOUND);
    assert_one_line(&miss.body);
    assert!(
        miss.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        miss.headers
    );
    assert_eq!(up.count(), 1, "the upstream never saw the unrouted request");
    p.stop().await;
}

#[tokio::test]
async fn host_then_longest_prefix_on_segment_boundaries() {
    let root = upstream(|_| text("root")).await;
    let app = upstream(|_| text("app")).await;
    let admin = upstream(|_| text("admin")).await;
    let vhost = upstream(|_| text("vhost")).await;
    let routes = [
        route_to("root", &root, ""),
        route_to("app", &app, "path = \"/app\""),
        route_to("admin", &admin, "path = \"/app/admin\""),
        route_to("vhost", &vhost, "host = \"h.example.com\"\npath = \"/app\""),
    ]
    .concat();
    let p = start(&config("", &routes)).await;

    for (host, path, want) in [
        (None, "/app/x", "app"),
        (None, "/app", "app"),
        (None, "/app/", "app"),
        (None, "/apple", "root"),
        (None, "/", "root"),
        (None, "/app/admin/users", "admin"),
        (None, "/app/administrator", "app"),
        (Some("h.example.com"), "/app/x", "vhost"),
        (Some("H.Example.COM:8443"), "/app/x", "vhost"),
        (Some("other.example.com"), "/app/x", "app"),
    ] {
        let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
        let r = get_with(&p, path, &headers).await;
        assert_eq!(r.status, 200, "{host:?} {path}");
        assert_eq!(r.body, want, "Host {host:?}, path {path}");
    }
    assert_eq!(
        app.last().uri.path(),
        "/app/x",
        "no strip_prefix: the path is forwarded as is"
    );
    p.stop().await;
}

#[tokio::test]
async fn strip_prefix_keeps_the_query() {
    let up = upstream(|_| ok()).await;
    let p = start(&config(
        "",
        &route_to("app", &up, "path = \"/app\"\nstrip_prefix = true"),
    ))
    .await;

    assert_eq!(get_with(&p, "/app/x?a=1&b=two", &[]).await.status, 200);
    let s = up.last();
    assert_eq!(s.uri.path(), "/x");
    assert_eq!(s.uri.query(), Some("a=1&b=two"));

    assert_eq!(get_with(&p, "/app?q=1", &[]).await.status, 200);
    let s = up.last();
    assert_eq!(s.uri.path(), "/");
    assert_eq!(s.uri.query(), Some("q=1"));

    // An encoded slash after the prefix: the route is chosen on `/app/x`,
    // and the prefix is stripped from that.
    assert_eq!(get_with(&p, "/app%2Fx?a=1", &[]).await.status, 200);
    let s = up.last();
    assert_eq!(s.uri.path(), "/x");
    assert_eq!(s.uri.query(), Some("a=1"));
    // Encoded slashes after the prefix are kept.
    assert_eq!(get_with(&p, "/app/a%2Fb", &[]).await.status, 200);
    assert_eq!(up.last().uri.path(), "/a%2Fb");
    p.stop().await;
}

#[tokio::test]
async fn preserve_host_forwards_the_client_host_or_the_upstream_authority() {
    let keep = upstream(|_| ok()).await;
    let swap = upstream(|_| ok()).await;
    let routes = [
        route_to("keep", &keep, "path = \"/keep\"\npreserve_host = true"),
        route_to("swap", &swap, "path = \"/swap\"\npreserve_host = false"),
    ]
    .concat();
    let p = start(&config("", &routes)).await;
    let host = [("host", "client.example:8080")];

    assert_eq!(get_with(&p, "/keep/x", &host).await.status, 200);
    assert_eq!(keep.last().header("host"), Some("client.example:8080"));

    assert_eq!(get_with(&p, "/swap/x", &host).await.status, 200);
    let upstream_authority = swap.addr.to_string();
    assert_eq!(
        swap.last().header("host"),
        Some(upstream_authority.as_str())
    );

    // An HTTP/1.0 client may send no Host: the upstream still gets one.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /keep/old HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("the HTTP/1.0 answer", s.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(keep.last().uri.path(), "/keep/old");
    assert_eq!(
        keep.last().header("host"),
        Some(keep.addr.to_string().as_str())
    );
    p.stop().await;
}

#[tokio::test]
async fn forwarded_headers_are_set_by_the_proxy() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = get_with(
        &p,
        "/",
        &[
            ("host", "site.example:8080"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let s = up.last();
    let xff: Vec<&str> = s
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(xff, vec!["127.0.0.1"], "the client-sent value is dropped");
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-forwarded-host"), Some("site.example:8080"));
    p.stop().await;
}

// ---------------------------------------------------------------------------
// Hop-by-hop headers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_request_headers_never_reach_the_upstream() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = raw_request(
        p.addr,
        "GET /hop HTTP/1.1\r\n\
         Host: site.example\r\n\
         Connection: keep-alive, X-Secret\r\n\
         X-Secret: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         Proxy-Connection: keep-alive\r\n\
         X-Normal: yes\r\n\
         \r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let s = up.last();
    for name in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            s.header(name).is_none(),
            "{name} reached the upstream: {:?}",
            s.headers
        );
    }
    for v in s.headers.get_all("connection") {
        let v = v.to_str().unwrap().to_ascii_lowercase();
        assert!(
            !v.contains("x-secret"),
            "client Connection forwarded: {v:?}"
        );
    }
    assert_eq!(s.header("x-normal"), Some("yes"), "end-to-end headers pass");
    p.stop().await;
}

#[tokio::test]
async fn client_cannot_nominate_the_headers_the_proxy_adds() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = raw_request(
        p.addr,
        "GET / HTTP/1.1\r\n\
         Host: site.example\r\n\
         Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Session, X-Session-New\r\n\
         \r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let s = up.last();
    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-forwarded-host"), Some("site.example"));
    assert_eq!(s.header("x-session"), Some("{}"));
    assert_eq!(s.header("x-session-new"), Some("true"));
    p.stop().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let up = upstream(|_| {
        reply()
            .header("connection", "X-Up-Secret")
            .header("x-up-secret", "1")
            .header("keep-alive", "timeout=5, max=100")
            .header("proxy-connection", "keep-alive")
            .header("x-normal", "yes")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    })
    .await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = raw_request(
        p.addr,
        "GET / HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"ok");
    for name in ["x-up-secret", "keep-alive", "proxy-connection"] {
        assert!(r.header(name).is_none(), "{name} reached the client: {r:?}");
    }
    for v in r.all("connection") {
        assert!(
            !v.to_ascii_lowercase().contains("x-up-secret"),
            "upstream Connection forwarded: {v:?}"
        );
    }
    assert_eq!(r.header("x-normal"), Some("yes"));
    p.stop().await;
}

// ---------------------------------------------------------------------------
// The X-Session space and the session cookie (SPEC 3.1)
// ---------------------------------------------------------------------------

const FORGED: [(&str, &str); 6] = [
    ("x-session", r#"{"user_id": 1, "is_admin": true}"#),
    ("x-session-id", "forged-id"),
    ("x-session-update", r#"{"is_admin": true}"#),
    ("x-session-new", "false"),
    ("x-sessionfoo", "1"),
    ("x-user", "admin"),
];

#[tokio::test]
async fn client_session_headers_never_reach_a_session_route() {
    let up = upstream(|_| ok()).await;
    let p = start(&config(
        "",
        &route(&up, "forward = { \"X-User\" = \"username\" }"),
    ))
    .await;
    let r = get_with(&p, "/", &FORGED).await;
    assert_eq!(r.status, 200);
    assert!(
        r.set_cookies().is_empty(),
        "a client-sent directive is not applied: {:?}",
        r.set_cookies()
    );
    let s = up.last();
    // The proxy's own values replace the forged ones.
    assert_eq!(s.header("x-session"), Some("{}"));
    assert_eq!(s.header("x-session-id"), Some(""));
    assert_eq!(s.header("x-session-new"), Some("true"));
    assert_eq!(s.headers.get_all("x-session").iter().count(), 1);
    assert!(s.header("x-session-update").is_none());
    assert!(s.header("x-sessionfoo").is_none());
    assert!(
        s.header("x-user").is_none(),
        "a forward header the session does not fill is absent, never the client's"
    );
    p.stop().await;
}

#[tokio::test]
async fn client_session_headers_never_reach_a_sessionless_route() {
    let up = upstream(|_| ok()).await;
    let p = start(&config("", &route(&up, "session = false"))).await;
    let r = get_with(&p, "/", &FORGED[..5]).await;
    assert_eq!(r.status, 200);
    let s = up.last();
    assert_eq!(
        session_headers(&s.headers),
        Vec::<String>::new(),
        "{:?}",
        s.headers
    );
    p.stop().await;
}

#[tokio::test]
async fn forward_headers_from_the_client_are_dropped_even_when_the_session_has_the_key() {
    let up = upstream(|s| {
        if s.uri.path() == "/login" {
            directives(&[("x-session-update", r#"{"username": "alice"}"#)])
        } else {
            ok()
        }
    })
    .await;
    let p = start(&config(
        "",
        &route(&up, "forward = { \"X-User\" = \"username\" }"),
    ))
    .await;
    let key = get_with(&p, "/login", &[]).await.key();
    let cookie = format!("sessionid={key}");
    let r = get_with(&p, "/", &[("cookie", &cookie), ("x-user", "mallory")]).await;
    assert_eq!(r.status, 200);
    let s = up.last();
    let users: Vec<&str> = s
        .headers
        .get_all("x-user")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(users, vec!["alice"]);
    p.stop().await;
}

#[tokio::test]
async fn sessionless_route_adds_no_session_headers_and_sets_no_cookie() {
    let up = upstream(|_| {
        directives(&[
            ("x-session-update", r#"{"user_id": 1}"#),
            ("x-session-cycle-key", "1"),
        ])
    })
    .await;
    let p = start(&config("", &route(&up, "session = false"))).await;
    let r = get_with(&p, "/", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.set_cookies().is_empty(), "{:?}", r.set_cookies());
    let s = up.last();
    assert_eq!(
        session_headers(&s.headers),
        Vec::<String>::new(),
        "no X-Session headers on a session = false route"
    );
    let sessiongate::store::AnyStore::Memory(m) = &*p.store else {
        panic!("the harness uses the memory store")
    };
    assert_eq!(m.len(), 0, "no store access");
    p.stop().await;
}

#[tokio::test]
async fn sessionless_route_never_passes_upstream_session_headers_to_the_client() {
    let up = upstream(|_| {
        directives(&[
            ("x-session-update", r#"{"user_id": 1}"#),
            ("x-session-foo", "bar"),
            ("x-sessionfoo", "1"),
        ])
    })
    .await;
    let p = start(&config("", &route(&up, "session = false"))).await;
    let r = get_with(&p, "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        session_headers(&r.headers),
        Vec::<String>::new(),
        "SPEC 3.1: upstream X-Session* headers never reach the client"
    );
    p.stop().await;
}

#[tokio::test]
async fn session_route_never_passes_upstream_session_headers_to_the_client() {
    let up = upstream(|_| directives(&[("x-session-update", r#"{"user_id": 1}"#)])).await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = get_with(&p, "/", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.session_cookie().is_some());
    assert_eq!(session_headers(&r.headers), Vec::<String>::new());
    p.stop().await;
}

/// An upstream that logs in on `/login` and otherwise tries to set the
/// session cookie itself next to an ordinary cookie.
async fn cookie_setting_upstream() -> Upstream {
    upstream(|s| {
        if s.uri.path() == "/login" {
            return directives(&[("x-session-update", r#"{"user_id": 1}"#)]);
        }
        reply()
            .header(
                "set-cookie",
                "sessionid=evil0123456789abcdefghijklmnopq; Path=/",
            )
            .header("set-cookie", "theme=dark; Path=/")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn session_cookie_is_hidden_from_the_upstream_and_cannot_be_set_by_it() {
    let up = cookie_setting_upstream().await;
    let p = start(&config("", &route(&up, ""))).await;
    let key = get_with(&p, "/login", &[]).await.key();

    // Spaces around the `=` too: Django reads `sessionid =K` as the
    // session cookie (it was forwarded, key and all, and not adopted).
    for cookie in [
        format!("a=1; sessionid={key}; b=2"),
        format!("a=1; sessionid ={key}; b=2"),
        format!("a=1; sessionid= {key}; b=2"),
    ] {
        let r = get_with(&p, "/", &[("cookie", &cookie)]).await;
        assert_eq!(r.status, 200);
        let s = up.last();
        assert_eq!(
            s.session()["user_id"],
            1,
            "{cookie}: the session was loaded from the cookie"
        );
        assert_eq!(s.header("cookie"), Some("a=1; b=2"), "{cookie}");
    }
    // NBSP before the `=`: Django (Python's str.strip() on Latin-1) reads
    // it as the session cookie too; it is never forwarded.
    let raw = [
        &b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nCookie: a=1; sessionid\xa0="[..],
        key.as_bytes(),
        b"; b=2\r\n\r\n",
    ]
    .concat();
    let answer = within("an answer", async {
        use tokio::io::AsyncReadExt;
        let mut c = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        c.write_all(&raw).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        out
    })
    .await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let s = up.last();
    assert_eq!(s.session()["user_id"], 1, "NBSP: the session was loaded");
    assert_eq!(s.header("cookie"), Some("a=1; b=2"), "NBSP: not forwarded");
    let r = get_with(
        &p,
        "/",
        &[("cookie", &format!("a=1; sessionid={key}; b=2"))],
    )
    .await;
    assert_eq!(
        r.set_cookies(),
        vec!["theme=dark; Path=/".to_string()],
        "the upstream's sessionid Set-Cookie is dropped, the other passes"
    );
    p.stop().await;
}

#[tokio::test]
async fn session_cookie_is_hidden_and_protected_on_a_sessionless_route_too() {
    let up = cookie_setting_upstream().await;
    let p = start(&config("", &route(&up, "session = false"))).await;
    let cookie = format!("a=1; sessionid={SOME_KEY}; b=2");
    let r = get_with(&p, "/static", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.last().header("cookie"),
        Some("a=1; b=2"),
        "SPEC 3.1: the session cookie is never forwarded upstream"
    );
    assert_eq!(
        r.set_cookies(),
        vec!["theme=dark; Path=/".to_string()],
        "SPEC 3.1: a Set-Cookie for the session cookie from the upstream is dropped"
    );
    p.stop().await;
}

// ---------------------------------------------------------------------------
// Request bodies: the limit and streaming
// ---------------------------------------------------------------------------

#[tokio::test]
async fn content_length_over_the_limit_is_413_without_calling_the_upstream() {
    let up = upstream(|_| ok()).await;
    let p = start(&config_with(
        "max_request_body = \"1KiB\"",
        "",
        &route(&up, ""),
    ))
    .await;

    let big = within("413", p.post("/", None, &"x".repeat(1025))).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_one_line(&big.body);
    assert_eq!(up.count(), 0, "the upstream was not called");

    // Decided on the declared length alone: 512 of the 2048 declared bytes
    // are sent and the rest is held back, yet the answer comes at once.
    let (tx, body) = chan_body();
    let req = Request::post(p.url("/upload"))
        .header("content-length", "2048")
        .body(body)
        .unwrap();
    let c = client::<ChanBody>();
    let resp = tokio::spawn(async move { c.request(req).await });
    tx.send(Bytes::from(vec![b'z'; 512])).await.unwrap();
    let resp = within("the 413 before the body is complete", resp)
        .await
        .unwrap()
        .expect("an answer");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    drop(tx);
    assert_eq!(up.count(), 0, "the upstream was not called");

    let fits = within("200", p.post("/", None, &"y".repeat(1024))).await;
    assert_eq!(fits.status, 200, "exactly the limit is allowed");
    assert_eq!(up.count(), 1);
    assert_eq!(up.last().body.len(), 1024);
    p.stop().await;
}

#[tokio::test]
async fn chunked_body_growing_over_the_limit_is_413() {
    let up = upstream(|_| ok()).await;
    let p = start(&config_with(
        "max_request_body = \"1KiB\"",
        "",
        &route(&up, ""),
    ))
    .await;
    let (tx, body) = chan_body();
    let req = Request::post(p.url("/upload")).body(body).unwrap();
    let c = client::<ChanBody>();
    let resp = tokio::spawn(async move { c.request(req).await });
    for _ in 0..3 {
        within("send a chunk", tx.send(Bytes::from(vec![b'z'; 512])))
            .await
            .unwrap();
    }
    // The body has not ended: the proxy answers as soon as it passes 1 KiB.
    let resp = within("the 413", resp).await.unwrap().expect("an answer");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = within("the body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_one_line(&String::from_utf8_lossy(&body));
    drop(tx);
    p.stop().await;
}

/// Reads `want` bytes from `rx` (the transport may split or merge chunks).
async fn recv_exactly(rx: &mut mpsc::UnboundedReceiver<Bytes>, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let c = rx.recv().await.expect("more data");
        got.extend_from_slice(&c);
    }
    got
}

#[tokio::test]
async fn request_body_is_streamed_to_the_upstream() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Bytes>();
    let addr = streaming_upstream(move |req: Request<Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame.expect("body frame").into_data() {
                    total += d.len();
                    let _ = seen_tx.send(d);
                }
            }
            Response::new(Full::new(Bytes::from(total.to_string())))
        }
    })
    .await;
    let p = start(&config(
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\n"),
    ))
    .await;

    let (tx, body) = chan_body();
    let req = Request::post(p.url("/upload")).body(body).unwrap();
    let c = client::<ChanBody>();
    let resp = tokio::spawn(async move { c.request(req).await });

    tx.send(Bytes::from_static(b"first-chunk")).await.unwrap();
    let first = within(
        "the upstream to get the first chunk while the client holds the rest",
        recv_exactly(&mut seen_rx, 11),
    )
    .await;
    assert_eq!(first, b"first-chunk");

    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let resp = within("the response", resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = within("the body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"17");
    p.stop().await;
}

#[tokio::test]
async fn response_body_is_streamed_to_the_client() {
    let (senders_tx, mut senders_rx) = mpsc::unbounded_channel::<mpsc::Sender<Bytes>>();
    let addr = streaming_upstream(move |_req: Request<Incoming>| {
        let senders_tx = senders_tx.clone();
        async move {
            let (tx, body) = chan_body();
            tx.send(Bytes::from_static(b"head-chunk")).await.unwrap();
            let _ = senders_tx.send(tx);
            Response::new(body)
        }
    })
    .await;
    let p = start(&config(
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\n"),
    ))
    .await;

    let c = client::<Full<Bytes>>();
    let resp = within("the response head", c.get(p.url("/").parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rest = within("the upstream's body sender", senders_rx.recv())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 10 {
        let frame = within(
            "the first chunk while the upstream holds the rest",
            body.frame(),
        )
        .await
        .expect("a frame")
        .unwrap();
        if let Ok(d) = frame.into_data() {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got, b"head-chunk");

    rest.send(Bytes::from_static(b"-tail")).await.unwrap();
    drop(rest);
    let tail = within("the rest", body.collect()).await.unwrap().to_bytes();
    assert_eq!(&tail[..], b"-tail");
    p.stop().await;
}

// ---------------------------------------------------------------------------
// Upstream failures and timeouts
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let dead = dead_addr().await;
    let p = start(&config(
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{dead}\"\n"),
    ))
    .await;
    let r = get_with(&p, "/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_one_line(&r.body);
    assert!(r.set_cookies().is_empty());
    let r = within("POST", p.post("/", None, "payload")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_one_line(&r.body);
    p.stop().await;
}

#[tokio::test]
async fn round_robin_skips_a_dead_upstream() {
    let dead = dead_addr().await;
    let alive = upstream(|s| text(&format!("got {}", String::from_utf8_lossy(&s.body)))).await;
    let p = start(&config(
        "",
        &format!(
            "[[route]]\nname = \"app\"\nupstreams = [\"http://{dead}\", \"{}\"]\n",
            alive.url()
        ),
    ))
    .await;
    for i in 0..6 {
        let r = if i % 2 == 0 {
            get_with(&p, "/", &[]).await
        } else {
            within("POST", p.post("/", None, &format!("payload-{i}"))).await
        };
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        if i % 2 == 1 {
            assert_eq!(r.body, format!("got payload-{i}"), "the body went along");
        }
    }
    assert_eq!(alive.count(), 6, "the alive upstream got every request");
    p.stop().await;
}

#[tokio::test]
async fn failover_sends_the_next_upstream_its_own_target_and_the_body() {
    let dead = dead_addr().await;
    let alive = upstream(|_| ok()).await;
    let p = start(&config(
        "",
        &format!(
            "[[route]]\nname = \"api\"\npath = \"/api\"\nstrip_prefix = true\nupstreams = [\"http://{dead}\", \"{}/base\"]\n",
            alive.url()
        ),
    ))
    .await;
    // The first request of a new route starts with the first upstream: the
    // dead one, then the next, which has a path of its own.
    let req = p
        .req(Method::POST, "/api/x?q=1", None)
        .header("x-forwarded-for", "6.6.6.6")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let r = within("POST", p.send(req)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = alive.last();
    assert_eq!(
        s.uri.path(),
        "/base/x",
        "prefix stripped, upstream path added"
    );
    assert_eq!(s.uri.query(), Some("q=1"));
    assert_eq!(
        &s.body[..],
        b"payload",
        "the body went to the next upstream"
    );
    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(alive.count(), 1);
    p.stop().await;
}

/// What a raw upstream does after answering a request head.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    KeepAlive,
    /// Answer only after this many milliseconds (a slow upstream), then
    /// keep the connection.
    Late(u64),
    HangUp,
    /// Read and discard everything else on the connection.
    Drain,
}

/// A raw HTTP/1.1 upstream that counts the connections it accepts and
/// answers each request head (request bodies are not read) with what
/// `answer` gives for it and its index on its connection (0 for the first).
async fn raw_upstream(
    answer: impl Fn(&str, usize) -> (String, Then) + Copy + Send + 'static,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let n = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let mut index = 0;
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let (resp, then) = answer(&head, index);
                    index += 1;
                    if let Then::Late(ms) = then {
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    if s.write_all(resp.as_bytes()).await.is_err() || then == Then::HangUp {
                        return;
                    }
                    if then == Then::Drain {
                        while matches!(s.read(&mut chunk).await, Ok(k) if k > 0) {}
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Answers every request head with `ok` (`close`: with `Connection: close`,
/// then hangs up). HEAD gets the head only, `/empty` a 204.
async fn counting_upstream(close: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    raw_upstream(move |head, _| {
        let conn = if close { "Connection: close\r\n" } else { "" };
        let resp = if head.starts_with("HEAD ") {
            format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{conn}\r\n")
        } else if head.starts_with("GET /empty ") {
            format!("HTTP/1.1 204 No Content\r\n{conn}\r\n")
        } else {
            format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{conn}\r\nok")
        };
        (resp, if close { Then::HangUp } else { Then::KeepAlive })
    })
    .await
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (addr, conns) = counting_upstream(false).await;
    let p = start(&config(
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\nsession = false\n"),
    ))
    .await;
    for i in 0..3 {
        let r = get_with(&p, "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"), "GET {i}");
        let r = within(
            "HEAD",
            p.send(
                p.req(Method::HEAD, "/", None)
                    .body(Full::default())
                    .unwrap(),
            ),
        )
        .await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, ""), "HEAD {i}");
        let r = get_with(&p, "/empty", &[]).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "204 {i}");
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "nine sequential requests, bodies or none, share one upstream connection"
    );
    p.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_never_reused() {
    let (addr, conns) = counting_upstream(true).await;
    let p = start(&config(
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\n"),
    ))
    .await;
    for i in 0..5 {
        let r = get_with(&p, "/", &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (200, "ok"),
            "request {i}"
        );
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        5,
        "one connection per request"
    );
    p.stop().await;
}

#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_lent_to_another_request() {
    // The upstream answers an upload at once, without reading its body (as
    // a 401 or a redirect would), and then only drains that connection; a
    // GET on any other connection gets `ok`.
    let (addr, conns) = raw_upstream(|head, _| {
        if head.starts_with("POST ") {
            let early = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly";
            (early.to_string(), Then::Drain)
        } else {
            let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            (ok.to_string(), Then::KeepAlive)
        }
    })
    .await;
    let p = start(&config_with(
        "upstream_timeout = \"5s\"",
        "",
        &format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\nsession = false\n"),
    ))
    .await;

    let (tx, status, early) = post_with_early_answer(&p, "/upload", b"first-chunk").await;
    assert_eq!((status, &early[..]), (200, &b"early"[..]));

    // The upload's connection is still sending (the client holds its body
    // open): a GET now must get a connection of its own, not wait behind it
    // until upstream_timeout and fail with 504.
    let r = get_with(&p, "/", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    drop(tx);
    p.stop().await;
}

#[tokio::test]
async fn a_connection_answered_before_its_upload_ended_is_never_reused() {
    // A naive keep-alive upstream answers a POST before reading its body,
    // then takes the unread rest for its next request and refuses it, late.
    // Had the proxy pooled the connection once the upload ended, the next
    // request would get that refusal for its answer.
    let (addr, conns) = raw_upstream(|head, _| {
        if head.starts_with("POST ") {
            let early = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
            (early.to_string(), Then::KeepAlive)
        } else if head.starts_with("GET /next ") {
            let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            (ok.to_string(), Then::KeepAlive)
        } else {
            let bad = "HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad";
            (bad.to_string(), Then::Late(300))
        }
    })
    .await;
    let p = start(&config_with(
        "upstream_timeout = \"5s\"",
        "",
        &plain_route(addr),
    ))
    .await;
    let (tx, status, _) = post_with_early_answer(&p, "/login", b"x").await;
    assert_eq!(status, 401);
    tx.send(Bytes::from_static(b"rest\r\n\r\n")).await.unwrap();
    drop(tx);
    // Time for the upload to end (and, before the fix, for the connection
    // to go back to the pool while the upstream is still slow to refuse).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    next_request_gets_its_own_answer(&p, &conns).await;
    p.stop().await;
}

#[tokio::test]
async fn an_upstream_silent_in_the_middle_of_a_body_is_given_up_after_upstream_timeout() {
    // Head and 3 of 10 bytes, then nothing, the connection held open.
    let (addr, _) = raw_upstream(|_, _| {
        let part = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        (part.to_string(), Then::Drain)
    })
    .await;
    let p = start(&config_with(
        "upstream_timeout = \"300ms\"",
        "",
        &plain_route(addr),
    ))
    .await;
    // Before the request: the proxy's wait starts after it.
    let asked = std::time::Instant::now();
    let resp = within(
        "the head",
        client::<Full<Bytes>>().get(p.url("/").parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body = within("the cut-off body", resp.into_body().collect()).await;
    assert!(body.is_err(), "a truncated body must not look complete");
    // A lower bound only: the timeout may fire late, never early.
    let waited = asked.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(300),
        "{waited:?}"
    );
    p.stop().await;
}

#[tokio::test]
async fn an_early_answer_read_with_the_last_body_bytes_still_closes_the_connection() {
    use std::io::{Read, Write};
    // The early answer and the last bytes of the upload become readable in
    // the same wakeup of the proxy: the answer must still count as early.
    // A naive upstream (blocking threads, off the test runtime): answers a
    // POST as soon as it has the head, when told to, never reading the body.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Arc::new(std::sync::Mutex::new(go_rx));
    let conns = Arc::new(AtomicUsize::new(0));
    let n = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            n.fetch_add(1, Ordering::SeqCst);
            let (seen_tx, go_rx) = (seen_tx.clone(), go_rx.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let resp = if head.starts_with("POST ") {
                        if let Some(t) = seen_tx.lock().unwrap().take() {
                            let _ = t.send(());
                        }
                        go_rx.lock().unwrap().recv().unwrap();
                        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
                    } else if head.starts_with("GET /next ") {
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nunread-upload!"
                    };
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let p = start_on_this_thread(&config_with(
        "upstream_timeout = \"5s\"",
        "",
        &plain_route(addr),
    ))
    .await;
    let rest = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut c = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    c.write_all(
        format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\nx",
            rest.len() + 1
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    within("the upstream gets the head", seen_rx).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // Both the rest of the body and the early answer become readable before
    // the proxy (on this thread) runs again: one wakeup sees both.
    assert_eq!(c.try_write(rest.as_bytes()).unwrap(), rest.len());
    go_tx.send(()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = within("the 401", c.read(&mut b)).await.unwrap();
        assert!(k > 0);
        got.extend_from_slice(&b[..k]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    next_request_gets_its_own_answer(&p, &conns).await;
    p.stop().await;
}

#[tokio::test]
async fn a_client_slow_to_read_is_not_cut_off_by_the_body_read_timeout() {
    const N: usize = 32 << 20;
    // Built once, before the request: formatting 32 MiB inside the upstream
    // on a loaded machine could itself outlast the timeout to the head.
    let resp: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {N}\r\n\r\n{}",
            "a".repeat(N)
        )
        .into_boxed_str(),
    );
    let (addr, _) = raw_upstream(move |_, _| (resp.to_owned(), Then::KeepAlive)).await;
    let p = start(&config_with(
        "upstream_timeout = \"1s\"",
        "",
        &plain_route(addr),
    ))
    .await;
    let mut c = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Not reading for longer than the upstream timeout: the proxy's buffers
    // and the sockets fill up, and the proxy must wait for this client.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let mut all = Vec::new();
    within("the whole answer", c.read_to_end(&mut all))
        .await
        .unwrap();
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(all.len() - body_at, N);
    p.stop().await;
}

#[tokio::test]
async fn framing_fields_in_unusual_but_valid_forms_are_understood() {
    let (addr, _) = raw_upstream(|head, _| {
        let resp = if head.starts_with("GET /te ") {
            // An empty list element (RFC 9110 5.6.1): still chunked.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        } else if head.starts_with("GET /list ") {
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"
        };
        (resp.to_string(), Then::KeepAlive)
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    let r = get_with(&p, "/te", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hello"));
    for path in ["/list", "/twice"] {
        let r = raw_request(
            p.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let lengths: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(lengths, ["2"], "{path}: {:?}", r.headers);
        assert_eq!(r.body, b"ok");
    }
    p.stop().await;
}

#[tokio::test]
async fn expect_is_not_forwarded() {
    // The proxy has already answered `100 Continue` and sends the body at
    // once; an old upstream could refuse the field with a 417 (nginx drops
    // it too).
    let (addr, _) = raw_upstream(|head, _| {
        let expect = head.to_ascii_lowercase().contains("\r\nexpect:");
        let body = if expect { "expect" } else { "none" };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        (resp, Then::Drain)
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    let r = raw_request(
        p.addr,
        "POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    // `100 Continue` from the proxy, then the answer (raw_request reads
    // the first head only).
    assert_eq!(r.status, 100);
    let rest = String::from_utf8_lossy(&r.body);
    assert!(
        rest.starts_with("HTTP/1.1 200 OK\r\n") && rest.ends_with("\r\n\r\nnone"),
        "{rest}"
    );
    p.stop().await;
}

/// `GET /next` answers `ok` on a second upstream connection: the one of
/// the early-answered upload was not lent to it.
async fn next_request_gets_its_own_answer(p: &Proxy, conns: &AtomicUsize) {
    let r = get_with(p, "/next", &[]).await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.body.as_str(),
            conns.load(Ordering::SeqCst)
        ),
        (200, "ok", 2),
        "the next request must not get the answer to the unread upload"
    );
}

/// Starts a POST to `path` whose body the client holds open, sends `first`
/// and reads the whole answer the upstream gives before the body ends.
/// Returns the sender of the rest of the body, the status and the answer.
async fn post_with_early_answer(
    p: &Proxy,
    path: &str,
    first: &'static [u8],
) -> (mpsc::Sender<Bytes>, u16, Bytes) {
    let (tx, body) = chan_body();
    let req = Request::post(p.url(path)).body(body).unwrap();
    let c = client::<ChanBody>();
    let resp = tokio::spawn(async move { c.request(req).await });
    tx.send(Bytes::from_static(first)).await.unwrap();
    let resp = within("the early answer", resp).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let answer = within("its body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (tx, status, answer)
}

/// A session-less route to `addr`.
fn plain_route(addr: std::net::SocketAddr) -> String {
    format!("[[route]]\nname = \"app\"\nupstream = \"http://{addr}\"\nsession = false\n")
}

#[tokio::test]
async fn chunked_and_interim_responses_are_read_and_the_connection_reused() {
    let (addr, conns) = raw_upstream(|head, _| {
        let resp = if head.starts_with("GET /continue ") {
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter"
        } else {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
             5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
        };
        (resp.to_string(), Then::KeepAlive)
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    let r = get_with(&p, "/chunked", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hello, world"));
    assert_eq!(
        r.headers.get("content-length"),
        None,
        "a conflicting length is dropped"
    );
    let r = get_with(&p, "/continue", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "after"));
    let r = get_with(&p, "/chunked", &[]).await;
    assert_eq!(r.body, "hello, world");
    // The response with both framings was not trusted to end cleanly.
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    p.stop().await;
}

#[tokio::test]
async fn a_body_delimited_by_close_is_read_to_the_end() {
    let (addr, conns) = raw_upstream(|_, _| {
        let resp = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end";
        (resp.to_string(), Then::HangUp)
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    for _ in 0..2 {
        let r = get_with(&p, "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "until the end"));
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "such a connection ends with its body"
    );
    p.stop().await;
}

#[tokio::test]
async fn broken_upstream_responses_are_502() {
    let (addr, _) = raw_upstream(|head, _| {
        let resp = match head.split(' ').nth(1).unwrap_or_default() {
            "/garbage" => "this is not HTTP\r\n\r\n",
            "/lengths" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            "/switch" => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        };
        (resp.to_string(), Then::KeepAlive)
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    for path in ["/garbage", "/lengths", "/switch"] {
        let r = get_with(&p, path, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_one_line(&r.body);
    }
    let r = get_with(&p, "/fine", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    p.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_closed_under_a_request_is_retried_only_when_safe() {
    // Each connection answers its first request and hangs up on the second
    // without a word, as an upstream whose keep-alive timeout fires just as
    // the request arrives.
    let (addr, conns) = raw_upstream(|_, index| match index {
        0 => (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string(),
            Then::KeepAlive,
        ),
        _ => (String::new(), Then::HangUp),
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    for i in 0..3 {
        let r = get_with(&p, "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"), "GET {i}");
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        3,
        "each GET after the first went again on a new connection"
    );
    // A POST may have been acted on before the connection dropped: never
    // sent twice (RFC 9110 9.2.2).
    let r = within("POST", p.post("/", None, "")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(conns.load(Ordering::SeqCst), 3);
    p.stop().await;
}

/// An upstream that answers a request as soon as its head arrives with
/// `resp` (and `extra` bytes of body after it, written while it reads),
/// then reads the request body to its last chunk and reports what it got.
async fn early_answer_upstream(
    resp: &'static str,
    extra: usize,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                let end = loop {
                    if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break e;
                    }
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                };
                buf.drain(..end + 4);
                // Answer and read at the same time.
                tokio::spawn(async move {
                    wr.write_all(resp.as_bytes()).await.unwrap();
                    wr.write_all(&vec![b'r'; extra]).await.unwrap();
                });
                while !buf.ends_with(b"0\r\n\r\n") {
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let _ = tx.send(buf);
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn an_upstream_that_answers_early_and_stops_reading_does_not_hold_the_upload_forever() {
    // Answers 202 at once, then keeps the connection open without reading.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await;
            held.push(s);
        }
    });
    let p = start(&config_with(
        "upstream_timeout = \"300ms\"\nmax_request_body = \"1GiB\"",
        "",
        &plain_route(addr),
    ))
    .await;
    let (tx, status, _) = post_with_early_answer(&p, "/upload", b"first").await;
    assert_eq!(status, 202);
    // The client goes on sending. Once the socket buffers are full the
    // upload stalls; upstream_timeout after the answer ended, the proxy
    // gives it up and the client's connection ends, so sending fails.
    let sending = async move {
        let chunk = Bytes::from(vec![b'u'; 1 << 20]);
        while tx.send(chunk.clone()).await.is_ok() {}
    };
    within("the proxy to give up the stalled upload", sending).await;
    p.stop().await;
}

/// Posts "first", reads the whole early answer, then sends "second" and
/// ends the body; returns the answer and what the upstream received.
async fn upload_after_early_answer(resp: &'static str) -> (u16, String, String) {
    let (addr, mut got) = early_answer_upstream(resp, 0).await;
    let p = start(&config_with(
        "upstream_timeout = \"5s\"",
        "",
        &plain_route(addr),
    ))
    .await;
    let (tx, status, answer) = post_with_early_answer(&p, "/upload", b"first").await;
    // The answer has ended; only now does the client finish its upload.
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let seen = within("the upstream to get the whole body", got.recv())
        .await
        .unwrap();
    p.stop().await;
    (
        status,
        String::from_utf8_lossy(&answer).to_string(),
        String::from_utf8_lossy(&seen).to_string(),
    )
}

#[tokio::test]
async fn an_upload_goes_on_after_an_early_answer_has_ended() {
    let (status, answer, seen) =
        upload_after_early_answer("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly").await;
    assert_eq!((status, answer.as_str()), (200, "early"));
    assert_eq!(seen, "5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n");
    let (status, answer, seen) =
        upload_after_early_answer("HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!((status, answer.as_str()), (202, ""));
    assert_eq!(seen, "5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n");
}

#[tokio::test]
async fn a_large_upload_and_a_large_early_answer_do_not_wait_for_each_other() {
    // More than the socket buffers hold either way: the client sends all of
    // its body before it reads anything, and the upstream writes all of its
    // answer while it reads. The proxy must keep both moving.
    const SIZE: usize = 16 << 20;
    let (addr, mut got) = early_answer_upstream(
        Box::leak(format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_boxed_str()),
        SIZE,
    )
    .await;
    let p = start(&config_with(
        "upstream_timeout = \"10s\"\nmax_request_body = \"64MiB\"",
        "",
        &plain_route(addr),
    ))
    .await;
    let (tx, body) = chan_body();
    let req = Request::post(p.url("/upload")).body(body).unwrap();
    let c = client::<ChanBody>();
    let resp = tokio::spawn(async move { c.request(req).await });
    for _ in 0..SIZE / (64 * 1024) {
        within(
            "the client to send its body",
            tx.send(Bytes::from(vec![b'q'; 64 * 1024])),
        )
        .await
        .unwrap();
    }
    drop(tx);
    let seen = within("the upstream to get the whole body", got.recv())
        .await
        .unwrap();
    assert!(seen.ends_with(b"0\r\n\r\n"));
    let resp = within("the answer", resp).await.unwrap().unwrap();
    let answer = within("its body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(answer.len(), SIZE);
    p.stop().await;
}

#[tokio::test]
async fn trailers_of_a_chunked_answer_reach_an_http2_client() {
    let (addr, _) = raw_upstream(|_, _| {
        let resp = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    2\r\nok\r\n0\r\nX-Checksum: abc\r\nX-Session-Flush: 1\r\n\r\n";
        (resp.to_string(), Then::KeepAlive)
    })
    .await;
    let p = start(&config("", &plain_route(addr))).await;
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = within("the answer", c.get(p.url("/").parse().unwrap()))
        .await
        .unwrap();
    let body = within("its body", resp.into_body().collect())
        .await
        .unwrap();
    let trailers = body.trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc");
    assert!(
        trailers.get("x-session-flush").is_none(),
        "never a session directive"
    );
    assert_eq!(&body.to_bytes()[..], b"ok");
    p.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let gate = Gate::default();
    let g = gate.clone();
    let up = upstream_async(move |_| {
        let g = g.clone();
        Box::pin(async move {
            g.wait().await;
            ok()
        })
    })
    .await;
    let p = start(&config_with(
        "upstream_timeout = \"300ms\"",
        "",
        &route(&up, ""),
    ))
    .await;
    let asked = std::time::Instant::now();
    let r = get_with(&p, "/", &[]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    // A lower bound only: the timeout may fire late, never early.
    let waited = asked.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(300),
        "504 after {waited:?}"
    );
    assert_one_line(&r.body);
    assert!(r.set_cookies().is_empty());
    assert_eq!(up.count(), 1, "the request did reach the upstream");
    gate.open();
    p.stop().await;
}

/// How a client leaves before its answer.
#[derive(Clone, Copy, Debug)]
enum GoesAway {
    /// HTTP/1.1: the connection is closed.
    H1Close,
    /// HTTP/2: the stream is reset (RST_STREAM), the connection stays.
    H2Reset,
    /// HTTP/2: the connection is closed.
    H2Close,
}

/// Django runs the view to the end and saves the session even when the
/// browser has gone; so does the proxy with what the upstream answers, over
/// either HTTP version (over HTTP/2, hyper drops the request's future when
/// the stream is reset or the connection ends: the change was lost, a
/// logout too).
async fn a_client_that_goes_away(how: GoesAway, workers: usize, shutdown: bool) {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use sessiongate::store::Store;
    let gate = Gate::default();
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<()>();
    let g = gate.clone();
    let up = upstream_async(move |seen| {
        let g = g.clone();
        let arrived_tx = arrived_tx.clone();
        Box::pin(async move {
            if seen.uri.path() == "/slow" {
                let _ = arrived_tx.send(());
                g.wait().await;
                return directives(&[("X-Session-Update", r#"{"cart": 1}"#)]);
            }
            directives(&[("X-Session-Update", r#"{"user": "a"}"#)])
        })
    })
    .await;
    let cfg = sessiongate::config::Config::parse(
        &config("", &route(&up, "")),
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let store = sessiongate::store::AnyStore::Memory(sessiongate::store::MemoryStore::new());
    let mut p = common::start_workers(cfg, store, workers).await;
    let key = p.get("/login", None).await.key();
    let cookie = format!("sessionid={key}");

    let gauge = p.metrics.connections("main");
    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    // What is kept open until the change is seen (the HTTP/2 connection
    // whose stream was reset).
    let mut kept = None;
    // Connections open while the request runs (the client's keep-alive
    // one of `/login` may be one).
    let mut open = 0;
    match how {
        GoesAway::H1Close => {
            let req = format!("GET /slow HTTP/1.1\r\nHost: app\r\nCookie: {cookie}\r\n\r\n");
            tcp.write_all(req.as_bytes()).await.unwrap();
            within("the upstream to get the request", arrived.recv()).await;
            open = gauge.get();
            drop(tcp);
        }
        GoesAway::H2Reset => {
            let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
            let conn = tokio::spawn(conn);
            let req = http::Request::get("http://app/slow")
                .header("cookie", &cookie)
                .body(())
                .unwrap();
            let (_response, mut stream) = send.send_request(req, true).unwrap();
            within("the upstream to get the request", arrived.recv()).await;
            stream.send_reset(h2::Reason::CANCEL);
            kept = Some((send, conn));
            // Nothing tells when the server has dropped the reset stream's
            // request (what it does then is the test): a moment, long
            // enough for a server that cancels it to have done so.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        GoesAway::H2Close => {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            let conn = tokio::spawn(conn);
            let req = http::Request::get("http://app/slow")
                .header("cookie", &cookie)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let asked = tokio::spawn(send.send_request(req));
            within("the upstream to get the request", arrived.recv()).await;
            open = gauge.get();
            asked.abort();
            conn.abort();
            let _ = conn.await;
        }
    }
    // HTTP/1.1: the server does not watch the client while a request is
    // in flight (`half_close`), so nothing can cancel it before it ends.
    if matches!(how, GoesAway::H2Close) {
        // The server has seen the connection end once its task has: the
        // gauge of open connections goes down.
        within("the server to see the connection close", async {
            while gauge.get() >= open {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    if shutdown {
        // A graceful shutdown starts while the request runs on: it is
        // given the grace period, not cancelled with the worker.
        p.trigger_shutdown();
        within("the listener to close", async {
            while tokio::net::TcpStream::connect(p.addr).await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    gate.open();

    let k = sessiongate::session::SessionKey::parse(&key).unwrap();
    within("the upstream's change to be saved", async {
        loop {
            let r = p.store.load(&k, p.clock.now_ms()).await.unwrap().unwrap();
            if String::from_utf8_lossy(&r.data).contains("cart") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(kept);
    p.stop().await;
}

#[tokio::test]
async fn a_client_that_closes_its_connection_mid_request_loses_no_session_change() {
    a_client_that_goes_away(GoesAway::H1Close, 0, false).await;
}

#[tokio::test]
async fn an_h2_stream_reset_mid_request_loses_no_session_change() {
    a_client_that_goes_away(GoesAway::H2Reset, 0, false).await;
}

#[tokio::test]
async fn an_h2_connection_closed_mid_request_loses_no_session_change() {
    a_client_that_goes_away(GoesAway::H2Close, 0, false).await;
}

/// SPEC 1: a shutdown lets in-flight requests finish within
/// `shutdown_grace`, those whose client went away too (on a worker thread
/// of its own, whose runtime ends with the shutdown: before, the request
/// was dropped with it and its change lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_a_request_whose_client_went_away() {
    a_client_that_goes_away(GoesAway::H2Close, 1, true).await;
}

#[tokio::test]
async fn client_that_never_finishes_its_head_is_dropped() {
    let up = upstream(|_| ok()).await;
    let p = start(&config_with(
        "header_read_timeout = \"300ms\"",
        "",
        &route(&up, ""),
    ))
    .await;
    // Before connecting: the server's clock starts after its accept.
    let sent = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    // EOF or a reset: either way the connection is gone.
    assert!(closed.is_ok(), "the connection was still open after 5s");
    // A lower bound only: the timeout may fire late, never early.
    let waited = sent.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(300),
        "dropped after {waited:?}"
    );
    assert_eq!(up.count(), 0, "the upstream was never called");
    p.stop().await;
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_refuses_new_connections_and_finishes_in_flight_requests() {
    let gate = Gate::default();
    let (arrived_tx, mut arrived_rx) = mpsc::unbounded_channel::<()>();
    let g = gate.clone();
    let up = upstream_async(move |_| {
        let g = g.clone();
        let arrived = arrived_tx.clone();
        Box::pin(async move {
            let _ = arrived.send(());
            g.wait().await;
            text("finished")
        })
    })
    .await;
    let mut p = start(&config("", &route(&up, ""))).await;
    let url: http::Uri = p.url("/slow").parse().unwrap();
    let in_flight = tokio::spawn(async move {
        let resp = client::<Full<Bytes>>().get(url).await.expect("answer");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    });
    within("the request to reach the upstream", arrived_rx.recv())
        .await
        .unwrap();

    p.trigger_shutdown();
    wait_refused(p.addr).await;
    assert!(!in_flight.is_finished(), "the upstream still holds it");

    gate.open();
    let (status, body) = within("the in-flight response", in_flight).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    within("the server to stop", p.done.take().unwrap())
        .await
        .expect("server task");
}

/// SPEC 2 `upstream_timeout` (-> 504), README "a 504 is not retried": a
/// request the upstream has but does not answer in time is never sent
/// again, neither on another connection to it (one that was kept alive
/// may look as if it had closed) nor to the next upstream: the upstream
/// may be acting on it.
#[tokio::test]
async fn a_timed_out_request_is_never_sent_again() {
    let gate = Gate::default();
    let slow_upstream = || {
        let gate = gate.clone();
        upstream_async(move |s| {
            let gate = gate.clone();
            Box::pin(async move {
                if s.uri.path() == "/slow" {
                    gate.wait().await;
                }
                ok()
            })
        })
    };
    let (a, b) = (slow_upstream().await, slow_upstream().await);
    let p = start(&config_with(
        "upstream_timeout = \"500ms\"",
        "",
        &format!(
            "[[route]]\nname = \"app\"\nupstreams = [\"{}\", \"{}\"]\n",
            a.url(),
            b.url()
        ),
    ))
    .await;
    // Each upstream has a kept-alive connection in the pool.
    for _ in 0..2 {
        assert_eq!(p.get("/warm", None).await.status, 200);
    }
    assert_eq!((a.count(), b.count()), (1, 1));
    let slow = |u: &Upstream| {
        u.requests()
            .iter()
            .filter(|s| s.uri.path() == "/slow")
            .count()
    };
    for n in 1..=2 {
        let r = p.get("/slow", None).await;
        assert_eq!(r.status, 504, "{}", r.body);
        assert_eq!(slow(&a) + slow(&b), n, "sent once, to one upstream");
    }
    gate.open();
    p.stop().await;
}

/// A request that runs on after its HTTP/2 client closed the connection
/// keeps the connection's `max_connections` slot until it ends, so clients
/// that open, ask and leave cannot start upstream work without bound
/// (before, the slot went back with the connection's task, which over
/// HTTP/2 ends before hyper's stream tasks hand the request over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_running_on_after_its_h2_client_left_keeps_its_slot() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let gate = Gate::default();
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<()>();
    let g = gate.clone();
    let up = upstream_async(move |seen| {
        let g = g.clone();
        let arrived_tx = arrived_tx.clone();
        Box::pin(async move {
            if seen.uri.path() == "/slow" {
                let _ = arrived_tx.send(());
                g.wait().await;
            }
            ok()
        })
    })
    .await;
    let text = config("", &route(&up, "")).replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nmax_connections = 1",
    );
    assert!(text.contains("max_connections = 1"));
    let cfg = sessiongate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let store = sessiongate::store::AnyStore::Memory(sessiongate::store::MemoryStore::new());
    let p = common::start_workers(cfg, store, 1).await;
    let gauge = p.metrics.connections("main");

    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://app/slow")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let asked = tokio::spawn(send.send_request(req));
    within("the upstream to get the request", arrived.recv()).await;
    asked.abort();
    conn.abort();
    let _ = conn.await;
    within("the server to see the connection close", async {
        while gauge.get() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;

    // The next client waits for the slot while the request runs on...
    let mut next = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    next.write_all(b"GET /fast HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        next.read_to_end(&mut answer),
    )
    .await;
    assert!(
        early.is_err(),
        "served while the abandoned request held the only slot: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // ...and is served once it ends.
    gate.open();
    within("the next client's answer", next.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    p.stop().await;
}
