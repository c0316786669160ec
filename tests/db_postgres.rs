//! The `db` engine on a real PostgreSQL (SPEC 8): the outage `503` on
//! session routes only and recovery without a restart, start-up errors for
//! a wrong password or a missing database, two sessiongate instances on one
//! database (40-way concurrent patches, SessionInterrupted), and the table
//! shared with real Django on PostgreSQL.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use http::Method;
use serde_json::{json, Value};

#[path = "common/django.rs"]
mod django;
#[path = "common/postgres_server.rs"]
mod postgres_server;

use postgres_server::PgServer;

/// A server with database `sessions` and its table made by `migrate`.
async fn database() -> Option<PgServer> {
    let server = PgServer::start()?;
    server.create_db("sessions").await;
    let url = sessiongate::config::DbUrl::Postgres(server.url("sessions"));
    sessiongate::store::DbStore::migrate(
        &url,
        "django_session",
        std::time::Duration::from_secs(10),
    )
    .await
    .expect("migrate");
    Some(server)
}

/// An upstream that answers with the directives the request names in
/// `x-test-*` headers.
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

fn toml(up: &Upstream, url: &str, timeout: &str) -> String {
    let routes = format!(
        "{}\n[[route]]\nname = \"static\"\npath = \"/static\"\nupstream = \"{}\"\nsession = false\n",
        route(up, "forward = { \"X-User-Id\" = \"_auth_user_id\" }"),
        up.url()
    );
    config("", &routes).replace(
        "[store]\n",
        &format!("[store]\nengine = \"db\"\nurl = \"{url}\"\ntimeout = \"{timeout}\"\n"),
    )
}

