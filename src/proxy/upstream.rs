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

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept per upstream address (more are closed when they
/// come back).
const MAX_IDLE_PER_UPSTREAM: usize = 1024;

/// An idle connection older than this is closed rather than reused: a
/// firewall or NAT may have forgotten it without telling either end.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Keep-alive connections to the upstreams, one stack of idle ones per
/// distinct address.
pub struct Pool {
    slots: Vec<Slot>,
    /// Resolves the name and connects, trying the addresses of a name
    /// IPv6 and IPv4 side by side (happy eyeballs), within the timeout.
    connector: HttpConnector,
}

struct Slot {
    authority: Authority,
    /// The address as a URI, for the connector.
    uri: http::Uri,
    /// Ready connections, the most recently used at the back.
    idle: Mutex<VecDeque<(Instant, SendRequest<UpstreamBody>)>>,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Pool {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        Pool {
            slots: Vec::new(),
            connector,
        }
    }

    /// The slot of an address, added on first use (at start-up).
    pub fn slot_for(&mut self, authority: &Authority) -> usize {
        if let Some(i) = self.slots.iter().position(|s| &s.authority == authority) {
            return i;
        }
        let uri = http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("an authority makes a URI");
        self.slots.push(Slot {
            authority: authority.clone(),
            uri,
            idle: Mutex::new(VecDeque::new()),
        });
        self.slots.len() - 1
    }

    fn idle(
        &self,
        slot: usize,
    ) -> std::sync::MutexGuard<'_, VecDeque<(Instant, SendRequest<UpstreamBody>)>> {
        self.slots[slot]
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection that is still open and ready, if there is one.
    /// Only ready connections are pooled, so none is waited for here.
    fn reuse(&self, slot: usize) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle(slot);
        while let Some((since, sender)) = idle.pop_back() {
            if since.elapsed() > IDLE_TIMEOUT {
                // Everything below it is older still.
                idle.clear();
                return None;
            }
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// A new connection to the slot's address, or why none could be made.
    async fn connect(&self, slot: usize) -> Result<SendRequest<UpstreamBody>, String> {
        let Slot { authority, uri, .. } = &self.slots[slot];
        let mut connector = self.connector.clone();
        let io = async {
            std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(uri.clone()).await
        }
        .await
        .map_err(|e| format!("connect to {authority}: {}", chain(&e)))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| format!("connect to {authority}: {}", describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %describe(&e), "upstream connection closed");
            }
        });
        Ok(sender)
    }

    /// Pools a connection whose response has been read. One still busy
    /// (sending the rest of a request body the upstream answered early) is
    /// pooled once it is ready, so no request ever waits behind another.
    fn give_back(self: Arc<Self>, slot: usize, mut sender: SendRequest<UpstreamBody>) {
        if sender.is_ready() {
            self.push_idle(slot, sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    self.push_idle(slot, sender);
                }
            });
        }
    }

    fn push_idle(&self, slot: usize, sender: SendRequest<UpstreamBody>) {
        let now = Instant::now();
        let mut idle = self.idle(slot);
        while idle
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_UPSTREAM {
            idle.push_back((now, sender));
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
            let (mut sender, reused) = match self.reuse(slot) {
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

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A short description of a client error for logs and error bodies
/// (no URL with credentials, no headers).
pub fn describe(e: &hyper::Error) -> String {
    chain(e)
}
