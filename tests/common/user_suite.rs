//! A user's sessions (SPEC 9, issue 18) end to end through the proxy, on
//! whatever engine the caller's `[store]` lines name: `Logout-Others`,
//! `Logout-User`, the order of SPEC 3.3, the index following re-login,
//! Cycle-Key, Flush, expiry and the sweep, the 400 of an in-flight write of
//! a revoked session, malformed directives, and the directives without
//! `user_key`.
//!
//! Included with `#[path]` next to `mod common;`. Each case takes the
//! `[store]` section's lines (`engine = "file"`, `path = "..."`; the
//! suite adds `clear_expired_interval = "0s"`), so another engine's test
//! binary runs the same cases.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::common::{self, e2e::within, upstream_async, Got, Proxy, Upstream, SECRET};
use sessiongate::store::Store;

/// The upstream: each request header `x-echo-NAME: V` comes back as the
/// response header `x-session-NAME: V`; `x-hold` waits for the gate.
pub struct Env {
    pub proxy: Proxy,
    pub up: Upstream,
    arrived: Arc<Notify>,
    gate: Arc<Notify>,
}

pub const USER_KEY: &str = "uid";
/// `cookie_age` of the suite's configuration, seconds.
pub const AGE: u64 = 3600;

fn config_text(store: &str, user_key: Option<&str>, up: &Upstream) -> String {
    let user_key = user_key.map_or(String::new(), |k| format!("user_key = \"{k}\""));
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls = false
upstream_connect_timeout = "2s"
upstream_timeout = "20s"
shutdown_grace = "5s"
access_log = "off"

[session]
secret_key = "{SECRET}"
cookie_secure = false
cookie_age = "{AGE}s"
{user_key}

[store]
clear_expired_interval = "0s"
{store}

[[route]]
name = "app"
upstream = "{up}"
"#,
        up = up.url()
    )
}

impl Env {
    /// A proxy on the `[store]` lines `store`, with `user_key = "uid"` when
    /// `indexed`.
    pub async fn start(store: &str, indexed: bool) -> Env {
        let arrived = Arc::new(Notify::new());
        let gate = Arc::new(Notify::new());
        let (a, g) = (arrived.clone(), gate.clone());
        let up = upstream_async(move |s| {
            let (a, g) = (a.clone(), g.clone());
            Box::pin(async move {
                if s.header("x-hold").is_some() {
                    a.notify_one();
                    g.notified().await;
                }
                let mut b = common::reply();
                for (name, value) in &s.headers {
                    if let Some(rest) = name.as_str().strip_prefix("x-echo-") {
                        b = b.header(format!("x-session-{rest}"), value.clone());
                    }
                }
                b.body(Full::new(Bytes::from_static(b"ok"))).unwrap()
            })
        })
        .await;
        let text = config_text(store, indexed.then_some(USER_KEY), &up);
        let proxy = common::start_engine(&text).await;
        Env {
            proxy,
            up,
            arrived,
            gate,
        }
    }

    /// A POST with the session `key` (when given) whose response carries
    /// the directives `(name without x-session-, value)`.
    pub async fn send(&self, key: Option<&str>, directives: &[(&str, &str)]) -> Got {
        let mut b = self.proxy.req(Method::POST, "/", key);
        for (n, v) in directives {
            b = b.header(format!("x-echo-{n}"), *v);
        }
        within(
            "a proxied request",
            self.proxy.send(b.body(Full::default()).unwrap()),
        )
        .await
    }

    /// A new session logged in as `user` (a JSON value); its key.
    pub async fn login(&self, user: Value) -> String {
        let r = self
            .send(None, &[("update", &json!({ USER_KEY: user }).to_string())])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.key()
    }

