//! The upstream side: a keep-alive pool of HTTP/1.1 connections per
//! upstream address, the exchange on one of them, the request body wrapper
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
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::h1::{self, ChunkedDecoder, Decoded, Framing, ProtocolError, SendFraming};
use crate::session::headers::Added;
use crate::timer::{Sleep, Wheel};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    /// Open connections with nothing in flight, the most recently used at
    /// the back.
    idle: Mutex<VecDeque<(Instant, Conn)>>,
    /// A permit per connection carrying a request, when limited. An idle
    /// connection holds none, and a new one is made only when none is
    /// idle, so in use and idle together stay within the limit.
    limit: Option<Arc<Semaphore>>,
}

/// A connection's share of its upstream's `max_upstream_connections`.
type Permit = Option<OwnedSemaphorePermit>;

/// One connection to an upstream and its buffers.
struct Conn {
    io: TcpStream,
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
        match self.io.poll_read_ready(&mut cx) {
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

    /// A new TCP connection to the slot's address, or why none could be
    /// made.
    async fn dial(&self, slot: usize) -> Result<TokioIo<TcpStream>, String> {
        let Slot { authority, uri, .. } = &self.slots[slot];
        let mut connector = self.connector.clone();
        async {
            std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(uri.clone()).await
        }
        .await
        .map_err(|e| format!("connect to {authority}: {}", chain(&e)))
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
    /// 9.2.2, as nginx's `proxy_next_upstream` does).
    pub async fn send(
        self: &Arc<Self>,
        slot: usize,
        parts: &http::request::Parts,
        target: &http::uri::PathAndQuery,
        body: UpstreamBody,
        host: &HeaderValue,
        added: &Added,
    ) -> Result<Response<PooledBody>, SendError> {
        if parts.headers.contains_key(http::header::UPGRADE) {
            let mut req = Request::from_parts(parts.clone(), body);
            *req.uri_mut() = http::Uri::from(target.clone());
            req.headers_mut().insert(http::header::HOST, host.clone());
            added.apply_to(req.headers_mut());
            // Boxed: hyper's handshake makes this future large, and it is
            // rare; inline it would enlarge every request's future.
            return Box::pin(self.send_upgrade(slot, req)).await;
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
            let permit = match &self.slots[slot].limit {
                None => None,
                Some(limit) => Some(
                    limit
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the limit is never closed"),
                ),
            };
            let (mut conn, reused) = match self.reuse(slot) {
                Some(c) => (Conn { permit, ..c }, true),
                None => match self.dial(slot).await {
                    Ok(io) => (
                        Conn {
                            io: io.into_inner(),
                            rbuf: BytesMut::new(),
                            wbuf: Vec::with_capacity(1024),
                            permit,
                        },
                        false,
                    ),
                    Err(what) => {
                        let body = body.take().expect("the body is kept until it is sent");
                        return Err(SendError::Unreachable(what, body));
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
            match exchange(&mut conn, &parts.method, &mut upload).await {
                Ok(answer) => return Ok(self.respond(slot, conn, upload, answer)),
                Err(f) => {
                    let retry = reused
                        && framing == SendFraming::None
                        && f.nothing_received
                        && (f.head_unsent || parts.method.is_idempotent());
                    if retry {
                        tracing::debug!(error = %f.error, "a kept-alive upstream connection had closed; sending again on another");
                        continue;
                    }
                    return Err(SendError::Failed {
                        body_too_large: matches!(f.error, ClientError::TooLarge),
                        what: f.error.to_string(),
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
        let io = match upload {
            None => ReadIo::Whole(io),
            Some(upload) => {
                let (rd, wr) = io.into_split();
                let (tx, rx) = oneshot::channel();
                // The write half outlives the read half: it keeps the permit.
                tokio::spawn(finish_upload(upload, wr, rx, self.clone(), permit.take()));
                ReadIo::Half { rd, _over: tx }
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
            Err(what) => return Err(SendError::Unreachable(what, req.into_body())),
        };
        let failed = |e: hyper::Error| SendError::Failed {
            body_too_large: body_too_large(&e),
            what: chain(&e),
        };
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %chain(&e), "upstream connection closed");
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
    error: ClientError,
    /// Not a byte of an answer arrived.
    nothing_received: bool,
    /// The request head was not (completely) written.
    head_unsent: bool,
}

/// Writes the request head, then sends the body while waiting for the
/// response head (an upstream may answer before the body is complete: the
/// rest of the upload then goes on in a task of its own). Interim
/// 1xx responses are skipped.
async fn exchange(
    conn: &mut Conn,
    method: &Method,
    upload: &mut Option<Upload>,
) -> Result<Answer, Failure> {
    let fail = |error: ClientError, nothing_received: bool, head_unsent: bool| Failure {
        error,
        nothing_received,
        head_unsent,
    };
    {
        let Conn { io, wbuf, .. } = &mut *conn;
        tokio::io::AsyncWriteExt::write_all(io, wbuf)
            .await
            .map_err(|e| fail(e.into(), true, true))?;
    }
    let mut received = false;
    let mut write_failed: Option<io::Error> = None;
    let head = std::future::poll_fn(|cx| loop {
        let parsed = match conn.rbuf.is_empty() {
            true => Ok(None),
            false => h1::parse_head(&mut conn.rbuf),
        };
        match parsed {
            Ok(Some(head)) if head.status.is_informational() => {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Poll::Ready(Err(fail(ClientError::Switched, false, false)));
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
                        None if received => ClientError::Closed("the end of the response head"),
                        None => ClientError::Closed("answering"),
                    };
                    return Poll::Ready(Err(fail(e, !received, false)));
                }
                Ok(_) => received = true,
                Err(e) => return Poll::Ready(Err(fail(e.into(), !received, false))),
            }
            continue;
        }
        if let Some(up) = upload.as_mut() {
            match up.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => *upload = None,
                // The upstream may have answered and stopped reading: its
                // answer, if one comes, wins over the write error.
                Poll::Ready(Err(ClientError::Io(e))) => {
                    write_failed = Some(e);
                    *upload = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(fail(e, !received, false))),
                Poll::Pending => return Poll::Pending,
            }
            continue;
        }
        return Poll::Pending;
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

/// A request body on its way to the upstream.
struct Upload {
    body: UpstreamBody,
    chunked: bool,
    /// Framed bytes not yet written, from `pos`.
    out: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl Upload {
    fn new(body: UpstreamBody, framing: SendFraming) -> Upload {
        Upload {
            body,
            chunked: framing == SendFraming::Chunked,
            out: Vec::new(),
            pos: 0,
            ended: false,
        }
    }

    /// Writes the body frame by frame as the client sends it; ready when
    /// all of it (and the last chunk) has been written.
    fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ClientError>> {
        loop {
            while self.pos < self.out.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.pos += n;
            }
            self.out.clear();
            self.pos = 0;
            if self.ended {
                return Poll::Ready(Ok(()));
            }
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
                Some(Err(e)) if e.is::<TooLarge>() => {
                    return Poll::Ready(Err(ClientError::TooLarge))
                }
                Some(Err(e)) => return Poll::Ready(Err(ClientError::Body(chain(&*e)))),
            }
        }
    }
}

/// What went wrong talking to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the upstream closed the connection before {0}")]
    Closed(&'static str),
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("request body over the limit")]
    TooLarge,
    #[error("the upstream switched protocols without an upgrade request")]
    Switched,
    #[error("the upstream sent nothing more of the response body for {0:?}")]
    ReadTimeout(Duration),
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
    Whole(TcpStream),
    Half {
        rd: OwnedReadHalf,
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
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
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
            };
            let Poll::Ready(filled) = filled else {
                let pool = &self.pool;
                let idle = self
                    .idle
                    .get_or_insert_with(|| pool.timer.sleep(pool.read_timeout));
                if std::future::Future::poll(Pin::new(idle), cx).is_ready() {
                    return Poll::Ready(Some(Err(ClientError::ReadTimeout(
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
                    return Poll::Ready(Some(Err(ClientError::Closed(
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
        ReadIo::Half { .. } => {}
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
async fn finish_upload(
    mut upload: Upload,
    mut wr: OwnedWriteHalf,
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
