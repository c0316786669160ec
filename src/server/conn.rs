//! One client connection: the TLS handshake, the protocol ALPN chose (or,
//! on plain HTTP, the first bytes), and its watchdog: closed cleanly when
//! nothing is in flight for `keepalive_timeout` (HTTP/1.1 between requests,
//! HTTP/2 without a stream even while the client answers PINGs, a
//! connection that never sent a byte), dropped when a request head (an
//! HTTP/1 head, an HTTP/2 header block) is not complete within
//! `header_read_timeout`, closed gracefully when the worker drains.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::drain::Drain;
use super::io::{ConnIo, ConnState, HeadVerdict, InFlight, IntoTcp, Proto, Rewind, Verdict};
use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};
use crate::timer::{Sleep, Wheel};

/// The answer to a plain-HTTP request on a TLS listener.
const PLAIN_HTTP_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 65\r\nconnection: close\r\n\r\nthis port speaks HTTPS: use https:// in the address, not http://\n";
/// The length of [`PLAIN_HTTP_ON_TLS`]'s body, for the access log.
const PLAIN_HTTP_ON_TLS_BODY: usize = 65;

/// The largest request head, HTTP/1.1 and HTTP/2 alike: a larger one is
/// answered `431 Request Header Fields Too Large`. (HTTP/1: the head's
/// bytes, hyper's read buffer limit; HTTP/2: SETTINGS_MAX_HEADER_LIST_SIZE,
/// names and values plus 32 bytes a field.)
pub const MAX_REQUEST_HEAD: usize = 64 << 10;

/// How long a connection closed for being idle may take to go (an HTTP/2
/// client told GOAWAY) before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the connections of one worker share.
pub(super) struct Worker {
    /// What a reload replaces: new connections take the TLS acceptor and
    /// the PROXY/trust settings of the newest, every request its proxy.
    gen: arc_swap::ArcSwap<Gen>,
    /// The https port the redirect listener sends clients to (a reload
    /// that moves `listen` changes it).
    pub(super) https_port: std::sync::atomic::AtomicU16,
    h1: http1::Builder,
    h2: http2::Builder<StreamExecutor>,
    /// Plain HTTP: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
    auto: auto::Builder<StreamExecutor>,
    timer: Wheel,
    keepalive: Duration,
    header_read: Duration,
    /// Simple HTTP/1.1 requests on the server's own path (`super::h1`);
    /// off (`SESSIONGATE_H1=hyper`: to compare, or to fall back), hyper
    /// serves every request.
    own_h1: bool,
    /// Requests a connection may keep running after their client went
    /// away (`h2_max_concurrent_streams`; see [`Handled`]).
    abandon_limit: usize,
    /// Those requests, running on, and hyper's HTTP/2 stream tasks (which
    /// start them): the worker's shutdown waits for them within
    /// `shutdown_grace`, as for the connections.
    pub(super) abandoned: tokio_util::task::TaskTracker,
}

/// One configuration's share of a worker (SPEC 7.1).
struct Gen {
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    /// PROXY protocol, trusted proxies, the connections gauge.
    ops: crate::ops::ConnOps,
}

