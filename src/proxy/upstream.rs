//! The upstream side: a keep-alive pool of HTTP/1.1 connections per
//! upstream address (plain TCP, or TLS for `https://` upstreams: [`Io`]
//! dispatches, the plain arm first), the exchange on one of them, the request body wrapper
//! that enforces `max_request_body` while streaming, the response body
//! that hands its connection back to the pool once read, and the errors
//! that become 413/502/504.
//!
//! Every worker thread has its own proxy and pool (`sessiongate run`), so a
//! checkout is an uncontended lock and a `pop`. The exchange runs in the
//! request's own task: the head is written, the response head read and
//! parsed ([`super::h1`]), and a body that came with the head goes back to
//! the client with the connection already returned to the pool. hyper's
//! client connection, with its own task and channels per request, cost
//! about a quarter of the proxy's instructions per request
//! (BENCHMARKS.md); it still carries upgrade requests (WebSocket), each on
//! a connection of its own, as the tunnel needs hyper's upgrade machinery.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower_service::Service;

use super::h1::{self, ChunkedDecoder, Decoded, Framing, SendFraming};
use super::upstream_tls::UpstreamTls;
use crate::session::headers::Added;
use crate::timer::{Sleep, Wheel};

pub use super::error::BoxError;
use super::error::ProxyError;

/// Idle connections kept per upstream address (more are closed when they
/// come back).
const MAX_IDLE_PER_UPSTREAM: usize = 1024;

/// An idle connection older than this is closed rather than reused: a
/// firewall or NAT may have forgotten it without telling either end.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Read buffer growth (as hyper's).
const READ_CHUNK: usize = 8192;

/// Keep-alive connections to the upstreams, one stack of idle ones per
/// distinct address.
pub struct Pool {
    slots: Vec<Slot>,
    /// Resolves the name and connects, trying the addresses of a name
    /// IPv6 and IPv4 side by side (happy eyeballs), within the timeout.
    connector: HttpConnector,
    /// The longest wait between two reads of a response body (nginx's
    /// `proxy_read_timeout`), on the worker's timers.
    read_timeout: Duration,
    timer: Wheel,
    /// `max_upstream_connections` (this worker's share); 0: no limit.
    max_connections: usize,
}

struct Slot {
    authority: Authority,
    /// The address as a URI, for the connector.
    uri: http::Uri,
    /// `https://`: the handshake after connecting.
    tls: Option<SlotTls>,
    /// Open connections with nothing in flight, the most recently used at
    /// the back.
    idle: Mutex<VecDeque<(Instant, Conn)>>,
    /// A permit per connection carrying a request, when limited. An idle
    /// connection holds none, and a new one is made only when none is
    /// idle, so in use and idle together stay within the limit.
    limit: Option<Arc<Semaphore>>,
}

/// How a slot's connections become TLS ones.
struct SlotTls {
    id: UpstreamTls,
    connector: TlsConnector,
}

/// A connection's share of its upstream's `max_upstream_connections`.
type Permit = Option<OwnedSemaphorePermit>;

/// An upstream connection: plain TCP (the common case, dispatched first)
/// or TLS over it (boxed: rustls's state is large, and rare).
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(_) => Poll::Ready(Ok(())),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// One connection to an upstream and its buffers.
struct Conn {
    io: Io,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The request head being written.
    wbuf: Vec<u8>,
    permit: Permit,
}

/// Reads what is available into `rbuf`; `Ok(0)` is the end of input.
fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if rbuf.capacity() - rbuf.len() < 1024 {
        rbuf.reserve(READ_CHUNK);
    }
    // `poll_read` (rather than `try_read`) lets tokio note that a short
    // read drained the socket, so checking an idle connection later costs
    // no system call.
    tokio_util::io::poll_read_buf(Pin::new(io), cx, rbuf)
}

