//! The access log (SPEC 7.3) end to end, to a file: nginx's combined
//! format and JSON, with no query string, cookie, key or session data.

mod common;
#[path = "common/sessions_api.rs"]
mod sessions_api;

use common::e2e::*;
use common::*;
use http::Method;
use serde_json::Value;

const SECRETS: [&str; 4] = [
    "QUERY-SECRET",
    "REFERER-SECRET",
    "other=COOKIE-SECRET",
    "4111-CARD",
];

async fn exchange(format: &str) -> (String, String, String) {
    let up = upstream(|s| {
        if s.uri.path() == "/login" {
            directives(&[("x-session-update", r#"{"card":"4111-CARD"}"#)])
        } else {
            text("hello")
        }
    })
    .await;
    let dir = TempDir::new("access");
    let log = dir.join("access.log");
    let toml = config_with(
        &format!(
            "access_log = \"{}\"\naccess_log_format = \"{format}\"\n",
            log.display()
        ),
        "",
        &route(&up, ""),
    );
    let p = start(&toml).await;
    let key = p.get("/login?token=QUERY-SECRET", None).await.key();
    let req = p
        .req(Method::GET, "/cart?item=QUERY-SECRET", Some(&key))
        .header("cookie", "other=COOKIE-SECRET")
        .header("referer", "https://shop.test/list?sid=REFERER-SECRET")
        .header("user-agent", "agent \"7\"")
        .body(Default::default())
        .unwrap();
    let got = p.send(req).await;
    assert_eq!(got.body, "hello");
    let id = up.last().header("x-session-id").unwrap().to_string();
    p.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    for s in SECRETS.iter().chain([&key.as_str()]) {
        assert!(!text.contains(s), "{s:?} must not be logged:\n{text}");
    }
    (text, key, id)
}

#[tokio::test]
async fn combined_lines_as_nginx_writes_them() {
    let (text, _, _) = exchange("combined").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
    assert!(
        lines[0].contains("] \"GET /login HTTP/1.1\" 200 2 \"-\" \"-\" "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(
            "] \"GET /cart HTTP/1.1\" 200 5 \"https://shop.test/list\" \"agent \\x227\\x22\" "
        ),
        "{}",
        lines[1]
    );
    let secs: f64 = lines[1].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs >= 0.0);
}

#[tokio::test]
async fn json_lines_carry_route_upstream_and_the_public_session_id() {
    let (text, key, id) = exchange("json").await;
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let l = &lines[1];
    assert_eq!(l["remote_addr"], "127.0.0.1");
    assert_eq!(l["method"], "GET");
    assert_eq!(l["path"], "/cart");
    assert_eq!(l["status"], 200);
    assert_eq!(l["body_bytes_sent"], 5);
    assert_eq!(l["http_referer"], "https://shop.test/list");
    assert_eq!(l["route"], "app");
    assert!(l["upstream"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert!(l["upstream_ms"].as_f64().unwrap() >= 0.0);
    assert!(l["request_time"].as_f64().unwrap() >= 0.0);
    assert_eq!(l["session_id"], id.as_str());
    assert_ne!(id, key);
    // The first request had no session yet.
    assert_eq!(lines[0]["session_id"], Value::Null);
}

/// A request whose upstream did not answer names the upstream it tried
/// (nginx's `$upstream_addr`), in JSON; the combined line is as ever.
#[tokio::test]
async fn a_failed_upstream_is_named_in_the_json_line() {
    let dead = common::redis_server::free_port();
    let dir = TempDir::new("access-dead");
    let log = dir.join("access.log");
    let toml = config_with(
        &format!(
            "access_log = \"{}\"\naccess_log_format = \"json\"\n",
            log.display()
        ),
        "",
        &format!("[[route]]\nname = \"dead\"\nupstream = \"http://127.0.0.1:{dead}\"\n"),
    );
    let p = start(&toml).await;
    assert_eq!(p.get("/x", None).await.status, 502);
    p.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let l: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(l["status"], 502);
    assert_eq!(l["route"], "dead");
    assert_eq!(
        l["upstream"],
        format!("http://127.0.0.1:{dead}").as_str(),
        "{l}"
    );
    assert!(l["upstream_ms"].as_f64().unwrap() >= 0.0, "{l}");
}

/// SPEC 6 (a line that says what happened), 7.2 (counters are exact) and
/// 7.3 (one line per request): the heads the connection layer answers
/// itself, before any route (hyper's `400` and `431`, the `501` of a
/// transfer coding), get a one-line body, and are counted and logged like
/// every other request (route `-`).
#[tokio::test]
async fn refused_heads_get_a_line_and_are_counted_and_logged() {
    let up = upstream(|_| ok()).await;
    let dir = TempDir::new("access-refused");
    let log = dir.join("access.log");
    let toml = config_with(
        &format!("access_log = \"{}\"\n", log.display()),
        "",
        &format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n", route(&up, "")),
    );
    let p = start(&toml).await;
    let admin = p.admin.unwrap();
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let many = format!(
        "GET /many HTTP/1.1\r\nHost: a\r\n{}\r\n",
        (0..120)
            .map(|i| format!("X-H{i}: 1\r\n"))
            .collect::<String>()
    );
    let cases: [(&str, u16, &str, &str); 5] = [
        (
            "GET /x HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
            400,
            "malformed request head",
            "\"GET /x HTTP/1.1\" 400 ",
        ),
        (
            "G@T /x HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "malformed request head",
            "\"-\" 400 ",
        ),
        (
            "POST /te HTTP/1.1\r\nHost: a\r\nReferer: https://r.test/\r\nUser-Agent: curl/8\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "request transfer coding not supported",
            // The head was read whole: its referer and agent are logged.
            "\"POST /te HTTP/1.1\" 501 59 \"https://r.test/\" \"curl/8\"",
        ),
        (
            &big,
            431,
            "request head too large",
            "\"GET /big HTTP/1.1\" 431 ",
        ),
        (
            &many,
            431,
            "request head too large",
            "\"GET /many HTTP/1.1\" 431 ",
        ),
    ];
    for (head, status, says, _) in &cases {
        let r = raw_request(p.addr, head).await;
        assert_eq!(r.status, *status, "{says}");
        assert_one_line(&r.text());
        assert!(r.text().contains(says), "{:?}", r.text());
    }
    for (status, n) in [(400, 2), (431, 2), (501, 1)] {
        assert_eq!(
            sessions_api::metric(
                admin,
                &format!("sessiongate_requests_total{{route=\"-\",status=\"{status}\"}}")
            )
            .await,
            n,
            "{status}"
        );
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    p.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), cases.len(), "{text}");
    for (line, (_, _, _, logged)) in lines.iter().zip(&cases) {
        assert!(line.contains(logged), "{line}");
    }
}
