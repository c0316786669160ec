//! The access log (SPEC 7.3): one line per request, in nginx's `combined`
//! format followed by the request time in seconds, or one JSON object a
//! line.
//!
//! The request path formats its line (no allocation: a buffer kept per
//! thread) and appends it to a shared batch under a short lock; a writer
//! thread takes the whole batch every [`BATCH_WINDOW`] and writes it. When
//! the batch already holds [`CHANNEL_CAPACITY`] lines, the line is dropped and
//! counted (`sessiongate_access_log_dropped_total`): a slow disk never
//! slows a request. A file target is reopened by [`AccessLog::reopen`]
//! (SIGUSR1, for logrotate).
//!
//! Never logged: the query string (of the request target and of the
//! `Referer`), any cookie, a session key or session data.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Version};
use prometheus_client::metrics::counter::Counter;

use crate::config::{AccessLogFormat, AccessLogTarget};
use crate::proxy::h1::itoa;

/// Lines held for the writer before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 4096;

/// How long the writer lets lines gather after the first of a batch before
/// it writes them all: one wake-up and one `write` per batch, not per line
/// (per line, the wake-up and the syscall cost a quarter of the read path's
/// throughput, BENCHMARKS.md). A line reaches the log at most this late.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

/// The writer's output buffer (written out when a batch is done or full).
const BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("access_log: cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("access_log: cannot start the writer thread: {0}")]
    Thread(#[source] io::Error),
}

/// One request, as the request path hands it over (borrowed: the line is
/// formatted before the request's state is dropped).
#[derive(Debug)]
pub struct Entry<'a> {
    /// When the request head arrived.
    pub time: SystemTime,
    pub client: IpAddr,
    /// `None`: a head too broken to name one (the line shows `"-"` for the
    /// request, the JSON `null`s).
    pub method: Option<Method>,
    /// The request target; its query is cut off when the line is written.
    pub target: Option<http::uri::PathAndQuery>,
    pub version: Version,
    pub status: u16,
    /// The response body's length when it is known at the head.
    pub bytes: Option<u64>,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// Time to the response head.
    pub duration: Duration,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub upstream_time: Option<Duration>,
    /// The `X-Session-Id` the upstream was sent (never the key).
    pub session_id: Option<[u8; 32]>,
}

/// What the request path and the writer share.
struct Shared {
    state: Mutex<State>,
    /// The writer waits here for a first line, a reopen or a flush.
    work: Condvar,
    /// [`AccessLog::flush`] waits here for its batch to be written.
    written: Condvar,
    /// Lines a batch may hold before new ones are dropped.
    capacity: usize,
}

#[derive(Default)]
struct State {
    /// Formatted lines, each ending in `\n`, not yet taken by the writer.
    batch: Vec<u8>,
    /// How many lines `batch` holds.
    lines: usize,
    /// A reopen was asked for when `batch` was this long: the lines before
    /// it go to the old file, the rest to the new one.
    reopen_at: Option<usize>,
    /// Flushes asked for, and how many of them are done (in order).
    flushes_asked: u64,
    flushes_done: u64,
    /// Every [`AccessLog`] is gone: the writer writes what is left and ends.
    closed: bool,
}

impl Shared {
    fn new(capacity: usize) -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            written: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left whole lines or none.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The request path's end of the writer; the last one dropped ends it.
struct Handle {
    shared: Arc<Shared>,
    format: AccessLogFormat,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
    }
}

/// The request path's end of the access log. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    handle: Option<Arc<Handle>>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("on", &self.handle.is_some())
            .finish()
    }
}