impl Conn {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(&mut self.io, &mut self.rbuf, cx)
    }

    /// Whether an idle connection is still open with nothing unread: the
    /// upstream has not closed it (or sent anything) since its last
    /// response, as far as the event loop has seen.
    fn is_reusable(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let tcp = match &self.io {
            Io::Plain(tcp) => tcp,
            // rustls may hold decrypted bytes, or the socket a TLS record
            // that is no data (a session ticket, or `close_notify`): look.
            Io::Tls(_) => return self.poll_fill(&mut cx).is_pending(),
        };
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness is not proof of data: look, without waiting.
            Poll::Ready(Ok(())) => self.poll_fill(&mut cx).is_pending(),
        }
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration, read_timeout: Duration, timer: Wheel) -> Pool {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        Pool {
            slots: Vec::new(),
            connector,
            read_timeout,
            timer,
            max_connections: 0,
        }
    }

    /// At most `n` connections to each upstream address at once (0: no
    /// limit); a request finding all of them busy waits for one, within
    /// its `upstream_timeout`. Set before the first [`Pool::slot_for`].
    pub fn limit_connections(&mut self, n: usize) {
        self.max_connections = n;
    }

    /// The slot of an upstream (its address, and for `https://` its TLS
    /// configuration and name), added on first use (at start-up).
    pub fn slot_for(&mut self, upstream: &crate::config::Upstream) -> usize {
        let authority = &upstream.authority;
        let same_tls = |s: &Slot| match (&s.tls, &upstream.tls) {
            (None, None) => true,
            (Some(a), Some(b)) => a.id.same(b),
            _ => false,
        };
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| &s.authority == authority && same_tls(s))
        {
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
            tls: upstream.tls.as_ref().map(|t| SlotTls {
                id: t.clone(),
                connector: TlsConnector::from(t.config.clone()),
            }),
            idle: Mutex::new(VecDeque::new()),
            limit: (self.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(self.max_connections))),
        });
        self.slots.len() - 1
    }

    fn idle(&self, slot: usize) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Conn)>> {
        self.slots[slot]
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection that is still open, if there is one.
    fn reuse(&self, slot: usize) -> Option<Conn> {
        let mut idle = self.idle(slot);
        while let Some((since, mut conn)) = idle.pop_back() {
            if since.elapsed() > IDLE_TIMEOUT {
                // Everything below it is older still.
                idle.clear();
                return None;
            }
            if conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection to the slot's address (with its TLS handshake
    /// for `https://`), or why none could be made.
    async fn dial(&self, slot: usize) -> Result<Io, ProxyError> {
        let Slot { uri, tls, .. } = &self.slots[slot];
        let mut connector = self.connector.clone();
        let connect = async {
            std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(uri.clone()).await
        };
        // `upstream_connect_timeout` bounds the connecting, not the name's
        // resolution: `upstream_timeout` bounds both (and the handshake).
        let tcp = match self.timer.timeout(self.read_timeout, connect).await {
            Ok(r) => r.map_err(|e| ProxyError::UpstreamConnect(Box::new(e)))?,
            Err(_) => return Err(ProxyError::UpstreamTimeout(self.read_timeout)),
        };
        match tls {
            None => Ok(Io::Plain(tcp.into_inner())),
            // Boxed: the handshake's future is large, and it is not the
            // plain path's.
            Some(t) => Box::pin(self.handshake(t, tcp.into_inner())).await,
        }
    }

    /// The TLS handshake on a new connection to an https upstream, within
    /// `upstream_timeout`.
    async fn handshake(&self, t: &SlotTls, tcp: TcpStream) -> Result<Io, ProxyError> {
        let shake = t.connector.connect(t.id.server_name.clone(), tcp);
        match self.timer.timeout(self.read_timeout, shake).await {
            Ok(Ok(s)) => Ok(Io::Tls(Box::new(s))),
            Ok(Err(e)) => Err(handshake_error(e)),
            Err(_) => Err(ProxyError::UpstreamTimeout(self.read_timeout)),
        }
    }

    fn push_idle(&self, slot: usize, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.idle(slot);
        while idle
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_UPSTREAM {
            let conn = Conn {
                permit: None,
                ..conn
            };
            idle.push_back((now, conn));
        }
    }

    /// Sends `req` (origin-form target) with `host` and the `added` fields
    /// on a pooled connection to the slot's address, or on a new one, and
    /// returns the response once its head has arrived.
    ///
    /// A request without a body that a reused connection failed before any
    /// byte of an answer (the upstream closed it while it sat idle) is sent
    /// again on another connection when it cannot have been acted on: its
    /// head could not be written, or its method is idempotent (RFC 9110
    /// 9.2.2, as nginx's `proxy_next_upstream` does). When a new
    /// connection fails that way too, the error gives the body back
    /// ([`SendError::unsent`]) for the next upstream.
    pub async fn send(
        self: &Arc<Self>,
        slot: usize,
        parts: &http::request::Parts,
        target: &http::uri::PathAndQuery,
        body: UpstreamBody,
        host: &HeaderValue,
        added: &Added,
    ) -> Result<Response<PooledBody>, SendError> {
        if super::headers::has(&parts.headers, &http::header::UPGRADE) {
            let mut req = Request::from_parts(parts.clone(), body);
            *req.uri_mut() = http::Uri::from(target.clone());
            req.headers_mut().insert(http::header::HOST, host.clone());
            added.apply_to(req.headers_mut());
            // Boxed: hyper's handshake makes this future large, and it is
            // rare; inline it would enlarge every request's future.
            let timeout = self.read_timeout;
            return match Box::pin(self.timer.timeout(timeout, self.send_upgrade(slot, req))).await {
                Ok(r) => r,
                Err(_) => Err(SendError {
                    error: ProxyError::UpstreamTimeout(timeout),
                    unsent: None,
                }),
            };
        }
        let framing = if body.is_end_stream() {
            SendFraming::None
        } else {
            match body.size_hint().exact() {
                Some(n) => SendFraming::Length(n),
                None => SendFraming::Chunked,
            }
        };
        let mut body = Some(body);
        loop {
            // With `max_upstream_connections`, the time spent waiting for a
            // connection counts against `upstream_timeout`: the wait for
            // the response head then runs from the start of the queueing.
            let (permit, queued_since) = match &self.slots[slot].limit {
                None => (None, None),
                Some(limit) => {
                    let since = tokio::time::Instant::now();
                    match self
                        .timer
                        .timeout(self.read_timeout, limit.clone().acquire_owned())
                        .await
                    {
                        Ok(p) => (Some(p.expect("the limit is never closed")), Some(since)),
                        Err(_) => {
                            return Err(SendError {
                                error: ProxyError::UpstreamTimeout(self.read_timeout),
                                unsent: None,
                            })
                        }
                    }
                }
            };
            let (mut conn, reused) = match self.reuse(slot) {
                Some(c) => (Conn { permit, ..c }, true),
                None => match self.dial(slot).await {
                    Ok(io) => (
                        Conn {
                            io,
                            rbuf: BytesMut::new(),
                            wbuf: Vec::with_capacity(1024),
                            permit,
                        },
                        false,
                    ),
                    Err(error) => {
                        let body = body.take().expect("the body is kept until it is sent");
                        return Err(SendError {
                            error,
                            unsent: Some(body),
                        });
                    }
                },
            };
            h1::encode_head(
                &mut conn.wbuf,
                &parts.method,
                target.as_str(),
                host.as_bytes(),
                &parts.headers,
                added.as_bytes(),
                framing,
            );
            let mut upload = match framing {
                SendFraming::None => None,
                _ => body.take().map(|b| Upload::new(b, framing)),
            };
            match exchange(&mut conn, &parts.method, &mut upload, self, queued_since).await {
                Ok(answer) => return Ok(self.respond(slot, conn, upload, answer)),
                Err(f) => {
                    // Nothing of the request was acted on: its head never
                    // left, or it has no body, no answer came and its
                    // method is idempotent.
                    let unacted = f.nothing_received
                        && (f.head_unsent
                            || (framing == SendFraming::None && parts.method.is_idempotent()));
                    if reused && framing == SendFraming::None && unacted {
                        tracing::debug!(error = %f.error, "a kept-alive upstream connection had closed; sending again on another");
                        continue;
                    }
                    // A body not yet taken by an upload (no body, or its
                    // head unsent) is still whole: it can go elsewhere.
                    let unsent = match (unacted, upload, body.take()) {
                        (false, _, _) => None,
                        (true, None, b @ Some(_)) => b,
                        (true, Some(up), None) if up.untouched() => Some(up.body),
                        _ => None,
                    };
                    return Err(SendError {
                        error: f.error,
                        unsent,
                    });
                }
            }
        }
    }

    /// The response around its body: one that came with the head is handed
    /// over whole, the connection going back to the pool at once. An upload
    /// still going on continues in a task of its own.
    fn respond(
        self: &Arc<Self>,
        slot: usize,
        conn: Conn,
        upload: Option<Upload>,
        answer: Answer,
    ) -> Response<PooledBody> {
        let Answer {
            head,
            framing,
            reusable,
        } = answer;
        // An upstream that answered before it had the whole body may read
        // the rest as its next request (a naive server answering 401 or a
        // redirect early): the connection is never reused (as nginx does).
        let reusable = reusable && upload.is_none();
        let Conn {
            io,
            mut rbuf,
            wbuf,
            mut permit,
        } = conn;
        let io = match (upload, io) {
            (None, io) => ReadIo::Whole(io),
            (Some(upload), Io::Plain(io)) => {
                let (rd, wr) = io.into_split();
                let (tx, rx) = oneshot::channel();
                // The write half outlives the read half: it keeps the permit.
                tokio::spawn(finish_upload(upload, wr, rx, self.clone(), permit.take()));
                ReadIo::Half { rd, _over: tx }
            }
            (Some(upload), io @ Io::Tls(_)) => {
                // One TLS session for both directions: tokio's split.
                let (rd, wr) = tokio::io::split(io);
                let (tx, rx) = oneshot::channel();
                tokio::spawn(finish_upload(upload, wr, rx, self.clone(), permit.take()));
                ReadIo::TlsHalf { rd, _over: tx }
            }
        };
        let body = match framing {
            Framing::Length(n) if rbuf.len() as u64 >= n => {
                let data = rbuf.split_to(n as usize).freeze();
                release(self, slot, io, rbuf, wbuf, reusable, permit);
                Inner::Whole(Some(data))
            }
            _ => Inner::Stream(Box::new(Streaming {
                io,
                rbuf,
                wbuf,
                state: match framing {
                    Framing::Length(n) => BodyState::Length(n),
                    Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
                    Framing::Close => BodyState::Close,
                },
                reusable,
                pool: self.clone(),
                slot,
                idle: None,
                _permit: permit,
            })),
        };
        let mut resp = Response::new(PooledBody(body));
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        if let Some(r) = head.reason {
            resp.extensions_mut().insert(r);
        }
        resp
    }

    /// An upgrade request (WebSocket) goes over hyper's client on a new
    /// connection of its own, which the tunnel then takes over.
    async fn send_upgrade(
        &self,
        slot: usize,
        req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let io = match self.dial(slot).await {
            Ok(io) => io,
            Err(error) => {
                return Err(SendError {
                    error,
                    unsent: Some(req.into_body()),
                })
            }
        };
        let failed = |e: hyper::Error| SendError {
            error: from_hyper(e),
            unsent: None,
        };
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %super::error::one_line(&e), "upstream connection closed");
            }
        });
        let resp = sender.send_request(req).await.map_err(failed)?;
        Ok(resp.map(|b| PooledBody(Inner::Hyper(b))))
    }
}

