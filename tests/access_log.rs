//! The access log (SPEC 7.3) end to end, to a file: nginx's combined
//! format and JSON, with no query string, cookie, key or session data.

mod common;

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
