//! The client connection's byte stream, watched: what it has read tells
//! the connection's watchdog (see [`super::conn`]) when a request head
//! started, an HTTP/2 connection's frames are counted for PING and SETTINGS
//! floods, and a connection the server closed while the client may still be
//! sending is drained for a while before the socket goes (nginx's lingering
//! close), so the client reads the answer (a `413`) instead of a reset.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The client connection preface of HTTP/2 (RFC 9113 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// PING and SETTINGS frames (not acknowledgements) an HTTP/2 client may
/// send in one second; more closes the connection. A browser sends one
/// SETTINGS at the start and a PING now and then.
pub(super) const CONTROL_FRAMES_PER_SECOND: u32 = 100;

/// How long, and how many bytes, a closed connection is drained for.
/// (An HTTP/2 request body the proxy answered before reading is drained
/// within the same bounds: `proxy::upstream::Lingering`.)
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(5);
pub(crate) const LINGER_BYTES: usize = 32 << 20;

/// What the watchdog of one connection reads, written by the stream, the
/// requests in flight and the frame scanner. Times are milliseconds since
/// `epoch`.
pub(crate) struct ConnState {
    epoch: Instant,
    /// Requests whose response has not been sent (or dropped) yet.
    in_flight: AtomicUsize,
    /// When `in_flight` last went to 0 (or the connection opened).
    idle_since: AtomicU64,
    /// 1 + when the current request head started; 0: none in progress.
    head_since: AtomicU64,
    /// A head started: the watchdog's deadline may be earlier now.
    changed: AtomicBool,
    /// Responses finished (or dropped) so far.
    served: AtomicU64,
    /// Told to close (the worker drains, or the connection was idle): the
    /// server's own HTTP/1.1 path reads it (hyper has its own).
    closing: AtomicBool,
    /// Requests whose client went away and that run on to their end
    /// ([`ConnState::abandon`]).
    abandoned: AtomicUsize,
    /// The connection's `max_connections` permit. Given back when the
    /// connection's task ends with no request in flight or abandoned
    /// ([`ConnState::connection_ended`]: an upgraded connection's tunnel,
    /// which keeps this state in its `ConnIo`, does not hold it); else when
    /// the last holder of this state is gone, the requests that run on
    /// after their client went away included (over HTTP/2 they are dropped
    /// by hyper's stream tasks after the connection's task has ended).
    slot: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// The worker's tracker of abandoned requests, which its shutdown
    /// waits for within `shutdown_grace`.
    tracker: std::sync::OnceLock<tokio_util::task::TaskTracker>,
}

impl ConnState {
    pub(crate) fn new() -> ConnState {
        ConnState {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            changed: AtomicBool::new(false),
            served: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            abandoned: AtomicUsize::new(0),
            slot: std::sync::Mutex::new(None),
            tracker: std::sync::OnceLock::new(),
        }
    }