/// A response head and how its body is framed.
struct Answer {
    head: h1::Head,
    framing: Framing,
    /// The connection can carry another request after this one.
    reusable: bool,
}

/// Why an exchange failed, and whether it could be tried again.
struct Failure {
    error: ProxyError,
    /// Not a byte of an answer arrived.
    nothing_received: bool,
    /// The request head was not (completely) written.
    head_unsent: bool,
}

/// Writes the request head, then sends the body while waiting for the
/// response head (an upstream may answer before the body is complete: the
/// rest of the upload then goes on in a task of its own). Interim
/// 1xx responses are skipped.
///
/// `upstream_timeout` (the pool's `read_timeout`) runs from the head's
/// writing (or from the wait for a connection under
/// `max_upstream_connections`), and again from each write of the body, to
/// the response head;
/// not while the upload waits for the client's next bytes, which is
/// `client_body_timeout`'s business: a stalled client is never an
/// upstream timeout.
async fn exchange(
    conn: &mut Conn,
    method: &Method,
    upload: &mut Option<Upload>,
    pool: &Pool,
    queued_since: Option<tokio::time::Instant>,
) -> Result<Answer, Failure> {
    let fail = |error: ProxyError, nothing_received: bool, head_unsent: bool| Failure {
        error,
        nothing_received,
        head_unsent,
    };
    {
        let Conn { io, wbuf, .. } = &mut *conn;
        tokio::io::AsyncWriteExt::write_all(io, wbuf)
            .await
            .map_err(|e| fail(e.into(), true, true))?;
        if let Io::Tls(_) = io {
            // rustls may keep records a full socket did not take.
            tokio::io::AsyncWriteExt::flush(io)
                .await
                .map_err(|e| fail(e.into(), true, true))?;
        }
    }
    let mut received = false;
    let mut write_failed: Option<io::Error> = None;
    // Armed while the upstream is the one awaited; the first wait counts
    // from the queueing for a connection, if there was one.
    let mut deadline = Silence {
        since: queued_since,
        ..Silence::default()
    };
    let mut written = 0u64;
    let head = std::future::poll_fn(|cx| loop {
        let parsed = match conn.rbuf.is_empty() {
            true => Ok(None),
            false => h1::parse_head(&mut conn.rbuf),
        };
        match parsed {
            Ok(Some(head)) if head.status.is_informational() => {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Poll::Ready(Err(fail(ProxyError::UpstreamSwitched, false, false)));
                }
                continue;
            }
            Ok(Some(head)) => return Poll::Ready(Ok(head)),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Err(fail(e.into(), false, false))),
        }
        // What the upstream already sent is read before more of the body
        // goes: an answer that came first is an early one.
        if let Poll::Ready(filled) = conn.poll_fill(cx) {
            match filled {
                Ok(0) => {
                    let e = match write_failed.take() {
                        Some(e) => e.into(),
                        None if received => {
                            ProxyError::UpstreamClosed("the end of the response head")
                        }
                        None => ProxyError::UpstreamClosed("answering"),
                    };
                    return Poll::Ready(Err(fail(e, !received, false)));
                }
                Ok(_) => received = true,
                Err(e) => return Poll::Ready(Err(fail(e.into(), !received, false))),
            }
            continue;
        }
        if let Some(up) = upload.as_mut() {
            let polled = up.poll(&mut conn.io, cx);
            if up.written != written {
                // The upstream took more of the body: its time restarts.
                written = up.written;
                deadline.progress();
            }
            if polled.is_pending() && up.waiting_on_client {
                deadline.pause();
                return Poll::Pending;
            }
            match polled {
                Poll::Ready(Ok(())) => *upload = None,
                // The upstream may have answered and stopped reading: its
                // answer, if one comes, wins over the write error.
                Poll::Ready(Err(ProxyError::UpstreamIo(e))) => {
                    write_failed = Some(e);
                    *upload = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(fail(e, !received, false))),
                Poll::Pending => {}
            }
            if upload.is_some() {
                // Waiting for the upstream to take more of the body.
                return deadline
                    .poll(&pool.timer, pool.read_timeout, cx)
                    .map(|()| Err(fail(upstream_timeout(pool), false, false)));
            }
            continue;
        }
        // A timeout is never "nothing happened": the upstream has the
        // request and may be acting on it, so it is not sent again (to
        // this upstream on a new connection, or to the next one).
        return deadline
            .poll(&pool.timer, pool.read_timeout, cx)
            .map(|()| Err(fail(upstream_timeout(pool), false, false)));
    })
    .await?;
    let mut head = head;
    let (framing, reusable) = h1::response_framing(method, &mut head);
    Ok(Answer {
        head,
        framing,
        reusable: reusable && write_failed.is_none(),
    })
}