impl Worker {
    pub(super) fn new(
        proxy: Arc<Proxy>,
        tls: Option<TlsAcceptor>,
        s: &ServerConfig,
        https_port: u16,
    ) -> Worker {
        let timer = proxy.timer().clone();
        let mut h1 = http1::Builder::new();
        // The head's deadline is the watchdog's (from its first byte, not
        // from the end of the previous request).
        h1.timer(timer.clone())
            .header_read_timeout(None)
            .keep_alive(true)
            // One write per response head and short body.
            .writev(false)
            // A request in flight is not watched for the client going
            // away: it runs to its end and its session changes are saved,
            // as a Django view's are (and a client may half-close and still
            // read the answer). This also spares a read buffer per request.
            .half_close(true)
            .max_buf_size(MAX_REQUEST_HEAD);
        let abandoned = tokio_util::task::TaskTracker::new();
        let mut h2 = http2::Builder::new(StreamExecutor(abandoned.clone()));
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .max_concurrent_streams(s.h2_max_concurrent_streams)
            .max_header_list_size(MAX_REQUEST_HEAD as u32)
            // Rapid reset: streams the client opens and resets at once.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024));
        let mut auto = auto::Builder::new(StreamExecutor(abandoned.clone()));
        auto.http1()
            .timer(timer.clone())
            .header_read_timeout(None)
            .keep_alive(true)
            .writev(false)
            .half_close(true)
            .max_buf_size(MAX_REQUEST_HEAD);
        auto.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .max_concurrent_streams(s.h2_max_concurrent_streams)
            .max_header_list_size(MAX_REQUEST_HEAD as u32)
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024));
        Worker {
            https_port: https_port.into(),
            h1,
            h2,
            auto,
            timer,
            keepalive: s.keepalive_timeout,
            header_read: s.header_read_timeout,
            // Checked by `main` (own or hyper).
            own_h1: std::env::var("SESSIONGATE_H1").map_or(true, |v| v.trim() != "hyper"),
            abandon_limit: s.h2_max_concurrent_streams as usize,
            abandoned,
            gen: arc_swap::ArcSwap::from_pointee(Gen {
                ops: crate::ops::ConnOps::new(s, proxy.metrics()),
                proxy,
                tls,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body, the request counted in flight until it is dropped.
    pub(crate) struct Tracked<B> {
        #[pin]
        body: B,
        _guard: InFlight,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Worker {
    /// A reload: connections accepted from now on use `tls` and the
    /// settings of `s`, and every request from now on `proxy`; requests in
    /// flight finish on the proxy they started with.
    pub(super) fn swap(&self, proxy: Arc<Proxy>, tls: Option<TlsAcceptor>, s: &ServerConfig) {
        self.gen.store(Arc::new(Gen {
            ops: crate::ops::ConnOps::new(s, proxy.metrics()),
            proxy,
            tls,
        }));
    }
}

/// Tells the connection's state that its task is over (dropped as
/// [`serve`] returns, whichever way).
struct Ended(Arc<ConnState>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.connection_ended();
    }
}

/// The executor of hyper's HTTP/2 stream tasks: the worker's tracker, so
/// that its shutdown also waits for a stream whose connection has ended
/// and whose request runs on (it is handed to the tracker when hyper's
/// stream task drops it, after the connection's task is over).
#[derive(Clone)]
pub(super) struct StreamExecutor(tokio_util::task::TaskTracker);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        drop(self.0.spawn(fut));
    }
}

/// Serves one accepted connection (holding its `max_connections` permit),
/// until it ends or `drain` (its listener's: the worker's shutdown, or a
/// reload that moved the listener) tells it to finish and close.
pub(super) async fn serve(
    w: Arc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    redirect: bool,
    permit: OwnedSemaphorePermit,
    drain: Drain,
) {
    let drain = &drain;
    let state = Arc::new(ConnState::new());
    state.hold(permit, &w.abandoned);
    // However this returns, the permit goes back if nothing runs on.
    let _ended = Ended(state.clone());
    if redirect {
        let port = w.https_port.load(std::sync::atomic::Ordering::Relaxed);
        let st = state.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let guard = st.request();
            let resp = super::redirect_response(&req, port);
            async move { Ok::<_, Infallible>(track(resp, guard)) }
        });
        let io = ConnIo::new(stream, state.clone(), Proto::Sniff);
        let conn = pin!(w.auto.serve_connection(TokioIo::new(io), svc));
        return drive(conn, |c| c.graceful_shutdown(), &state, &w, drain, peer).await;
    }
    let g = w.gen.load_full();
    let _counted = crate::ops::ConnGuard::new(&g.ops.gauge);
    let mut stream = stream;
    // With `proxy_protocol`, the PROXY header comes first; a connection
    // without a valid one is closed before anything else is read.
    let info = tokio::select! {
        r = g.ops.conn_info(&mut stream, peer, g.tls.is_some()) => match r {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection closed: no valid PROXY protocol header");
                return;
            }
        },
        () = drain.started() => return,
    };
    let Some(acceptor) = g.tls.clone() else {
        let io = ConnIo::new(stream, state.clone(), Proto::Sniff);
        let conn = pin!(http1_first(w.clone(), io, state.clone(), info, Hyper::Auto));
        return drive(conn, |_| state.close_soon(), &state, &w, drain, peer).await;
    };
    // Boxed: a plain connection's task is not the size of a handshake's or
    // an HTTP/2 connection's future.
    Box::pin(serve_tls(w, stream, acceptor, state, info, drain, peer)).await
}

