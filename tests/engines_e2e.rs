//! The same session behaviours, through the real proxy, on every engine:
//! memory, file, cached_file, signed_cookies, redis, cached_redis, db and
//! cached_db (on SQLite). The
//! store-level conformance suite (tests/store_conformance.rs) covers the
//! engines with a server side; this one also covers signed_cookies, whose
//! only "store" is the cookie. Where an engine cannot do something by
//! design (a signed cookie cannot be revoked), the test says so.

mod common;

use std::any::Any;

use common::redis_server::RedisServer;
use common::*;
use http::Method;
use serde_json::json;

type Guard = Box<dyn Any + Send>;

struct RemoveDir(std::path::PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `[store]` lines for `engine`, and what keeps its resources alive.
/// `None`: Redis could not be started outside CI (already said, loudly).
async fn store_for(engine: &str) -> Option<(String, Guard)> {
    match engine {
        "memory" | "signed_cookies" => Some((format!("engine = \"{engine}\""), Box::new(()))),
        "file" | "cached_file" => {
            let dir = std::env::temp_dir().join(format!(
                "sessiongate-engines-{}-{}",
                std::process::id(),
                sessiongate::session::SessionKey::generate().as_str()
            ));
            let lines = format!("engine = \"{engine}\"\npath = \"{}\"", dir.display());
            Some((lines, Box::new(RemoveDir(dir))))
        }
        "redis" | "cached_redis" => {
            let server = RedisServer::start().await?;
            let lines = format!(
                "engine = \"{engine}\"\nurl = \"{}\"\ntimeout = \"5s\"",
                server.url()
            );
            Some((lines, Box::new(server)))
        }
        "db" => {
            let dir = std::env::temp_dir().join(format!(
                "sessiongate-engines-db-{}-{}",
                std::process::id(),
                sessiongate::session::SessionKey::generate().as_str()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let url = sessiongate::config::DbUrl::Sqlite(dir.join("sessions.sqlite3"));
            sessiongate::store::DbStore::migrate(
                &url,
                "django_session",
                std::time::Duration::from_secs(5),
            )
            .await
            .expect("migrate");
            let lines = format!(
                "engine = \"db\"\nurl = \"sqlite://{}\"\ntimeout = \"5s\"",
                dir.join("sessions.sqlite3").display()
            );
            Some((lines, Box::new(RemoveDir(dir))))
        }
        "cached_db" => {
            let server = RedisServer::start().await?;
            let (lines, guard) = Box::pin(store_for("db")).await?;
            let lines = lines.replace("engine = \"db\"", "engine = \"cached_db\"")
                + &format!("\ncache_url = \"{}\"", server.url());
            Some((lines, Box::new((server, guard))))
        }
        other => panic!("unknown engine {other}"),
    }
}

/// An upstream that answers with the directives the request names in
/// `x-test-*` headers (and a 500 on /boom).
async fn echo() -> Upstream {
    upstream(|s| {
        let status = if s.uri.path() == "/boom" { 500 } else { 200 };
        let mut b = reply().status(status);
        for (n, v) in &s.headers {
            if let Some(d) = n.as_str().strip_prefix("x-test-") {
                b = b.header(format!("x-session-{d}"), v.clone());
            }
        }
        b.body(Default::default()).unwrap()
    })
    .await
}

struct Setup {
    up: Upstream,
    p: Proxy,
    server_side: bool,
    _guard: Guard,
}

async fn setup(engine: &str) -> Option<Setup> {
    let (store, guard) = store_for(engine).await?;
    let up = echo().await;
    let toml = config("", &route(&up, "")).replace("[store]\n", &format!("[store]\n{store}\n"));
    assert!(toml.contains(&format!("engine = \"{engine}\"")));
    let p = start_engine(&toml).await;
    Some(Setup {
        up,
        p,
        server_side: engine != "signed_cookies",
        _guard: guard,
    })
}

/// One request carrying the cookie jar `jar` and asking for `ds`.
async fn call(p: &Proxy, path: &str, jar: &str, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, path, None);
    if !jar.is_empty() {
        b = b.header("cookie", jar);
    }
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

async fn lifecycle(engine: &str) {
    let Some(Setup {
        up,
        p,
        server_side,
        _guard,
    }) = setup(engine).await
    else {
        return;
    };
    // Lazy: a new visitor without data gets no cookie.
    let r = call(&p, "/", "", &[]).await;
    assert!(r.set_cookies().is_empty(), "{engine}");
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    // Update creates the session; the next request sees it.
    let r = call(&p, "/", "", &[("update", r#"{"user":"zoë","n":1}"#)]).await;
    assert_eq!(r.status, 200, "{engine}: {}", r.body);
    let jar = r.cookie_jar();
    assert!(jar.starts_with("sessionid="), "{engine}: {jar}");
    call(&p, "/", &jar, &[]).await;
    let s = up.last();
    assert_eq!(s.session(), json!({"user":"zoë","n":1}), "{engine}");
    assert!(s.header("x-session").unwrap().is_ascii());
    assert_eq!(s.header("x-session-new"), Some("false"));
    let id = s.header("x-session-id").unwrap().to_string();
    assert_eq!(id.len(), 32);
    // Update merges, Delete removes.
    let r = call(
        &p,
        "/",
        &jar,
        &[("update", r#"{"n":2,"cart":[1]}"#), ("delete", "user")],
    )
    .await;
    let jar = if server_side { jar } else { r.cookie_jar() };
    call(&p, "/", &jar, &[]).await;
    assert_eq!(up.last().session(), json!({"n":2,"cart":[1]}), "{engine}");
    // Clear keeps the session and its id.
    let r = call(&p, "/", &jar, &[("clear", "1")]).await;
    assert!(
        r.session_cookie().is_some(),
        "{engine}: the cookie is sent again"
    );
    let jar = r.cookie_jar();
    call(&p, "/", &jar, &[]).await;
    assert_eq!(up.last().session(), json!({}));
    assert_eq!(up.last().header("x-session-new"), Some("false"), "{engine}");
    assert_eq!(up.last().header("x-session-id"), Some(id.as_str()));
    // Cycle-Key: data kept, a new id; the old cookie is dead where there is a
    // server side (a signed cookie cannot be revoked: README).
    call(&p, "/", &jar, &[("update", r#"{"cart":[2]}"#)]).await;
    let old = if server_side {
        jar.clone()
    } else {
        String::new()
    };
    let jar = if server_side {
        jar
    } else {
        call(&p, "/", &jar, &[("update", r#"{"cart":[2]}"#)])
            .await
            .cookie_jar()
    };
    let r = call(&p, "/", &jar, &[("cycle-key", "1")]).await;
    let cycled = r.cookie_jar();
    assert_ne!(cycled, jar, "{engine}");
    call(&p, "/", &cycled, &[]).await;
    assert_eq!(up.last().session(), json!({"cart":[2]}), "{engine}");
    assert_ne!(
        up.last().header("x-session-id"),
        Some(id.as_str()),
        "{engine}"
    );
    if server_side {
        call(&p, "/", &old, &[]).await;
        assert_eq!(
            up.last().header("x-session-new"),
            Some("true"),
            "{engine}: old key dead"
        );
    }
    // Flush deletes the cookie; the session is gone where there is a server side.
    let r = call(&p, "/", &cycled, &[("flush", "1")]).await;
    assert!(
        r.session_cookie().unwrap().contains("Max-Age=0"),
        "{engine}"
    );
    if server_side {
        call(&p, "/", &cycled, &[]).await;
        assert_eq!(
            up.last().header("x-session-new"),
            Some("true"),
            "{engine}: flushed"
        );
    }
}

async fn bad_input_changes_nothing(engine: &str) {
    // Bind the guard: `..` would drop it now (and with it the redis-server).
    let Some(Setup { up, p, _guard, .. }) = setup(engine).await else {
        return;
    };
    let jar = call(&p, "/", "", &[("update", r#"{"keep":1}"#)])
        .await
        .cookie_jar();
    // A malformed directive: 502 naming the header, nothing applied.
    let r = call(&p, "/", &jar, &[("update", "[1]"), ("flush", "1")]).await;
    assert_eq!(r.status, 502, "{engine}");
    assert!(r.body.contains("X-Session-Update"), "{engine}: {}", r.body);
    // A 5xx answer: nothing written, no cookie.
    let r = call(&p, "/boom", &jar, &[("update", r#"{"keep":2}"#)]).await;
    assert_eq!(r.status, 500);
    assert!(r.set_cookies().is_empty(), "{engine}");
    call(&p, "/", &jar, &[]).await;
    assert_eq!(up.last().session(), json!({"keep": 1}), "{engine}");
    // A forged or garbled cookie is never adopted, and is deleted.
    for bad in [
        "sessionid=abcdefghijklmnopqrstuvwxyz012345",
        "sessionid=1.garbage",
        "sessionid=x",
    ] {
        let r = call(&p, "/", bad, &[]).await;
        assert_eq!(
            up.last().header("x-session-new"),
            Some("true"),
            "{engine}: {bad}"
        );
        assert!(
            r.session_cookie().unwrap().contains("Max-Age=0"),
            "{engine}: {bad}"
        );
        let r = call(&p, "/", bad, &[("update", r#"{"a":1}"#)]).await;
        let fresh = r.cookie_jar();
        assert!(
            !fresh.is_empty() && fresh != bad,
            "{engine}: a fresh session, not {bad}"
        );
    }
}

async fn expiry_forms(engine: &str) {
    // Bind the guard: `..` would drop it now (and with it the redis-server).
    let Some(Setup { up, p, _guard, .. }) = setup(engine).await else {
        return;
    };
    let r = call(&p, "/", "", &[("update", r#"{"a":1}"#), ("expiry", "300")]).await;
    assert_eq!(
        attr(&r.session_cookie().unwrap(), "max-age").as_deref(),
        Some("300"),
        "{engine}"
    );
    let jar = r.cookie_jar();
    call(&p, "/", &jar, &[]).await;
    assert_eq!(
        up.last().header("x-session-expiry-age"),
        Some("300"),
        "{engine}"
    );
    let r = call(&p, "/", &jar, &[("expiry", "0")]).await;
    let c = r.session_cookie().unwrap();
    assert!(
        attr(&c, "max-age").is_none() && attr(&c, "expires").is_none(),
        "{engine}: {c}"
    );
    let jar = r.cookie_jar();
    call(&p, "/", &jar, &[]).await;
    assert_eq!(
        up.last().header("x-session-expire-at-browser-close"),
        Some("true"),
        "{engine}"
    );
    let r = call(&p, "/", &jar, &[("expiry", "none")]).await;
    assert_eq!(
        attr(&r.session_cookie().unwrap(), "max-age").as_deref(),
        Some("1209600"),
        "{engine}"
    );
}

/// `max_session_size` holds on what is stored: two requests load the same
/// session, each adds under a different key enough to pass the limit
/// alone but not together, and both are answered only once both were
/// loaded (the upstream waits for the two). The second write to land finds
/// the newest state over the limit: it is a 502 and writes nothing, so the
/// stored session has one of the two changes and stays under the limit.
async fn concurrent_growth_stays_under_max_session_size(engine: &str) {
    if engine == "signed_cookies" {
        // No shared state: each cookie holds its own session.
        return;
    }
    let Some((store, _guard)) = store_for(engine).await else {
        return;
    };
    let both = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let up = upstream_async(move |s| {
        let both = both.clone();
        Box::pin(async move {
            let path = s.uri.path().to_string();
            match path.as_str() {
                "/login" => directives(&[("x-session-update", "{\"user\": 1}")]),
                "/a" | "/b" => {
                    both.wait().await;
                    let v = format!("{{\"{}\": \"{}\"}}", &path[1..], "x".repeat(600));
                    directives(&[("x-session-update", &v)])
                }
                _ => ok(),
            }
        })
    })
    .await;
    let toml = config("max_session_size = \"1KiB\"", &route(&up, ""))
        .replace("[store]\n", &format!("[store]\n{store}\n"));
    let p = start_engine(&toml).await;
    let jar = call(&p, "/login", "", &[]).await.cookie_jar();
    let (a, b) = tokio::join!(call(&p, "/a", &jar, &[]), call(&p, "/b", &jar, &[]));
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 502], "{engine}: {} / {}", a.body, b.body);
    let refused = if a.status == 502 { &a } else { &b };
    assert!(
        refused.body.contains("max_session_size"),
        "{engine}: {}",
        refused.body
    );
    call(&p, "/look", &jar, &[]).await;
    let session = up.last().session();
    let stored = session.as_object().unwrap();
    assert_eq!(stored["user"], json!(1), "{engine}");
    assert_eq!(
        stored.contains_key("a") as u8 + stored.contains_key("b") as u8,
        1,
        "{engine}: exactly one change landed: {:?}",
        stored.keys().collect::<Vec<_>>()
    );
    assert!(session.to_string().len() <= 1024, "{engine}");
    p.stop().await;
}

macro_rules! every_engine {
    ($($engine:ident),*) => {
        $(
            mod $engine {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn lifecycle() {
                    super::lifecycle(stringify!($engine)).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn bad_input_changes_nothing() {
                    super::bad_input_changes_nothing(stringify!($engine)).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn expiry_forms() {
                    super::expiry_forms(stringify!($engine)).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn concurrent_growth_stays_under_max_session_size() {
                    super::concurrent_growth_stays_under_max_session_size(stringify!($engine))
                        .await;
                }
            }
        )*
    };
}

every_engine!(
    memory,
    file,
    cached_file,
    signed_cookies,
    redis,
    cached_redis,
    db,
    cached_db
);

/// SPEC 8: on the engines that store Django's format, `_session_expiry` is
/// the session's expiry and never a key an upstream sets, however the
/// session was made (a new visitor's first write, a Replace, an Update of
/// an existing session). Django reads the key as the expiry: a stray value
/// would shorten the session, end it, or make Django's views fail.
async fn session_expiry_is_not_data(engine: &str, store_extra: &str) {
    let Some((store, _guard)) = store_for(engine).await else {
        return;
    };
    let up = echo().await;
    let toml = config("", &route(&up, ""))
        .replace("[store]\n", &format!("[store]\n{store}\n{store_extra}\n"));
    let p = start_engine(&toml).await;
    let default_age = (14 * 86_400).to_string();
    for (first, value) in [
        ("update", r#"{"cart":1,"_session_expiry":5}"#),
        (
            "replace",
            r#"{"cart":1,"_session_expiry":"2020-01-01T00:00:00+00:00"}"#,
        ),
        ("update", r#"{"cart":1,"_session_expiry":"garbage"}"#),
        ("replace", r#"{"cart":1,"_session_expiry":0}"#),
    ] {
        let r = call(&p, "/", "", &[(first, value)]).await;
        assert_eq!(r.status, 200, "{engine} {value}: {}", r.body);
        let mut jar = r.cookie_jar();
        // Then once more on the session as it stands.
        let r = call(&p, "/", &jar, &[("update", r#"{"_session_expiry":7}"#)]).await;
        assert_eq!(r.status, 200, "{engine} {value}: {}", r.body);
        if !r.cookie_jar().is_empty() {
            jar = r.cookie_jar();
        }
        call(&p, "/", &jar, &[]).await;
        let s = up.last();
        assert_eq!(s.header("x-session-new"), Some("false"), "{engine} {value}");
        assert_eq!(s.session(), json!({"cart":1}), "{engine} {value}");
        assert_eq!(
            s.header("x-session-expiry-age"),
            Some(default_age.as_str()),
            "{engine} {value}"
        );
        assert_eq!(
            s.header("x-session-expire-at-browser-close"),
            Some("false"),
            "{engine} {value}"
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_not_data_on_db() {
    session_expiry_is_not_data("db", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_not_data_on_cached_db() {
    session_expiry_is_not_data("cached_db", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_not_data_on_djangos_signed_cookies() {
    session_expiry_is_not_data("signed_cookies", "format = \"django\"").await;
}
