//! Graceful shutdown bounded by `shutdown_grace`: a request still running
//! when the grace period ends is cut off, and the server stops anyway; idle
//! keep-alive connections are closed at once rather than waited on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn requests_past_the_grace_period_are_cut_off() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let a = arrived.clone();
    let up = upstream_async(move |_| {
        let a = a.clone();
        Box::pin(async move {
            a.notify_one();
            // Never answers within the test.
            std::future::pending::<()>().await;
            ok()
        })
    })
    .await;
    let toml = config("", &route(&up, ""))
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"200ms\"");
    assert!(toml.contains("shutdown_grace = \"200ms\""));
    let mut p = start(&toml).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let url: http::Uri = p.url("/").parse().unwrap();
    let stuck = tokio::spawn(async move { client.get(url).await });
    arrived.notified().await;
    p.trigger_shutdown();
    let done = p.done.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("the server stops once the grace period is over")
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), stuck)
        .await
        .unwrap()
        .unwrap();
    assert!(
        r.is_err(),
        "the stuck request was cut off, not answered: {r:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream(|_| ok()).await;
    // A grace period far longer than the test's bound: waiting on the idle
    // connections instead of closing them would fail it.
    let toml =
        config("", &route(&up, "")).replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\"");
    assert!(toml.contains("shutdown_grace = \"60s\""));
    let mut p = start(&toml).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before the answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        idle.push(s);
    }
    p.trigger_shutdown();
    let done = p.done.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("the server stops without waiting on idle connections")
        .unwrap();
    for mut s in idle {
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("the idle connection is closed");
        assert!(
            n.is_err() || rest.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

#[tokio::test]
async fn idle_h2_connections_close_at_once_and_in_flight_h2_requests_finish() {
    use http_body_util::BodyExt;
    let gate = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (g, a) = (gate.clone(), arrived.clone());
    let up = upstream_async(move |req| {
        let (g, a) = (g.clone(), a.clone());
        Box::pin(async move {
            if req.uri.path() == "/slow" {
                a.notify_one();
                g.notified().await;
            }
            ok()
        })
    })
    .await;
    let toml =
        config("", &route(&up, "")).replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\"");
    let mut p = start(&toml).await;
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    // One request done: an idle h2 connection in the pool.
    let r = c.get(p.url("/").parse().unwrap()).await.unwrap();
    r.into_body().collect().await.unwrap();
    // Another client, one request in flight over h2.
    let c2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let url: http::Uri = p.url("/slow").parse().unwrap();
    let slow = tokio::spawn(async move {
        let r = c2.get(url).await?;
        let s = r.status();
        let b = r.into_body().collect().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((s, b.to_bytes()))
    });
    arrived.notified().await;
    p.trigger_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.notify_one();
    let r = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "in-flight h2 request finished: {r:?}");
    let done = p.done.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("idle h2 connections do not hold the shutdown for the grace period")
        .unwrap();
    drop(c);
}