/// The TLS part of [`serve`]: the handshake, then what ALPN chose.
///
/// What an idle connection holds is this future (boxed by [`serve`]) and
/// the task's: so the handshake's and HTTP/2's futures are boxed apart and
/// an HTTP/1.1 connection does not keep room for them. This is a function
/// returning an async block, not an `async fn`, as are [`http1_first`] and
/// [`with_hyper`]: rustc keeps an `async fn`'s arguments apart from the
/// locals they are moved into, so a `ConnIo` passed by value took its room
/// twice (`-Zprint-type-sizes`; BENCHMARKS.md, idle connections).
#[allow(clippy::manual_async_fn)]
fn serve_tls<'a>(
    w: Arc<Worker>,
    stream: TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<ConnState>,
    info: ConnInfo,
    drain: &'a Drain,
    peer: SocketAddr,
) -> impl Future<Output = ()> + 'a {
    async move {
        let Some(tls) = Box::pin(handshake(&w, stream, acceptor, drain, &info)).await else {
            return;
        };
        // What ALPN chose, and nothing else: no sniffing on TLS.
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let svc = service(&w, &state, info);
            let io = ConnIo::new(tls, state.clone(), Proto::Http2);
            let mut conn = Box::pin(w.h2.serve_connection(TokioIo::new(io), svc));
            drive(
                conn.as_mut(),
                |c| c.graceful_shutdown(),
                &state,
                &w,
                drain,
                peer,
            )
            .await
        } else {
            let io = ConnIo::new(tls, state.clone(), Proto::Http1);
            let conn = pin!(http1_first(
                w.clone(),
                io,
                state.clone(),
                info,
                Hyper::Http1
            ));
            drive(conn, |_| state.close_soon(), &state, &w, drain, peer).await
        }
    }
}

/// The TLS handshake, within `header_read_timeout`; `None` (logged) when
/// the connection ends instead.
async fn handshake(
    w: &Worker,
    mut stream: TcpStream,
    acceptor: TlsAcceptor,
    drain: &Drain,
    info: &ConnInfo,
) -> Option<TlsStream<TcpStream>> {
    let peer = info.peer;
    // A connection still handshaking when the drain starts is dropped (it
    // has no request yet), not waited on.
    let handshake = tokio::time::timeout(w.header_read, async move {
        // A plain-HTTP request on the TLS port gets a readable 400, as
        // nginx answers it, instead of a failed handshake (a TLS record
        // starts with 0x16; a request line with a method's capitals).
        let mut first = [0u8; 1];
        if matches!(stream.peek(&mut first).await, Ok(1)) && first[0].is_ascii_uppercase() {
            use tokio::io::AsyncWriteExt;
            // What already came of the request is read first, so closing
            // does not reset the answer away; the first bytes are kept for
            // the access log.
            let mut sink = [0u8; 4096];
            let mut head = None;
            while let Ok(n @ 1..) = stream.try_read(&mut sink) {
                head.get_or_insert_with(|| super::io::refused_head(&sink[..n]));
            }
            let _ = stream.write_all(PLAIN_HTTP_ON_TLS).await;
            let _ = stream.shutdown().await;
            return Ok(Err(head.unwrap_or_default()));
        }
        acceptor.accept(stream).await.map(Ok)
    });
    tokio::select! {
        r = handshake => match r {
            Ok(Ok(Ok(s))) => Some(s),
            Ok(Ok(Err(head))) => {
                tracing::debug!(%peer, "plain HTTP on the TLS port: answered 400");
                w.gen.load().proxy.refused(
                    info,
                    http::StatusCode::BAD_REQUEST,
                    PLAIN_HTTP_ON_TLS_BODY,
                    head,
                );
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        },
        () = drain.started() => None,
    }
}

/// Which of hyper's servers takes a connection the server's own HTTP/1.1
/// path hands over.
#[derive(Clone, Copy)]
enum Hyper {
    /// Plain HTTP: HTTP/1.1, or h2c with prior knowledge.
    Auto,
    /// TLS that chose HTTP/1.1.
    Http1,
}

/// Serves an HTTP/1 connection: its simple requests on the server's own
/// path ([`super::h1`]), then, from the first other head on, with hyper.
/// Told to close through `state` ([`ConnState::close_soon`]).
// Not an `async fn`, on purpose: see [`serve_tls`].
#[allow(clippy::manual_async_fn)]
fn http1_first<T>(
    w: Arc<Worker>,
    mut io: ConnIo<T>,
    state: Arc<ConnState>,
    info: ConnInfo,
    hyper: Hyper,
) -> impl Future<Output = Result<(), crate::proxy::upstream::BoxError>>
where
    T: IntoTcp + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let mut buf = bytes::BytesMut::new();
        if w.own_h1 {
            io.check_heads(false, false);
            let proxy = || w.gen.load().proxy.clone();
            match super::h1::serve(&mut io, &mut buf, proxy, &state, &info).await {
                Ok(super::h1::Next::Close) => {
                    let _ = io.shutdown().await;
                    return Ok(());
                }
                Ok(super::h1::Next::Handoff) => {}
                Err(e) => return Err(e.into()),
            }
            // A head hyper would refuse is answered here, with a line that
            // says why, and counted and logged as every request is.
            use crate::proxy::ProxyError;
            let refused = match super::io::judge_head(&buf) {
                HeadVerdict::Refuse(coding) => Some(ProxyError::TransferCoding(coding)),
                HeadVerdict::Malformed(why) => Some(ProxyError::MalformedHead(why)),
                HeadVerdict::TooLarge => Some(ProxyError::HeadTooLarge),
                HeadVerdict::Pass { tunnel } => {
                    io.check_heads(true, tunnel);
                    None
                }
                HeadVerdict::More => {
                    io.check_heads(true, false);
                    None
                }
            };
            if let Some(e) = refused {
                let (status, body) = e.status_and_body();
                tracing::debug!(error = %crate::proxy::error::one_line(&e), status = status.as_u16(), "request head refused");
                let head = super::io::refused_head(&buf);
                let proxy = w.gen.load().proxy.clone();
                proxy.refused(&info, status, body.len() + 1, head);
                io.answer(status, &body, proxy.hsts(&info));
                let _ = io.shutdown().await;
                return Ok(());
            }
        }
        // Boxed: only a connection handed over pays for hyper's.
        Box::pin(with_hyper(w, io, buf.freeze(), state, info, hyper)).await
    }
}