    /// Keeps the connection's `max_connections` permit and knows the
    /// worker's tracker of abandoned requests (see the fields).
    pub(crate) fn hold(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
        tracker: &tokio_util::task::TaskTracker,
    ) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
        let _ = self.tracker.set(tracker.clone());
    }

    /// The connection's task is over: its permit goes back now unless a
    /// request is still in flight or running on (those keep this state,
    /// and so the permit, until they end).
    pub(crate) fn connection_ended(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.abandoned.load(Ordering::Acquire) == 0
        {
            drop(self.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
    }

    /// Runs an abandoned request (counted by `counted`) to its end, in a
    /// task the worker's shutdown waits for.
    pub(crate) fn run_abandoned<F>(&self, rt: &tokio::runtime::Handle, counted: Abandoned, fut: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = async move {
            let _counted = counted;
            let _ = fut.await;
        };
        match self.tracker.get() {
            Some(t) => drop(t.spawn_on(task, rt)),
            None => drop(rt.spawn(task)),
        }
    }

    /// A request whose client went away (an HTTP/2 stream reset, the
    /// connection closed) before its answer: whether it may run on to its
    /// end, so that its session changes are saved (a Django view runs to
    /// its end too). At most `limit` at once per connection, so resetting
    /// streams does not start upstream work without bound; past it, the
    /// request is cancelled, as nginx cancels one. The returned guard
    /// counts it until dropped.
    pub(crate) fn abandon(self: &Arc<Self>, limit: usize) -> Option<Abandoned> {
        let n = self.abandoned.fetch_add(1, Ordering::Relaxed);
        if n >= limit {
            self.abandoned.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Abandoned(self.clone()))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Tells the connection to close once no request is in flight.
    pub(crate) fn close_soon(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    pub(crate) fn start_head(&self) {
        if self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(self.now_ms() + 1, Ordering::Relaxed);
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    fn end_head(&self) {
        if self.head_since.load(Ordering::Relaxed) != 0 {
            self.head_since.store(0, Ordering::Relaxed);
        }
    }

    /// A request's head has been read: it is in flight until its response
    /// (the guard) is dropped.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.end_head();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether the watchdog's deadline needs computing again (and clears it).
    pub(crate) fn take_changed(&self) -> bool {
        if self.changed.load(Ordering::Relaxed) {
            self.changed.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// What the connection's state calls for at this moment.
    pub(crate) fn check(&self, keepalive: Duration, header_read: Duration) -> Verdict {
        let now = self.now_ms();
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 {
            let due = head - 1 + header_read.as_millis() as u64;
            return match now >= due {
                true => Verdict::HeadTimeout,
                false => Verdict::Until(due),
            };
        }
        let ka = keepalive.as_millis() as u64;
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let due = self.idle_since.load(Ordering::Relaxed) + ka;
            return match now >= due {
                true => Verdict::Idle,
                false => Verdict::Until(due),
            };
        }
        // Busy: look again later (a head starting says so at once).
        Verdict::Until(now + ka)
    }
}

pub(crate) enum Verdict {
    /// Nothing in flight for `keepalive_timeout`: close it cleanly.
    Idle,
    /// A request head not complete within `header_read_timeout`: drop it.
    HeadTimeout,
    /// Fine until then (milliseconds since the epoch).
    Until(u64),
}

/// One request in flight on a connection (see [`ConnState::request`]).
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        if s.in_flight.load(Ordering::Relaxed) == 1 {
            s.idle_since.store(s.now_ms(), Ordering::Relaxed);
        }
        s.served.fetch_add(1, Ordering::Relaxed);
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One abandoned request running on (see [`ConnState::abandon`]); the
/// state it keeps holds the connection's `max_connections` permit.
pub(crate) struct Abandoned(Arc<ConnState>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.abandoned.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that can give its TCP socket back, for the lingering close.
pub(crate) trait IntoTcp {
    fn into_tcp(self) -> TcpStream;
}

impl IntoTcp for TcpStream {
    fn into_tcp(self) -> TcpStream {
        self
    }
}

impl IntoTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_tcp(self) -> TcpStream {
        self.into_inner().0
    }
}

/// What the reads are scanned for.
enum Scan {
    /// Plain HTTP before the first bytes tell HTTP/1 from h2c prior
    /// knowledge: how many bytes of the preface matched so far.
    Detect(u8),
    Http1,
    Http2(Frames),
}

/// The frame boundaries of an HTTP/2 client's stream.
#[derive(Default)]
struct Frames {
    /// Bytes of the preface still to skip.
    skip: usize,
    header: [u8; 9],
    header_len: usize,
    /// Bytes of the current frame's payload still to skip.
    payload_left: usize,
    /// Control frames in the current one-second window, and its start.
    control: u32,
    window: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
#[error("more than {CONTROL_FRAMES_PER_SECOND} HTTP/2 PING or SETTINGS frames in a second")]
pub(crate) struct Flood;

impl Frames {
    fn after_preface(skip: usize) -> Frames {
        Frames {
            skip,
            ..Frames::default()
        }
    }

    fn scan(&mut self, mut data: &[u8], state: &ConnState) -> Result<(), Flood> {
        while !data.is_empty() {
            let skip = if self.skip > 0 {
                &mut self.skip
            } else if self.payload_left > 0 {
                &mut self.payload_left
            } else {
                let n = (9 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                data = &data[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.frame(h[3], h[4], state)?;
                }
                continue;
            };
            let n = (*skip).min(data.len());
            *skip -= n;
            data = &data[n..];
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, state: &ConnState) -> Result<(), Flood> {
        const END_HEADERS: u8 = 0x4;
        const ACK: u8 = 0x1;
        match kind {
            // HEADERS: a block that goes on in CONTINUATION frames.
            0x1 if flags & END_HEADERS == 0 => state.start_head(),
            // CONTINUATION
            0x9 if flags & END_HEADERS != 0 => state.end_head(),
            // SETTINGS, PING
            0x4 | 0x6 if flags & ACK == 0 => {
                if self.control == 0 {
                    self.window = Some(Instant::now());
                }
                self.control += 1;
                if self.control > CONTROL_FRAMES_PER_SECOND {
                    let now = Instant::now();
                    if self
                        .window
                        .is_some_and(|w| now.duration_since(w) < Duration::from_secs(1))
                    {
                        return Err(Flood);
                    }
                    self.window = Some(now);
                    self.control = 1;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The HTTP/1 request heads, looked at before hyper parses them, for the
/// one answer hyper cannot be made to give: a request whose final transfer
/// coding is not `chunked` (`Transfer-Encoding: identity`, `gzip`,
/// `chunked, gzip`) gets hyper's own `400` (its h1 parser refuses it,
/// and no builder option changes that), where SPEC 3.1 (and nginx) answer
/// `501` naming the coding. Codings hyper lets through (`gzip, chunked`)
/// are answered by the proxy (`headers::check_transfer_coding`).
///
/// A head is looked at when it starts on a connection with nothing in
/// flight and a response sent since the last head (the first head, and
/// every request that is not pipelined); its bytes are copied only when it
/// spans reads. Whatever cannot be judged (a pipelined head, a head hyper
/// refuses anyway, the bytes after an upgrade) is left to hyper as before.
#[derive(Default)]
struct HeadCheck {
    /// Reading a head: its bytes so far, when it spans reads.
    reading: bool,
    buf: Vec<u8>,
    /// `served` when the last head was judged (`None`: none yet).
    judged_at: Option<u64>,
    /// An upgrade or `CONNECT` passed: what follows is a tunnel's.
    off: bool,
}

/// What a request head's transfer codings call for.
#[derive(Debug, PartialEq)]
pub(super) enum HeadVerdict {
    /// Not complete yet.
    More,
    /// Left to hyper and the proxy.
    Pass { tunnel: bool },
    /// Answered `501` here, naming the coding.
    Refuse(crate::proxy::headers::Coding),
    /// Not a request head hyper would take (its `400`): what is wrong.
    Malformed(&'static str),
    /// Over [`super::conn::MAX_REQUEST_HEAD`] bytes or 100 fields
    /// (hyper's `431`).
    TooLarge,
}

/// Judges a request head at the front of `head` as hyper would parse it:
/// HTTP/1.1, a `Transfer-Encoding` whose last field does not end in
/// `chunked` (hyper's rule: it answers 400 then).
pub(super) fn judge_head(head: &[u8]) -> HeadVerdict {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= super::conn::MAX_REQUEST_HEAD => {
            return HeadVerdict::TooLarge
        }
        Ok(httparse::Status::Partial) => return HeadVerdict::More,
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return HeadVerdict::TooLarge,
        // `HTTP/2.0` is h2c's preface (hyper's), other versions its 400.
        Err(httparse::Error::Version) => return HeadVerdict::Pass { tunnel: false },
        Err(e) => return HeadVerdict::Malformed(malformed(e)),
    }
    let tunnel = req.method == Some("CONNECT")
        || req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let mut te = http::HeaderMap::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if let Ok(v) = http::HeaderValue::from_bytes(h.value) {
                te.append(http::header::TRANSFER_ENCODING, v);
            }
        }
    }
    let last_chunked = te
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(|v| {
            v.as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        });
    // HTTP/1.0 with a coding is faulty framing (RFC 9112 6.1): hyper's 400.
    match (req.version, last_chunked) {
        (Some(1), Some(false)) => match crate::proxy::headers::check_transfer_coding(&te) {
            Err(c) => HeadVerdict::Refuse(c),
            Ok(()) => HeadVerdict::Pass { tunnel },
        },
        _ => HeadVerdict::Pass { tunnel },
    }
}

/// What can be read of a head the connection layer refuses (for the
/// access log): httparse keeps what it read before the fault, the fields
/// up to it included.
pub(super) fn refused_head(head: &[u8]) -> crate::proxy::RefusedHead {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut fields);
    let _ = req.parse(head);
    let mut out = crate::proxy::RefusedHead::default();
    let Some(method) = req
        .method
        .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok())
    else {
        return out;
    };
    out.method = Some(method);
    out.target = req.path.and_then(|p| p.parse().ok());
    if req.version == Some(0) {
        out.version = http::Version::HTTP_10;
    }
    for f in req.headers.iter().take_while(|f| !f.name.is_empty()) {
        let value = || http::HeaderValue::from_bytes(f.value).ok();
        if f.name.eq_ignore_ascii_case("user-agent") {
            out.user_agent = value();
        } else if f.name.eq_ignore_ascii_case("referer") {
            out.referer = value();
        }
    }
    out
}

/// What is wrong with a head httparse refused, for the `400`'s line.
fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "an invalid header field name",
        httparse::Error::HeaderValue => "an invalid header field value",
        httparse::Error::NewLine | httparse::Error::Status => "an invalid line ending",
        httparse::Error::Token => "an invalid method or request line",
        _ => "not HTTP/1.1",
    }
}

impl HeadCheck {
    /// Looks at `new`, just read; a head refused stops here.
    fn seen(&mut self, new: &[u8], state: &ConnState) -> Option<crate::proxy::headers::Coding> {
        if self.off {
            return None;
        }
        if !self.reading {
            let served = state.served.load(Ordering::Relaxed);
            if state.in_flight.load(Ordering::Relaxed) != 0 || self.judged_at == Some(served) {
                return None;
            }
            self.reading = true;
        }
        let verdict = if self.buf.is_empty() {
            judge_head(new)
        } else {
            self.buf.extend_from_slice(new);
            judge_head(&self.buf)
        };
        match verdict {
            HeadVerdict::More => {
                if self.buf.is_empty() {
                    self.buf.extend_from_slice(new);
                }
                if self.buf.len() > super::conn::MAX_REQUEST_HEAD {
                    // hyper answers 431.
                    self.done(state);
                }
                None
            }
            HeadVerdict::Pass { tunnel } => {
                self.off = tunnel;
                self.done(state);
                None
            }
            // hyper answers these on a connection it serves.
            HeadVerdict::Malformed(_) | HeadVerdict::TooLarge => {
                self.done(state);
                None
            }
            HeadVerdict::Refuse(c) => {
                self.done(state);
                self.off = true;
                Some(c)
            }
        }
    }

    fn done(&mut self, state: &ConnState) {
        self.reading = false;
        self.buf = Vec::new();
        self.judged_at = Some(state.served.load(Ordering::Relaxed));
    }
}

/// The `501` written for a refused head, then the connection closes.
struct Refusal {
    bytes: Vec<u8>,
    written: usize,
    flushed: bool,
}

impl Refusal {
    fn new(coding: crate::proxy::headers::Coding) -> Refusal {
        let (status, body) = crate::proxy::ProxyError::TransferCoding(coding).status_and_body();
        Refusal::answer(status, &body, None)
    }

    /// `status` with the one-line `body` (and `Strict-Transport-Security`
    /// when given), then the connection closes.
    fn answer(status: http::StatusCode, body: &str, hsts: Option<&http::HeaderValue>) -> Refusal {
        let body = format!("{body}\n");
        let hsts = hsts.map_or(String::new(), |h| {
            format!(
                "strict-transport-security: {}\r\n",
                String::from_utf8_lossy(h.as_bytes())
            )
        });
        let bytes = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{hsts}connection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        Refusal {
            bytes: bytes.into_bytes(),
            written: 0,
            flushed: false,
        }
    }
}

/// The client connection as hyper reads and writes it.
pub(crate) struct ConnIo<T: IntoTcp> {
    /// Always there until dropped (taken for the lingering close).
    io: Option<T>,
    state: Arc<ConnState>,
    scan: Scan,
    /// The client's end of input has been read.
    eof: bool,
    /// The server has shut its side (hyper closing the connection).
    shut: bool,
    /// HTTP/1: the heads looked at for codings hyper refuses.
    heads: HeadCheck,
    /// A refused head's answer, being written (then hyper reads the end).
    refusal: Option<Box<Refusal>>,
}

/// Which protocol the stream carries, as far as is known when it starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Proto {
    /// Plain HTTP: HTTP/1 or h2c prior knowledge, told by the first bytes.
    Sniff,
    Http1,
    Http2,
}

impl<T: IntoTcp> ConnIo<T> {
    pub(crate) fn new(io: T, state: Arc<ConnState>, proto: Proto) -> ConnIo<T> {
        ConnIo {
            io: Some(io),
            state,
            scan: match proto {
                Proto::Sniff => Scan::Detect(0),
                Proto::Http1 => Scan::Http1,
                Proto::Http2 => Scan::Http2(Frames::after_preface(PREFACE.len())),
            },
            eof: false,
            shut: false,
            heads: HeadCheck::default(),
            refusal: None,
        }
    }

    /// Whether the HTTP/1 heads read are looked at for codings hyper
    /// refuses. Off while the server's own HTTP/1.1 path reads (it judges
    /// each head itself, `super::h1`); on again, from the next response
    /// on, when it hands the connection to hyper (`tunnel`: what follows
    /// is an upgrade's or a `CONNECT`'s, never looked at).
    pub(crate) fn check_heads(&mut self, on: bool, tunnel: bool) {
        self.heads = HeadCheck {
            off: !on || tunnel,
            judged_at: Some(self.state.served.load(Ordering::Relaxed)),
            ..HeadCheck::default()
        };
    }

    /// Answers `status` with the one-line `body` (at the next shutdown, or
    /// read), then the connection closes after the lingering close: a head
    /// the connection layer refuses itself.
    pub(crate) fn answer(
        &mut self,
        status: http::StatusCode,
        body: &str,
        hsts: Option<&http::HeaderValue>,
    ) {
        self.refusal = Some(Box::new(Refusal::answer(status, body, hsts)));
    }

    fn io(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(self.io.as_mut().expect("the stream is there until dropped"))
    }

    /// Looks at bytes just read.
    fn seen(&mut self, data: &[u8]) -> io::Result<()> {
        let state = &*self.state;
        match &mut self.scan {
            Scan::Http1 => {
                if state.in_flight.load(Ordering::Relaxed) == 0 {
                    state.start_head();
                }
            }
            Scan::Detect(matched) => {
                let m = *matched as usize;
                let n = (PREFACE.len() - m).min(data.len());
                if data[..n] != PREFACE[m..m + n] {
                    self.scan = Scan::Http1;
                    state.start_head();
                } else if m + n == PREFACE.len() {
                    state.end_head();
                    let mut frames = Frames::default();
                    let r = frames.scan(&data[n..], state);
                    self.scan = Scan::Http2(frames);
                    r.map_err(flood)?;
                } else {
                    *matched = (m + n) as u8;
                    // Could still be an HTTP/1 head.
                    state.start_head();
                }
            }
            Scan::Http2(frames) => frames.scan(data, state).map_err(flood)?,
        }
        Ok(())
    }
}

fn flood(e: Flood) -> io::Error {
    tracing::info!(error = %e, "closing an HTTP/2 connection");
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<T: IntoTcp + AsyncRead + AsyncWrite + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.refusal.is_some() {
            return self.poll_refusal(cx);
        }
        let before = buf.filled().len();
        ready!(self.io().poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            self.eof = true;
            return Poll::Ready(Ok(()));
        }
        self.seen(new)?;
        if !matches!(self.scan, Scan::Http2(_)) {
            let this = &mut *self;
            if let Some(coding) = this.heads.seen(new, &this.state) {
                tracing::debug!(coding = %coding, "request transfer coding not supported: answered 501");
                // hyper never sees the end of this head: it holds at most
                // a part of it, so it ends the connection on the EOF below
                // without an answer of its own.
                buf.set_filled(before);
                self.refusal = Some(Box::new(Refusal::new(coding)));
                return self.poll_refusal(cx);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: IntoTcp + AsyncWrite + Unpin> ConnIo<T> {
    /// Writes the refusal, flushes, shuts the write side (the lingering
    /// close then reads what the client still sends), then reads as EOF.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut r = self.refusal.take().expect("a refusal");
        let out = (|| {
            while r.written < r.bytes.len() {
                let n = ready!(self.io().poll_write(cx, &r.bytes[r.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                r.written += n;
            }
            if !r.flushed {
                ready!(self.io().poll_flush(cx))?;
                r.flushed = true;
            }
            if !self.shut {
                ready!(self.io().poll_shutdown(cx))?;
                self.shut = true;
            }
            Poll::Ready(Ok(()))
        })();
        self.refusal = Some(r);
        out
    }
}

impl<T: IntoTcp + AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.refusal.is_some() {
            // Shut already (or being shut) by the refusal.
            return self.poll_refusal(cx);
        }
        self.shut = true;
        self.io().poll_shutdown(cx)
    }
}

impl<T: IntoTcp> Drop for ConnIo<T> {
    fn drop(&mut self) {
        // Closed by the server while the client may still be sending (an
        // upload answered early): unread bytes would make the kernel reset
        // the connection, and the client could lose the answer.
        if !self.shut || self.eof {
            return;
        }
        let (Some(io), Ok(rt)) = (self.io.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(linger(io.into_tcp()));
    }
}

/// A stream whose first bytes were read already: they are read again
/// first (the server's own HTTP/1.1 path hands hyper the connection with
/// what it buffered).
pub(crate) struct Rewind<T> {
    pre: bytes::Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(pre: bytes::Bytes, inner: T) -> Rewind<T> {
        Rewind { pre, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads and discards what the client still sends, until it closes, for
/// at most [`LINGER_TIME`] and [`LINGER_BYTES`].
async fn linger(mut tcp: TcpStream) {
    let until = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 << 10];
    let mut total = 0;
    while total < LINGER_BYTES {
        match tokio::time::timeout_at(until, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_keeps_at_most_its_limit_of_abandoned_requests() {
        let state = Arc::new(ConnState::new());
        let a = state.abandon(2).expect("the first runs on");
        let b = state.abandon(2).expect("the second runs on");
        assert!(state.abandon(2).is_none(), "the third is cancelled");
        drop(a);
        let c = state.abandon(2).expect("room again once one ended");
        drop((b, c));
        assert_eq!(state.abandoned.load(Ordering::Relaxed), 0);
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_split_anywhere_are_seen_alike() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, &[0; 6]));
        bytes.extend(frame(0x1, 0, b"partial block"));
        bytes.extend(frame(0x0, 0, &[7; 300]));
        for split in 0..bytes.len() {
            let state = ConnState::new();
            let mut f = Frames::after_preface(PREFACE.len());
            f.scan(&bytes[..split], &state).unwrap();
            f.scan(&bytes[split..], &state).unwrap();
            assert_eq!(f.control, 1, "split at {split}");
            assert_ne!(state.head_since.load(Ordering::Relaxed), 0);
            assert_eq!((f.payload_left, f.header_len), (0, 0));
        }
        let state = ConnState::new();
        let mut f = Frames::after_preface(0);
        f.scan(&frame(0x1, 0, b"x"), &state).unwrap();
        f.scan(&frame(0x9, 0x4, b"y"), &state).unwrap();
        assert_eq!(state.head_since.load(Ordering::Relaxed), 0, "block ended");
    }

    /// A head's codings are judged alike however its bytes arrive, only
    /// once per response sent, and not after an upgrade.
    #[test]
    fn request_heads_are_judged_alike_in_any_split() {
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nbody";
        for split in 1..bad.len() {
            let state = ConnState::new();
            let mut h = HeadCheck::default();
            let first = h.seen(&bad[..split], &state);
            let second = first.clone().or_else(|| h.seen(&bad[split..], &state));
            let end = bad.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            match split < end {
                true => assert_eq!(first, None, "split at {split}"),
                false => assert!(first.is_some(), "split at {split}"),
            }
            assert_eq!(
                second.map(|c| c.0),
                Some("gzip".to_string()),
                "split at {split}"
            );
        }
        for good in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"not a head at all\r\n\r\n",
        ] {
            let state = ConnState::new();
            let mut h = HeadCheck::default();
            assert_eq!(
                h.seen(good, &state),
                None,
                "{:?}",
                String::from_utf8_lossy(good)
            );
        }
        // Judged once: the next head only after a response.
        let state = Arc::new(ConnState::new());
        let mut h = HeadCheck::default();
        assert_eq!(h.seen(b"GET / HTTP/1.1\r\n\r\n", &state), None);
        assert_eq!(h.seen(bad, &state), None, "body bytes are not a head");
        drop(state.request());
        assert!(h.seen(bad, &state).is_some(), "the next request's head");
        // After an upgrade, bytes are a tunnel's.
        let state = Arc::new(ConnState::new());
        let mut h = HeadCheck::default();
        let up = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(h.seen(up, &state), None);
        drop(state.request());
        assert_eq!(h.seen(bad, &state), None);
    }

    #[test]
    fn a_ping_flood_is_refused_and_acks_are_not_counted() {
        let state = ConnState::new();
        let mut f = Frames::after_preface(0);
        for _ in 0..1000 {
            f.scan(&frame(0x6, 0x1, &[0; 8]), &state).unwrap();
        }
        for _ in 0..CONTROL_FRAMES_PER_SECOND {
            f.scan(&frame(0x6, 0, &[0; 8]), &state).unwrap();
        }
        assert!(f.scan(&frame(0x6, 0, &[0; 8]), &state).is_err());
    }
}
