//! End-to-end session semantics (SPEC 3 and 4) on the memory engine: the
//! real server on port 0 in front of a scripted upstream.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::Method;
use serde_json::json;

/// An upstream that applies whatever directives the request asks for in
/// `?d=` style: the test passes them through headers named `x-test-*`.
async fn echo_directives() -> Upstream {
    upstream(|s| {
        let mut b = reply();
        for (n, v) in &s.headers {
            if let Some(d) = n.as_str().strip_prefix("x-test-") {
                b = b.header(format!("x-session-{d}"), v.clone());
            }
        }
        b.body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
            .unwrap()
    })
    .await
}

/// Sends a request whose upstream answer carries `directives`.
async fn with(p: &Proxy, key: Option<&str>, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, "/", key);
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

async fn setup(session_extra: &str) -> (Upstream, Proxy) {
    let up = echo_directives().await;
    let p = start(&config(session_extra, &route(&up, ""))).await;
    (up, p)
}

#[tokio::test]
async fn new_visitor_gets_no_cookie_and_no_record() {
    let (up, p) = setup("").await;
    for _ in 0..20 {
        let r = p.get("/", None).await;
        assert_eq!(r.status, 200);
        assert!(r.set_cookies().is_empty(), "lazy: no cookie without data");
        assert_eq!(r.header("vary"), Some("Cookie"));
    }
    let s = up.last();
    assert_eq!(s.header("x-session"), Some("{}"));
    assert_eq!(s.header("x-session-id"), Some(""));
    assert_eq!(s.header("x-session-new"), Some("true"));
    assert_eq!(s.header("x-session-expiry-age"), Some("1209600"));
    assert_eq!(s.header("x-session-expire-at-browser-close"), Some("false"));
    let date = s.header("x-session-expiry-date").unwrap();
    assert!(date.ends_with('Z') && date.len() == 20, "{date}");
    let sessiongate::store::AnyStore::Memory(m) = &*p.store;
    assert_eq!(
        m.len(),
        0,
        "a flood of cookie-less requests does not grow the store"
    );
}

#[tokio::test]
async fn update_creates_session_and_next_request_sees_it() {
    let (up, p) = setup("").await;
    let r = with(&p, None, &[("update", r#"{"user_id": 7, "name": "Zoë"}"#)]).await;
    let key = r.key();
    let c = r.session_cookie().unwrap();
    assert_eq!(attr(&c, "max-age").as_deref(), Some("1209600"));
    assert_eq!(attr(&c, "path").as_deref(), Some("/"));
    assert_eq!(attr(&c, "samesite").as_deref(), Some("Lax"));
    assert!(attr(&c, "httponly").is_some());
    assert_eq!(r.header("cache-control"), Some("private"));
    assert!(
        r.header("x-session-update").is_none(),
        "directives never reach the client"
    );

    let r2 = p.get("/", Some(&key)).await;
    assert!(r2.set_cookies().is_empty(), "nothing changed: no cookie");
    let s = up.last();
    assert_eq!(s.session(), json!({"user_id": 7, "name": "Zoë"}));
    let raw = s.header("x-session").unwrap();
    assert!(raw.is_ascii() && raw.contains("\\u00eb"), "{raw}");
    assert_eq!(s.header("x-session-new"), Some("false"));
    let id = s.header("x-session-id").unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_ne!(id, key, "the id is not the cookie value");
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-id"),
        Some(id.as_str()),
        "stable"
    );
    assert!(
        !s.header("cookie").unwrap_or("").contains(&key),
        "cookie stripped"
    );
}

#[tokio::test]
async fn expires_and_max_age_agree() {
    let (_up, p) = setup("").await;
    let r = with(&p, None, &[("update", r#"{"a":1}"#)]).await;
    let c = r.session_cookie().unwrap();
    let max_age: u64 = attr(&c, "max-age").unwrap().parse().unwrap();
    let expires = httpdate::parse_http_date(&attr(&c, "expires").unwrap()).unwrap();
    let now = std::time::SystemTime::now();
    let delta = expires.duration_since(now).unwrap().as_secs();
    assert!(delta.abs_diff(max_age) <= 2, "{delta} vs {max_age}");
}
