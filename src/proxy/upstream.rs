//! The upstream side: a pooled keep-alive HTTP/1.1 client, the request body
//! wrapper that enforces `max_request_body` while streaming, and the errors
//! that become 413/502/504.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

pub fn client(connect_timeout: Duration) -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(connect_timeout));
    conn.set_nodelay(true);
    conn.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(conn)
}

/// Why a request could not be answered by the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error("upstream failed: {0}")]
    Failed(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Failed(_) => StatusCode::BAD_GATEWAY,
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct TooLarge;

/// The client's request body on its way upstream: streamed frame by frame,
/// failing once more than `limit` bytes have passed. If the client drops it
/// before the first poll (the connection could not be made), the inner body
/// goes back to `reclaim`, so the request can be tried on another upstream.
pub struct UpstreamBody {
    inner: Option<Incoming>,
    seen: u64,
    limit: u64,
    polled: bool,
    exceeded: Arc<AtomicBool>,
    reclaim: Arc<Mutex<Option<Incoming>>>,
}

/// Shared between the handler and the body it hands to the client.
#[derive(Clone, Default)]
pub struct BodyWatch {
    pub exceeded: Arc<AtomicBool>,
    pub reclaim: Arc<Mutex<Option<Incoming>>>,
}

impl BodyWatch {
    pub fn wrap(&self, body: Incoming, limit: u64) -> UpstreamBody {
        UpstreamBody {
            inner: Some(body),
            seen: 0,
            limit,
            polled: false,
            exceeded: self.exceeded.clone(),
            reclaim: self.reclaim.clone(),
        }
    }
    pub fn take_back(&self) -> Option<Incoming> {
        self.reclaim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !self.polled {
            if let Some(b) = self.inner.take() {
                *self.reclaim.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.polled = true;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.limit {
                        this.exceeded.store(true, Ordering::Relaxed);
                        this.inner = None;
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

/// A short description of a client error for logs and error bodies
/// (no URL with credentials, no headers).
pub fn describe(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
