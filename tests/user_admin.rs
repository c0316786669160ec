//! A user's sessions through the admin API (SPEC 9) end to end on the
//! memory engine (listing and revoking on file and redis too): the bearer token (401
//! without or wrong, 403 when none is configured, a reload's new token),
//! `GET /sessions?user=V` after logins from several browsers (ids the
//! upstream saw as `X-Session-Id`, never a key, `created` fixed and
//! `last_write` moving, expired sessions left out), `DELETE /sessions/ID`
//! and `DELETE /sessions?user=V` (those browsers are new visitors), and the
//! `sessiongate sessions` commands run as a subprocess against the proxy a
//! configuration file describes (on memory, file and redis).

mod common;
#[path = "common/sessions_api.rs"]
mod sessions_api;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::e2e::*;
use common::redis_server::free_port;
use common::*;
use serde_json::Value;
use sessions_api::{admin, deleted, list, metric, Browser};

const TOKEN: &str = "t0ken-for-the-sessions-api";
const COOKIE_AGE: i64 = 1000;

/// What the upstream saw of a browser.
trait WhoAmI {
    /// Requests `/` and returns the `X-Session-Id` and the user the
    /// upstream saw (`None`, `None` for a new visitor).
    async fn whoami(&mut self, p: &Proxy, up: &Upstream) -> (Option<String>, Option<Value>);
}

impl WhoAmI for Browser {
    async fn whoami(&mut self, p: &Proxy, up: &Upstream) -> (Option<String>, Option<Value>) {
        let got = self.get(p, "/").await;
        assert_eq!(got.status, 200);
        let seen = up.last();
        (
            seen.header("x-session-id")
                .filter(|v| !v.is_empty())
                .map(str::to_string),
            seen.session().get("user_id").cloned(),
        )
    }
}

