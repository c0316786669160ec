//! The upstream side: a keep-alive pool of HTTP/1.1 connections per
//! upstream address, the request body wrapper that enforces
//! `max_request_body` while streaming, the response body that hands its
//! connection back to the pool once read, and the errors that become
//! 413/502/504.
//!
//! The pool is hyper's low-level `client::conn::http1` with a stack of idle
//! senders per address, rather than hyper-util's general-purpose client:
//! under `sessiongate run` every worker thread has its own proxy and pool,
//! so a checkout is an uncontended lock and a `pop`, and a connection goes
//! back when its response body ends, without the extra task per request
//! the general client spawns to wait for that moment (BENCHMARKS.md).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept per upstream address (more are closed when they
/// come back).
const MAX_IDLE_PER_UPSTREAM: usize = 1024;

/// Keep-alive connections to the upstreams, one stack of idle ones per
/// distinct address.
pub struct Pool {
    slots: Vec<Slot>,
    connect_timeout: Duration,
}

struct Slot {
    authority: Authority,
    idle: Mutex<Vec<SendRequest<UpstreamBody>>>,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Pool {
        Pool {
            slots: Vec::new(),
            connect_timeout,
        }
    }

    /// The slot of an address, added on first use (at start-up).
    pub fn slot_for(&mut self, authority: &Authority) -> usize {
        if let Some(i) = self.slots.iter().position(|s| &s.authority == authority) {
            return i;
        }
        self.slots.push(Slot {
            authority: authority.clone(),
            idle: Mutex::new(Vec::new()),
        });
        self.slots.len() - 1
    }

    fn idle(&self, slot: usize) -> std::sync::MutexGuard<'_, Vec<SendRequest<UpstreamBody>>> {
        self.slots[slot]
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection that is still open and ready, if there is one.
    async fn reuse(&self, slot: usize) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let mut sender = self.idle(slot).pop()?;
            if sender.is_closed() {
                continue;
            }
            // Given back when its response body ended: ready at once, or
            // as soon as its connection task has seen that end.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// A new connection to the slot's address, or why none could be made.
    async fn connect(&self, slot: usize) -> Result<SendRequest<UpstreamBody>, String> {
        let authority = &self.slots[slot].authority;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = authority.port_u16().unwrap_or(80);
        let connect = TcpStream::connect((host, port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect to {authority}: {e}")),
            Err(_) => {
                return Err(format!(
                    "connect to {authority}: no answer within {:?}",
                    self.connect_timeout
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("connect to {authority}: {}", describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %describe(&e), "upstream connection closed");
            }
        });
        Ok(sender)
    }

    fn give_back(&self, slot: usize, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle(slot);
        if idle.len() < MAX_IDLE_PER_UPSTREAM {
            idle.push(sender);
        }
    }

    /// Sends `req` (origin-form target, `Host` set) on a pooled connection
    /// to the slot's address, or on a new one. A request a reused
    /// connection could not take (the upstream closed it meanwhile) is
    /// sent again on another one: it never reached the upstream.
    pub async fn send(
        self: &Arc<Self>,
        slot: usize,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let (mut sender, reused) = match self.reuse(slot).await {
                Some(s) => (s, true),
                None => match self.connect(slot).await {
                    Ok(s) => (s, false),
                    Err(what) => return Err(SendError::Unreachable(what, req.into_body())),
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let (parts, body) = resp.into_parts();
                    let mut body = PooledBody {
                        inner: body,
                        back: (!upgrade).then(|| (self.clone(), slot, sender)),
                    };
                    if body.inner.is_end_stream() {
                        body.give_back();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => {
                        let e = e.into_error();
                        return Err(SendError::Failed {
                            body_too_large: body_too_large(&e),
                            what: describe(&e),
                        });
                    }
                },
            }
        }
    }
}

/// Why [`Pool::send`] failed.
pub enum SendError {
    /// No connection could be made: the request body is given back, unsent.
    Unreachable(String, UpstreamBody),
    /// The exchange failed after the request was handed to a connection
    /// (`body_too_large`: because the request body went over its limit).
    Failed { what: String, body_too_large: bool },
}

/// The upstream's response body; the connection goes back to the pool
/// when the body has been read to its end.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, usize, SendRequest<UpstreamBody>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((pool, slot, sender)) = self.back.take() {
            pool.give_back(slot, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            // A broken body leaves a broken connection: not given back.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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

/// Whether a client error was caused by [`UpstreamBody`] going over its
/// limit.
fn body_too_large(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = src {
        if c.is::<TooLarge>() {
            return true;
        }
        src = c.source();
    }
    false
}

/// The client's request body on its way upstream: streamed frame by frame,
/// failing once more than `limit` bytes have passed.
pub struct UpstreamBody {
    inner: Option<Incoming>,
    seen: u64,
    limit: u64,
}

impl UpstreamBody {
    pub fn new(body: Incoming, limit: u64) -> UpstreamBody {
        UpstreamBody {
            inner: Some(body),
            seen: 0,
            limit,
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.limit {
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
pub fn describe(e: &hyper::Error) -> String {
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