fn upstream_timeout(pool: &Pool) -> ProxyError {
    ProxyError::UpstreamTimeout(pool.read_timeout)
}

/// "Nothing happened for a while": one timer of the worker's wheel, armed
/// on the first wait and pushed back (when it fires) to `d` after the start
/// of the current wait, so that progress costs a clock read when the next
/// wait starts, not a new timer. Time when nobody waits (the task busy
/// elsewhere) is never counted.
#[derive(Default)]
struct Silence {
    sleep: Option<Sleep>,
    /// When the current wait started.
    since: Option<tokio::time::Instant>,
    /// Progress since `since`: the next poll starts a new wait.
    moved: bool,
}

impl Silence {
    fn progress(&mut self) {
        self.moved = true;
    }

    /// The wait is over (not counted until the next one).
    fn pause(&mut self) {
        self.sleep = None;
        self.since = None;
    }

    /// Ready once `d` has passed in one wait.
    fn poll(&mut self, timer: &Wheel, d: Duration, cx: &mut Context<'_>) -> Poll<()> {
        if self.moved || self.since.is_none() {
            self.moved = false;
            self.since = Some(tokio::time::Instant::now());
        }
        let since = self.since.expect("set above");
        loop {
            let sleep = self
                .sleep
                .get_or_insert_with(|| timer.sleep_until(since + d));
            ready!(std::future::Future::poll(Pin::new(sleep), cx));
            if since.elapsed() < d {
                self.sleep = Some(timer.sleep_until(since + d));
                continue;
            }
            self.pause();
            return Poll::Ready(());
        }
    }
}