/// The app: `/login?NAME` logs in as the string NAME (`/login-42`: the
/// number 42, `/login-short`: alice for 30 s), `/touch` writes the session.
async fn app() -> Upstream {
    upstream(|s| {
        let path = s.uri.path();
        let update = |v: Value| directives(&[("x-session-update", &v.to_string())]);
        match path {
            "/login" => {
                let name = percent_encoding::percent_decode_str(s.uri.query().unwrap_or(""))
                    .decode_utf8()
                    .unwrap()
                    .into_owned();
                update(serde_json::json!({ "user_id": name }))
            }
            "/login-42" => update(serde_json::json!({ "user_id": 42 })),
            "/login-short" => directives(&[
                ("x-session-update", r#"{"user_id": "alice"}"#),
                ("x-session-expiry", "30"),
            ]),
            "/touch" => update(serde_json::json!({ "touched": s.header("x-test-n") })),
            _ => ok(),
        }
    })
    .await
}

fn session_lines(extra: &str) -> String {
    format!("user_key = \"user_id\"\ncookie_age = \"{COOKIE_AGE}s\"\n{extra}")
}

fn admin_lines(listen: &str, token: Option<&str>) -> String {
    let token = token.map_or(String::new(), |t| format!("token = \"{t}\"\n"));
    format!("[admin]\nlisten = \"{listen}\"\n{token}")
}

/// The proxy on the memory engine (through `AnyStore::open`, so the
/// engine keeps its user index).
async fn proxy(up: &Upstream, session: &str, admin: &str) -> Proxy {
    let toml = config(session, &format!("{}\n{admin}", route(up, "")));
    start_engine(&toml).await
}

fn ms(rfc3339: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(
        rfc3339.as_str().expect("a string"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    assert_eq!(t.offset(), time::UtcOffset::UTC, "UTC");
    t.unix_timestamp() * 1000
}

#[tokio::test]
async fn the_sessions_api_needs_the_bearer_token() {
    let up = app().await;
    let p = proxy(
        &up,
        &session_lines(""),
        &admin_lines("127.0.0.1:0", Some(TOKEN)),
    )
    .await;
    let a = p.admin.unwrap();
    for token in [
        None,
        Some("wrong"),
        Some("t0ken-for-the-sessions-ap"),
        Some(""),
    ] {
        for (method, target) in [
            ("GET", "/sessions?user=alice"),
            ("DELETE", "/sessions?user=alice"),
            ("DELETE", "/sessions/0123456789abcdef0123456789abcdef"),
        ] {
            let r = admin(a, method, target, token).await;
            assert_eq!(r.status, 401, "{method} {target} with {token:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    let r = admin(a, "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!((r.status, r.text().trim()), (200, "[]"));
    // The scheme is case-insensitive, with one or more spaces (RFC 9110
    // 11.1); another scheme, or none, is a 401.
    for (auth, want) in [
        (format!("bearer {TOKEN}"), 200),
        (format!("BEARER   {TOKEN}"), 200),
        (format!("Bearer{TOKEN}"), 401),
        (format!("Basic {TOKEN}"), 401),
        (TOKEN.to_string(), 401),
    ] {
        let r = raw_request(
            a,
            &format!(
                "GET /sessions?user=alice HTTP/1.1\r\nHost: admin\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(r.status, want, "Authorization: {auth}");
    }
    // HEAD goes where GET goes: the head of the list, no body.
    let head = raw_bytes(
        a,
        &format!(
            "HEAD /sessions?user=alice HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "no body after a HEAD: {head}");
    // The other admin paths stay open.
    assert_eq!(admin(a, "GET", "/healthz", None).await.status, 200);
    p.stop().await;
}

#[tokio::test]
async fn without_a_token_or_a_user_key_the_sessions_api_says_what_is_missing() {
    let up = app().await;
    let p = proxy(&up, &session_lines(""), &admin_lines("127.0.0.1:0", None)).await;
    let r = admin(p.admin.unwrap(), "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("[admin] token"), "{}", r.text());
    assert_one_line(&r.text());
    p.stop().await;

    let p = proxy(&up, "", &admin_lines("127.0.0.1:0", Some(TOKEN))).await;
    let r = admin(p.admin.unwrap(), "GET", "/sessions?user=alice", Some(TOKEN)).await;
    assert_eq!(r.status, 409);
    assert!(r.text().contains("[session] user_key"), "{}", r.text());
    assert_one_line(&r.text());
    p.stop().await;
}

#[tokio::test]
async fn bad_requests_are_400_and_wrong_methods_405() {
    let up = app().await;
    let p = proxy(
        &up,
        &session_lines(""),
        &admin_lines("127.0.0.1:0", Some(TOKEN)),
    )
    .await;
    let a = p.admin.unwrap();
    for (method, target) in [
        ("GET", "/sessions"),
        ("GET", "/sessions?user="),
        ("GET", "/sessions?name=alice"),
        ("DELETE", "/sessions"),
        ("GET", "/sessions?user=%FF"),
        ("DELETE", "/sessions/abc"),
        ("DELETE", "/sessions/0123456789ABCDEF0123456789ABCDEF"),
        ("DELETE", "/sessions/0123456789abcdef0123456789abcdef0"),
    ] {
        let r = admin(a, method, target, Some(TOKEN)).await;
        assert_eq!(r.status, 400, "{method} {target}: {}", r.text());
        assert_one_line(&r.text());
    }
    for (method, target, allow) in [
        (
            "GET",
            "/sessions/0123456789abcdef0123456789abcdef",
            "DELETE",
        ),
        ("POST", "/sessions?user=alice", "GET, HEAD, DELETE"),
        (
            "PUT",
            "/sessions/0123456789abcdef0123456789abcdef",
            "DELETE",
        ),
    ] {
        let r = admin(a, method, target, Some(TOKEN)).await;
        assert_eq!(r.status, 405, "{method} {target}");
        assert_eq!(r.header("allow"), Some(allow));
    }
    p.stop().await;
}

#[tokio::test]
async fn memory_list_revoke_by_id_and_by_user() {
    list_revoke_by_id_and_by_user("engine = \"memory\"").await;
}

#[tokio::test]
async fn file_list_revoke_by_id_and_by_user() {
    let dir = TempDir::new("user-admin-file");
    let store = format!(
        "engine = \"file\"\npath = \"{}\"",
        dir.join("store").display()
    );
    list_revoke_by_id_and_by_user(&store).await;
}

#[tokio::test]
async fn redis_list_revoke_by_id_and_by_user() {
    let Some(server) = common::redis_server::RedisServer::start().await else {
        return;
    };
    let store = format!("engine = \"redis\"\nurl = \"{}\"", server.url());
    list_revoke_by_id_and_by_user(&store).await;
}

#[tokio::test]
async fn cached_redis_list_revoke_by_id_and_by_user() {
    let Some(server) = common::redis_server::RedisServer::start().await else {
        return;
    };
    let store = format!("engine = \"cached_redis\"\nurl = \"{}\"", server.url());
    list_revoke_by_id_and_by_user(&store).await;
}

async fn list_revoke_by_id_and_by_user(store: &str) {
    let up = app().await;
    let toml = config(
        &session_lines(""),
        &format!(
            "{}\n{}",
            route(&up, ""),
            admin_lines("127.0.0.1:0", Some(TOKEN))
        ),
    )
    .replace("[store]\n", &format!("[store]\n{store}\n"));
    let p = start_engine(&toml).await;
    let a = p.admin.unwrap();

    // alice from three browsers, one more for 30 s only, and bob.
    let mut alice: Vec<Browser> = (0..3).map(|_| Browser::default()).collect();
    let mut ids = Vec::new();
    for b in &mut alice {
        b.get(&p, "/login?alice").await;
        let (id, user) = b.whoami(&p, &up).await;
        assert_eq!(user, Some(Value::from("alice")));
        ids.push(id.expect("an X-Session-Id"));
    }
    let mut short = Browser::default();
    short.get(&p, "/login-short").await;
    let (short_id, _) = short.whoami(&p, &up).await;
    let mut bob = Browser::default();
    bob.get(&p, "/login?bob").await;
    let (bob_id, _) = bob.whoami(&p, &up).await;
    let keys: Vec<String> = alice
        .iter()
        .chain([&short, &bob])
        .map(Browser::key)
        .collect();

    let listed = list(a, "alice", TOKEN).await;
    assert_eq!(listed.len(), 4, "{listed:?}");
    let listed_ids: BTreeSet<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    let want: BTreeSet<&str> = ids
        .iter()
        .chain(short_id.iter())
        .map(String::as_str)
        .collect();
    assert_eq!(
        listed_ids, want,
        "the ids are the X-Session-Ids the upstream saw"
    );
    assert!(!listed_ids.contains(bob_id.as_deref().unwrap()));
    let body = serde_json::to_string(&listed).unwrap();
    for k in &keys {
        assert!(!body.contains(k.as_str()), "a session key in the listing");
    }
    for s in &listed {
        let fields: BTreeSet<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            BTreeSet::from(["id", "created", "last_write", "expires"])
        );
        assert_eq!(s["created"], s["last_write"], "not written since the login");
    }
    let first = listed
        .iter()
        .find(|s| s["id"] == ids[0].as_str())
        .unwrap()
        .clone();
    assert_eq!(
        ms(&first["expires"]) - ms(&first["last_write"]),
        COOKIE_AGE * 1000,
        "a persistent session ends cookie_age after its last write"
    );

    // A minute later browser 0 writes: created stays, last_write moves;
    // the 30 s session has expired and is no longer listed.
    p.clock.advance(Duration::from_secs(60));
    alice[0].get(&p, "/touch").await;
    let listed = list(a, "alice", TOKEN).await;
    assert_eq!(
        listed.len(),
        3,
        "the expired session is not listed: {listed:?}"
    );
    let now = listed.iter().find(|s| s["id"] == ids[0].as_str()).unwrap();
    assert_eq!(now["created"], first["created"]);
    assert!(ms(&now["last_write"]) >= ms(&first["last_write"]) + 60_000);
    assert!(ms(&now["expires"]) >= ms(&first["expires"]) + 60_000);

    // DELETE /sessions/ID: that browser is a new visitor, the others are not.
    assert_eq!(deleted(a, &format!("/sessions/{}", ids[1]), TOKEN).await, 1);
    assert_eq!(alice[1].whoami(&p, &up).await, (None, None));
    assert_eq!(alice[0].whoami(&p, &up).await.1, Some(Value::from("alice")));
    assert_eq!(deleted(a, &format!("/sessions/{}", ids[1]), TOKEN).await, 0);
    assert_eq!(list(a, "alice", TOKEN).await.len(), 2);

    // DELETE /sessions?user=V: every remaining alice session; bob stays.
    assert_eq!(deleted(a, "/sessions?user=alice", TOKEN).await, 2);
    for i in [0, 2] {
        assert_eq!(
            alice[i].whoami(&p, &up).await,
            (None, None),
            "a new visitor"
        );
    }
    assert_eq!(list(a, "alice", TOKEN).await, Vec::<Value>::new());
    assert_eq!(bob.whoami(&p, &up).await.0, bob_id);
    assert_eq!(list(a, "bob", TOKEN).await.len(), 1);

    assert_eq!(
        metric(a, r#"sessiongate_sessions_deleted_total{reason="revoked"}"#).await,
        3,
        "sessions_deleted_total{{reason=\"revoked\"}}"
    );
    p.stop().await;
}

#[tokio::test]
async fn users_are_percent_decoded_and_compared_as_text() {
    let up = app().await;
    let p = proxy(
        &up,
        &session_lines(""),
        &admin_lines("127.0.0.1:0", Some(TOKEN)),
    )
    .await;
    let a = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login?Jos%C3%A9%20Q%2B").await;
    assert_eq!(b.whoami(&p, &up).await.1, Some(Value::from("José Q+")));
    assert_eq!(list(a, "Jos%C3%A9%20Q%2B", TOKEN).await.len(), 1);
    assert_eq!(
        list(a, "Jos%C3%A9+Q%2B", TOKEN).await.len(),
        1,
        "+ is a space"
    );
    assert_eq!(list(a, "Jos%C3%A9", TOKEN).await.len(), 0);
    let mut n = Browser::default();
    n.get(&p, "/login-42").await;
    assert_eq!(
        list(a, "42", TOKEN).await.len(),
        1,
        "the number 42 is the user \"42\""
    );
    p.stop().await;
}

#[tokio::test]
async fn a_reload_that_changes_the_token_takes_effect() {
    let up = app().await;
    let dir = TempDir::new("user-admin-reload");
    let port = free_port();
    let text = |token: &str| {
        config(
            &session_lines(""),
            &format!(
                "{}\n{}",
                route(&up, ""),
                admin_lines(&format!("127.0.0.1:{port}"), Some(token))
            ),
        )
    };
    let path = dir.write("sessiongate.toml", &text(TOKEN));
    let config = sessiongate::config::Config::load(&path).unwrap();
    let store = sessiongate::store::AnyStore::open(&config).await.unwrap();
    let p = start_with(config, store).await;
    let a = p.admin.unwrap();
    assert_eq!(
        admin(a, "GET", "/sessions?user=x", Some(TOKEN))
            .await
            .status,
        200
    );

    std::fs::write(&path, text("a-new-token")).unwrap();
    let r = admin(a, "POST", "/reload", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin(a, "GET", "/sessions?user=x", Some(TOKEN))
            .await
            .status,
        401
    );
    assert_eq!(
        admin(a, "GET", "/sessions?user=x", Some("a-new-token"))
            .await
            .status,
        200
    );
    assert_eq!(admin(a, "POST", "/reload", Some(TOKEN)).await.status, 401);

    // The user key is the store's index: a reload that changes it is refused.
    std::fs::write(
        &path,
        text("a-new-token").replace("user_key = \"user_id\"", "user_key = \"uid\""),
    )
    .unwrap();
    let r = admin(a, "POST", "/reload", Some("a-new-token")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("[session] user_key"), "{}", r.text());
    p.stop().await;
}

#[tokio::test]
async fn a_refresh_is_the_last_write_the_api_shows() {
    let up = app().await;
    let p = proxy(
        &up,
        &session_lines("refresh_interval = \"5m\""),
        &admin_lines("127.0.0.1:0", Some(TOKEN)),
    )
    .await;
    let a = p.admin.unwrap();
    let mut b = Browser::default();
    b.get(&p, "/login?alice").await;
    let before = list(a, "alice", TOKEN).await.remove(0);
    p.clock.advance(Duration::from_secs(60));
    b.whoami(&p, &up).await;
    assert_eq!(
        list(a, "alice", TOKEN).await[0],
        before,
        "within the interval: no write"
    );
    p.clock.advance(Duration::from_secs(300));
    b.whoami(&p, &up).await;
    let after = list(a, "alice", TOKEN).await.remove(0);
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["created"], before["created"]);
    // Whole seconds: the real time the test takes may cross one.
    let moved = ms(&after["last_write"]) - ms(&before["last_write"]);
    assert!((360_000..=361_000).contains(&moved), "{moved} ms");
    assert_eq!(
        ms(&after["expires"]) - ms(&after["last_write"]),
        COOKIE_AGE * 1000
    );
    p.stop().await;
}

// The `sessiongate sessions` commands, run as the user runs them.

fn sessions_cmd(args: &[&str], config: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("sessions")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run sessiongate");
    out
}

async fn cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let config = config.to_path_buf();
    let out = within(
        "sessiongate sessions",
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            sessions_cmd(&a, &config)
        }),
    )
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration file for the proxy, with its admin listener on `port`.
fn write_config(dir: &TempDir, name: &str, up: &Upstream, session: &str, admin: &str) -> PathBuf {
    dir.write(
        name,
        &config(session, &format!("{}\n{admin}", route(up, ""))),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_commands_list_and_revoke_on_memory() {
    the_sessions_commands_list_and_revoke("engine = \"memory\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_commands_list_and_revoke_on_file() {
    let dir = TempDir::new("user-admin-cli-file");
    let store = format!(
        "engine = \"file\"\npath = \"{}\"",
        dir.join("store").display()
    );
    the_sessions_commands_list_and_revoke(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_commands_list_and_revoke_on_redis() {
    let Some(server) = common::redis_server::RedisServer::start().await else {
        return;
    };
    let store = format!("engine = \"redis\"\nurl = \"{}\"", server.url());
    the_sessions_commands_list_and_revoke(&store).await;
}

/// `sessiongate sessions list/revoke` (the binary) against a proxy on the
/// engine of `store` (its `[store]` lines).
async fn the_sessions_commands_list_and_revoke(store: &str) {
    let up = app().await;
    let dir = TempDir::new("user-admin-cli");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let path = write_config(
        &dir,
        "sessiongate.toml",
        &up,
        &session_lines(""),
        &admin_lines(&listen, Some(TOKEN)),
    );
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[store]\n", &format!("[store]\n{store}\n"));
    std::fs::write(&path, text).unwrap();
    let config = sessiongate::config::Config::load(&path).unwrap();
    let store = sessiongate::store::AnyStore::open(&config).await.unwrap();
    let p = start_with(config, store).await;

    let mut browsers: Vec<Browser> = (0..3).map(|_| Browser::default()).collect();
    let mut ids = Vec::new();
    for b in &mut browsers {
        b.get(&p, "/login?alice").await;
        ids.push(b.whoami(&p, &up).await.0.unwrap());
    }

    let (code, out, err) = cli(&["list", "--user", "alice"], &path).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    let header: Vec<&str> = lines[0]
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(header, ["ID", "CREATED", "LAST WRITE", "EXPIRES"], "{out}");
    let shown: BTreeSet<&str> = lines[1..4]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(shown, ids.iter().map(String::as_str).collect(), "{out}");
    for l in &lines[1..4] {
        assert_eq!(l.split_whitespace().count(), 4, "{l}");
    }
    assert_eq!(lines[4], "3 sessions of user \"alice\"");
    for b in &browsers {
        assert!(!out.contains(&b.key()) && !err.contains(&b.key()));
    }

    let (code, out, err) = cli(&["revoke", "--id", &ids[0]], &path).await;
    assert_eq!((code, out.trim()), (0, "1 session revoked"), "{err}");
    assert_eq!(browsers[0].whoami(&p, &up).await, (None, None));
    let (code, out, err) = cli(&["revoke", "--user", "alice"], &path).await;
    assert_eq!((code, out.trim()), (0, "2 sessions revoked"), "{err}");
    assert_eq!(browsers[2].whoami(&p, &up).await, (None, None));
    let (code, out, _) = cli(&["list", "--user", "alice"], &path).await;
    assert_eq!(
        (code, out.trim()),
        (0, "no live sessions for user \"alice\"")
    );

    // A wrong token: the 401 named, exit 1.
    let wrong = write_config(
        &dir,
        "wrong.toml",
        &up,
        &session_lines(""),
        &admin_lines(&listen, Some("not-the-token")),
    );
    let (code, out, err) = cli(&["list", "--user", "alice"], &wrong).await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("401") && err.contains("token"), "{err}");
    assert!(!err.contains(TOKEN) && !err.contains("not-the-token"));
    assert_one_line(&err);

    // A bad id is refused before anything is sent.
    let (code, _, err) = cli(&["revoke", "--id", "XYZ"], &path).await;
    assert_eq!(code, 1);
    assert!(err.contains("X-Session-Id"), "{err}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_commands_say_what_is_wrong() {
    let up = app().await;
    let dir = TempDir::new("user-admin-cli-errors");

    let no_admin = write_config(&dir, "no-admin.toml", &up, &session_lines(""), "");
    let (code, out, err) = cli(&["list", "--user", "alice"], &no_admin).await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("no [admin] section"), "{err}");
    assert_one_line(&err);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let not_running = write_config(
        &dir,
        "not-running.toml",
        &up,
        &session_lines(""),
        &admin_lines(&listen, Some(TOKEN)),
    );
    let (code, _, err) = cli(&["revoke", "--user", "alice"], &not_running).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&listen) && err.contains("not running"),
        "{err}"
    );
    assert_one_line(&err);

    let no_user_key = write_config(
        &dir,
        "no-user-key.toml",
        &up,
        "",
        &admin_lines(&listen, Some(TOKEN)),
    );
    let (code, _, err) = cli(&["list", "--user", "alice"], &no_user_key).await;
    assert_eq!(code, 1);
    assert!(err.contains("[session] user_key"), "{err}");

    let no_token = write_config(
        &dir,
        "no-token.toml",
        &up,
        &session_lines(""),
        &admin_lines(&listen, None),
    );
    let (code, _, err) = cli(&["list", "--user", "alice"], &no_token).await;
    assert_eq!(code, 1);
    assert!(err.contains("[admin] token"), "{err}");

    // Neither --user nor --id, or both: a usage error from the parser.
    let (code, _, _) = cli(&["revoke"], &not_running).await;
    assert_eq!(code, 2);
    let (code, _, _) = cli(&["revoke", "--user", "a", "--id", "b"], &not_running).await;
    assert_eq!(code, 2);
}

/// The bytes of one exchange, to EOF (a HEAD answer has a length and no body).
async fn raw_bytes(addr: std::net::SocketAddr, request: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("a raw exchange", async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    })
    .await
}
