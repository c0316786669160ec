//! Sliding expiry (SPEC 10) end to end on memory, file, signed_cookies, db
//! (SQLite) and redis, with a short `cookie_age` and the proxy's test clock: an active
//! session outlives `cookie_age`, an idle one ends `cookie_age` after its
//! last write, a refresh keeps the key and sends `Max-Age = cookie_age`, and
//! the store sees at most one write per session per `refresh_interval`
//! (counted by `sessiongate_sessions_saved_total`, and by the refreshed
//! cookies the browser received).

mod common;
#[path = "common/sessions_api.rs"]
mod sessions_api;

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::e2e::*;
use common::redis_server::RedisServer;
use common::*;
use sessions_api::{metric, Browser};

type Guard = Box<dyn Any + Send>;

const COOKIE_AGE: u64 = 100;
const INTERVAL: u64 = 10;
const STEP: u64 = 4;
const STEPS: u64 = 30;

/// The `[store]` lines for `engine`; `None`: Redis could not be started
/// outside CI (already said, loudly).
async fn store_for(engine: &str) -> Option<(String, Guard)> {
    match engine {
        "memory" | "signed_cookies" => Some((format!("engine = \"{engine}\""), Box::new(()))),
        "file" => {
            let dir = TempDir::new("refresh-file");
            let lines = format!(
                "engine = \"file\"\npath = \"{}\"",
                dir.join("store").display()
            );
            Some((lines, Box::new(dir)))
        }
        "db" => {
            let dir = TempDir::new("refresh-db");
            let file = dir.join("sessions.sqlite3");
            sessiongate::store::DbStore::migrate(
                &sessiongate::config::DbUrl::Sqlite(file.clone()),
                "django_session",
                Duration::from_secs(10),
            )
            .await
            .expect("migrate");
            let lines = format!(
                "engine = \"db\"\nurl = \"sqlite://{}\"\ntimeout = \"10s\"",
                file.display()
            );
            Some((lines, Box::new(dir)))
        }
        "redis" => {
            let server = RedisServer::start().await?;
            let lines = format!(
                "engine = \"redis\"\nurl = \"{}\"\ntimeout = \"5s\"",
                server.url()
            );
            Some((lines, Box::new(server)))
        }
        other => panic!("unknown engine {other}"),
    }
}

/// `sessiongate_sessions_saved_total` (writes of an existing session).
async fn saved(admin: SocketAddr) -> u64 {
    metric(admin, "sessiongate_sessions_saved_total").await
}