/// A request body on its way to the upstream.
struct Upload {
    body: UpstreamBody,
    chunked: bool,
    /// Framed bytes not yet written, from `pos`.
    out: Vec<u8>,
    pos: usize,
    ended: bool,
    /// Bytes written so far (framing included).
    written: u64,
    /// The last `poll` was pending on the client's body, not on the
    /// upstream.
    waiting_on_client: bool,
}

impl Upload {
    /// Nothing of the body has been read from the client yet.
    fn untouched(&self) -> bool {
        self.body.seen == 0 && self.out.is_empty() && !self.ended
    }

    fn new(body: UpstreamBody, framing: SendFraming) -> Upload {
        Upload {
            body,
            chunked: framing == SendFraming::Chunked,
            out: Vec::new(),
            pos: 0,
            ended: false,
            written: 0,
            waiting_on_client: false,
        }
    }

    /// Writes the body frame by frame as the client sends it; ready when
    /// all of it (and the last chunk) has been written.
    fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ProxyError>> {
        loop {
            self.waiting_on_client = false;
            while self.pos < self.out.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.pos += n;
                self.written += n as u64;
            }
            // TLS may keep records back (plain sockets: nothing to do).
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            self.out.clear();
            self.pos = 0;
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            self.waiting_on_client = true;
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.out.extend_from_slice(h1::LAST_CHUNK);
                    }
                }
                Some(Ok(frame)) => {
                    // Trailers from the client are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        if self.chunked && !data.is_empty() {
                            h1::encode_chunk(&mut self.out, &data);
                        } else {
                            self.out.extend_from_slice(&data);
                        }
                    }
                    // A body of known length is over with its last byte:
                    // no need to wait for the client's next move to say so.
                    if self.body.is_end_stream() {
                        self.ended = true;
                        if self.chunked {
                            self.out.extend_from_slice(h1::LAST_CHUNK);
                        }
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(client_body_boxed(e))),
            }
        }
    }
}

