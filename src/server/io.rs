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
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 32 << 20;

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
}

impl ConnState {
    pub(crate) fn new() -> ConnState {
        ConnState {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            changed: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn start_head(&self) {
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
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        }
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

impl<T: IntoTcp + AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(self.io().poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            self.eof = true;
        } else {
            self.seen(new)?;
        }
        Poll::Ready(Ok(()))
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