async fn app() -> Upstream {
    upstream(|s| match s.uri.path() {
        "/login" => directives(&[("x-session-update", r#"{"user_id": 1}"#)]),
        _ => ok(),
    })
    .await
}

/// The proxy for `engine` with `session_extra`, and an admin listener for
/// the metrics.
async fn proxy(engine: &str, up: &Upstream, session_extra: &str) -> Option<(Proxy, Guard)> {
    let (store, guard) = store_for(engine).await?;
    let routes = format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n", route(up, ""));
    let toml = config(session_extra, &routes).replace("[store]\n", &format!("[store]\n{store}\n"));
    Some((start_engine(&toml).await, guard))
}

fn refresh_config() -> String {
    format!("cookie_age = \"{COOKIE_AGE}s\"\nrefresh_interval = \"{INTERVAL}s\"")
}

/// The user the upstream saw in the last request's session, if any.
fn seen_user(up: &Upstream) -> Option<i64> {
    up.last().session().get("user_id").and_then(|v| v.as_i64())
}

async fn active_then_idle(engine: &str) {
    let up = app().await;
    let Some((p, _guard)) = proxy(engine, &up, &refresh_config()).await else {
        return;
    };
    let admin = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login").await.key_or_token();
    let first = b.get(&p, "/").await;
    assert!(
        first.set_cookies().is_empty(),
        "{engine}: within the interval nothing is written"
    );
    let id = up.last().header("x-session-id").unwrap().to_string();
    let cookie = b.jar["sessionid"].clone();
    let before = saved(admin).await;

    let mut refreshed = 0u64;
    for step in 1..=STEPS {
        p.clock.advance(Duration::from_secs(STEP));
        let got = b.get(&p, "/").await;
        assert_eq!(got.status, 200);
        assert_eq!(
            seen_user(&up),
            Some(1),
            "{engine}: step {step}: still logged in"
        );
        assert_eq!(
            up.last().header("x-session-id"),
            Some(id.as_str()),
            "{engine}: the same session (its key kept)"
        );
        if let Some(c) = got.session_cookie() {
            refreshed += 1;
            assert_eq!(
                attr(&c, "max-age").as_deref(),
                Some(COOKIE_AGE.to_string().as_str()),
                "{engine}: a refresh sends Max-Age = cookie_age: {c}"
            );
            if engine != "signed_cookies" {
                assert_eq!(
                    b.jar["sessionid"], cookie,
                    "{engine}: a refresh keeps the key"
                );
            }
        }
    }
    let elapsed = STEP * STEPS;
    assert!(elapsed > COOKIE_AGE, "the session lived past cookie_age");
    let writes = saved(admin).await - before;
    assert_eq!(
        writes, refreshed,
        "{engine}: every write is a refresh the browser saw"
    );
    assert!(
        writes <= elapsed / INTERVAL,
        "{engine}: {writes} writes in {elapsed}s: at most one per {INTERVAL}s"
    );
    assert!(
        writes >= elapsed / (INTERVAL + STEP),
        "{engine}: {writes} writes in {elapsed}s: it was refreshed"
    );

    // Idle: it ends cookie_age after its last write (at most one interval
    // before its last activity), and the next request is a new visitor.
    p.clock.advance(Duration::from_secs(COOKIE_AGE + 1));
    let got = b.get(&p, "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(
        seen_user(&up),
        None,
        "{engine}: idle past cookie_age: logged out"
    );
    assert_ne!(up.last().header("x-session-id"), Some(id.as_str()));
    p.stop().await;
}

trait KeyOrToken {
    fn key_or_token(&self);
}

impl KeyOrToken for Got {
    /// The login set a session cookie.
    fn key_or_token(&self) {
        assert!(self.session_cookie().is_some(), "the login sets a cookie");
    }
}

#[tokio::test]
async fn memory_an_active_session_slides_an_idle_one_ends() {
    active_then_idle("memory").await;
}

#[tokio::test]
async fn file_an_active_session_slides_an_idle_one_ends() {
    active_then_idle("file").await;
}

#[tokio::test]
async fn signed_cookies_an_active_session_slides_an_idle_one_ends() {
    active_then_idle("signed_cookies").await;
}

/// The row's last write is its signing time, so the db engine refreshes
/// too (it did not when a row read as written at the time it was read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_an_active_session_slides_an_idle_one_ends() {
    active_then_idle("db").await;
}

#[tokio::test]
async fn redis_an_active_session_slides_an_idle_one_ends() {
    active_then_idle("redis").await;
}

#[tokio::test]
async fn without_refresh_interval_an_active_session_ends_at_cookie_age() {
    let up = app().await;
    let (p, _guard) = proxy("memory", &up, &format!("cookie_age = \"{COOKIE_AGE}s\""))
        .await
        .unwrap();
    let admin = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login").await.key_or_token();
    let mut logged_out_at = None;
    for step in 1..=STEPS {
        p.clock.advance(Duration::from_secs(STEP));
        let got = b.get(&p, "/").await;
        if seen_user(&up).is_none() {
            logged_out_at = Some(step * STEP);
            break;
        }
        assert!(got.session_cookie().is_none(), "no refresh: nothing set");
    }
    assert_eq!(
        logged_out_at,
        Some(COOKIE_AGE),
        "cookie_age after the login"
    );
    assert_eq!(saved(admin).await, 0);
    p.stop().await;
}

#[tokio::test]
async fn a_browser_close_session_is_not_refreshed() {
    let up = app().await;
    let extra = format!("{}\nexpire_at_browser_close = true", refresh_config());
    let (p, _guard) = proxy("memory", &up, &extra).await.unwrap();
    let admin = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login").await.key_or_token();
    for _ in 0..5 {
        p.clock.advance(Duration::from_secs(INTERVAL + 1));
        let got = b.get(&p, "/").await;
        assert!(
            got.session_cookie().is_none(),
            "a browser-close session is not refreshed"
        );
        assert_eq!(seen_user(&up), Some(1));
    }
    assert_eq!(saved(admin).await, 0, "no write");
    p.stop().await;
}

#[tokio::test]
async fn a_session_with_a_fixed_end_is_not_rewritten() {
    // X-Session-Expiry with a date: nothing slides, so a refresh would be
    // a write for nothing.
    let end = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let end = end
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let up = upstream(move |s| match s.uri.path() {
        "/login" => directives(&[
            ("x-session-update", r#"{"user_id": 1}"#),
            ("x-session-expiry", end.as_str()),
        ]),
        _ => ok(),
    })
    .await;
    let (p, _guard) = proxy("memory", &up, &refresh_config()).await.unwrap();
    let admin = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login").await.key_or_token();
    for _ in 0..3 {
        p.clock.advance(Duration::from_secs(INTERVAL + 1));
        let got = b.get(&p, "/").await;
        assert!(got.session_cookie().is_none());
        assert_eq!(seen_user(&up), Some(1));
    }
    assert_eq!(saved(admin).await, 0, "no write");
    p.stop().await;
}

#[test]
fn check_refuses_refresh_interval_with_save_every_request() {
    let toml = config(
        "refresh_interval = \"1m\"\nsave_every_request = true",
        "[[route]]\nname = \"app\"\nupstream = \"http://127.0.0.1:9\"\n",
    );
    let e = sessiongate::config::Config::parse(&toml, std::path::Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refresh_interval") && e.contains("save_every_request"),
        "{e}"
    );
}

/// SPEC 10 "the store sees at most one write per session per interval",
/// for the requests a page makes at once (parallel XHR, assets on a session
/// route): they all load the session due for a refresh before any answers.
/// One of them writes it and sends the refreshed cookie; the others find it
/// just written and send none.
async fn a_burst_refreshes_once(engine: &str) {
    const BURST: usize = 6;
    let arrived = Arc::new(tokio::sync::Barrier::new(BURST));
    let up = upstream_async({
        let arrived = arrived.clone();
        move |s: Seen| {
            let arrived = arrived.clone();
            Box::pin(async move {
                if s.uri.path() == "/login" {
                    return directives(&[("x-session-update", r#"{"user_id": 1}"#)]);
                }
                // Every request of the burst has loaded the session.
                arrived.wait().await;
                ok()
            })
        }
    })
    .await;
    let Some((p, _guard)) = proxy(engine, &up, &refresh_config()).await else {
        return;
    };
    let admin = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login").await.key_or_token();
    let before = saved(admin).await;
    p.clock.advance(Duration::from_secs(INTERVAL + 1));
    let burst: Vec<_> = (0..BURST)
        .map(|_| {
            let mut b = Browser { jar: b.jar.clone() };
            let p = &p;
            async move { b.get(p, "/page").await }
        })
        .collect();
    let got = within("the burst", futures_util::future::join_all(burst)).await;
    assert!(got.iter().all(|g| g.status == 200), "{engine}");
    let cookies = got.iter().filter(|g| g.session_cookie().is_some()).count();
    assert_eq!(cookies, 1, "{engine}: one refreshed cookie for the burst");
    assert_eq!(
        saved(admin).await - before,
        1,
        "{engine}: one write for the burst"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_burst_refreshes_once() {
    a_burst_refreshes_once("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_a_burst_refreshes_once() {
    a_burst_refreshes_once("file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_a_burst_refreshes_once() {
    a_burst_refreshes_once("db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_burst_refreshes_once() {
    a_burst_refreshes_once("redis").await;
}
