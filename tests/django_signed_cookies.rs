//! `signed_cookies` with `format = "django"` (SPEC 8): Django's own
//! `signed_cookies` session backend reads the cookie sessiongate writes, and
//! sessiongate reads the cookie Django's backend writes.

mod common;

use std::path::Path;

use common::*;
use http::Method;
use serde_json::{json, Value};

#[path = "common/django.rs"]
mod django;

/// Django's signed_cookies `SessionStore` (`session_tool.py signed-*`).
fn tool(py: &Path, args: &[&str]) -> Value {
    let out = django::run_project(py, "session_tool.py", ":memory:", SECRET, args);
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn echo() -> Upstream {
    upstream(|s| {
        let mut b = reply();
        for (n, v) in &s.headers {
            if let Some(d) = n.as_str().strip_prefix("x-test-") {
                b = b.header(format!("x-session-{d}"), v.clone());
            }
        }
        b.body(Default::default()).unwrap()
    })
    .await
}

async fn call(p: &Proxy, cookie: Option<&str>, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, "/", cookie);
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

fn cookie_value(r: &Got) -> String {
    let c = r.session_cookie().expect("a session cookie");
    c["sessionid=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_and_sessiongate_read_each_others_signed_cookies() {
    let up = echo().await;
    let toml = config("", &route(&up, "")).replace(
        "[store]\n",
        "[store]\nengine = \"signed_cookies\"\nformat = \"django\"\n",
    );
    let p = start_engine(&toml).await;

    // sessiongate writes; Django's backend reads it.
    let r = call(
        &p,
        None,
        &[("update", r#"{"cart":[1,2],"name":"zo\u00eb"}"#)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let value = cookie_value(&r);
    assert!(
        !value.contains('.') || value.starts_with('.'),
        "one Django token, not chunks: {value}"
    );
    assert_eq!(value.matches(':').count(), 2, "{value}");
    call(&p, Some(&value), &[]).await;
    assert_eq!(
        up.last().header("x-session-id"),
        Some(""),
        "the cookie carries no key"
    );
    assert_eq!(up.last().header("x-session-new"), Some("false"));

    let Some(py) = django::python() else { return };
    let d = tool(&py, &["signed-read", &value]);
    assert_eq!(
        d["data"],
        json!({"cart": [1, 2], "name": "zo\u{eb}"}),
        "{d}"
    );

    // With set_expiry: Django sees _session_expiry.
    let r = call(&p, Some(&value), &[("expiry", "300")]).await;
    let value = cookie_value(&r);
    let d = tool(&py, &["signed-read", &value]);
    assert_eq!(d["data"]["_session_expiry"], 300);
    assert_eq!(d["expiry_age"], 300);

    // Django's backend writes; sessiongate reads it.
    let made = tool(
        &py,
        &["signed-create", r#"{"_auth_user_id":"4","theme":"dark"}"#],
    );
    let theirs = made["cookie"].as_str().unwrap();
    call(&p, Some(theirs), &[]).await;
    let s = up.last();
    assert_eq!(s.header("x-session-new"), Some("false"));
    assert_eq!(s.session(), json!({"_auth_user_id": "4", "theme": "dark"}));
    assert_eq!(s.header("x-session-id"), Some(""));

    // Tampered: a new visitor, and the cookie is deleted.
    let forged = theirs.replacen(':', "x:", 1);
    let r = call(&p, Some(&forged), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));

    // Too large for one cookie: the 502 of section 5, nothing set.
    // Pseudo-random text: zlib cannot shrink it under one cookie.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: String = (0..6000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize])
        })
        .collect();
    let big = format!("{{\"blob\":\"{noise}\"}}");
    let r = call(&p, None, &[("update", &big)]).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("too large"), "{}", r.body);
    assert!(r.session_cookie().is_none());
}
