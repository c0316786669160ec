//! A minimal HTTP/1.1 backend for the load benchmark (`benches/load.sh`),
//! used when nginx is not installed (or with `BACKEND=bundled`).
//!
//! Every path answers `200` with a short plain-text body. Paths under
//! `/write` also send `X-Session-Update: {"n": <counter>}`, so every request
//! through sessiongate writes the session.
//!
//! Usage: `cargo run --release --example bench_backend -- 127.0.0.1:9000`
//! (default `127.0.0.1:9000`). Stops on SIGTERM or Ctrl-C.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The same body as the nginx backend of `benches/load.sh`.
const BODY: &[u8] = b"hello from the backend\n";

fn answer(req: &Request<Incoming>, counter: &AtomicU64) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    let path = req.uri().path();
    if path == "/write" || path.starts_with("/write/") {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let v = format!("{{\"n\": {n}}}");
        resp.headers_mut().insert(
            "x-session-update",
            HeaderValue::from_str(&v).expect("ascii"),
        );
    }
    resp
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{a:?} is not an address such as 127.0.0.1:9000: {e}"),
            )
        })?,
        None => SocketAddr::from(([127, 0, 0, 1], 9000)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!(
            "bench_backend listening on http://{}",
            listener.local_addr()?
        );
        let counter = Arc::new(AtomicU64::new(0));
        let stop = async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        tokio::pin!(stop);
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut stop => return Ok(()),
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("bench_backend: accept: {e}");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = answer(&req, &counter);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
