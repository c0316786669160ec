//! The admin listener (SPEC 7.2) end to end: `/metrics` read by a real
//! Prometheus text parser with exact counter deltas, `/healthz`, `/readyz`
//! against a real `redis-server` stopped and started, and the separation
//! of admin paths from routes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::e2e::*;
use common::redis_server::RedisServer;
use common::*;

fn admin_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
}

async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let r = raw_request(admin, &admin_get("/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("a valid Prometheus text exposition")
}

/// The value of the sample `name` whose labels include `labels` (0 when absent).
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&prometheus_parse::Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?}: {} samples",
        found.len()
    );
    match found.first().map(|x| &x.value) {
        None => 0.0,
        Some(prometheus_parse::Value::Counter(v))
        | Some(prometheus_parse::Value::Gauge(v))
        | Some(prometheus_parse::Value::Untyped(v)) => *v,
        Some(prometheus_parse::Value::Histogram(buckets)) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map(|b| b.count)
            .unwrap_or(0.0),
        Some(other) => panic!("{name}: unexpected {other:?}"),
    }
}

fn admin_section() -> &'static str {
    "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t0ken-for-the-sessions-api\"\n"
}

#[tokio::test]
async fn metrics_count_every_request_exactly() {
    let up = upstream(|s| match s.uri.path() {
        "/login" => directives(&[("x-session-update", r#"{"user_id": 1}"#)]),
        "/cycle" => directives(&[("x-session-cycle-key", "1")]),
        "/logout" => directives(&[("x-session-flush", "1")]),
        _ => ok(),
    })
    .await;
    let dead = dead_addr().await;
    let routes = format!(
        "{}\n[[route]]\nname = \"down\"\npath = \"/down\"\nupstream = \"http://{dead}\"\n{}",
        route(&up, ""),
        admin_section()
    );
    let p = start(&config("", &routes)).await;
    let admin = p.admin.expect("an admin listener");
    let before = scrape(admin).await;
    assert_eq!(
        value(
            &before,
            "sessiongate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    const N: usize = 7;
    for _ in 0..N {
        assert_eq!(p.get("/page", None).await.status, 200);
    }
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(p.get("/login", None).await.key());
    }
    let cycled = p.get("/cycle", Some(&keys[0])).await;
    assert_eq!(cycled.status, 200);
    assert_eq!(p.get("/logout", Some(&keys[1])).await.status, 200);
    assert_eq!(p.get("/down/x", None).await.status, 502);

    let after = scrape(admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let ok200 = [("route", "app"), ("status", "200")];
    assert_eq!(delta("sessiongate_requests_total", &ok200), (N + 5) as f64);
    assert_eq!(
        delta(
            "sessiongate_requests_total",
            &[("route", "down"), ("status", "502")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "sessiongate_upstream_errors_total",
            &[("route", "down"), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "sessiongate_upstream_errors_total",
            &[("route", "app"), ("kind", "connect")]
        ),
        0.0
    );
    assert_eq!(
        delta("sessiongate_request_duration_seconds", &[("route", "app")]),
        (N + 5) as f64
    );
    assert_eq!(
        delta("sessiongate_upstream_duration_seconds", &[("route", "app")]),
        (N + 5) as f64
    );
    assert_eq!(delta("sessiongate_sessions_created_total", &[]), 3.0);
    // The cycle writes the session under its new key.
    assert_eq!(delta("sessiongate_sessions_saved_total", &[]), 1.0);
    assert_eq!(
        delta("sessiongate_sessions_deleted_total", &[("reason", "cycle")]),
        1.0
    );
    assert_eq!(
        delta("sessiongate_sessions_deleted_total", &[("reason", "flush")]),
        1.0
    );
    assert_eq!(delta("sessiongate_sessions_interrupted_total", &[]), 0.0);
    assert_eq!(delta("sessiongate_store_errors_total", &[]), 0.0);
    // Loads: the cycle's and the logout's cookies (the others had none).
    assert_eq!(
        delta("sessiongate_store_duration_seconds", &[("op", "load")]),
        2.0
    );
    assert_eq!(
        delta("sessiongate_store_duration_seconds", &[("op", "create")]),
        3.0
    );
    for name in [
        "sessiongate_connections",
        "sessiongate_config_reloads_total",
        "sessiongate_access_log_dropped_total",
    ] {
        assert!(
            after.samples.iter().any(|s| s.metric == name),
            "{name} is exposed"
        );
    }
    p.stop().await;
}

#[tokio::test]
async fn health_and_the_separation_of_admin_paths_and_routes() {
    let up = upstream(|s| text(&format!("upstream saw {}", s.uri.path()))).await;
    let p = start(&config(
        "",
        &format!("{}{}", route(&up, ""), admin_section()),
    ))
    .await;
    let admin = p.admin.unwrap();

    let h = raw_request(admin, &admin_get("/healthz")).await;
    assert_eq!((h.status, h.text().as_str()), (200, "ok\n"));
    let r = raw_request(admin, &admin_get("/readyz")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("memory"), "{}", r.text());

    // The admin listener serves no route...
    for path in ["/", "/page", "/healthz/x"] {
        let r = raw_request(admin, &admin_get(path)).await;
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(
        up.count(),
        0,
        "the admin listener never reaches an upstream"
    );
    // A known path asked with another method is a 405 naming the right
    // ones; an unknown path is a 404 whatever the method.
    for (method, path, want, allow) in [
        ("POST", "/metrics", 405, Some("GET, HEAD")),
        ("DELETE", "/healthz", 405, Some("GET, HEAD")),
        ("GET", "/reload", 405, Some("POST")),
        ("PUT", "/reload", 405, Some("POST")),
        ("POST", "/nope", 404, None),
        ("DELETE", "/", 404, None),
    ] {
        let r = raw_request(
            admin,
            &format!("{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, want, "{method} {path}");
        assert_eq!(r.header("allow"), allow, "{method} {path}");
        assert_eq!(r.text().lines().count(), 1, "{method} {path}: {}", r.text());
    }

    // ...and the routes serve no admin path: they reach the upstream.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let got = p.get(path, None).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, format!("upstream saw {path}"));
    }
    p.stop().await;
}

/// Without `[admin]` there is no listener, and nothing is counted: no reader
/// exists for the metrics (adding the section needs a restart), so the read
/// path does not pay for them.
#[tokio::test]
async fn no_admin_section_no_admin_listener_and_nothing_counted() {
    let up = upstream(|s| match s.uri.path() {
        "/login" => directives(&[("x-session-update", r#"{"user_id": 1}"#)]),
        _ => ok(),
    })
    .await;
    let p = start(&config("", &route(&up, ""))).await;
    assert!(p.admin.is_none());
    let key = p.get("/login", None).await.key();
    for _ in 0..3 {
        assert_eq!(p.get("/page", Some(&key)).await.status, 200);
    }
    let text = p.metrics.encode();
    let s = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("a valid Prometheus text exposition");
    let ok200 = [("route", "app"), ("status", "200")];
    assert_eq!(value(&s, "sessiongate_requests_total", &ok200), 0.0);
    assert_eq!(value(&s, "sessiongate_sessions_created_total", &[]), 0.0);
    assert_eq!(
        value(
            &s,
            "sessiongate_request_duration_seconds",
            &[("route", "app")]
        ),
        0.0
    );
    p.stop().await;
}

async fn readyz(admin: SocketAddr) -> (u16, String) {
    let r = raw_request(admin, &admin_get("/readyz")).await;
    (r.status, r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_down_and_up() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let up = upstream(|_| ok()).await;
    let toml = config("", &format!("{}{}", route(&up, ""), admin_section())).replace(
        "[store]\n",
        &format!(
            "[store]\nengine = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\n",
            redis.url()
        ),
    );
    let p = start_engine(&toml).await;
    let admin = p.admin.unwrap();
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 200, "{body}");

    redis.kill();
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis"), "names the engine: {body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    // A liveness check is not a readiness check.
    let h = raw_request(admin, &admin_get("/healthz")).await;
    assert_eq!(h.status, 200);

    redis.restart().await;
    // Reconnection has no event to wait on from outside: poll, bounded.
    within("readyz to answer 200 again", async {
        loop {
            if readyz(admin).await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    p.stop().await;
}
