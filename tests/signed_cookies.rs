//! The signed_cookies engine end to end: the session lives in the cookie,
//! signed (HMAC-SHA256) and by default encrypted (AES-256-GCM), split over
//! numbered cookies when large.

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use serde_json::json;

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

fn cfg(up: &Upstream, store_extra: &str, session_extra: &str) -> String {
    config(session_extra, &route(up, "")).replace(
        "[store]\n",
        &format!("[store]\nengine = \"signed_cookies\"\n{store_extra}\n"),
    )
}

/// One request with the given `Cookie` header and directives.
async fn call(p: &Proxy, cookie: &str, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, "/", None);
    if !cookie.is_empty() {
        b = b.header("cookie", cookie);
    }
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

#[tokio::test]
async fn the_session_lives_in_the_cookie() {
    let up = echo().await;
    let p = start_engine(&cfg(&up, "", "")).await;
    let r = call(
        &p,
        "",
        &[("update", r#"{"user":"ann","secret":"hunter2"}"#)],
    )
    .await;
    let jar = r.cookie_jar();
    assert!(jar.starts_with("sessionid=1."), "{jar}");
    assert!(!jar.contains("hunter2"), "encrypted by default");
    let c = r.session_cookie().unwrap();
    assert_eq!(attr(&c, "max-age").as_deref(), Some("1209600"));
    call(&p, &jar, &[]).await;
    let s = up.last();
    assert_eq!(s.session(), json!({"user":"ann","secret":"hunter2"}));
    assert_eq!(s.header("x-session-new"), Some("false"));
    let id = s.header("x-session-id").unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(
        s.header("cookie").is_none(),
        "the session cookie never goes upstream"
    );
    // Cycle-Key changes the id, keeps the data.
    let r = call(&p, &jar, &[("cycle-key", "1")]).await;
    call(&p, &r.cookie_jar(), &[]).await;
    assert_ne!(up.last().header("x-session-id").unwrap(), id);
    assert_eq!(up.last().session()["user"], "ann");
    // Flush deletes the cookie.
    let r = call(&p, &jar, &[("flush", "1")]).await;
    assert!(r.session_cookie().unwrap().contains("Max-Age=0"));
}

#[tokio::test]
async fn tampered_truncated_or_foreign_cookies_are_new_sessions() {
    let up = echo().await;
    let p = start_engine(&cfg(&up, "", "")).await;
    let jar = call(&p, "", &[("update", r#"{"admin":false}"#)])
        .await
        .cookie_jar();
    let value = jar.strip_prefix("sessionid=").unwrap();
    let mut flipped = value.as_bytes().to_vec();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let other =
        start_engine(&cfg(&up, "", "").replace(SECRET, "another-secret-another-secret-another"))
            .await;
    let foreign = call(&other, "", &[("update", r#"{"admin":true}"#)])
        .await
        .cookie_jar();
    for bad in [
        format!("sessionid={flipped}"),
        format!("sessionid={}", &value[..value.len() - 3]),
        "sessionid=1.garbage".to_string(),
        "sessionid=nonsense".to_string(),
        foreign,
    ] {
        let r = call(&p, &bad, &[]).await;
        assert_eq!(up.last().header("x-session-new"), Some("true"), "{bad}");
        assert_eq!(up.last().session(), json!({}));
        assert!(
            r.session_cookie().unwrap().contains("Max-Age=0"),
            "bad cookie deleted"
        );
    }
}

#[tokio::test]
async fn fallback_keys_accept_old_cookies() {
    let up = echo().await;
    let old = start_engine(&cfg(&up, "", "")).await;
    let jar = call(&old, "", &[("update", r#"{"n":1}"#)])
        .await
        .cookie_jar();
    let new_secret = "brand-new-secret-brand-new-secret-xx";
    let rotated = start_engine(
        &cfg(&up, "", &format!("secret_key_fallbacks = [\"{SECRET}\"]")).replace(
            &format!("secret_key = \"{SECRET}\""),
            &format!("secret_key = \"{new_secret}\""),
        ),
    )
    .await;
    call(&rotated, &jar, &[]).await;
    assert_eq!(
        up.last().session(),
        json!({"n": 1}),
        "verified with the fallback"
    );
    let without = start_engine(&cfg(&up, "", "").replace(SECRET, new_secret)).await;
    call(&without, &jar, &[]).await;
    assert_eq!(
        up.last().header("x-session-new"),
        Some("true"),
        "no fallback, no session"
    );
}

#[tokio::test]
async fn set_expiry_is_honoured_from_the_payload() {
    let up = echo().await;
    let p = start_engine(&cfg(&up, "", "")).await;
    let r = call(&p, "", &[("update", r#"{"a":1}"#), ("expiry", "5")]).await;
    assert_eq!(
        attr(&r.session_cookie().unwrap(), "max-age").as_deref(),
        Some("5")
    );
    let jar = r.cookie_jar();
    p.clock.advance(Duration::from_secs(4));
    call(&p, &jar, &[]).await;
    assert_eq!(up.last().session(), json!({"a": 1}));
    p.clock.advance(Duration::from_secs(2));
    call(&p, &jar, &[]).await;
    assert_eq!(
        up.last().header("x-session-new"),
        Some("true"),
        "a replayed cookie past its expiry is refused"
    );
}

#[tokio::test]
async fn large_sessions_are_chunked_and_shrink_cleanly() {
    let up = echo().await;
    let p = start_engine(&cfg(&up, "encrypt = false", "")).await;
    let big = "x".repeat(9000);
    let r = call(&p, "", &[("update", &format!(r#"{{"big":"{big}"}}"#))]).await;
    let set = r.set_cookies();
    let names: Vec<&str> = set.iter().map(|c| c.split('=').next().unwrap()).collect();
    assert_eq!(names, vec!["sessionid", "sessionid.1", "sessionid.2"]);
    for c in &set {
        let pair = c.split(';').next().unwrap();
        assert!(pair.len() <= 4096, "name+value {} bytes", pair.len());
    }
    let jar = r.cookie_jar();
    call(&p, &jar, &[]).await;
    assert_eq!(up.last().session()["big"].as_str().unwrap().len(), 9000);
    // A chunk whose name has a space before its `=` is read as Django
    // reads it, and so never forwarded (the token is the session).
    let spaced = jar.replacen("sessionid.1=", "sessionid.1 =", 1);
    assert_ne!(spaced, jar);
    call(&p, &spaced, &[]).await;
    assert_eq!(up.last().session()["big"].as_str().unwrap().len(), 9000);
    let forwarded = up.last().header("cookie").unwrap_or("").to_string();
    assert!(!forwarded.contains("sessionid"), "{forwarded}");
    // Reordered chunks fail the MAC: a new session.
    let parts: Vec<&str> = jar.split("; ").collect();
    let v1 = parts[1].split_once('=').unwrap().1;
    let v2 = parts[2].split_once('=').unwrap().1;
    let swapped = format!("{}; sessionid.1={v2}; sessionid.2={v1}", parts[0]);
    call(&p, &swapped, &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    // A missing chunk too.
    call(&p, &format!("{}; {}", parts[0], parts[1]), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    // Shrinking deletes the extra chunks.
    let r = call(&p, &jar, &[("delete", "big"), ("update", r#"{"small":1}"#)]).await;
    let set = r.set_cookies();
    assert!(set[0].starts_with("sessionid=1."));
    assert!(set
        .iter()
        .any(|c| c.starts_with("sessionid.1=") && c.contains("Max-Age=0")));
    assert!(set
        .iter()
        .any(|c| c.starts_with("sessionid.2=") && c.contains("Max-Age=0")));
    // Flush deletes every chunk.
    let r = call(&p, &jar, &[("flush", "1")]).await;
    let deleted: Vec<String> = r
        .set_cookies()
        .into_iter()
        .filter(|c| c.contains("Max-Age=0"))
        .map(|c| c.split('=').next().unwrap().to_string())
        .collect();
    assert_eq!(deleted, vec!["sessionid", "sessionid.1", "sessionid.2"]);
}

#[tokio::test]
async fn a_session_too_large_is_a_502_and_the_old_one_stays() {
    let up = echo().await;
    let p = start_engine(&cfg(&up, "", "")).await;
    let jar = call(&p, "", &[("update", r#"{"keep":1}"#)])
        .await
        .cookie_jar();
    let huge = "y".repeat(60_000);
    let r = call(&p, &jar, &[("update", &format!(r#"{{"huge":"{huge}"}}"#))]).await;
    assert_eq!(r.status, 502);
    assert!(
        r.body.contains("too large") && r.body.contains("bytes"),
        "{}",
        r.body
    );
    assert!(r.set_cookies().is_empty(), "the old cookie is left alone");
    call(&p, &jar, &[]).await;
    assert_eq!(up.last().session(), json!({"keep": 1}));
}

#[tokio::test]
async fn signed_only_mode_is_readable_but_still_verified() {
    use base64::Engine as _;
    let up = echo().await;
    let p = start_engine(&cfg(&up, "encrypt = false", "")).await;
    let jar = call(&p, "", &[("update", r#"{"visible":"yes"}"#)])
        .await
        .cookie_jar();
    let token = jar.strip_prefix("sessionid=1.").unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .unwrap();
    assert!(String::from_utf8_lossy(&raw).contains(r#""visible":"yes""#));
    // Editing the readable data breaks the signature.
    let edited = String::from_utf8_lossy(&raw)
        .replace("yes", "no!")
        .into_bytes();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(edited);
    call(&p, &format!("sessionid=1.{forged}"), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
}

/// SPEC 2 `absolute_timeout` on Django's format: "no session outlives this
/// since its creation, whatever its activity". The cookie carries the
/// creation time, so writes that re-sign it do not move its start; without
/// `absolute_timeout` the cookie is Django's exactly (no such key).
#[tokio::test]
async fn djangos_format_keeps_absolute_timeout_across_writes() {
    let up = echo().await;
    let p = start_engine(&cfg(
        &up,
        "format = \"django\"",
        "cookie_age = \"100s\"\nabsolute_timeout = \"150s\"",
    ))
    .await;
    let r = call(&p, "", &[("update", r#"{"n":0}"#)]).await;
    let mut jar = r.cookie_jar();
    for n in 1..=3 {
        p.clock.advance(Duration::from_secs(40));
        let r = call(&p, &jar, &[("update", &format!("{{\"n\":{n}}}"))]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        jar = r.cookie_jar();
        assert_eq!(
            up.last().session(),
            json!({"n": n - 1}),
            "hidden from X-Session"
        );
    }
    // 160 s after its creation, 40 s after its last write.
    p.clock.advance(Duration::from_secs(40));
    call(&p, &jar, &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    assert_eq!(up.last().session(), json!({}));

    // Without absolute_timeout the cookie holds the data only.
    let p = start_engine(&cfg(&up, "format = \"django\"", "")).await;
    let r = call(&p, "", &[("update", r#"{"n":0}"#)]).await;
    let token = r.cookie_jar();
    let payload = token.split_once('=').unwrap().1.split(':').next().unwrap();
    let b64 = payload.trim_start_matches('.');
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .unwrap();
    assert_eq!(raw, br#"{"n":0}"#, "Django's own payload, uncompressed");
}

/// A reload installs the new codec (keys, cookie name) in the store before
/// the workers take the new configuration up; a request still served by
/// the old generation reads and makes its cookies with that generation's
/// codec, not half with each (before: with `cookie_name` changed, the old
/// generation looked for the token under the new name and stripped the
/// old one: a logged-in visitor became a new one mid-reload).
#[tokio::test]
async fn a_generation_keeps_its_own_codec_across_a_reload() {
    use http_body_util::BodyExt;
    use sessiongate::proxy::{ClientBody, ConnInfo, Proxy as Gen};
    let up = echo().await;
    let text = cfg(&up, "", "cookie_name = \"sid_a\"");
    let a = sessiongate::config::Config::parse(&text, std::path::Path::new("a.toml")).unwrap();
    let b = sessiongate::config::Config::parse(
        &text.replace("cookie_name = \"sid_a\"", "cookie_name = \"sid_b\""),
        std::path::Path::new("a.toml"),
    )
    .unwrap();
    let store = std::sync::Arc::new(sessiongate::store::AnyStore::open(&a).await.unwrap());
    let old = std::sync::Arc::new(Gen::new(&a, store.clone(), Default::default()));
    let conn = ConnInfo::new("127.0.0.1:9".parse().unwrap(), false);
    let ask = |cookie: Option<String>, update: Option<&str>| {
        let mut r = http::Request::get("http://app/");
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        if let Some(u) = update {
            r = r.header("x-test-update", u);
        }
        r.body(ClientBody::empty()).unwrap()
    };
    let resp = old
        .clone()
        .handle(ask(None, Some(r#"{"user":"ann"}"#)), conn.clone())
        .await
        .unwrap();
    let set: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .collect();
    let _ = resp.into_body().collect().await;
    assert!(set[0].starts_with("sid_a="), "{set:?}");
    // The reload's new codec, installed before the old generation stops.
    store.follow(&b);
    let resp = old
        .clone()
        .handle(ask(Some(set.join("; ")), None), conn.clone())
        .await
        .unwrap();
    let _ = resp.into_body().collect().await;
    let seen = up.last();
    assert_eq!(
        seen.session()["user"],
        "ann",
        "the old generation's cookie is still read"
    );
    assert!(seen.header("cookie").is_none(), "and never forwarded");
}
