//! A real Django project (`tests/django/project`: `django.contrib.sessions`
//! with the `db` backend and `django.contrib.auth`, served by
//! `manage.py runserver --noreload`) and a legacy upstream behind one
//! sessiongate, sharing sessions through one table, on SQLite and on
//! PostgreSQL (SPEC 8): a Django login is seen by the legacy app, what the
//! legacy app writes is in `request.session`, cycle_key, set_expiry and
//! flush on either side hold on both, and `cookie_passthrough` lets Django's
//! cookie pass on its routes. With `user_key = "_auth_user_id"`, the
//! sessions Django's logins make are listed and ended by the admin API and
//! by Logout-Others (SPEC 9), though sessiongate never wrote them.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::e2e::TempDir;
use common::*;
use http::Method;
use http_body_util::Full;
use serde_json::{json, Value};

#[path = "common/django.rs"]
mod django;
#[path = "common/postgres_server.rs"]
mod postgres_server;
#[path = "common/sessions_api.rs"]
mod sessions_api;

struct Django {
    child: Child,
    port: u16,
}

impl Drop for Django {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn manage(py: &Path, db: &str, args: &[&str]) {
    django::run_project(py, "manage.py", db, SECRET, args);
}

/// Migrates `db`, adds the user ann (password pw) and serves Django on a free port.
fn django(py: &Path, db: &str, log: PathBuf) -> Django {
    manage(py, db, &["migrate", "-v0"]);
    manage(
        py,
        db,
        &[
            "shell",
            "-c",
            "from django.contrib.auth.models import User; User.objects.create_user('ann', password='pw')",
        ],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(py)
        .arg(django::dir().join("project/manage.py"))
        .args(["runserver", "--noreload", &format!("127.0.0.1:{port}")])
        .env("SG_DATABASE", db)
        .env("SG_SECRET_KEY", SECRET)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start runserver");
    let d = Django { child, port };
    for _ in 0..600 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return d;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("Django's runserver did not listen within 30 s");
}

/// An upstream that answers with the directives the request names in
/// `x-test-*` headers.
async fn legacy() -> Upstream {
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

async fn call(p: &Proxy, path: &str, key: Option<&str>, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, path, key);
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

/// What Django's view sees for `key`.
async fn django_view(p: &Proxy, key: Option<&str>) -> Value {
    let r = p.get("/new/session", key).await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

async fn login(p: &Proxy) -> String {
    let r = p
        .send(
            p.req(Method::POST, "/new/login", None)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from_static(b"username=ann&password=pw")))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Django's own Set-Cookie passed through sessiongate untouched.
    let c = r.session_cookie().expect("Django's session cookie passes");
    c["sessionid=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

async fn shared_login_and_data(django_db: &str, store_url: &str, dir: &TempDir) {
    let Some(py) = django::python() else { return };
    let dj = django(&py, django_db, dir.join("django.log"));
    let up = legacy().await;
    let routes = format!(
        "{}\n[[route]]\nname = \"django\"\npath = \"/new/\"\nupstream = \"http://127.0.0.1:{}\"\nsession = false\ncookie_passthrough = true\n",
        route(&up, "forward = { \"X-User-Id\" = \"_auth_user_id\" }"),
        dj.port
    );
    let toml = config("", &routes).replace(
        "[store]\n",
        &format!("[store]\nengine = \"db\"\nurl = \"{store_url}\"\ntimeout = \"5s\"\n"),
    );
    let p = start_engine(&toml).await;

    // A login through django.contrib.auth is seen by the legacy app.
    let key = login(&p).await;
    call(&p, "/", Some(&key), &[]).await;
    let s = up.last();
    assert_eq!(s.header("x-session-new"), Some("false"));
    assert_eq!(s.session()["_auth_user_id"], "1");
    assert!(s.session()["_auth_user_hash"].is_string());
    assert_eq!(s.header("x-user-id"), Some("1"));

    // What the legacy app writes is in request.session; the user stays logged in.
    call(&p, "/", Some(&key), &[("update", r#"{"cart":[7]}"#)]).await;
    let v = django_view(&p, Some(&key)).await;
    assert_eq!(v["data"]["cart"], json!([7]), "{v}");
    assert_eq!(v["user"], "ann");

    // Django writes; the legacy app sees it.
    let r = p
        .send(
            p.req(Method::POST, "/new/set", Some(&key))
                .body(Full::new(Bytes::from_static(br#"{"theme":"dark"}"#)))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    call(&p, "/", Some(&key), &[]).await;
    assert_eq!(up.last().session()["theme"], "dark");
    assert_eq!(up.last().session()["cart"], json!([7]));

    // set_expiry on the Django side holds here, and the other way round.
    p.get("/new/expiry?v=300", Some(&key)).await;
    call(&p, "/", Some(&key), &[]).await;
    assert_eq!(up.last().header("x-session-expiry-age"), Some("300"));
    call(&p, "/", Some(&key), &[("expiry", "0")]).await;
    let v = django_view(&p, Some(&key)).await;
    assert_eq!(v["expire_at_browser_close"], true, "{v}");

    // cycle_key here (as at a login): Django follows the new key.
    let key2 = call(&p, "/", Some(&key), &[("cycle-key", "1")]).await.key();
    assert_eq!(django_view(&p, Some(&key2)).await["user"], "ann");
    assert_eq!(django_view(&p, Some(&key)).await["user"], Value::Null);
    // cycle_key in Django: the legacy app follows Django's new cookie.
    let r = p.get("/new/cycle", Some(&key2)).await;
    let c = r.session_cookie().expect("Django's new cookie");
    let key3 = c["sessionid=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(key3, key2);
    call(&p, "/", Some(&key3), &[]).await;
    assert_eq!(up.last().session()["_auth_user_id"], "1");
    call(&p, "/", Some(&key2), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));

    // flush in Django (logout) ends it for the legacy app.
    p.get("/new/flush", Some(&key3)).await;
    call(&p, "/", Some(&key3), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    // Flush here ends Django's login.
    let key4 = login(&p).await;
    assert_eq!(django_view(&p, Some(&key4)).await["user"], "ann");
    call(&p, "/", Some(&key4), &[("flush", "1")]).await;
    assert_eq!(django_view(&p, Some(&key4)).await["user"], Value::Null);
    p.stop().await;
}

const TOKEN: &str = "django-interop-admin-token";

/// Django's logins (rows sessiongate never wrote) through the admin API and
/// Logout-Others: listed with their times, ended, and Django's next request
/// with an ended cookie is anonymous.
async fn djangos_logins_are_a_users_sessions(django_db: &str, store_url: &str, dir: &TempDir) {
    let Some(py) = django::python() else { return };
    let dj = django(&py, django_db, dir.join("django.log"));
    let up = legacy().await;
    let routes = format!(
        "{}\n[[route]]\nname = \"django\"\npath = \"/new/\"\nupstream = \"http://127.0.0.1:{}\"\nsession = false\ncookie_passthrough = true\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
        route(&up, ""),
        dj.port
    );
    let toml = config("user_key = \"_auth_user_id\"", &routes).replace(
        "[store]\n",
        &format!("[store]\nengine = \"db\"\nurl = \"{store_url}\"\ntimeout = \"5s\"\n"),
    );
    let p = start_engine(&toml).await;
    let admin = p.admin.expect("the admin listener");
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();

    // ann logs in through Django on two devices; the upstream sees each
    // session's X-Session-Id, which is what the API lists.
    let laptop = login(&p).await;
    let phone = login(&p).await;
    assert_ne!(laptop, phone);
    let mut ids = Vec::new();
    for k in [&laptop, &phone] {
        call(&p, "/", Some(k), &[]).await;
        assert_eq!(up.last().session()["_auth_user_id"], "1");
        ids.push(up.last().header("x-session-id").unwrap().to_string());
    }
    let listed = sessions_api::list(admin, "1", TOKEN).await;
    let mut listed_ids: Vec<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    listed_ids.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(listed_ids, want, "Django's logins are listed: {listed:?}");
    let body = serde_json::to_string(&listed).unwrap();
    assert!(!body.contains(&laptop) && !body.contains(&phone), "no key");
    let t1 = time::OffsetDateTime::now_utc().unix_timestamp();
    for s in &listed {
        let w = time::OffsetDateTime::parse(
            s["last_write"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp();
        assert!((t0..=t1).contains(&w), "last_write: Django's login: {s}");
    }
    assert!(sessions_api::list(admin, "2", TOKEN).await.is_empty());

    // "Log out other devices" from the laptop: the phone's Django session
    // ends, the laptop's stays.
    let r = call(&p, "/", Some(&laptop), &[("logout-others", "1")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(django_view(&p, Some(&phone)).await["user"], Value::Null);
    assert_eq!(django_view(&p, Some(&laptop)).await["user"], "ann");

    // Django logs ann in again (a new row); the API ends every session of
    // hers, and Django's next requests with those cookies are anonymous.
    let tablet = login(&p).await;
    assert_eq!(sessions_api::list(admin, "1", TOKEN).await.len(), 2);
    assert_eq!(
        sessions_api::deleted(admin, "/sessions?user=1", TOKEN).await,
        2
    );
    for k in [&laptop, &tablet] {
        let v = django_view(&p, Some(k)).await;
        assert_eq!(v["user"], Value::Null, "{v}");
    }
    assert!(sessions_api::list(admin, "1", TOKEN).await.is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn djangos_logins_are_listed_and_revoked_on_sqlite() {
    let dir = TempDir::new("django-users-sqlite");
    let db = dir.join("shared.sqlite3");
    djangos_logins_are_a_users_sessions(
        db.to_str().unwrap(),
        &format!("sqlite://{}", db.display()),
        &dir,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn djangos_logins_are_listed_and_revoked_on_postgres() {
    if django::python().is_none() {
        return;
    }
    let Some(server) = postgres_server::PgServer::start() else {
        return;
    };
    server.create_db("users").await;
    let dir = TempDir::new("django-users-pg");
    let url = server.url("users");
    djangos_logins_are_a_users_sessions(&url, &url, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_and_legacy_share_sessions_on_sqlite() {
    let dir = TempDir::new("django-sqlite");
    let db = dir.join("shared.sqlite3");
    shared_login_and_data(
        db.to_str().unwrap(),
        &format!("sqlite://{}", db.display()),
        &dir,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_and_legacy_share_sessions_on_postgres() {
    if django::python().is_none() {
        return;
    }
    let Some(server) = postgres_server::PgServer::start() else {
        return;
    };
    server.create_db("shared").await;
    let dir = TempDir::new("django-pg");
    let url = server.url("shared");
    shared_login_and_data(&url, &url, &dir).await;
}