/// Why [`Pool::send`] failed.
pub struct SendError {
    pub error: ProxyError,
    /// The request body, when nothing of the request was acted on (no
    /// connection, its head never sent, or an idempotent request without
    /// a body that got no answer): the request may go to another upstream.
    pub unsent: Option<UpstreamBody>,
}

/// The upstream's response body; the connection goes back to the pool
/// when the body has been read to its end.
pub struct PooledBody(Inner);

enum Inner {
    /// All of it arrived with the head (the connection is back already).
    Whole(Option<Bytes>),
    Stream(Box<Streaming>),
    /// From an upgrade request's connection.
    Hyper(Incoming),
}

/// A response body still arriving on its connection.
struct Streaming {
    io: ReadIo,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    state: BodyState,
    reusable: bool,
    pool: Arc<Pool>,
    slot: usize,
    /// Armed while waiting for the next bytes of the body.
    idle: Option<Sleep>,
    _permit: Permit,
}

/// What a response body is read from: the whole connection, or its read
/// half while the rest of an early-answered upload goes on in a task of its
/// own (which keeps the write half open until the response is over: the
/// dropped sender tells it).
enum ReadIo {
    Whole(Io),
    Half {
        rd: OwnedReadHalf,
        _over: oneshot::Sender<()>,
    },
    TlsHalf {
        rd: tokio::io::ReadHalf<Io>,
        _over: oneshot::Sender<()>,
    },
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
    Done,
}