/// hyper serves the rest of the connection, `pre` first.
// Not an `async fn`, on purpose: see [`serve_tls`].
#[allow(clippy::manual_async_fn)]
fn with_hyper<T>(
    w: Arc<Worker>,
    io: ConnIo<T>,
    pre: bytes::Bytes,
    state: Arc<ConnState>,
    info: ConnInfo,
    hyper: Hyper,
) -> impl Future<Output = Result<(), crate::proxy::upstream::BoxError>>
where
    T: IntoTcp + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let io = TokioIo::new(Rewind::new(pre, io));
        let svc = service(&w, &state, info);
        match hyper {
            Hyper::Auto => {
                let conn = pin!(w.auto.serve_connection_with_upgrades(io, svc));
                closing(conn, |c| c.graceful_shutdown(), &state).await
            }
            Hyper::Http1 => {
                let conn = pin!(w.h1.serve_connection(io, svc).with_upgrades());
                closing(conn, |c| c.graceful_shutdown(), &state)
                    .await
                    .map_err(Into::into)
            }
        }
    }
}

/// Polls `conn`, shutting it gracefully once `state` says to close
/// (pinned by the caller, as for [`drive`]).
async fn closing<C, F>(mut conn: Pin<&mut C>, mut shut: F, state: &ConnState) -> C::Output
where
    C: Future,
    F: FnMut(Pin<&mut C>),
{
    let mut told = false;
    std::future::poll_fn(|cx| {
        if !told && state.closing() {
            told = true;
            shut(conn.as_mut());
        }
        conn.as_mut().poll(cx)
    })
    .await
}

fn track<B>(resp: Response<B>, guard: InFlight) -> Response<Tracked<B>> {
    resp.map(|body| Tracked {
        body,
        _guard: guard,
    })
}

type Answer = Result<Response<Tracked<crate::proxy::RespBody>>, Infallible>;

/// A request's future, boxed (see [`service`]), which the client going
/// away does not cancel: hyper drops it when an HTTP/2 stream is reset or
/// the connection ends, and it then runs on in a task of its own, so the
/// upstream's answer is read and its session changes saved (bounded by
/// `upstream_timeout`; [`ConnState::abandon`] bounds how many).
pub(super) struct Handled {
    fut: Option<Pin<Box<dyn Future<Output = Answer> + Send + 'static>>>,
    state: Arc<ConnState>,
    /// Abandoned requests a connection may keep running.
    limit: usize,
}

