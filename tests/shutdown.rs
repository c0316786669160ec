//! Graceful shutdown bounded by `shutdown_grace`: a request still running
//! when the grace period ends is cut off, and the server stops anyway.

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