impl AccessLog {
    /// An access log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            handle: None,
            dropped: Counter::default(),
        }
    }

    /// Starts the writer thread for `target` (nothing for `Off`). A file is
    /// opened here, so a path that cannot be written is an error at start.
    pub fn start(
        target: &AccessLogTarget,
        format: AccessLogFormat,
        dropped: Counter,
    ) -> Result<AccessLog, AccessLogError> {
        let sink = match target {
            AccessLogTarget::Off => {
                return Ok(AccessLog {
                    handle: None,
                    dropped,
                })
            }
            AccessLogTarget::Stderr => Sink::Stderr(BufWriter::with_capacity(BUFFER, io::stderr())),
            AccessLogTarget::File(p) => Sink::File {
                path: p.clone(),
                out: BufWriter::with_capacity(BUFFER, open(p)?),
            },
        };
        let shared = Arc::new(Shared::new(CHANNEL_CAPACITY));
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("sessiongate-access-log".into())
            .spawn(move || writer(&theirs, sink))
            .map_err(AccessLogError::Thread)?;
        Ok(AccessLog {
            handle: Some(Arc::new(Handle { shared, format })),
            dropped,
        })
    }

    /// Whether lines are written (the request path skips collecting them
    /// otherwise).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.handle.is_some()
    }

    /// Formats the line and hands it to the writer; drops and counts it
    /// when the writer is behind. Never blocks on the writer: the lock is
    /// held only to append the line.
    pub fn log(&self, entry: &Entry<'_>) {
        let Some(h) = &self.handle else { return };
        thread_local! {
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            match h.format {
                AccessLogFormat::Combined => combined(&mut line, entry),
                AccessLogFormat::Json => json(&mut line, entry),
            }
            line.push(b'\n');
            let mut st = h.shared.lock();
            if st.lines >= h.shared.capacity || st.closed {
                drop(st);
                self.dropped.inc();
                return;
            }
            let first = st.lines == 0;
            st.batch.extend_from_slice(&line);
            st.lines += 1;
            drop(st);
            // Only the first line of a batch can find the writer waiting.
            if first {
                h.shared.work.notify_one();
            }
        })
    }

    /// Blocks until every line handed over so far is written (shutdown).
    pub fn flush(&self) {
        let Some(h) = &self.handle else { return };
        let mut st = h.shared.lock();
        st.flushes_asked += 1;
        let ticket = st.flushes_asked;
        h.shared.work.notify_one();
        while st.flushes_done < ticket {
            st = h.shared.written.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Reopens the file (logrotate moved it away) once the lines handed
    /// over before it are written; nothing for stderr. Never dropped.
    pub fn reopen(&self) {
        let Some(h) = &self.handle else { return };
        let mut st = h.shared.lock();
        if st.reopen_at.is_none() {
            st.reopen_at = Some(st.batch.len());
        }
        drop(st);
        h.shared.work.notify_one();
    }
}

enum Sink {
    Stderr(BufWriter<io::Stderr>),
    File { path: PathBuf, out: BufWriter<File> },
}

fn open(path: &Path) -> Result<File, AccessLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stderr(out) => out.write_all(bytes),
            Sink::File { out, .. } => out.write_all(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stderr(out) => out.flush(),
            Sink::File { out, .. } => out.flush(),
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, out } = self {
            let _ = out.flush();
            match open(path) {
                Ok(f) => {
                    *out = BufWriter::with_capacity(BUFFER, f);
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => {
                    tracing::error!(error = %e, "access log: reopen failed; writing on to the old file")
                }
            }
        }
    }
}