impl Future for Handled {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Answer> {
        let fut = self
            .fut
            .as_mut()
            .expect("a request's future polled after its end");
        let r = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(r)
    }
}

impl Drop for Handled {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        match self.state.abandon(self.limit) {
            Some(counted) => self.state.run_abandoned(&rt, counted, fut),
            None => tracing::debug!("request cancelled: its client went away, and the connection has too many abandoned requests running"),
        }
    }
}

/// The proxy's service for one connection, each request counted in flight.
///
/// Its future is boxed: hyper's HTTP/1 dispatcher keeps one slot the size
/// of the service's future for as long as the connection lives (allocated
/// at the first request, kept while idle), and the request future is up to
/// 4 KiB (`the_future_of_a_request_stays_small`). Boxed, an idle
/// keep-alive connection holds a pointer instead; the allocation lives only
/// while a request does.
fn service(
    w: &Arc<Worker>,
    state: &Arc<ConnState>,
    info: ConnInfo,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked<crate::proxy::RespBody>>,
    Error = Infallible,
    Future = Handled,
> + Clone
       + Send
       + 'static {
    let w = w.clone();
    let state = state.clone();
    let limit = w.abandon_limit;
    service_fn(move |req: Request<Incoming>| -> Handled {
        let guard = state.request();
        let proxy = w.gen.load().proxy.clone();
        let info = info.clone();
        // The request's future is made inside the box, and the box is
        // filled in place: `Box::pin(f)` builds `f` on the stack and copies
        // all of it (3.4 KB) into the allocation, once per request.
        let fut: Pin<Box<_>> = Box::into_pin(Box::write(Box::new_uninit(), async move {
            let h2 = req.version() == http::Version::HTTP_2;
            let req = req.map(|b| crate::proxy::ClientBody::new(b, h2));
            let resp = proxy.handle(req, info).await?;
            Ok(track(resp, guard))
        }));
        Handled {
            fut: Some(fut),
            state: state.clone(),
            limit,
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Told to finish its requests and close (the worker drains).
    Draining,
    /// Told to close for being idle; dropped if it takes too long.
    Closing,
}

/// Polls `conn` to its end under the watchdog and the drain; `shut` is
/// the connection's graceful shutdown. `conn` is pinned by the caller:
/// taken by value, it would be kept twice ([`serve_tls`]).
async fn drive<C, F, T>(
    mut conn: Pin<&mut C>,
    mut shut: F,
    state: &ConnState,
    w: &Worker,
    drain: &Drain,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), T>>,
    T: std::fmt::Display,
    F: FnMut(Pin<&mut C>),
{
    let mut reg = drain.register();
    let mut phase = Phase::Serving;
    let mut timer: Option<Sleep> = None;
    std::future::poll_fn(|cx| {
        if phase == Phase::Serving && reg.poll_draining(cx) {
            reg.release();
            shut(conn.as_mut());
            phase = Phase::Draining;
        }
        loop {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended");
                }
                return Poll::Ready(());
            }
            match phase {
                // Bounded by the worker's grace period.
                Phase::Draining => return Poll::Pending,
                Phase::Closing => {
                    let t = timer.as_mut().expect("armed when closing");
                    return match Pin::new(t).poll(cx) {
                        Poll::Ready(()) => Poll::Ready(()),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Phase::Serving => {}
            }
            if state.take_changed() {
                timer = None;
            }
            if let Some(t) = timer.as_mut() {
                if Pin::new(t).poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            match state.check(w.keepalive, w.header_read) {
                Verdict::Until(ms) => timer = Some(w.timer.sleep_until(state.instant(ms))),
                Verdict::HeadTimeout => {
                    tracing::debug!(%peer, "request head not complete within header_read_timeout; connection dropped");
                    return Poll::Ready(());
                }
                Verdict::Idle => {
                    tracing::debug!(%peer, "idle for keepalive_timeout; closing the connection");
                    shut(conn.as_mut());
                    phase = Phase::Closing;
                    timer = Some(w.timer.sleep(CLOSE_WAIT));
                }
            }
        }
    })
    .await
}
