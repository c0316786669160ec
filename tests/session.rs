//! End-to-end session semantics (SPEC 3 and 4) on the memory engine: the
//! real server on port 0 in front of a scripted upstream.

mod common;

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
    let m = p.store.as_memory().unwrap();
    assert_eq!(
        m.len(),
        0,
        "a flood of cookie-less requests does not grow the store"
    );
}

/// An Expiry already past on a new visitor (with data or without) makes
/// no session: it would end at once. Before, each such request minted a
/// key, wrote a record and sent a cookie that expired as it arrived.
#[tokio::test]
async fn a_past_expiry_on_a_new_visitor_makes_no_session() {
    let (_up, p) = setup("").await;
    for directives in [
        &[("expiry", "2000-01-01T00:00:00Z")][..],
        &[
            ("update", r#"{"a": 1}"#),
            ("expiry", "2000-01-01T00:00:00Z"),
        ],
    ] {
        let r = with(&p, None, directives).await;
        assert_eq!(r.status, 200);
        assert!(
            r.set_cookies().is_empty(),
            "{directives:?}: {:?}",
            r.set_cookies()
        );
    }
    assert_eq!(p.store.as_memory().unwrap().len(), 0, "no record made");
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

#[tokio::test]
async fn directives_never_reach_client_and_5xx_saves_nothing() {
    let up = upstream(|s| {
        let status = if s.uri.path() == "/boom" { 500 } else { 200 };
        reply()
            .status(status)
            .header("x-session-update", r#"{"a":1}"#)
            .header("X-Session-Anything", "x")
            .body(Default::default())
            .unwrap()
    })
    .await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = p.get("/boom", None).await;
    assert_eq!(r.status, 500);
    assert!(r.set_cookies().is_empty(), "no cookie on 5xx");
    assert!(r
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("x-session")));
    let m = p.store.as_memory().unwrap();
    assert_eq!(m.len(), 0, "nothing written on 5xx");
    let r = p.get("/ok", None).await;
    assert!(r
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("x-session")));
    let key = r.key();
    // 5xx on an existing session: the change is not applied either.
    let up2 = upstream(|_| {
        reply()
            .status(503)
            .header("x-session-update", r#"{"a":2}"#)
            .body(Default::default())
            .unwrap()
    })
    .await;
    let _ = up2;
    let r = p.get("/boom", Some(&key)).await;
    assert!(r.set_cookies().is_empty());
    p.get("/ok", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"a": 1}));
}

#[tokio::test]
async fn malformed_directive_is_502_naming_header_and_changes_nothing() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"a":1}"#)]).await.key();
    let cases: &[(&str, &str, &str)] = &[
        ("update", "{not json", "X-Session-Update"),
        ("update", "[1,2]", "X-Session-Update"),
        ("replace", "42", "X-Session-Replace"),
        ("delete", "[1]", "X-Session-Delete"),
        ("expiry", "next tuesday", "X-Session-Expiry"),
        ("clear", "please", "X-Session-Clear"),
    ];
    for (d, v, header) in cases {
        // A valid directive in the same response is not applied either.
        let r = with(&p, Some(&key), &[(d, v), ("flush", "1")]).await;
        assert_eq!(r.status, 502, "{d}: {v}");
        assert!(r.body.contains(header), "{}", r.body);
        assert!(r.body.ends_with('\n') && r.body.lines().count() == 1);
        assert!(r.set_cookies().is_empty());
    }
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"a": 1}));
}

#[tokio::test]
async fn directive_order_is_fixed() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"old":1,"keep":1}"#)])
        .await
        .key();
    // Replace, then Clear, then Update, then Delete, whatever the header order.
    let r = with(
        &p,
        Some(&key),
        &[
            ("delete", "b"),
            ("update", r#"{"a":1,"b":2}"#),
            ("clear", "1"),
            ("replace", r#"{"r":1}"#),
        ],
    )
    .await;
    assert_eq!(r.key(), key, "same key");
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"a": 1}));

    // Replace then Update then Delete.
    with(
        &p,
        Some(&key),
        &[
            ("update", r#"{"u":1}"#),
            ("replace", r#"{"r":1,"d":1}"#),
            ("delete", "d"),
        ],
    )
    .await;
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"r": 1, "u": 1}));
}

