//! The server's own HTTP/1.1 path, for the requests most clients send:
//! HTTP/1.1, a method other than `HEAD` and `CONNECT`, no body (no
//! `Content-Length` but `0`, no `Transfer-Encoding`), no `Upgrade`,
//! `Expect` or `TE`. Such a head is parsed once (httparse), the proxy
//! answers it, and the response is written as hyper's server writes it
//! (the same framing, `connection` and `date` rules: [`encode_head`]).
//!
//! Anything else, from the first head that is not such a request on
//! (and every head it cannot read: hyper answers those `400` or `431`),
//! goes to hyper with the connection and the bytes read so far
//! ([`Next::Handoff`]). hyper remains the server for bodies, `100
//! Continue`, upgrades, HTTP/1.0 and h2c; this path only spares the
//! common request hyper's per-connection buffers (16 KiB, kept while idle)
//! and its dispatcher (BENCHMARKS.md, "The server's own HTTP/1.1 path").

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::conn::MAX_REQUEST_HEAD;
use super::io::ConnState;
use crate::proxy::h1::itoa;
use crate::proxy::{ClientBody, ConnInfo, Proxy, RespBody};

/// Fields a head may have on this path; a head with more goes to hyper
/// (whose limit is 100).
const MAX_FIELDS: usize = 64;

/// The first read of a head, made into a buffer on the stack, and the
/// read buffer's first size when a head takes more than one read.
const READ_START: usize = 2048;

/// A response body's bytes gathered before they are written.
const WRITE_BATCH: usize = 64 << 10;

/// What a request head at the front of the read buffer is.
#[derive(Debug)]
// Returned once per request and taken apart at once: boxing the request
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Head {
    /// Not complete yet.
    Partial,
    /// A request this path serves, `len` bytes long; `close`: the client
    /// asked for the connection to close after it.
    Simple {
        parts: http::request::Parts,
        len: usize,
        close: bool,
    },
    /// Anything else: served by hyper from this head on.
    Other,
}

/// Reads the request head at the front of `buf` (see the module's
/// documentation for which heads are [`Head::Simple`]).
pub(crate) fn parse(buf: &[u8]) -> Head {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => return Head::Partial,
        // Too large (hyper's 431), too many fields, or not a request
        // head hyper would take (its 400).
        _ => return Head::Other,
    };
    if req.version != Some(1) {
        return Head::Other;
    }
    let method = match req.method.map(str::as_bytes) {
        Some(b"GET") => Method::GET,
        Some(b"POST") => Method::POST,
        Some(b"HEAD" | b"CONNECT") | None => return Head::Other,
        Some(m) => match Method::from_bytes(m) {
            Ok(m) => m,
            Err(_) => return Head::Other,
        },
    };
    let mut close = false;
    let mut length_seen = false;
    for f in req.headers.iter() {
        let n = f.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            if length_seen || f.value != b"0" {
                return Head::Other;
            }
            length_seen = true;
        } else if n.eq_ignore_ascii_case(b"transfer-encoding")
            || n.eq_ignore_ascii_case(b"upgrade")
            || n.eq_ignore_ascii_case(b"expect")
            || n.eq_ignore_ascii_case(b"te")
        {
            return Head::Other;
        } else if n.eq_ignore_ascii_case(b"connection") {
            close |= has_close(f.value);
        }
    }
    // The head's own copy: field values and the target share it.
    let head = Bytes::copy_from_slice(&buf[..len]);
    let at = |s: &[u8]| head.slice_ref(&head[offset(buf, s)..offset(buf, s) + s.len()]);
    let Some(path) = req.path else {
        return Head::Other;
    };
    let Ok(uri) = Uri::from_maybe_shared(at(path.as_bytes())) else {
        return Head::Other;
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for f in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_maybe_shared(at(f.value)),
        ) else {
            return Head::Other;
        };
        headers.append(name, value);
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Head::Simple { parts, len, close }
}