/// The writer thread: waits for a first line (or a reopen or a flush),
/// lets the batch gather for [`BATCH_WINDOW`], takes it whole, writes it
/// and flushes. Ends when every [`AccessLog`] is gone and all is written.
fn writer(shared: &Shared, mut sink: Sink) {
    let mut batch = Vec::with_capacity(BUFFER);
    let mut failed = false;
    loop {
        let mut st = shared.lock();
        while st.lines == 0
            && st.reopen_at.is_none()
            && st.flushes_asked == st.flushes_done
            && !st.closed
        {
            st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.lines > 0 && st.flushes_asked == st.flushes_done && !st.closed {
            // While this thread sleeps the request path only appends: the
            // first line of the batch woke it, the others wake nobody.
            drop(st);
            std::thread::sleep(BATCH_WINDOW);
            st = shared.lock();
        }
        batch.clear();
        std::mem::swap(&mut batch, &mut st.batch);
        st.lines = 0;
        let reopen_at = st.reopen_at.take();
        let flushes = st.flushes_asked;
        let closed = st.closed;
        drop(st);

        let (before, after) = batch.split_at(reopen_at.unwrap_or(batch.len()));
        let mut wrote = sink.write(before).and_then(|()| sink.flush());
        if reopen_at.is_some() {
            sink.reopen();
            wrote = wrote.and(sink.write(after).and_then(|()| sink.flush()));
        }
        match wrote {
            Ok(()) => failed = false,
            Err(e) if !failed => {
                failed = true;
                tracing::error!(error = %e, "access log: write failed");
            }
            Err(_) => {}
        }
        if flushes > 0 {
            let mut st = shared.lock();
            if st.flushes_done < flushes {
                st.flushes_done = flushes;
                shared.written.notify_all();
            }
        }
        if closed && shared.lock().lines == 0 {
            return;
        }
    }
}

/// The path of the request target without its query.
fn path_only(target: Option<&http::uri::PathAndQuery>) -> &str {
    target.map_or("/", |t| t.path())
}

/// A header value with its query cut off (a `Referer`).
fn without_query(v: &[u8]) -> &[u8] {
    match v.iter().position(|&b| b == b'?' || b == b'#') {
        Some(i) => &v[..i],
        None => v,
    }
}

/// The bytes nginx escapes in a log line: `"`, `\` and anything not
/// printable ASCII. A table: one lookup a byte.
static ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b < 0x20 || b >= 0x7f || b == b'"' as usize || b == b'\\' as usize;
        b += 1;
    }
    t
};

/// Bytes as nginx escapes them in a log line ([`ESCAPE`]) as `\xHH`. The
/// runs between are copied whole.
fn escaped(out: &mut Vec<u8>, v: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut rest = v;
    while let Some(i) = rest.iter().position(|&b| ESCAPE[usize::from(b)]) {
        out.extend_from_slice(&rest[..i]);
        let b = rest[i];
        out.extend_from_slice(&[
            b'\\',
            b'x',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 15)],
        ]);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Appends `01/Dec/2026:23:45:07 +0000` (UTC: see README), formatted once
/// per second (the writer's lines come in time order, mostly).
fn push_time_local(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> =
            const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    // The second, without the calendar (a time before 1970 is never cached).
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        // Never equal for a time before 1970 (`secs` is None).
        if secs != Some(last.0) {
            let t = time::OffsetDateTime::from(t);
            last.1 = format!(
                "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
                t.day(),
                MONTHS[usize::from(u8::from(t.month())) - 1],
                t.year(),
                t.hour(),
                t.minute(),
                t.second()
            );
            last.0 = secs.unwrap_or(i64::MIN);
        }
        out.extend_from_slice(last.1.as_bytes());
    })
}