impl Streaming {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        loop {
            let rbuf = &mut self.rbuf;
            match &mut self.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !rbuf.is_empty() {
                        let take = (*left).min(rbuf.len() as u64);
                        let data = rbuf.split_to(take as usize).freeze();
                        *left -= take;
                        if *left == 0 {
                            self.state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(d) => match d.decode(rbuf)? {
                    Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Decoded::End(trailers) => {
                        self.state = BodyState::Done;
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Decoded::More => {}
                },
                BodyState::Close => {
                    if !rbuf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rbuf.split().freeze()))));
                    }
                }
            }
            let filled = match &mut self.io {
                ReadIo::Whole(io) => poll_fill(io, &mut self.rbuf, cx),
                ReadIo::Half { rd, .. } => poll_fill(rd, &mut self.rbuf, cx),
                ReadIo::TlsHalf { rd, .. } => poll_fill(rd, &mut self.rbuf, cx),
            };
            let Poll::Ready(filled) = filled else {
                let pool = &self.pool;
                let idle = self
                    .idle
                    .get_or_insert_with(|| pool.timer.sleep(pool.read_timeout));
                if std::future::Future::poll(Pin::new(idle), cx).is_ready() {
                    return Poll::Ready(Some(Err(ProxyError::UpstreamReadTimeout(
                        self.pool.read_timeout,
                    ))));
                }
                return Poll::Pending;
            };
            self.idle = None;
            match filled {
                Ok(0) if matches!(self.state, BodyState::Close) => {
                    self.state = BodyState::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return Poll::Ready(Some(Err(ProxyError::UpstreamClosed(
                        "the end of the response body",
                    ))))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    /// The body has ended: the connection goes back when it is clean.
    fn finish(self) {
        let Streaming {
            io,
            rbuf,
            wbuf,
            reusable,
            pool,
            slot,
            _permit,
            ..
        } = self;
        release(&pool, slot, io, rbuf, wbuf, reusable, _permit);
    }
}

/// A connection whose response has been read: pooled when it can carry
/// another request and nothing unexpected follows; with an upload still
/// going, its task decides once the upload is done.
fn release(
    pool: &Pool,
    slot: usize,
    io: ReadIo,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    reusable: bool,
    permit: Permit,
) {
    if !reusable || !rbuf.is_empty() {
        return;
    }
    match io {
        ReadIo::Whole(io) => pool.push_idle(
            slot,
            Conn {
                io,
                rbuf,
                wbuf,
                permit,
            },
        ),
        // Never reusable (see `respond`).
        ReadIo::Half { .. } | ReadIo::TlsHalf { .. } => {}
    }
}

/// Sends the rest of a request body the upstream answered before it had
/// all of it, apart from the response (which may end first, or wait for
/// the client to finish sending before it is read: RFC 9112 9.5 has the
/// client keep sending, and an upstream that answered `202` early may
/// still want the rest). Once the response is over, the rest of the body
/// gets `read_timeout` more, so an upstream that stops reading without
/// closing cannot hold the task. The write half is kept open until the
/// response is over too; then the connection is closed, never reused.
async fn finish_upload<W: AsyncWrite + Unpin>(
    mut upload: Upload,
    mut wr: W,
    mut response: oneshot::Receiver<()>,
    pool: Arc<Pool>,
    _permit: Permit,
) {
    let sent = std::future::poll_fn(|cx| upload.poll(&mut wr, cx));
    let mut sent = std::pin::pin!(sent);
    let (outcome, response_over) = tokio::select! {
        r = &mut sent => (r, false),
        _ = &mut response => match pool.timer.timeout(pool.read_timeout, sent).await {
            Ok(r) => (r, true),
            Err(_) => {
                tracing::debug!("request body after an early answer: the upstream stopped reading");
                return;
            }
        },
    };
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "request body after an early answer");
        return;
    }
    if !response_over {
        let _ = response.await;
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.0 {
            Inner::Whole(data) => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Stream(s) => {
                let res = s.poll_frame(cx);
                let done = matches!(s.state, BodyState::Done);
                let failed = matches!(res, Poll::Ready(Some(Err(_))));
                if done || failed {
                    // A broken body leaves a broken connection: closed.
                    if let Inner::Stream(s) = std::mem::replace(&mut this.0, Inner::Whole(None)) {
                        if done {
                            s.finish();
                        }
                    }
                }
                res.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Whole(data) => data.as_ref().is_none_or(Bytes::is_empty),
            Inner::Stream(s) => matches!(s.state, BodyState::Done),
            Inner::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Stream(s) => match s.state {
                BodyState::Length(n) => SizeHint::with_exact(n),
                BodyState::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
            Inner::Hyper(body) => body.size_hint(),
        }
    }
}

/// A failed TLS handshake with an upstream: a certificate rustls refused
/// is told as such (with rustls's reason in the log), anything else is
/// the upstream being unreachable.
fn handshake_error(e: io::Error) -> ProxyError {
    let refused = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    if refused {
        let inner = e.into_inner().expect("checked above");
        return ProxyError::UpstreamCertificate(inner);
    }
    ProxyError::UpstreamConnect(Box::new(e))
}

/// The request body went over `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct TooLarge(pub u64);

/// Nothing of the request body arrived for `client_body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled")]
pub struct BodyTimeout(pub Duration);

/// The client's side of a failed request body, as [`UpstreamBody`] gave it:
/// over the limit, stalled, or broken framing (hyper's error).
fn client_body_boxed(e: BoxError) -> ProxyError {
    if let Some(t) = e.downcast_ref::<TooLarge>() {
        return ProxyError::BodyTooLarge(t.0);
    }
    if let Some(t) = e.downcast_ref::<BodyTimeout>() {
        return ProxyError::ClientBodyTimeout(t.0);
    }
    ProxyError::ClientBody(e)
}

/// A failure of hyper's client (upgrade requests): the request body's
/// when its cause is an [`UpstreamBody`] error, else the upstream's.
fn from_hyper(e: hyper::Error) -> ProxyError {
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        if let Some(t) = c.downcast_ref::<TooLarge>() {
            return ProxyError::BodyTooLarge(t.0);
        }
        if let Some(t) = c.downcast_ref::<BodyTimeout>() {
            return ProxyError::ClientBodyTimeout(t.0);
        }
        // The client's own connection failed under its body.
        if c.is::<hyper::Error>() {
            return ProxyError::ClientBody(Box::new(e));
        }
        src = c.source();
    }
    ProxyError::UpstreamUpgrade(Box::new(e))
}

/// A client's request body, as the server hands it to the proxy: hyper's,
/// or none at all (a request the server's own HTTP/1.1 path read, which
/// takes only requests without a body: `server::h1`).
///
/// An HTTP/2 body dropped before its end (the proxy answered without
/// reading it: a `413`, a `404`, an upstream that answered early) is
/// drained for a while ([`Lingering`]), so the client's upload ends cleanly
/// and it reads the answer instead of a stream reset.
pub struct ClientBody(Option<Source>);