/// Whether a `Connection` value lists `close`.
fn has_close(v: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// Where `part` (a slice of `buf`) starts in `buf`.
fn offset(buf: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length`: this many bytes are still to go.
    Length(u64),
    Chunked,
}

/// The response head could not be written (hyper's "user header" error:
/// conflicting `Content-Length` values, or one that is not a number).
#[derive(Debug, thiserror::Error)]
#[error("the response's Content-Length is not one number")]
pub(crate) struct BadLength;

/// The body's length as hyper's dispatcher sees it: `None`, nothing to
/// send; `Some(None)`, unknown.
fn body_length<B: Body>(b: &B) -> Option<Option<u64>> {
    match b.is_end_stream() {
        true => None,
        false => Some(b.size_hint().exact()),
    }
}

/// Writes the head of `resp` (to a request that is not `HEAD` or
/// `CONNECT`, over HTTP/1.1) as hyper's server does: `Content-Length` from
/// the body when it knows its length, else `Transfer-Encoding: chunked`;
/// none for 204 and 304; `connection: close` added when `close`; `date`
/// unless there is one. Returns the body's framing, and whether the
/// connection ends after it (the response said `Connection: close`).
pub(crate) fn encode_head(
    status: StatusCode,
    reason: Option<&[u8]>,
    headers: &HeaderMap,
    body: Option<Option<u64>>,
    close: bool,
    dst: &mut Vec<u8>,
) -> Result<(Framing, bool), BadLength> {
    let bodyless = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    if status == StatusCode::OK && reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        // The upstream's own phrase, else the status's (hyper writes
        // `<none>` for a code it does not know: so do we, alike).
        let reason = reason.unwrap_or(status.canonical_reason().unwrap_or("<none>").as_bytes());
        dst.extend_from_slice(reason);
        dst.extend_from_slice(b"\r\n");
    }
    let mut framing = None;
    let mut is_last = close;
    let mut wrote_date = false;
    let mut length: Option<u64> = None;
    let mut connection_has_close = false;
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH => {
                if bodyless {
                    continue;
                }
                match body {
                    // Nothing to send: the implicit `content-length: 0`.
                    None => continue,
                    Some(known) => {
                        let Some(n) = parse_length(value.as_bytes()) else {
                            return Err(BadLength);
                        };
                        match length {
                            Some(prev) if prev != n => return Err(BadLength),
                            Some(_) => continue,
                            None => {}
                        }
                        length = Some(n);
                        // hyper trusts a known length over the field.
                        framing = Some(Framing::Length(known.unwrap_or(n)));
                    }
                }
            }
            header::TRANSFER_ENCODING => {
                if bodyless {
                    continue;
                }
                // The proxy never sends one (its upstream client decodes
                // the body); should one come, the body is chunked here.
                framing = Some(Framing::Chunked);
            }
            header::CONNECTION if has_close(value.as_bytes()) => {
                connection_has_close = true;
                is_last = true;
            }
            header::DATE => wrote_date = true,
            _ => {}
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    if close && !connection_has_close {
        // hyper adds `close` to the connection's field.
        dst.extend_from_slice(b"connection: close\r\n");
    }
    let framing = match (framing, bodyless) {
        (_, true) => Framing::Length(0),
        (Some(f), false) => f,
        (None, false) => match body {
            Some(None) => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            None | Some(Some(0)) => {
                dst.extend_from_slice(b"content-length: 0\r\n");
                Framing::Length(0)
            }
            Some(Some(n)) => {
                dst.extend_from_slice(b"content-length: ");
                dst.extend_from_slice(itoa(n, &mut [0; 20]));
                dst.extend_from_slice(b"\r\n");
                Framing::Length(n)
            }
        },
    };
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        date(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    Ok((framing, is_last))
}

/// A `Content-Length` value as hyper reads it: digits, nothing else.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Appends the current time as an HTTP date, formatted once a second per
/// thread (as hyper caches it).
fn date(dst: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        dst.extend_from_slice(c.1.as_bytes());
    });
}

/// Appends one body frame's data in `framing`; false once the body has
/// more than its `Content-Length` (the excess is dropped).
fn encode_data(data: &[u8], framing: &mut Framing, dst: &mut Vec<u8>) -> bool {
    match framing {
        Framing::Length(left) => {
            let n = (*left).min(data.len() as u64);
            dst.extend_from_slice(&data[..n as usize]);
            *left -= n;
            n == data.len() as u64
        }
        Framing::Chunked => {
            if !data.is_empty() {
                // Upper-case hex, as hyper writes it.
                dst.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                dst.extend_from_slice(data);
                dst.extend_from_slice(b"\r\n");
            }
            true
        }
    }
}

/// Why this path ended a connection with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("client connection: {0}")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Head(#[from] BadLength),
    #[error("response body: {0}")]
    Body(#[source] crate::proxy::upstream::BoxError),
    #[error("the response body did not match its Content-Length")]
    Length,
}

/// How the connection goes on after this path.
pub(crate) enum Next {
    /// It is over (the client closed, or asked to, or the server did).
    Close,
    /// hyper serves it from the head at the front of the buffer on.
    Handoff,
}

/// Serves the connection's requests while they are simple ones; `buf`
/// holds what was read and not yet served when it returns.
pub(crate) async fn serve<T>(
    io: &mut T,
    buf: &mut BytesMut,
    proxy: impl Fn() -> Arc<Proxy>,
    state: &Arc<ConnState>,
    info: &ConnInfo,
) -> Result<Next, H1Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let (parts, close) = match next_head(io, buf, state).await? {
            Ok(head) => head,
            Err(next) => return Ok(next),
        };
        let guard = state.request();
        let req = Request::from_parts(parts, ClientBody::empty());
        // Boxed, so an idle connection's future stays small, and filled
        // in place: `Box::pin(f)` builds `f` on the stack and copies all of
        // it (3.4 KB) into the allocation, once per request (perf: a third
        // of the proxy's `memcpy` time).
        let resp = Box::into_pin(Box::write(
            Box::new_uninit(),
            proxy().handle(req, info.clone()),
        ))
        .await
        .unwrap_or_else(|e| match e {});
        let keep = write_response(io, resp, close || state.closing()).await?;
        drop(guard);
        if !keep {
            return Ok(Next::Close);
        }
    }
}

/// Reads until a head is whole at the front of `buf`: the head of a simple
/// request, or else what the connection does instead (its end, or hyper).
async fn next_head<T>(
    io: &mut T,
    buf: &mut BytesMut,
    state: &ConnState,
) -> Result<Result<(http::request::Parts, bool), Next>, H1Error>
where
    T: AsyncRead + Unpin,
{
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Head::Simple { parts, len, close } => {
                    buf.advance(len);
                    return Ok(Ok((parts, close)));
                }
                Head::Other => return Ok(Err(Next::Handoff)),
                Head::Partial => state.start_head(),
            }
        }
        let read = std::future::poll_fn(|cx| {
            if buf.is_empty() {
                // Told to close: only between requests.
                if state.closing() {
                    return Poll::Ready(Ok(Read::End));
                }
                return read_first(&mut *io, cx, buf);
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(buf.capacity().max(READ_START));
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf).map_ok(|n| {
                if n == 0 {
                    Read::End
                } else {
                    Read::More
                }
            })
        })
        .await
        .map_err(H1Error::Io)?;
        match read {
            // The client is done (a head cut short gets no answer,
            // as from hyper), or the server closes.
            Read::End => return Ok(Err(Next::Close)),
            Read::More => {}
            Read::Head(parts, close) => return Ok(Ok((parts, close))),
        }
    }
}

/// What one read between heads brought.
// Taken apart at once, as [`Head`] is.
#[allow(clippy::large_enum_variant)]
enum Read {
    /// The connection's end.
    End,
    /// Bytes, now in the read buffer.
    More,
    /// A whole simple head (what followed it is in the read buffer).
    Head(http::request::Parts, bool),
}

/// Reads the first bytes of a head when the read buffer is empty, on the
/// stack: between requests a connection holds no read buffer at all, and a
/// head that comes whole in one read (the usual case) never needs one.
fn read_first<T>(io: &mut T, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<Read>>
where
    T: AsyncRead + Unpin,
{
    // What is left of a buffer emptied by the last request goes back now.
    if buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
    let mut tmp = [MaybeUninit::<u8>::uninit(); READ_START];
    let mut read = ReadBuf::uninit(&mut tmp);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut read))?;
    let got = read.filled();
    if got.is_empty() {
        return Poll::Ready(Ok(Read::End));
    }
    if let Head::Simple { parts, len, close } = parse(got) {
        buf.extend_from_slice(&got[len..]);
        return Poll::Ready(Ok(Read::Head(parts, close)));
    }
    buf.reserve(READ_START);
    buf.extend_from_slice(got);
    Poll::Ready(Ok(Read::More))
}

/// Writes `resp`; whether the connection may serve another request.
async fn write_response<T>(
    io: &mut T,
    resp: Response<RespBody>,
    close: bool,
) -> Result<bool, H1Error>
where
    T: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let len = body_length(&body);
    let mut out = Vec::with_capacity(256 + parts.headers.len() * 48);
    // hyper answers a response it cannot encode with a 500 (and closes).
    let encoded = if parts.status.is_informational() {
        Err(BadLength)
    } else {
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes());
        encode_head(parts.status, reason, &parts.headers, len, close, &mut out)
    };
    let (mut framing, last) = match encoded {
        Ok(e) => e,
        Err(_) => {
            out.clear();
            let empty = HeaderMap::new();
            encode_head(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                &empty,
                None,
                true,
                &mut out,
            )?;
            io.write_all(&out).await.map_err(H1Error::Io)?;
            io.flush().await.map_err(H1Error::Io)?;
            return Ok(false);
        }
    };
    // Nothing to send, or nothing that may be sent (204, 304, `Content-Length: 0`).
    if len.is_some() && framing != Framing::Length(0) {
        // Frames that are ready go with the head, in one write.
        loop {
            let polled = {
                let mut cx = Context::from_waker(Waker::noop());
                Pin::new(&mut body).poll_frame(&mut cx)
            };
            let frame = match polled {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    if !out.is_empty() {
                        io.write_all(&out).await.map_err(H1Error::Io)?;
                        io.flush().await.map_err(H1Error::Io)?;
                        out.clear();
                    }
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            };
            match frame {
                Some(Ok(f)) => {
                    if !data_of(f, &mut framing, &mut out) {
                        io.write_all(&out).await.map_err(H1Error::Io)?;
                        return Err(H1Error::Length);
                    }
                    if framing == Framing::Length(0) {
                        break;
                    }
                }
                Some(Err(e)) => {
                    // Cut short: the client sees the connection end
                    // without the body's end, as from hyper.
                    io.write_all(&out).await.map_err(H1Error::Io)?;
                    return Err(H1Error::Body(e));
                }
                None => {
                    match framing {
                        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                        Framing::Length(0) => {}
                        Framing::Length(_) => {
                            io.write_all(&out).await.map_err(H1Error::Io)?;
                            return Err(H1Error::Length);
                        }
                    }
                    break;
                }
            }
            if out.len() >= WRITE_BATCH {
                io.write_all(&out).await.map_err(H1Error::Io)?;
                out.clear();
            }
        }
    }
    io.write_all(&out).await.map_err(H1Error::Io)?;
    io.flush().await.map_err(H1Error::Io)?;
    Ok(!(close || last))
}

/// A frame's data into `out` (trailers are dropped: a client that asked
/// for them, `TE: trailers`, is served by hyper); false when it ran over
/// the body's length.
fn data_of(f: Frame<Bytes>, framing: &mut Framing, out: &mut Vec<u8>) -> bool {
    match f.into_data() {
        Ok(d) => encode_data(&d, framing, out),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(raw: &[u8]) -> (http::request::Parts, usize, bool) {
        match parse(raw) {
            Head::Simple { parts, len, close } => (parts, len, close),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    /// A connection whose reads give one chunk each, then its end.
    struct Script(std::collections::VecDeque<Vec<u8>>);

    impl Script {
        fn new(chunks: &[&[u8]]) -> Script {
            Script(chunks.iter().map(|c| c.to_vec()).collect())
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut c) = self.0.pop_front() {
                let n = c.len().min(out.remaining());
                out.put_slice(&c[..n]);
                if n < c.len() {
                    self.0.push_front(c.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// The path of the next head, or what the connection does instead.
    async fn next(
        io: &mut Script,
        buf: &mut BytesMut,
        state: &ConnState,
    ) -> Result<String, &'static str> {
        match next_head(io, buf, state).await {
            Ok(Ok((parts, _))) => Ok(parts.uri.to_string()),
            Ok(Err(Next::Close)) => Err("close"),
            Ok(Err(Next::Handoff)) => Err("handoff"),
            Err(_) => Err("error"),
        }
    }

    #[tokio::test]
    async fn heads_are_read_whole_however_they_come_and_no_buffer_is_held_between() {
        let state = ConnState::new();
        let long = format!(
            "GET /d HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "x".repeat(5000)
        );
        let mut io = Script::new(&[
            // A head in two reads; a whole one and a part after it.
            b"GET /a HTTP/1.1\r\nHo",
            b"st: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HT",
            b"TP/1.1\r\nHost: a\r\n\r\n",
            // Longer than the first read.
            long.as_bytes(),
            // Whole in one read, from an empty buffer.
            b"GET /e HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
        ]);
        let mut buf = BytesMut::new();
        for path in ["/a", "/b", "/c", "/d"] {
            assert_eq!(next(&mut io, &mut buf, &state).await, Ok(path.to_string()));
        }
        assert!(buf.is_empty());
        assert_eq!(next(&mut io, &mut buf, &state).await, Ok("/e".to_string()));
        // The buffer the long head needed was given back; none was taken for /e.
        assert_eq!(buf.capacity(), 0);
        // hyper gets the head and its body.
        assert_eq!(next(&mut io, &mut buf, &state).await, Err("handoff"));
        assert!(buf.starts_with(b"POST /f") && buf.ends_with(b"\r\n\r\nx"));

        // The end, between heads or in one; and the server's close, between heads.
        let mut buf = BytesMut::new();
        let mut io = Script::new(&[b"GET /g HTTP/1.1\r\nHost: a\r\n\r\nGET /h HTTP/1.1\r\nHo"]);
        assert_eq!(next(&mut io, &mut buf, &state).await, Ok("/g".to_string()));
        assert_eq!(next(&mut io, &mut buf, &state).await, Err("close"));
        assert_eq!(
            next(&mut Script::new(&[]), &mut BytesMut::new(), &state).await,
            Err("close")
        );
        state.close_soon();
        let mut io = Script::new(&[b"GET /i HTTP/1.1\r\nHost: a\r\n\r\n"]);
        assert_eq!(
            next(&mut io, &mut BytesMut::new(), &state).await,
            Err("close")
        );
    }

    #[test]
    fn common_heads_are_read_here_and_the_rest_left_to_hyper() {
        let raw = b"GET /a/b?c=d HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\nX-Odd: \xe9t\xe9\r\n\r\nGET / HTTP/1.1\r\n";
        let (p, len, close) = simple(raw);
        assert_eq!(&raw[len..], b"GET / HTTP/1.1\r\n");
        assert!(!close);
        assert_eq!(p.method, Method::GET);
        assert_eq!(p.uri, "/a/b?c=d");
        assert_eq!(p.headers.get_all("cookie").iter().count(), 2);
        assert_eq!(p.headers["x-odd"].as_bytes(), b"\xe9t\xe9");
        let (_, _, close) = simple(b"DELETE / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(close);
        simple(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        simple(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
        simple(b"GET http://x/y HTTP/1.1\r\n\r\n");
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Head::Partial
        ));
        for other in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(
                matches!(parse(other), Head::Other),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_FIELDS + 1 {
            many.extend(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert!(matches!(parse(&many), Head::Other), "too many fields");
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD, b'a');
        assert!(
            matches!(parse(&huge), Head::Other),
            "too large: hyper's 431"
        );
    }

    fn head(
        status: u16,
        fields: &[(&str, &str)],
        body: Option<Option<u64>>,
        close: bool,
    ) -> (String, Framing, bool) {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut out = Vec::new();
        let (f, last) = encode_head(
            StatusCode::from_u16(status).unwrap(),
            None,
            &h,
            body,
            close,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let date = text.find("date: ").expect("a date");
        let text = format!("{}{}", &text[..date + 6], &text[date + 6 + 29..]);
        (text, f, last)
    }

    #[test]
    fn response_heads_are_framed_as_hyper_frames_them() {
        assert_eq!(
            head(200, &[("x-a", "1")], Some(Some(5)), false),
            (
                "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: \r\n\r\n".into(),
                Framing::Length(5),
                false
            )
        );
        assert_eq!(
            head(404, &[("content-length", "3")], Some(None), false),
            (
                "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\ndate: \r\n\r\n".into(),
                Framing::Length(3),
                false
            )
        );
        assert_eq!(
            head(200, &[], Some(None), true),
            ("HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\ndate: \r\n\r\n".into(), Framing::Chunked, true)
        );
        assert_eq!(
            head(204, &[("content-length", "0")], None, false),
            (
                "HTTP/1.1 204 No Content\r\ndate: \r\n\r\n".into(),
                Framing::Length(0),
                false
            )
        );
        assert_eq!(
            head(304, &[("etag", "\"x\"")], Some(None), false),
            (
                "HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\ndate: \r\n\r\n".into(),
                Framing::Length(0),
                false
            )
        );
        assert_eq!(
            head(599, &[("connection", "close")], None, false),
            (
                "HTTP/1.1 599 <none>\r\nconnection: close\r\ncontent-length: 0\r\ndate: \r\n\r\n"
                    .into(),
                Framing::Length(0),
                true
            )
        );
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, "1".parse().unwrap());
        h.append(header::CONTENT_LENGTH, "2".parse().unwrap());
        assert!(encode_head(StatusCode::OK, None, &h, Some(None), false, &mut out).is_err());
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::DATE, "yesterday".parse().unwrap());
        encode_head(StatusCode::OK, None, &h, None, false, &mut out).unwrap();
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\ndate: yesterday\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn bodies_are_framed_and_a_long_one_cut_at_its_length() {
        let mut out = Vec::new();
        let mut f = Framing::Chunked;
        assert!(encode_data(b"hello", &mut f, &mut out));
        assert!(encode_data(b"", &mut f, &mut out));
        assert_eq!(out, b"5\r\nhello\r\n");
        let mut out = Vec::new();
        let mut f = Framing::Length(3);
        assert!(!encode_data(b"hello", &mut f, &mut out));
        assert_eq!((out.as_slice(), f), (&b"hel"[..], Framing::Length(0)));
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(
            itoa(u64::MAX, &mut [0; 20]),
            u64::MAX.to_string().as_bytes()
        );
        assert_eq!(parse_length(b"0042"), Some(42));
        assert_eq!(parse_length(b"4 2"), None);
        assert_eq!(parse_length(b""), None);
    }
}