#[tokio::test]
async fn several_update_headers_apply_in_order() {
    let up = upstream(|_| {
        reply()
            .header("x-session-update", r#"{"a":1,"b":1}"#)
            .header("x-session-update", r#"{"b":2}"#)
            .body(Default::default())
            .unwrap()
    })
    .await;
    let p = start(&config("", &route(&up, ""))).await;
    let key = p.get("/", None).await.key();
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"a": 1, "b": 2}));
}

#[tokio::test]
async fn delete_forms_and_empty_session_keeps_cookie() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"a":1,"b":2,"c,d":3,"e":4}"#)])
        .await
        .key();
    with(&p, Some(&key), &[("delete", "a, b")]).await;
    with(&p, Some(&key), &[("delete", r#"["c,d"]"#)]).await;
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"e": 4}));
    // Deleting the last key: still saved, cookie kept (Django).
    let r = with(&p, Some(&key), &[("delete", "e")]).await;
    assert_eq!(r.key(), key);
    p.get("/", Some(&key)).await;
    let s = up.last();
    assert_eq!(s.session(), json!({}));
    assert_eq!(
        s.header("x-session-new"),
        Some("false"),
        "the key is still valid"
    );
    // Deleting an absent key changes nothing: no write, no cookie.
    let r = with(&p, Some(&key), &[("delete", "zzz")]).await;
    assert!(r.set_cookies().is_empty());
}

#[tokio::test]
async fn clear_keeps_key_flush_deletes_cookie() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"a":1}"#)]).await.key();
    let r = with(&p, Some(&key), &[("clear", "1")]).await;
    assert_eq!(r.key(), key, "Clear keeps the key and the cookie");
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({}));
    assert_eq!(up.last().header("x-session-new"), Some("false"));

    let r = with(&p, Some(&key), &[("flush", "1")]).await;
    let c = r.session_cookie().expect("deletion cookie");
    assert!(
        c.starts_with("sessionid=\"\";") || c.starts_with("sessionid=;"),
        "{c}"
    );
    assert_eq!(attr(&c, "max-age").as_deref(), Some("0"));
    assert!(attr(&c, "expires").unwrap().contains("1970"));
    assert_eq!(attr(&c, "path").as_deref(), Some("/"));
    assert_eq!(r.header("cache-control"), Some("private"));
    // The old key is gone: a new, empty session, and the stale cookie is deleted.
    let r = p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    assert_eq!(up.last().session(), json!({}));
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));
}

#[tokio::test]
async fn flush_then_update_starts_a_fresh_session() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"user":1}"#)]).await.key();
    let r = with(
        &p,
        Some(&key),
        &[("update", r#"{"flash":"bye"}"#), ("flush", "1")],
    )
    .await;
    let new_key = r.key();
    assert_ne!(new_key, key);
    p.get("/", Some(&new_key)).await;
    assert_eq!(up.last().session(), json!({"flash": "bye"}));
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
}

#[tokio::test]
async fn cycle_key_keeps_data_and_kills_old_key() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"cart":[1]}"#)]).await.key();
    p.get("/", Some(&key)).await;
    let old_id = up.last().header("x-session-id").unwrap().to_string();
    let r = with(
        &p,
        Some(&key),
        &[("cycle-key", "1"), ("update", r#"{"user":"ann"}"#)],
    )
    .await;
    let new_key = r.key();
    assert_ne!(new_key, key);
    p.get("/", Some(&new_key)).await;
    let s = up.last();
    assert_eq!(s.session(), json!({"cart":[1], "user":"ann"}));
    assert_ne!(
        s.header("x-session-id").unwrap(),
        old_id,
        "id changes with the key"
    );
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-new"),
        Some("true"),
        "old key is dead"
    );
}

#[tokio::test]
async fn cycle_or_expiry_on_a_new_visitor_creates_a_session() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("cycle-key", "1")]).await.key();
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-new"), Some("false"));
    let key = with(&p, None, &[("expiry", "300")]).await.key();
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-expiry-age"), Some("300"));
    // Clear, empty Update or expiry none on a new visitor: still nothing.
    for d in [
        ("clear", "1"),
        ("update", "{}"),
        ("expiry", "none"),
        ("replace", "{}"),
    ] {
        assert!(with(&p, None, &[d]).await.set_cookies().is_empty(), "{d:?}");
    }
}