/// hyper's body of a request, by the protocol it came over.
///
/// Boxed, the lingering one: `Source` then fits in `Incoming`'s own room
/// (its unused tag values), so `ClientBody` stays 40 bytes in every
/// request's future, which is moved whole at each step (BENCHMARKS.md:
/// 48 bytes cost 170 instructions a request in `memcpy`).
enum Source {
    Http1(Incoming),
    Http2(Box<Lingering>),
}

impl Source {
    fn get(&mut self) -> &mut Incoming {
        match self {
            Source::Http1(b) => b,
            Source::Http2(l) => {
                l.0.as_mut()
                    .expect("a lingering body is taken only when dropped")
            }
        }
    }

    fn get_ref(&self) -> &Incoming {
        match self {
            Source::Http1(b) => b,
            Source::Http2(l) => {
                l.0.as_ref()
                    .expect("a lingering body is taken only when dropped")
            }
        }
    }
}

impl ClientBody {
    /// No body: the request ended with its head.
    pub fn empty() -> ClientBody {
        ClientBody(None)
    }

    /// hyper's body of a request; `h2`: it came over HTTP/2.
    pub fn new(body: Incoming, h2: bool) -> ClientBody {
        // A body over with its head (a GET) has nothing to drain.
        ClientBody(Some(if h2 && !body.is_end_stream() {
            Source::Http2(Box::new(Lingering(Some(body))))
        } else {
            Source::Http1(body)
        }))
    }
}

/// An HTTP/2 request body that, dropped before its end, reads and discards
/// what remains for at most `LINGER_TIME` and `LINGER_BYTES` (as the
/// lingering close of an HTTP/1.1 connection, `server::io`), in a task of
/// its own. Without it, hyper resets the stream while the client is still
/// sending: curl then reports "Stream error in the HTTP/2 framing layer"
/// instead of the `413` it was sent. A body already over costs nothing.
/// (Only HTTP/2 bodies are wrapped: the read path of HTTP/1.1 pays for no
/// drop of its own.)
struct Lingering(Option<Incoming>);

impl Drop for Lingering {
    fn drop(&mut self) {
        use http_body_util::BodyExt;
        let Some(mut body) = self.0.take() else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let drain = async {
                let mut seen = 0usize;
                while let Some(Ok(frame)) = body.frame().await {
                    seen += frame.data_ref().map_or(0, |d| d.len());
                    if seen > crate::server::LINGER_BYTES {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(crate::server::LINGER_TIME, drain).await;
        });
    }
}

/// The client's request body on its way upstream: streamed frame by frame,
/// failing once more than `limit` bytes have passed.
///
/// A body silent for longer than `client_body_timeout` fails with
/// [`BodyTimeout`]; the timer runs only while the body is asked for and
/// has nothing (an upstream slow to read holds no client to account).
/// What is left of an HTTP/2 body when it is dropped (a `413`, an
/// upstream that answered early) is drained ([`Lingering`]).
pub struct UpstreamBody {
    inner: Option<Source>,
    seen: u64,
    limit: u64,
    timeout: Duration,
    /// None for a body that is over before it starts (a GET): no clone of
    /// the timers on the read path.
    timer: Option<Wheel>,
    /// Armed while waiting for the client's next bytes (boxed: most bodies
    /// never wait, and this sits in every request's future).
    idle: Option<Box<Silence>>,
}

impl UpstreamBody {
    pub fn new(body: ClientBody, limit: u64, timeout: Duration, timer: &Wheel) -> UpstreamBody {
        let body = body.0;
        UpstreamBody {
            timer: body
                .as_ref()
                .is_some_and(|b| !b.get_ref().is_end_stream())
                .then(|| timer.clone()),
            inner: body,
            seen: 0,
            limit,
            timeout,
            idle: None,
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
        let polled = Pin::new(inner.get()).poll_frame(cx);
        if polled.is_ready() {
            if let Some(idle) = &mut this.idle {
                idle.progress();
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.limit {
                        // Over HTTP/2 the rest is drained, so the client
                        // reads the `413`.
                        this.inner = None;
                        return Poll::Ready(Some(Err(Box::new(TooLarge(this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let (Some(timer), timeout) = (&this.timer, this.timeout) else {
                    return Poll::Pending;
                };
                let idle = this.idle.get_or_insert_with(Box::default);
                if idle.poll(timer, timeout, cx).is_ready() {
                    this.inner = None;
                    this.idle = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|b| b.get_ref().is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.get_ref().size_hint())
            .unwrap_or_default()
    }
}