/// `$remote_addr - - [$time_local] "$request" $status $body_bytes_sent
/// "$http_referer" "$http_user_agent" $request_time`
///
/// Written byte by byte, not through `core::fmt`: the writer thread shares
/// the cores with the requests (`core::fmt` was most of its user time).
pub fn combined(out: &mut Vec<u8>, e: &Entry) {
    push_ip(out, e.client.to_canonical());
    out.extend_from_slice(b" - - [");
    push_time_local(out, e.time);
    out.extend_from_slice(b"] \"");
    match &e.method {
        Some(m) => {
            escaped(out, m.as_str().as_bytes());
            out.push(b' ');
            escaped(out, path_only(e.target.as_ref()).as_bytes());
            out.push(b' ');
            out.extend_from_slice(version_str(e.version).as_bytes());
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b"\" ");
    out.extend_from_slice(itoa(u64::from(e.status), &mut [0; 20]));
    out.push(b' ');
    match e.bytes {
        Some(n) => out.extend_from_slice(itoa(n, &mut [0; 20])),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" \"");
    match &e.referer {
        Some(r) => escaped(out, without_query(r.as_bytes())),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b"\" \"");
    match &e.user_agent {
        Some(u) => escaped(out, u.as_bytes()),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b"\" ");
    push_seconds(out, e.duration);
}

/// An address as `Display` writes it (IPv4 by hand, the common case).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa(u64::from(octet), &mut [0; 20]));
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Seconds with three decimals (`1.250`), rounded to the millisecond.
fn push_seconds(out: &mut Vec<u8>, d: Duration) {
    let ms = (d.as_nanos() + 500_000) / 1_000_000;
    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
    out.extend_from_slice(itoa(ms / 1000, &mut [0; 20]));
    let frac = ms % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `n` units of 10^-`decimals` as a JSON number in plain decimal form
/// (`0.000005`, never `5e-6`, which some log pipelines read as text).
fn push_fixed(out: &mut Vec<u8>, n: u128, decimals: u32) {
    let unit = 10u128.pow(decimals);
    let whole = u64::try_from(n / unit).unwrap_or(u64::MAX);
    out.extend_from_slice(itoa(whole, &mut [0; 20]));
    out.push(b'.');
    let frac = n % unit;
    for d in (0..decimals).rev() {
        out.push(b'0' + (frac / 10u128.pow(d) % 10) as u8);
    }
}

/// The same fields as [`combined`] plus `route`, `upstream`,
/// `upstream_ms` and `session_id`, as one JSON object. `request_time` is
/// seconds to the microsecond, `upstream_ms` milliseconds to the
/// microsecond, both in plain decimal form.
pub fn json(out: &mut Vec<u8>, e: &Entry) {
    use serde_json::to_writer;
    let text = |v: &Option<HeaderValue>, cut: bool| {
        v.as_ref().map(|v| {
            let b = if cut {
                without_query(v.as_bytes())
            } else {
                v.as_bytes()
            };
            String::from_utf8_lossy(b).into_owned()
        })
    };
    let time = time::OffsetDateTime::from(e.time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    out.extend_from_slice(b"{\"time\":");
    let _ = to_writer(&mut *out, &time);
    out.extend_from_slice(b",\"remote_addr\":");
    let _ = to_writer(&mut *out, &e.client.to_canonical().to_string());
    out.extend_from_slice(b",\"method\":");
    let _ = to_writer(&mut *out, &e.method.as_ref().map(Method::as_str));
    out.extend_from_slice(b",\"path\":");
    let _ = to_writer(
        &mut *out,
        &e.method.as_ref().map(|_| path_only(e.target.as_ref())),
    );
    out.extend_from_slice(b",\"protocol\":");
    let _ = to_writer(
        &mut *out,
        &e.method.as_ref().map(|_| version_str(e.version)),
    );
    out.extend_from_slice(b",\"status\":");
    let _ = to_writer(&mut *out, &e.status);
    out.extend_from_slice(b",\"body_bytes_sent\":");
    let _ = to_writer(&mut *out, &e.bytes);
    out.extend_from_slice(b",\"http_referer\":");
    let _ = to_writer(&mut *out, &text(&e.referer, true));
    out.extend_from_slice(b",\"http_user_agent\":");
    let _ = to_writer(&mut *out, &text(&e.user_agent, false));
    out.extend_from_slice(b",\"request_time\":");
    push_fixed(out, (e.duration.as_nanos() + 500) / 1000, 6);
    out.extend_from_slice(b",\"route\":");
    let _ = to_writer(&mut *out, &e.route);
    out.extend_from_slice(b",\"upstream\":");
    let _ = to_writer(&mut *out, &e.upstream);
    out.extend_from_slice(b",\"upstream_ms\":");
    match e.upstream_time {
        Some(d) => push_fixed(out, (d.as_nanos() + 500) / 1000, 3),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"session_id\":");
    let _ = to_writer(
        &mut *out,
        &e.session_id
            .map(|id| String::from_utf8_lossy(&id).into_owned()),
    );
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_254_707),
            client: "::ffff:10.1.2.3".parse().unwrap(),
            method: Some(Method::GET),
            target: Some("/cart/add?item=7&token=secret".parse().unwrap()),
            version: Version::HTTP_11,
            status: 200,
            bytes: Some(1234),
            referer: Some(HeaderValue::from_static("https://shop.test/list?sid=abc")),
            user_agent: Some(HeaderValue::from_static("curl/8.0 \"quoted\"")),
            duration: Duration::from_micros(1_250),
            route: Some("app"),
            upstream: Some("http://127.0.0.1:9000"),
            upstream_time: Some(Duration::from_micros(900)),
            session_id: Some(*b"0123456789abcdef0123456789abcdef"),
        }
    }

    #[test]
    fn combined_line_as_nginx_writes_it_without_queries() {
        let mut out = Vec::new();
        combined(&mut out, &entry());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"10.1.2.3 - - [02/Dec/2026:23:38:27 +0000] "GET /cart/add HTTP/1.1" 200 1234 "https://shop.test/list" "curl/8.0 \x22quoted\x22" 0.001"#
        );
    }

    #[test]
    fn addresses_and_seconds_as_display_writes_them() {
        for ip in [
            "10.1.2.3",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "2001:db8::8:800:200c:417a",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
        for (micros, text) in [
            (0, "0.000"),
            (499, "0.000"),
            (500, "0.001"),
            (1_250, "0.001"),
            (999_500, "1.000"),
            (12_345_678, "12.346"),
            (61_000_000, "61.000"),
        ] {
            let mut out = Vec::new();
            push_seconds(&mut out, Duration::from_micros(micros));
            assert_eq!(String::from_utf8(out).unwrap(), text, "{micros} µs");
        }
        for (raw, text) in [
            (&b""[..], ""),
            (b"plain /path", "plain /path"),
            (
                b"\"\\\x01caf\xc3\xa9\x7f\"",
                r#"\x22\x5C\x01caf\xC3\xA9\x7F\x22"#,
            ),
        ] {
            let mut out = Vec::new();
            escaped(&mut out, raw);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }

    #[test]
    fn every_byte_is_escaped_as_nginx_does_and_the_time_follows_the_second() {
        for b in 0..=255u8 {
            let mut out = Vec::new();
            escaped(&mut out, &[b'a', b, b'z']);
            let plain = (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
            let want = match plain {
                true => vec![b'a', b, b'z'],
                false => format!("a\\x{b:02X}z").into_bytes(),
            };
            assert_eq!(out, want, "{b:#x}");
        }
        let at = |secs: u64| {
            let mut out = Vec::new();
            push_time_local(&mut out, SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            String::from_utf8(out).unwrap()
        };
        // One thread's cache, as the request path uses it: the same second,
        // the next one, a minute later, then back.
        assert_eq!(at(1_796_254_707), "02/Dec/2026:23:38:27 +0000");
        assert_eq!(at(1_796_254_707), "02/Dec/2026:23:38:27 +0000");
        assert_eq!(at(1_796_254_708), "02/Dec/2026:23:38:28 +0000");
        assert_eq!(at(1_796_254_768), "02/Dec/2026:23:39:28 +0000");
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(1_796_254_707), "02/Dec/2026:23:38:27 +0000");
        let mut out = Vec::new();
        push_time_local(&mut out, SystemTime::UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(out, b"31/Dec/1969:23:59:59 +0000");
    }

    #[test]
    fn combined_line_with_nothing_known() {
        let mut e = entry();
        e.bytes = None;
        e.referer = None;
        e.user_agent = None;
        e.target = None;
        e.method = Some(Method::from_bytes(b"PROPFIND").unwrap());
        let mut out = Vec::new();
        combined(&mut out, &e);
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with(r#""PROPFIND / HTTP/1.1" 200 - "-" "-" 0.001"#),
            "{line}"
        );
    }

    #[test]
    fn json_line_has_the_extra_fields_and_no_query() {
        let mut out = Vec::new();
        json(&mut out, &entry());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/cart/add");
        assert_eq!(v["remote_addr"], "10.1.2.3");
        assert_eq!(v["http_referer"], "https://shop.test/list");
        assert_eq!(v["route"], "app");
        assert_eq!(v["upstream"], "http://127.0.0.1:9000");
        assert_eq!(v["upstream_ms"], 0.9);
        assert_eq!(v["session_id"], "0123456789abcdef0123456789abcdef");
        assert_eq!(v["status"], 200);
        assert_eq!(v["request_time"], 0.00125);
        assert!(!String::from_utf8_lossy(&out).contains("secret"));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""request_time":0.001250,"#), "{text}");
        assert!(text.contains(r#""upstream_ms":0.900,"#), "{text}");
    }

    #[test]
    fn json_times_are_plain_decimals_however_short() {
        // serde_json writes 0.000005 as 5e-6.
        let mut e = entry();
        e.duration = Duration::from_micros(5);
        e.upstream_time = Some(Duration::from_nanos(1_400));
        let mut out = Vec::new();
        json(&mut out, &e);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""request_time":0.000005,"#), "{text}");
        assert!(text.contains(r#""upstream_ms":0.001,"#), "{text}");
        e.duration = Duration::from_millis(61_250);
        e.upstream_time = None;
        let mut out = Vec::new();
        json(&mut out, &e);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["request_time"], 61.25);
        assert!(v["upstream_ms"].is_null());
        assert_eq!(v.as_object().unwrap().len(), 14, "every field, once");
    }

    /// An access log writing combined lines to `access.log` in a new
    /// directory of its own: (the directory, the file, the log).
    fn file_log(tag: &str) -> (PathBuf, PathBuf, AccessLog) {
        let dir = std::env::temp_dir().join(format!("{tag}{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::start(
            &AccessLogTarget::File(path.clone()),
            AccessLogFormat::Combined,
            Counter::default(),
        )
        .unwrap();
        (dir, path, log)
    }

    #[test]
    fn a_full_batch_drops_and_counts() {
        let dropped = Counter::default();
        // No writer: a batch of one line that nobody takes.
        let shared = Arc::new(Shared::new(1));
        let log = AccessLog {
            handle: Some(Arc::new(Handle {
                shared: shared.clone(),
                format: AccessLogFormat::Combined,
            })),
            dropped: dropped.clone(),
        };
        for _ in 0..5 {
            log.log(&entry());
        }
        assert_eq!(dropped.get(), 4);
        let st = shared.lock();
        assert_eq!(st.lines, 1);
        let mut want = Vec::new();
        combined(&mut want, &entry());
        want.push(b'\n');
        assert_eq!(st.batch, want, "the one line kept, whole");
    }

    #[test]
    fn lines_from_many_threads_are_written_whole_and_a_flush_waits_for_them() {
        let (dir, path, log) = file_log("sg-access-many-");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        log.log(&entry());
                    }
                });
            }
        });
        log.flush();
        let mut want = Vec::new();
        combined(&mut want, &entry());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2000);
        assert!(
            text.lines().all(|l| l.as_bytes() == want),
            "a line was torn"
        );
        // The last handle gone, the writer writes what is left and ends
        // (nothing to wait on but the file).
        log.log(&entry());
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 2001 {
            assert!(
                std::time::Instant::now() < deadline,
                "the last line was lost"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_written_and_reopened() {
        let (dir, path, log) = file_log("sg-access-");
        log.log(&entry());
        log.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.log(&entry());
        log.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