#[tokio::test]
async fn invalid_cookies_are_never_adopted() {
    let (up, p) = setup("").await;
    let forged = "a".repeat(32);
    for bad in [
        forged.as_str(),
        "short",
        "UPPERCASEUPPERCASEUPPERCASEUPPER",
        "x;y",
    ] {
        let r = with(&p, Some(bad), &[("update", r#"{"a":1}"#)]).await;
        let key = r.key();
        assert_ne!(key, bad, "fixation: a fresh key, never the presented one");
        assert_eq!(up.last().header("x-session-new"), Some("true"));
        // Without a write, the bad cookie is deleted.
        let r = p.get("/", Some(bad)).await;
        let c = r.session_cookie().expect("deletion");
        assert_eq!(attr(&c, "max-age").as_deref(), Some("0"), "{c}");
    }
}

#[tokio::test]
async fn first_of_several_session_cookies_is_used() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"who":"first"}"#)])
        .await
        .key();
    let other = with(&p, None, &[("update", r#"{"who":"second"}"#)])
        .await
        .key();
    let req = p
        .req(Method::GET, "/", None)
        .header(
            "cookie",
            format!("theme=dark; sessionid={key}; sessionid={other}; lang=fr"),
        )
        .body(Default::default())
        .unwrap();
    p.send(req).await;
    let s = up.last();
    assert_eq!(s.session(), json!({"who": "first"}));
    assert_eq!(
        s.header("cookie"),
        Some("theme=dark; lang=fr"),
        "other cookies pass untouched"
    );
}

#[tokio::test]
async fn expiry_forms() {
    let (up, p) = setup("").await;
    // N seconds.
    let r = with(&p, None, &[("update", r#"{"a":1}"#), ("expiry", "300")]).await;
    let key = r.key();
    let c = r.session_cookie().unwrap();
    assert_eq!(attr(&c, "max-age").as_deref(), Some("300"));
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-expiry-age"), Some("300"));
    assert_eq!(
        up.last().header("x-session-expire-at-browser-close"),
        Some("false")
    );
    // 0: browser-close cookie, server keeps it cookie_age.
    let r = with(&p, Some(&key), &[("expiry", "0")]).await;
    let c = r.session_cookie().unwrap();
    assert!(
        attr(&c, "max-age").is_none() && attr(&c, "expires").is_none(),
        "{c}"
    );
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-expire-at-browser-close"),
        Some("true")
    );
    assert_eq!(up.last().header("x-session-expiry-age"), Some("1209600"));
    // A date.
    let when = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let date = when
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let r = with(&p, Some(&key), &[("expiry", &date)]).await;
    let age: i64 = attr(&r.session_cookie().unwrap(), "max-age")
        .unwrap()
        .parse()
        .unwrap();
    assert!((7195..=7200).contains(&age), "{age}");
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-expiry-date"),
        Some(date.as_str())
    );
    // none: back to the global policy.
    let r = with(&p, Some(&key), &[("expiry", "none")]).await;
    assert_eq!(
        attr(&r.session_cookie().unwrap(), "max-age").as_deref(),
        Some("1209600")
    );
}

#[tokio::test]
async fn expired_sessions_are_never_served() {
    let (up, p) = setup("cookie_age = \"60s\"").await;
    let key = with(&p, None, &[("update", r#"{"a":1}"#)]).await.key();
    let short = with(&p, None, &[("update", r#"{"b":1}"#), ("expiry", "5")])
        .await
        .key();
    p.clock.advance(Duration::from_secs(6));
    p.get("/", Some(&short)).await;
    assert_eq!(
        up.last().header("x-session-new"),
        Some("true"),
        "5 s expiry passed"
    );
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().session(), json!({"a": 1}), "60 s not yet");
    p.clock.advance(Duration::from_secs(60));
    let r = p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    assert!(
        r.session_cookie().unwrap().contains("Max-Age=0"),
        "stale cookie deleted"
    );
    // The sweep removes both records.
    let m = p.store.as_memory().unwrap();
    use sessiongate::store::Store;
    assert_eq!(m.clear_expired(p.clock.now_ms()).await.unwrap(), 2);
    assert_eq!(m.len(), 0);
}

#[tokio::test]
async fn save_every_request_refreshes_the_cookie() {
    let (up, p) = setup("save_every_request = true\ncookie_age = \"100s\"").await;
    let key = with(&p, None, &[("update", r#"{"a":1}"#)]).await.key();
    p.clock.advance(Duration::from_secs(60));
    let r = p.get("/", Some(&key)).await;
    assert_eq!(r.key(), key, "cookie sent again with no directive");
    p.clock.advance(Duration::from_secs(60));
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().session(),
        json!({"a": 1}),
        "each request extended the life"
    );
    // Not for an empty new session.
    assert!(p.get("/", None).await.set_cookies().is_empty());
}

#[tokio::test]
async fn without_save_every_request_reads_do_not_extend() {
    let (up, p) = setup("cookie_age = \"100s\"").await;
    let key = with(&p, None, &[("update", r#"{"a":1}"#)]).await.key();
    p.clock.advance(Duration::from_secs(60));
    assert!(p.get("/", Some(&key)).await.set_cookies().is_empty());
    p.clock.advance(Duration::from_secs(60));
    p.get("/", Some(&key)).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
}

#[tokio::test]
async fn absolute_timeout_caps_an_active_session() {
    let (up, p) = setup("cookie_age = \"100s\"\nabsolute_timeout = \"150s\"").await;
    let key = with(&p, None, &[("update", r#"{"n":0}"#)]).await.key();
    p.clock.advance(Duration::from_secs(90));
    let r = with(&p, Some(&key), &[("update", r#"{"n":1}"#)]).await;
    let age: i64 = attr(&r.session_cookie().unwrap(), "max-age")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (59..=60).contains(&age),
        "capped by the absolute timeout: {age}"
    );
    p.get("/", Some(&key)).await;
    let a: i64 = up
        .last()
        .header("x-session-expiry-age")
        .unwrap()
        .parse()
        .unwrap();
    assert!((59..=60).contains(&a), "{a}");
    p.clock.advance(Duration::from_secs(61));
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-new"),
        Some("true"),
        "active, but too old"
    );
}

#[tokio::test]
async fn expire_at_browser_close_policy() {
    let (up, p) = setup("expire_at_browser_close = true").await;
    let r = with(&p, None, &[("update", r#"{"a":1}"#)]).await;
    let c = r.session_cookie().unwrap();
    assert!(
        attr(&c, "max-age").is_none() && attr(&c, "expires").is_none(),
        "{c}"
    );
    let key = r.key();
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-expire-at-browser-close"),
        Some("true")
    );
    let r = with(&p, Some(&key), &[("expiry", "60")]).await;
    assert_eq!(
        attr(&r.session_cookie().unwrap(), "max-age").as_deref(),
        Some("60")
    );
}

#[tokio::test]
async fn cookie_attributes_follow_config() {
    let (_up, p) = setup(
        "cookie_name = \"__Host-sid\"\ncookie_secure = true\ncookie_samesite = \"Strict\"\ncookie_httponly = false",
    )
    .await;
    let r = with(&p, None, &[("update", r#"{"a":1}"#)]).await;
    let c = r
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("__Host-sid="))
        .unwrap();
    assert!(attr(&c, "secure").is_some());
    assert!(attr(&c, "httponly").is_none());
    assert_eq!(attr(&c, "samesite").as_deref(), Some("Strict"));
    assert_eq!(attr(&c, "path").as_deref(), Some("/"));
    assert!(attr(&c, "domain").is_none());
}

#[tokio::test]
async fn cache_control_private_only_when_upstream_sent_none() {
    let up = upstream(|_| {
        reply()
            .header("cache-control", "no-store")
            .header("vary", "Accept-Encoding")
            .header("x-session-update", r#"{"a":1}"#)
            .body(Default::default())
            .unwrap()
    })
    .await;
    let p = start(&config("", &route(&up, ""))).await;
    let r = p.get("/", None).await;
    assert!(r.session_cookie().is_some());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let vary: Vec<&str> = r
        .headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(vary, vec!["Accept-Encoding", "Cookie"]);
}

#[tokio::test]
async fn forty_concurrent_disjoint_updates_all_survive() {
    // Every one of the 40 requests has loaded the session and reached the
    // upstream before any of them answers: a blind overwrite would lose 39.
    let barrier = Arc::new(tokio::sync::Barrier::new(40));
    let up = upstream_async(move |s| {
        let barrier = barrier.clone();
        Box::pin(async move {
            let Some(n) = s.header("x-n").map(str::to_string) else {
                return ok();
            };
            if n != "0" {
                barrier.wait().await;
            }
            directives(&[("x-session-update", &format!(r#"{{"k{n}": {n}}}"#))])
        })
    })
    .await;
    let p = Arc::new(start(&config("", &route(&up, ""))).await);
    let key = {
        let r = p
            .send(
                p.req(Method::GET, "/", None)
                    .header("x-n", "0")
                    .body(Default::default())
                    .unwrap(),
            )
            .await;
        r.key()
    };
    let mut tasks = Vec::new();
    for n in 1..=40 {
        let p = p.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let r = p
                .send(
                    p.req(Method::POST, "/", Some(&key))
                        .header("x-n", n.to_string())
                        .body(Default::default())
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, 200);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = p.get("/", Some(&key)).await;
    assert_eq!(s.status, 200);
    let data = up.last().session();
    let obj = data.as_object().unwrap();
    assert_eq!(obj.len(), 41, "every key kept: {data}");
    for n in 0..=40 {
        assert_eq!(obj[&format!("k{n}")], json!(n));
    }
}

/// An upstream for the in-flight races (SPEC 4.9): `/login` writes
/// `login`, `/logout` flushes, `/cycle` cycles the key, and each of `slow`'s
/// paths answers its directive only once the test lets it ([`Race::end`]).
struct Race {
    up: Upstream,
    gate: Arc<tokio::sync::Notify>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Race {
    async fn upstream(
        login: &'static str,
        slow: &'static [(&'static str, &'static str, &'static str)],
    ) -> Race {
        let gate = Arc::new(tokio::sync::Notify::new());
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (g, a) = (gate.clone(), arrived.clone());
        let up = upstream_async(move |s| {
            let (g, a) = (g.clone(), a.clone());
            Box::pin(async move {
                match s.uri.path() {
                    "/login" => directives(&[("x-session-update", login)]),
                    "/logout" => directives(&[("x-session-flush", "1")]),
                    "/cycle" => directives(&[("x-session-cycle-key", "1")]),
                    path => match slow.iter().find(|(p, _, _)| *p == path) {
                        Some((_, name, value)) => {
                            a.notify_one();
                            g.notified().await;
                            directives(&[(name, value)])
                        }
                        None => ok(),
                    },
                }
            })
        })
        .await;
        Race { up, gate, arrived }
    }

    /// `slow` on `key`'s session, with `ender` answered while it is in
    /// flight: the slow request's answer.
    async fn end(&self, p: &Arc<Proxy>, key: &str, slow: &'static str, ender: &str) -> Got {
        let pending = {
            let (p, key) = (p.clone(), key.to_string());
            tokio::spawn(async move { p.get(slow, Some(&key)).await })
        };
        self.arrived.notified().await;
        assert_eq!(p.get(ender, Some(key)).await.status, 200, "{ender}");
        self.gate.notify_one();
        pending.await.unwrap()
    }
}

#[tokio::test]
async fn flush_during_an_in_flight_request_gives_400_and_no_resurrection() {
    let race = Race::upstream(
        r#"{"user":1}"#,
        &[("/slow", "x-session-update", r#"{"late":1}"#)],
    )
    .await;
    let up = &race.up;
    let p = Arc::new(start(&config("", &route(up, ""))).await);
    for ender in ["/logout", "/cycle"] {
        let key = p.get("/login", None).await.key();
        let r = race.end(&p, &key, "/slow", ender).await;
        assert_eq!(r.status, 400, "{ender}: {}", r.body);
        assert!(r.body.contains("concurrent"), "{}", r.body);
        assert!(r.set_cookies().is_empty());
        // Not resurrected.
        p.get("/", Some(&key)).await;
        assert_eq!(up.last().header("x-session-new"), Some("true"), "{ender}");
    }
}

/// SPEC 4.9 and 9: Logout-Others from a request whose session another
/// request flushed (or cycled) meanwhile cannot act on the session's user:
/// it is the 400 of an interrupted session, not a 200 that ended nothing.
#[tokio::test]
async fn logout_others_after_a_concurrent_flush_is_interrupted() {
    let race = Race::upstream(
        r#"{"user":"u1"}"#,
        &[("/slow-others", "x-session-logout-others", "1")],
    )
    .await;
    let up = &race.up;
    let p = Arc::new(start(&config("user_key = \"user\"", &route(up, ""))).await);
    for ender in ["/logout", "/cycle"] {
        let other = p.get("/login", None).await.key();
        let key = p.get("/login", None).await.key();
        let r = race.end(&p, &key, "/slow-others", ender).await;
        assert_eq!(r.status, 400, "{ender}: {}", r.body);
        assert!(r.body.contains("concurrent"), "{}", r.body);
        p.get("/", Some(&other)).await;
        assert_eq!(
            up.last().session(),
            json!({"user": "u1"}),
            "{ender}: the other session was not ended"
        );
    }
}

#[tokio::test]
async fn a_no_op_directive_after_a_concurrent_flush_is_not_interrupted() {
    // `/slow-noop` pops a key the session does not have: Django's
    // session.pop(k, None) leaves it unmodified, so no save.
    let race = Race::upstream(
        r#"{"user":1}"#,
        &[
            ("/slow-noop", "x-session-delete", "absent"),
            ("/slow-pop", "x-session-delete", "user"),
        ],
    )
    .await;
    let p = Arc::new(start(&config("", &route(&race.up, ""))).await);
    for (path, status) in [("/slow-noop", 200), ("/slow-pop", 400)] {
        let key = p.get("/login", None).await.key();
        let r = race.end(&p, &key, path, "/logout").await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.set_cookies().is_empty(), "{path}");
    }
}

#[tokio::test]
async fn login_required_redirects_or_401_without_calling_upstream() {
    let (up, p) = {
        let up = echo_directives().await;
        let routes = format!(
            "{}\n[[route]]\nname = \"admin\"\npath = \"/admin\"\nupstream = \"{}\"\nlogin_required = [\"user_id\"]\nlogin_url = \"/accounts/login\"\n",
            route(&up, ""),
            up.url()
        );
        let p = start(&config("", &routes)).await;
        (up, p)
    };
    let r = p.get("/admin/users?page=2&q=a+b", None).await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("/accounts/login?next=/admin/users%3Fpage%3D2%26q%3Da%2Bb")
    );
    assert_eq!(up.count(), 0, "the upstream is not called");
    let r = p.post("/admin/users", None, "x=1").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Cookie realm=\"admin\", form-action=\"/accounts/login\", cookie-name=\"sessionid\"")
    );
    let r = p
        .send(
            p.req(Method::HEAD, "/admin", None)
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(up.count(), 0);
    // Logged in: passes.
    let key = with(&p, None, &[("update", r#"{"user_id": 1}"#)])
        .await
        .key();
    let r = p.get("/admin/users", Some(&key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().uri.path(), "/admin/users");
}

#[tokio::test]
async fn forward_headers_are_safe() {
    let up = echo_directives().await;
    let routes = route(
        &up,
        "forward = { \"X-User\" = \"user\", \"X-Roles\" = \"roles\", \"X-Missing\" = \"nope\" }",
    );
    let p = start(&config("", &routes)).await;
    let key = with(
        &p,
        None,
        &[("update", r#"{"user":"alice smith","roles":["a","b"]}"#)],
    )
    .await
    .key();
    let req = p
        .req(Method::GET, "/", Some(&key))
        .header("x-user", "admin")
        .header("x-missing", "spoofed")
        .body(Default::default())
        .unwrap();
    p.send(req).await;
    let s = up.last();
    assert_eq!(s.header("x-user"), Some("alice smith"));
    assert_eq!(s.header("x-roles"), Some(r#"["a","b"]"#));
    assert!(
        s.header("x-missing").is_none(),
        "client value dropped, key absent"
    );
    // CR/LF/NUL/non-ASCII never go out raw.
    let evil = r#"{"user":"bob\r\nX-Admin: 1\u0000 é"}"#;
    with(&p, Some(&key), &[("update", evil)]).await;
    p.get("/", Some(&key)).await;
    let s = up.last();
    let v = s.headers.get("x-user").unwrap().as_bytes();
    assert!(v.iter().all(|b| (0x20..0x7f).contains(b)), "{v:?}");
    assert_eq!(v, br#""bob\r\nX-Admin: 1\u0000 \u00e9""#);
    assert!(s.header("x-admin").is_none());
}

#[tokio::test]
async fn path_tricks_cannot_bypass_login_required() {
    let up = echo_directives().await;
    let routes = format!(
        "{}\n[[route]]\nname = \"account\"\npath = \"/account\"\nupstream = \"{}\"\nlogin_required = [\"user\"]\n[[route]]\nname = \"static\"\npath = \"/static\"\nupstream = \"{}\"\nsession = false\n",
        route(&up, ""),
        up.url(),
        up.url()
    );
    let p = start(&config("", &routes)).await;
    for trick in [
        "/%61ccount",
        "/x/../account",
        "//account",
        "/static/../account/x",
        "/./account",
        // An encoded slash: the upstream would decode it to `/`.
        "/account%2Fx",
        "/account%2fx",
        "/%2Faccount",
    ] {
        let r = p.get(trick, None).await;
        assert_eq!(r.status, 302, "{trick}");
        let location = r.header("location").unwrap();
        assert!(
            location.starts_with("/login?next=/") && location.contains("account"),
            "{trick}: {location}"
        );
    }
    assert_eq!(
        up.count(),
        0,
        "the upstream never saw an anonymous /account request"
    );
    // Normalised paths are what the upstream receives.
    p.get("/a/./b//c/../d?q=1", None).await;
    assert_eq!(
        up.last().uri.path_and_query().unwrap().as_str(),
        "/a/b/d?q=1"
    );
    // An encoded slash is kept on the way to the upstream.
    p.get("/a%2Fb?q=1", None).await;
    assert_eq!(
        up.last().uri.path_and_query().unwrap().as_str(),
        "/a%2Fb?q=1"
    );
    assert_eq!(p.get("/../etc/passwd", None).await.status, 400);
    assert_eq!(p.get("/x/..%2F..%2Fetc", None).await.status, 400);
    // Dot segments made of encoded slashes would route a path the upstream
    // does not get (`/account/..%2Fstatic` as `/static`): refused.
    for trick in [
        "/account/..%2Fstatic",
        "/account/%2E%2E%2Fx",
        "/account/.%2Fx",
    ] {
        assert_eq!(p.get(trick, None).await.status, 400, "{trick}");
    }
    assert_eq!(
        up.count(),
        2,
        "only the two plain requests above reached it"
    );
    assert_eq!(p.get("/bad%zzescape", None).await.status, 400);
}

#[tokio::test]
async fn host_header_rules() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, p) = setup("").await;
    for head in [
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{head:?} -> {out}");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn non_ascii_neighbour_cookie_does_not_hide_the_session() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"user":1}"#)]).await.key();
    let req = p
        .req(Method::GET, "/", None)
        .header(
            "cookie",
            http::HeaderValue::from_bytes(format!("pref=caf\u{e9}; sessionid={key}").as_bytes())
                .unwrap(),
        )
        .body(Default::default())
        .unwrap();
    p.send(req).await;
    let s = up.last();
    assert_eq!(s.session(), json!({"user": 1}));
    let fwd = s.headers.get("cookie").unwrap().as_bytes();
    assert_eq!(
        fwd,
        "pref=caf\u{e9}".as_bytes(),
        "key stripped, neighbour kept byte for byte"
    );
}

#[tokio::test]
async fn clear_returns_to_the_global_expiry_like_django() {
    let (up, p) = setup("").await;
    let key = with(&p, None, &[("update", r#"{"a":1}"#), ("expiry", "0")])
        .await
        .key();
    let r = with(&p, Some(&key), &[("clear", "1")]).await;
    assert_eq!(
        attr(&r.session_cookie().unwrap(), "max-age").as_deref(),
        Some("1209600")
    );
    p.get("/", Some(&key)).await;
    assert_eq!(
        up.last().header("x-session-expire-at-browser-close"),
        Some("false")
    );
}

#[tokio::test]
async fn far_future_expiry_date_is_rejected_not_a_crash() {
    let (_up, p) = setup("").await;
    let r = with(
        &p,
        None,
        &[
            ("update", r#"{"a":1}"#),
            ("expiry", "9999-12-31T23:59:59-23:59"),
        ],
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("X-Session-Expiry"), "{}", r.body);
    let r = with(
        &p,
        None,
        &[("update", r#"{"a":1}"#), ("expiry", "9999-12-31T23:59:59Z")],
    )
    .await;
    assert_eq!(r.status, 200);
    let c = r.session_cookie().unwrap();
    assert!(attr(&c, "expires").unwrap().contains("9999"), "{c}");
}