    /// What the upstream sees for `key` on a plain GET: (X-Session-New, data).
    pub async fn seen(&self, key: &str) -> (bool, Value) {
        let r = within("a GET", self.proxy.get("/", Some(key))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let s = self.up.last();
        (s.header("x-session-new") == Some("true"), s.session())
    }

    /// Whether `key` is still a live session with user `user`.
    pub async fn is_user(&self, key: &str, user: Value) -> bool {
        let (new, data) = self.seen(key).await;
        !new && data.get(USER_KEY) == Some(&user)
    }

    /// Whether `key` is gone: the browser presenting it is a new visitor
    /// with no data.
    pub async fn is_gone(&self, key: &str) -> bool {
        let (new, data) = self.seen(key).await;
        new && data == json!({})
    }

    pub async fn listed(&self, user: &str) -> usize {
        let now = self.proxy.clock.now_ms();
        self.proxy
            .store
            .user_sessions(user, now)
            .await
            .unwrap()
            .len()
    }

    pub async fn stop(self) {
        self.proxy.stop().await;
    }
}

fn deletes_cookie(r: &Got) -> bool {
    r.session_cookie().is_some_and(|c| c.contains("Max-Age=0"))
}

/// Logout-Others: the user's other sessions become new visitors; this one
/// stays (and keeps its cookie); another user's session is untouched.
pub async fn logout_others(store: &str) {
    let env = Env::start(store, true).await;
    let a = env.login(json!("alice")).await;
    let b = env.login(json!("alice")).await;
    let c = env.login(json!("alice")).await;
    let d = env.login(json!("bob")).await;
    assert_eq!(env.listed("alice").await, 3);
    let r = env.send(Some(&b), &[("logout-others", "1")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        !deletes_cookie(&r),
        "this session's cookie stays: {:?}",
        r.set_cookies()
    );
    assert!(env.is_gone(&a).await);
    assert!(env.is_gone(&c).await);
    assert!(env.is_user(&b, json!("alice")).await);
    assert!(env.is_user(&d, json!("bob")).await);
    assert_eq!(env.listed("alice").await, 1);
    // Again: nothing else to end, and a session in no user's index ends
    // nothing.
    let r = env.send(Some(&b), &[("logout-others", "1")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let anon = env.send(None, &[("update", r#"{"cart": 1}"#)]).await.key();
    let r = env.send(Some(&anon), &[("logout-others", "1")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(env.is_user(&b, json!("alice")).await);
    assert!(env.is_user(&d, json!("bob")).await);
    env.stop().await;
}

/// Logout-User V: a number and a string with the same text are one user;
/// when the current session is among them its cookie is deleted and its
/// next request is a new visitor.
pub async fn logout_user(store: &str) {
    let env = Env::start(store, true).await;
    let n = env.login(json!(42)).await;
    let s = env.login(json!("42")).await;
    let other = env.login(json!("alice")).await;
    assert_eq!(env.listed("42").await, 2);
    let r = env.send(Some(&other), &[("logout-user", "42")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!deletes_cookie(&r));
    assert!(env.is_gone(&n).await);
    assert!(env.is_gone(&s).await);
    assert!(env.is_user(&other, json!("alice")).await);
    // The string form, from a session of that user: itself included.
    let m = env.login(json!(7)).await;
    let m2 = env.login(json!(7)).await;
    let r = env.send(Some(&m), &[("logout-user", r#""7""#)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        deletes_cookie(&r),
        "the current session's cookie is deleted: {:?}",
        r.set_cookies()
    );
    assert_eq!(r.set_cookies().len(), 1, "{:?}", r.set_cookies());
    assert!(env.is_gone(&m).await);
    assert!(env.is_gone(&m2).await);
    // Its own session logged in and out of the same response: an update
    // then the revocation of that user (SPEC 3.3 order) leaves no session.
    let r = env
        .send(
            None,
            &[("update", r#"{"uid": "eve"}"#), ("logout-user", r#""eve""#)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.session_cookie().is_none_or(|c| c.contains("Max-Age=0")),
        "no live cookie for a session that was ended: {:?}",
        r.set_cookies()
    );
    assert_eq!(env.listed("eve").await, 0);
    assert!(env.is_user(&other, json!("alice")).await);
    env.stop().await;
}

/// The empty string names no user, on every engine alike: sessions with
/// `"uid": ""` are in no index, Logout-Others from one ends nothing, and
/// `Logout-User: ""` ends nothing.
pub async fn an_empty_user_is_no_user(store: &str) {
    let env = Env::start(store, true).await;
    let a = env.login(json!("")).await;
    let b = env.login(json!("")).await;
    assert_eq!(env.listed("").await, 0, "no index lists the empty user");
    let r = env.send(Some(&a), &[("logout-others", "1")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        env.is_user(&b, json!("")).await,
        "Logout-Others ended nothing"
    );
    let r = env.send(Some(&b), &[("logout-user", r#""""#)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!deletes_cookie(&r), "{:?}", r.set_cookies());
    assert!(
        env.is_user(&a, json!("")).await,
        "Logout-User \"\" ended nothing"
    );
    assert!(env.is_user(&b, json!("")).await);
    env.stop().await;
}

/// SPEC 3.3: the user directives act on the user as it stands after the
/// rest of the response: an Update that logs in as V plus Logout-Others
/// ends V's other sessions, not the previous user's.
pub async fn order_of_directives(store: &str) {
    let env = Env::start(store, true).await;
    let s = env.login(json!("alice")).await;
    let a2 = env.login(json!("alice")).await;
    let v1 = env.login(json!("v")).await;
    let r = env
        .send(
            Some(&s),
            &[("logout-others", "1"), ("update", r#"{"uid": "v"}"#)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(env.is_gone(&v1).await, "V's other session ended");
    assert!(
        env.is_user(&a2, json!("alice")).await,
        "the old user's is not"
    );
    assert!(env.is_user(&s, json!("v")).await, "this one stays");
    // Cycle-Key then Logout-Others: the new key is the one kept.
    let v2 = env.login(json!("v")).await;
    let r = env
        .send(Some(&s), &[("logout-others", "1"), ("cycle-key", "1")])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let s2 = r.key();
    assert_ne!(s2, s);
    assert!(env.is_gone(&s).await);
    assert!(env.is_gone(&v2).await);
    assert!(env.is_user(&s2, json!("v")).await);
    assert_eq!(env.listed("v").await, 1);
    env.stop().await;
}

/// The index follows the session: a login as another user moves it,
/// Cycle-Key moves it to the new key, deleting the user key and Flush take
/// it out.
pub async fn index_follows_the_session(store: &str) {
    let env = Env::start(store, true).await;
    let admin = env.login(json!("root")).await;
    let s = env.login(json!("alice")).await;
    env.send(Some(&s), &[("update", r#"{"uid": "bob"}"#)]).await;
    assert_eq!(env.listed("alice").await, 0);
    assert_eq!(env.listed("bob").await, 1);
    env.send(Some(&admin), &[("logout-user", r#""alice""#)])
        .await;
    assert!(env.is_user(&s, json!("bob")).await, "no longer alice's");
    // Cycle-Key: the old key leaves the index, the new one joins.
    let r = env.send(Some(&s), &[("cycle-key", "1")]).await;
    let s2 = r.key();
    let now = env.proxy.clock.now_ms();
    let listed = env.proxy.store.user_sessions("bob", now).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key.as_str(), s2);
    env.send(Some(&admin), &[("logout-user", r#""bob""#)]).await;
    assert!(env.is_gone(&s2).await);
    // Deleting the user key: in no user's index.
    let t = env.login(json!("carol")).await;
    env.send(Some(&t), &[("delete", "uid")]).await;
    assert_eq!(env.listed("carol").await, 0);
    env.send(Some(&admin), &[("logout-user", r#""carol""#)])
        .await;
    assert!(
        !env.is_gone(&t).await,
        "the session itself lives on, anonymous"
    );
    // Flush.
    let f = env.login(json!("dave")).await;
    let r = env.send(Some(&f), &[("flush", "1")]).await;
    assert!(deletes_cookie(&r));
    assert_eq!(env.listed("dave").await, 0);
    assert!(env.is_user(&admin, json!("root")).await);
    env.stop().await;
}

/// Expired sessions are not listed nor counted, and the sweep removes
/// them from the index.
pub async fn expiry_and_the_sweep(store: &str) {
    let env = Env::start(store, true).await;
    let old = env.login(json!("erin")).await;
    env.proxy.clock.advance(Duration::from_secs(AGE / 2));
    let young = env.login(json!("erin")).await;
    assert_eq!(env.listed("erin").await, 2);
    env.proxy.clock.advance(Duration::from_secs(AGE / 2 + 1));
    assert_eq!(env.listed("erin").await, 1, "the expired one is not listed");
    let now = env.proxy.clock.now_ms();
    assert_eq!(env.proxy.store.clear_expired(now).await.unwrap(), 1);
    assert_eq!(env.listed("erin").await, 1);
    assert_eq!(
        env.proxy
            .store
            .revoke_user("erin", None, now)
            .await
            .unwrap(),
        1,
        "only the live one counted"
    );
    assert!(env.is_gone(&young).await);
    assert!(env.is_gone(&old).await);
    env.stop().await;
}

/// A request of a session in flight while the session is revoked: its
/// write gets 400 (SessionInterrupted) and does not bring it back.
pub async fn in_flight_write_of_a_revoked_session(store: &str) {
    let env = Arc::new(Env::start(store, true).await);
    let h = env.login(json!("frank")).await;
    let admin = env.login(json!("root")).await;
    let held = {
        let env = env.clone();
        let h = h.clone();
        tokio::spawn(async move {
            let b = env
                .proxy
                .req(Method::POST, "/", Some(&h))
                .header("x-hold", "1")
                .header("x-echo-update", r#"{"cart": 1}"#);
            env.proxy.send(b.body(Full::default()).unwrap()).await
        })
    };
    within("the held request at the upstream", env.arrived.notified()).await;
    let r = env
        .send(Some(&admin), &[("logout-user", r#""frank""#)])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    env.gate.notify_one();
    let r = within("the held response", held).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(env.is_gone(&h).await, "not resurrected");
    assert_eq!(env.listed("frank").await, 0);
    let env = Arc::try_unwrap(env).ok().expect("one holder");
    env.stop().await;
}

/// Malformed user directives are a 502 naming the header, and nothing in
/// the response is applied: no data change, no session ended.
pub async fn malformed_directives(store: &str) {
    let env = Env::start(store, true).await;
    let s = env.login(json!("alice")).await;
    let other = env.login(json!("alice")).await;
    for (name, value, header) in [
        ("logout-user", "alice", "X-Session-Logout-User"),
        ("logout-user", "[1]", "X-Session-Logout-User"),
        ("logout-user", "null", "X-Session-Logout-User"),
        ("logout-others", "yes", "X-Session-Logout-Others"),
    ] {
        let r = env
            .send(Some(&s), &[(name, value), ("update", r#"{"x": 1}"#)])
            .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{name}: {value}");
        assert!(r.body.contains(header), "{name}: {value}: {}", r.body);
        assert!(r.session_cookie().is_none());
        let (_, data) = env.seen(&s).await;
        assert_eq!(
            data,
            json!({ "uid": "alice" }),
            "{name}: {value}: nothing applied"
        );
        assert!(env.is_user(&other, json!("alice")).await, "{name}: {value}");
    }
    env.stop().await;
}

/// Without `user_key`, both directives are a 502 naming the header, and
/// nothing changes.
pub async fn without_user_key(store: &str) {
    let env = Env::start(store, false).await;
    let s = env.login(json!("alice")).await;
    let other = env.login(json!("alice")).await;
    for (name, value, header) in [
        ("logout-others", "1", "X-Session-Logout-Others"),
        ("logout-user", r#""alice""#, "X-Session-Logout-User"),
    ] {
        let r = env
            .send(Some(&s), &[(name, value), ("update", r#"{"x": 1}"#)])
            .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{name}");
        assert!(r.body.contains(header), "{name}: {}", r.body);
        assert!(r.body.contains("user_key"), "{name}: {}", r.body);
        let (_, data) = env.seen(&s).await;
        assert_eq!(data, json!({ "uid": "alice" }));
        assert!(env.is_user(&other, json!("alice")).await);
    }
    env.stop().await;
}

/// Every case, on one engine.
pub async fn all(store: &str) {
    logout_others(store).await;
    logout_user(store).await;
    an_empty_user_is_no_user(store).await;
    order_of_directives(store).await;
    index_follows_the_session(store).await;
    expiry_and_the_sweep(store).await;
    in_flight_write_of_a_revoked_session(store).await;
    malformed_directives(store).await;
    without_user_key(store).await;
}
