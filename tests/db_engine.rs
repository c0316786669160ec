//! The `db` engine on SQLite (SPEC 8): `migrate` and `clear-expired`
//! through the real binary, the start-up error without a table, and one
//! session table shared with real Django (its own `SessionStore`, from
//! `tests/django/project`) in both directions: data, login keys, expiry,
//! flush and cycle_key.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::e2e::TempDir;
use common::*;
use http::Method;
use serde_json::{json, Value};

#[path = "common/django.rs"]
mod django;

fn bin(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .current_dir(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run sessiongate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A config file in `dir` for the db engine on `sqlite://var/sessions.sqlite3`.
fn write_config(dir: &TempDir) -> std::path::PathBuf {
    let text = config("", "[[route]]\nupstream = \"http://127.0.0.1:9\"\n").replace(
        "[store]\n",
        "[store]\nengine = \"db\"\nurl = \"sqlite://var/sessions.sqlite3\"\n",
    );
    dir.write("sessiongate.toml", &text)
}

/// Runs Django's `session_tool.py` (its own `SessionStore`) on `db`.
fn tool(py: &Path, db: &Path, secret: &str, args: &[&str]) -> Value {
    let out = django::run_project(py, "session_tool.py", db, secret, args);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn manage(py: &Path, db: &Path, args: &[&str]) -> Output {
    django::run_project(py, "manage.py", db, SECRET, args)
}

#[test]
fn migrate_makes_djangos_table_and_is_a_noop_when_present() {
    let dir = TempDir::new("db-migrate");
    write_config(&dir);
    let o = bin(dir.path(), &["migrate", "--config", "sessiongate.toml"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o).contains("created table \"django_session\""),
        "{o:?}"
    );
    let o = bin(dir.path(), &["migrate", "--config", "sessiongate.toml"]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("already exists"), "{o:?}");
    let ours = dir.join("var/sessions.sqlite3");
    assert!(ours.exists(), "relative to the config file's directory");

    // Another engine: migrate says it does not apply.
    let other = dir.write(
        "memory.toml",
        &config("", "[[route]]\nupstream = \"http://127.0.0.1:9\"\n"),
    );
    let o = bin(
        dir.path(),
        &["migrate", "--config", other.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    let Some(py) = django::python() else { return };
    // The same schema as Django's own migration, and Django's migrate
    // accepts the table (--fake-initial) then works on it.
    let theirs = dir.join("django.sqlite3");
    manage(&py, &theirs, &["migrate", "-v0"]);
    assert_eq!(
        tool(&py, &ours, SECRET, &["schema"]),
        tool(&py, &theirs, SECRET, &["schema"])
    );
    manage(&py, &ours, &["migrate", "--fake-initial", "-v0"]);
    let k = tool(&py, &ours, SECRET, &["create", r#"{"a":1}"#]);
    assert_eq!(k["key"].as_str().unwrap().len(), 32);
}

#[test]
fn clear_expired_deletes_expired_rows_and_prints_how_many() {
    let dir = TempDir::new("db-clear");
    write_config(&dir);
    assert!(
        bin(dir.path(), &["migrate", "--config", "sessiongate.toml"])
            .status
            .success()
    );
    let c = rusqlite::Connection::open(dir.join("var/sessions.sqlite3")).unwrap();
    // As Django writes expire_date on SQLite: naive UTC text.
    for (k, exp) in [
        ("a", "2001-01-01 00:00:00"),
        ("b", "2020-06-01 12:30:00.250000"),
        ("c", "2999-01-01 00:00:00"),
    ] {
        c.execute(
            "INSERT INTO django_session VALUES (?1, 'x', ?2)",
            [k.repeat(32), exp.to_string()],
        )
        .unwrap();
    }
    let o = bin(
        dir.path(),
        &["clear-expired", "--config", "sessiongate.toml"],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).trim(), "2 expired sessions deleted");
    let left: i64 = c
        .query_row("SELECT count(*) FROM django_session", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 1);
}

#[test]
fn run_without_the_table_is_a_clear_start_up_error() {
    let dir = TempDir::new("db-notable");
    let cfg = write_config(&dir);
    std::fs::create_dir_all(dir.join("var")).unwrap();
    let o = bin(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("sessiongate migrate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
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

async fn call(p: &Proxy, key: Option<&str>, ds: &[(&str, &str)]) -> Got {
    let mut b = p.req(Method::GET, "/", key);
    for (n, v) in ds {
        b = b.header(format!("x-test-{n}"), *v);
    }
    p.send(b.body(Default::default()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_shared_with_django_both_ways() {
    let Some(py) = django::python() else { return };
    let dir = TempDir::new("db-django");
    let db = dir.join("shared.sqlite3");
    // Django's migrate first, as the README says when both apps share it.
    manage(&py, &db, &["migrate", "-v0"]);
    let up = echo().await;
    let toml = config(
        "",
        &route(&up, "forward = { \"X-User-Id\" = \"_auth_user_id\" }"),
    )
    .replace(
        "[store]\n",
        &format!(
            "[store]\nengine = \"db\"\nurl = \"sqlite://{}\"\ntimeout = \"5s\"\n",
            db.display()
        ),
    );
    let p = start_engine(&toml).await;

    // Django logs a user in (these are the keys django.contrib.auth writes)
    // with set_expiry(600): the legacy upstream sees them.
    let login = json!({"_auth_user_id": "1",
        "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
        "_auth_user_hash": "abc123"});
    let made = tool(&py, &db, SECRET, &["create", &login.to_string(), "600"]);
    let key = made["key"].as_str().unwrap().to_string();
    call(&p, Some(&key), &[]).await;
    let s = up.last();
    assert_eq!(s.header("x-session-new"), Some("false"));
    assert_eq!(s.session(), login, "_session_expiry is not in X-Session");
    assert_eq!(s.header("x-user-id"), Some("1"));
    assert_eq!(s.header("x-session-expiry-age"), Some("600"));

    // The legacy app writes a cart: Django's request.session has it, with
    // the login and the expiry kept.
    let r = call(&p, Some(&key), &[("update", r#"{"cart":[1,2]}"#)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = tool(&py, &db, SECRET, &["read", &key]);
    assert_eq!(d["exists"], true, "{d}");
    assert_eq!(d["data"]["cart"], json!([1, 2]));
    assert_eq!(d["data"]["_auth_user_id"], "1");
    assert_eq!(d["expiry_age"], 600);
    let raw = d["raw_expire_date"].as_str().unwrap();
    assert!(
        raw.len() >= 19 && raw.as_bytes()[10] == b' ' && !raw.contains('+'),
        "naive UTC text as Django writes it: {raw}"
    );

    // set_expiry with a date on the legacy side: Django sees that date.
    call(&p, Some(&key), &[("expiry", "2030-01-02T03:04:05Z")]).await;
    let d = tool(&py, &db, SECRET, &["read", &key]);
    assert_eq!(d["data"]["_session_expiry"], "2030-01-02T03:04:05+00:00");
    assert_eq!(d["expire_date"], "2030-01-02T03:04:05+00:00");
    assert_eq!(d["raw_expire_date"], "2030-01-02 03:04:05");
    // set_expiry(0): a browser-close session for both.
    call(&p, Some(&key), &[("expiry", "0")]).await;
    let d = tool(&py, &db, SECRET, &["read", &key]);
    assert_eq!(d["data"]["_session_expiry"], 0);
    assert_eq!(d["browser_close"], true);

    // Django writes: the upstream sees it, and Django's expiry.
    tool(&py, &db, SECRET, &["update", &key, r#"{"django":"yes"}"#]);
    call(&p, Some(&key), &[]).await;
    let s = up.last();
    assert_eq!(s.session()["django"], "yes");
    assert_eq!(s.session()["cart"], json!([1, 2]));
    assert_eq!(s.header("x-session-expire-at-browser-close"), Some("true"));

    // Django's cycle_key: the old key is dead here, the new one works.
    let moved = tool(&py, &db, SECRET, &["cycle", &key]);
    let key2 = moved["key"].as_str().unwrap().to_string();
    assert_ne!(key2, key);
    call(&p, Some(&key), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    call(&p, Some(&key2), &[]).await;
    assert_eq!(up.last().session()["cart"], json!([1, 2]));

    // sessiongate's Cycle-Key: Django loses the old key, finds the new one.
    let r = call(&p, Some(&key2), &[("cycle-key", "1")]).await;
    let key3 = r.key();
    assert_eq!(tool(&py, &db, SECRET, &["read", &key2])["exists"], false);
    let d = tool(&py, &db, SECRET, &["read", &key3]);
    assert_eq!(d["data"]["_auth_user_id"], "1");

    // Django's flush ends it here too.
    tool(&py, &db, SECRET, &["flush", &key3]);
    call(&p, Some(&key3), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));

    // sessiongate's Flush ends it for Django.
    let key4 = call(&p, None, &[("update", r#"{"a":1}"#)]).await.key();
    assert_eq!(tool(&py, &db, SECRET, &["read", &key4])["data"]["a"], 1);
    call(&p, Some(&key4), &[("flush", "1")]).await;
    assert_eq!(tool(&py, &db, SECRET, &["read", &key4])["exists"], false);

    // A row signed under another SECRET_KEY is not adopted: a new visitor,
    // and a write gets a fresh key.
    let other = "another-secret-0123456789abcdef0123456789";
    let forged = tool(&py, &db, other, &["create", r#"{"_auth_user_id":"2"}"#]);
    let fk = forged["key"].as_str().unwrap();
    call(&p, Some(fk), &[]).await;
    assert_eq!(up.last().header("x-session-new"), Some("true"));
    assert_eq!(up.last().session(), json!({}));
    let r = call(&p, Some(fk), &[("update", r#"{"b":1}"#)]).await;
    assert_ne!(r.key(), fk);
    p.stop().await;
}

#[test]
fn cookie_passthrough_is_only_for_routes_without_sessions() {
    let text = config(
        "",
        "[[route]]\nupstream = \"http://127.0.0.1:9\"\ncookie_passthrough = true\n",
    );
    let e = sessiongate::config::Config::parse(&text, Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cookie_passthrough"), "{e}");
    let ok = text.replace(
        "cookie_passthrough = true",
        "cookie_passthrough = true\nsession = false",
    );
    assert!(sessiongate::config::Config::parse(&ok, Path::new("t.toml")).is_ok());
}

#[test]
fn store_keys_of_the_django_engines_are_checked() {
    let base = config("", "[[route]]\nupstream = \"http://127.0.0.1:9\"\n");
    let parse = |store: &str| {
        sessiongate::config::Config::parse(
            &base.replace("[store]\n", &format!("[store]\n{store}\n")),
            Path::new("t.toml"),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert!(parse("engine = \"signed_cookies\"\nformat = \"django\"").is_ok());
    let e = parse("format = \"django\"").unwrap_err();
    assert!(e.contains("[store] format"), "{e}");
    let e = parse("engine = \"signed_cookies\"\nformat = \"php\"").unwrap_err();
    assert!(e.contains("unknown format"), "{e}");
    let e = parse("engine = \"cached_db\"\nurl = \"sqlite://s.db\"").unwrap_err();
    assert!(e.contains("cache_url: required"), "{e}");
    let e =
        parse("engine = \"db\"\nurl = \"sqlite://s.db\"\ncache_url = \"redis://x\"").unwrap_err();
    assert!(e.contains("only for engine \"cached_db\""), "{e}");
    let e = parse("engine = \"db\"\nurl = \"mysql://x\"").unwrap_err();
    assert!(e.contains("sqlite://") && e.contains("postgres://"), "{e}");
    let e = parse("engine = \"db\"\nurl = \"sqlite://s.db\"\ntable = \"x; drop\"").unwrap_err();
    assert!(e.contains("[store] table"), "{e}");
}