async fn call(p: &Proxy, path: &str, key: Option<&str>, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, path, key);
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_is_503_on_session_routes_only_and_recovers_without_restart() {
    let Some(mut server) = database().await else {
        return;
    };
    let up = echo().await;
    let text = toml(&up, &server.url("sessions"), "2s") + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let p = start_engine(&text).await;
    let admin = p.admin.unwrap();
    let readyz = || async move {
        let r = common::e2e::raw_request(
            admin,
            "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        (r.status, r.text())
    };
    assert_eq!(readyz().await.0, 200);
    let key = call(&p, "/", None, &[("update", r#"{"cart":[1]}"#)])
        .await
        .key();

    server.stop();
    // The load balancer sees it before a request does.
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store db"), "names the engine: {body}");
    let r = call(&p, "/", Some(&key), &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_one_line_body(&r.body);
    let r = call(&p, "/", None, &[("update", r#"{"a":1}"#)]).await;
    assert_eq!(r.status, 503, "a write too");
    let r = call(&p, "/static/x", Some(&key), &[]).await;
    assert_eq!(r.status, 200, "a route without sessions is served");

    server.start_again().expect("start PostgreSQL again");
    let r = call(&p, "/", Some(&key), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(readyz().await.0, 200, "ready again");
    assert_eq!(up.last().session(), json!({"cart": [1]}));
    let r = call(&p, "/", Some(&key), &[("update", r#"{"b":2}"#)]).await;
    assert_eq!(r.status, 200);
    p.stop().await;
}

fn assert_one_line_body(body: &str) {
    assert!(
        !body.trim().is_empty() && body.trim().lines().count() == 1,
        "{body:?}"
    );
    assert!(!body.contains("sg-test-password"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_or_missing_database_is_a_start_up_error() {
    let Some(server) = database().await else {
        return;
    };
    let up = echo().await;
    let wrong_pw = server
        .url("sessions")
        .replace(postgres_server::PASSWORD, "nope");
    let no_db = server.url("nosuchdb");
    for (url, says) in [
        (wrong_pw.as_str(), "password authentication failed"),
        (no_db.as_str(), "does not exist"),
    ] {
        let text = toml(&up, url, "5s");
        let config = sessiongate::config::Config::parse(&text, Path::new("t.toml")).unwrap();
        let Err(e) = sessiongate::store::AnyStore::open(&config).await else {
            panic!("{url} opened")
        };
        let msg = e.to_string();
        assert!(msg.contains(says), "{msg}");
        assert!(!msg.contains(postgres_server::PASSWORD), "{msg}");
    }
    // Through the binary: one line on stderr, a failing exit status.
    let dir = common::e2e::TempDir::new("pg-badpw");
    let cfg = dir.write("s.toml", &toml(&up, &wrong_pw, "5s"));
    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_lose_no_update() {
    let Some(server) = database().await else {
        return;
    };
    let up = echo().await;
    // 40 patches queue on one row lock: a generous bound for a loaded machine.
    two_instances(&up, &toml(&up, &server.url("sessions"), "60s")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_db_two_instances_on_one_database_and_one_redis() {
    let Some(server) = database().await else {
        return;
    };
    let Some(redis) = common::redis_server::RedisServer::start().await else {
        return;
    };
    let up = echo().await;
    let text = toml(&up, &server.url("sessions"), "60s").replace(
        "engine = \"db\"",
        &format!("engine = \"cached_db\"\ncache_url = \"{}\"", redis.url()),
    );
    two_instances(&up, &text).await;
}

/// Two proxies on `text`'s store: 40 concurrent patches split across them
/// all survive; after a Cycle-Key on one, the other never serves the old key.
async fn two_instances(up: &Upstream, text: &str) {
    let a = Arc::new(start_engine(text).await);
    let b = Arc::new(start_engine(text).await);
    let key = call(&a, "/", None, &[("update", r#"{"start":0}"#)])
        .await
        .key();
    let mut tasks = Vec::new();
    for n in 0..40 {
        let p = if n % 2 == 0 { a.clone() } else { b.clone() };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let r = call(
                &p,
                "/",
                Some(&key),
                &[("update", &format!("{{\"k{n}\":{n}}}"))],
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    call(&b, "/", Some(&key), &[]).await;
    let s = up.last().session();
    assert_eq!(s.as_object().unwrap().len(), 41, "{s}");
    // Cycle-Key on one instance: a write through the other with the old key
    // is SessionInterrupted (400) and resurrects nothing.
    let new_key = call(&a, "/", Some(&key), &[("cycle-key", "1")]).await.key();
    let r = call(&b, "/", Some(&key), &[("update", r#"{"late":1}"#)]).await;
    assert!(r.status == 400 || r.key() != key, "{} {}", r.status, r.body);
    call(&b, "/", Some(&new_key), &[]).await;
    assert!(up.last().session().get("late").is_none());
    assert_eq!(up.last().session().as_object().unwrap().len(), 41);
}

/// Django's `session_tool.py` on the shared PostgreSQL database.
fn tool(py: &Path, url: &str, args: &[&str]) -> Value {
    let out = django::run_project(py, "session_tool.py", url, SECRET, args);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_shared_with_django_on_postgres() {
    let Some(py) = django::python() else { return };
    let Some(server) = PgServer::start() else {
        return;
    };
    server.create_db("shared").await;
    let url = server.url("shared");
    // sessiongate's migrate first, then Django's with --fake-initial.
    sessiongate::store::DbStore::migrate(
        &sessiongate::config::DbUrl::Postgres(url.clone()),
        "django_session",
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    let out = Command::new(&py)
        .arg(django::dir().join("project/manage.py"))
        .args(["migrate", "--fake-initial", "-v0"])
        .env("SG_DATABASE", &url)
        .env("SG_SECRET_KEY", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = echo().await;
    let p = start_engine(&toml(&up, &url, "5s")).await;

    let login = json!({"_auth_user_id": "3",
        "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
        "_auth_user_hash": "h"});
    let key = tool(&py, &url, &["create", &login.to_string(), "900"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    call(&p, "/", Some(&key), &[]).await;
    assert_eq!(up.last().session(), login);
    assert_eq!(up.last().header("x-user-id"), Some("3"));
    assert_eq!(up.last().header("x-session-expiry-age"), Some("900"));

    call(
        &p,
        "/",
        Some(&key),
        &[
            ("update", r#"{"cart":["x"]}"#),
            ("expiry", "2031-05-06T07:08:09Z"),
        ],
    )
    .await;
    let d = tool(&py, &url, &["read", &key]);
    assert_eq!(d["data"]["cart"], json!(["x"]));
    assert_eq!(d["data"]["_auth_user_id"], "3");
    assert_eq!(d["expire_date"], "2031-05-06T07:08:09+00:00");
    assert!(
        d["raw_expire_date"].as_str().unwrap().ends_with("+00:00"),
        "timestamptz: {d}"
    );

    let key2 = tool(&py, &url, &["cycle", &key])["key"]
        .as_str()
        .unwrap()
        .to_string();
    call(&p, "/", Some(&key), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    call(&p, "/", Some(&key2), &[("flush", "1")]).await;
    assert_eq!(tool(&py, &url, &["read", &key2])["exists"], false);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slower_than_the_store_timeout_is_503_then_served_again() {
    let Some(server) = database().await else {
        return;
    };
    let up = echo().await;
    let p = start_engine(&toml(&up, &server.url("sessions"), "500ms")).await;
    let key = call(&p, "/", None, &[("update", r#"{"n":1}"#)]).await.key();
    // Another client holds the table: every statement on it waits.
    let (locker, conn) = tokio_postgres::connect(&server.url("sessions"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE django_session IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let r = call(&p, "/", Some(&key), &[]).await;
    assert_eq!(r.status, 503, "a read: {}", r.body);
    assert_one_line_body(&r.body);
    let r = call(&p, "/", Some(&key), &[("update", r#"{"n":2}"#)]).await;
    assert_eq!(r.status, 503, "a write: {}", r.body);
    let r = call(&p, "/static/x", None, &[]).await;
    assert_eq!(r.status, 200);
    locker.batch_execute("ROLLBACK").await.unwrap();
    drop(locker);
    let _ = task.await;
    let r = call(&p, "/", Some(&key), &[("update", r#"{"m":3}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    call(&p, "/", Some(&key), &[]).await;
    let s = up.last().session();
    assert_eq!(s["m"], 3);
    assert_eq!(s["n"], 1, "the timed-out write was not applied: {s}");
}
