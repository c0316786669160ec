//! The HTTP/1.1 client side of the upstream exchange, without I/O: the
//! request head as bytes, the response head parsed (by `httparse`, the
//! parser hyper uses), how the response body is framed (RFC 9112 6.3), and
//! the chunked decoder. [`super::upstream`] drives it over the pooled
//! connections.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use http::{Method, StatusCode, Version};

/// A response head larger than this is refused (hyper's default buffer
/// limit is about 400 KB; nginx's `proxy_buffer_size` is 4-8 KB).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers accepted in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk (they are dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an upstream's response could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid response head: {0}")]
    Head(httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid status code {0}")]
    Status(u16),
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("invalid chunked framing: {0}")]
    Chunked(&'static str),
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    /// Anything but one final `chunked`: the proxy decodes no other coding
    /// and will not pass coded bytes on as if they were the content.
    #[error("unsupported response Transfer-Encoding {0:?} (only chunked is supported)")]
    TransferCoding(String),
}

/// How the request body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFraming {
    /// No body, and no framing header added.
    None,
    /// `Content-Length` (set to this value).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes the request head: request line, `Host`, the client's fields as
/// given (names in lower case, as hyper sends them; its own `Host` and,
/// when the proxy frames the body, `Content-Length` left out), the fields
/// the proxy adds (already in wire form), then the framing field.
pub fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    host: &[u8],
    headers: &HeaderMap,
    added: &[u8],
    framing: SendFraming,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == HOST || (framing != SendFraming::None && name == CONTENT_LENGTH) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(added);
    match framing {
        SendFraming::None => {}
        SendFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        SendFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// One chunk of a chunked request body: size line, data, CRLF.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    let mut n = data.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// `n` in decimal, written at the end of `buf`.
pub(crate) fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A parsed response head, without its hop-by-hop fields: what they say
/// about the connection and the framing is kept aside.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// The upstream's reason phrase when it is not the status's own
    /// (`499 Client Closed`, `200 Fine`), passed on as nginx passes it.
    pub reason: Option<hyper::ext::ReasonPhrase>,
    /// The end-to-end fields. `Connection` is kept only when it nominates
    /// other fields (for the caller's hop-by-hop removal).
    pub headers: HeaderMap,
    /// `Connection: close` was sent.
    close: bool,
    /// `Transfer-Encoding: chunked` was sent (any other coding is refused).
    chunked: bool,
    /// The `Content-Length`, checked (all values agree).
    content_length: Option<u64>,
}

/// Where a field sits in the head's bytes.
#[derive(Clone, Copy)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

/// Parses a complete response head off the front of `buf`, or returns
/// `None` when more bytes are needed. Header values share the bytes read.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ProtocolError> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    // Filled up to the head's count, never zeroed whole (an array would
    // be 1.6 KB cleared for every response).
    let mut spans: smallvec::SmallVec<[Span; MAX_HEADERS]> = smallvec::SmallVec::new();
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut r, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(ProtocolError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ProtocolError::Head(e)),
    };
    if len > MAX_HEAD {
        return Err(ProtocolError::HeadTooLarge);
    }
    let code = r.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| ProtocolError::Status(code))?;
    let reason = match (code, r.reason.unwrap_or("")) {
        // An empty phrase (or one httparse could not read as text, which
        // it gives as empty) gets the standard one, not a bare `404 `.
        (200, "OK") | (_, "") => None,
        (_, reason) => match status.canonical_reason() {
            Some(own) if own == reason => None,
            _ => hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok(),
        },
    };
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Offsets now, so the values can be slices of the frozen head below
    // rather than copies.
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
    let count = r.headers.len();
    spans.extend(r.headers.iter().map(|h| Span {
        name: at(h.name.as_bytes()),
        value: at(h.value),
    }));
    let bytes = buf.split_to(len).freeze();
    let slice = |(at, len): (u32, u32)| &bytes[at as usize..(at + len) as usize];

    let mut head = Head {
        status,
        version,
        reason,
        // Room for what the proxy adds (Vary, Set-Cookie, Cache-Control)
        // without growing the map.
        headers: HeaderMap::with_capacity(count + 4),
        close: false,
        chunked: false,
        content_length: None,
    };
    // Codings named across every Transfer-Encoding field (empty list
    // elements are allowed, RFC 9110 5.6.1), and whether the only one is
    // chunked.
    let mut codings = 0usize;
    for span in &spans {
        let name = HeaderName::from_bytes(slice(span.name))
            .map_err(|_| ProtocolError::Head(httparse::Error::HeaderName))?;
        let raw = slice(span.value);
        match name.as_str() {
            "connection" => {
                let mut nominates = false;
                for t in raw.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if t.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                        nominates = true;
                    }
                }
                if !nominates {
                    continue;
                }
            }
            "transfer-encoding" => {
                for c in raw
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|c| !c.is_empty())
                {
                    codings += 1;
                    head.chunked = codings == 1 && c.eq_ignore_ascii_case(b"chunked");
                }
                // A field naming no coding still says the body is coded.
                codings = codings.max(1);
                continue;
            }
            "content-length" => {
                let n = content_length(raw)?;
                let repeated = head.content_length.is_some();
                if head.content_length.is_some_and(|f| f != n) {
                    return Err(ProtocolError::ContentLength);
                }
                head.content_length = Some(n);
                // One field with the number, whatever list or repetition
                // of it the upstream sent (the usual plain number is kept
                // as it came, without a copy).
                if repeated {
                    continue;
                }
                if raw.contains(&b',') {
                    head.headers.append(CONTENT_LENGTH, HeaderValue::from(n));
                    continue;
                }
            }
            // `Connection` and `Transfer-Encoding` are handled above.
            n if super::headers::is_hop_by_hop_name(n) => continue,
            _ => {}
        }
        let value = HeaderValue::from_maybe_shared(
            bytes.slice(span.value.0 as usize..(span.value.0 + span.value.1) as usize),
        )
        .map_err(|_| ProtocolError::Head(httparse::Error::HeaderValue))?;
        head.headers.append(name, value);
    }
    if codings > 0 {
        // RFC 9112 6.1: the framing of such a message is faulty.
        if head.version == Version::HTTP_10 {
            return Err(ProtocolError::TransferEncodingInHttp10);
        }
        if codings > 1 || !head.chunked {
            return Err(transfer_coding_error(&bytes, &spans));
        }
    }
    Ok(Some(head))
}

/// The error naming every `Transfer-Encoding` value of a refused head
/// (shortened: it ends up in a log line and an error body).
fn transfer_coding_error(bytes: &Bytes, spans: &[Span]) -> ProtocolError {
    let mut all = String::new();
    for s in spans {
        let name = &bytes[s.name.0 as usize..(s.name.0 + s.name.1) as usize];
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let value = &bytes[s.value.0 as usize..(s.value.0 + s.value.1) as usize];
            if !all.is_empty() {
                all.push_str(", ");
            }
            all.push_str(&String::from_utf8_lossy(value));
        }
    }
    if let Some((i, _)) = all.char_indices().nth(64) {
        all.truncate(i);
        all.push_str("...");
    }
    ProtocolError::TransferCoding(all)
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` bytes (0: no body).
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// The body framing of a response to `method` (RFC 9112 6.3), and whether
/// the connection can carry another request afterwards. A response with
/// both `Transfer-Encoding` and `Content-Length` loses the latter.
pub fn response_framing(method: &Method, head: &mut Head) -> (Framing, bool) {
    let reusable = head.version == Version::HTTP_11 && !head.close;
    let status = head.status.as_u16();
    if method == Method::HEAD || (100..200).contains(&status) || status == 204 || status == 304 {
        return (Framing::Length(0), reusable);
    }
    match (head.chunked, head.content_length) {
        (true, length) => {
            let mut reusable = reusable;
            if length.is_some() {
                head.headers.remove(CONTENT_LENGTH);
                reusable = false;
            }
            (Framing::Chunked, reusable)
        }
        (false, Some(n)) => (Framing::Length(n), reusable),
        (false, None) => (Framing::Close, false),
    }
}

/// One `Content-Length` field value: a decimal number, or a list of the
/// same one.
fn content_length(v: &[u8]) -> Result<u64, ProtocolError> {
    let mut found: Option<u64> = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(ProtocolError::ContentLength);
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err(ProtocolError::ContentLength);
        }
        found = Some(n);
    }
    found.ok_or(ProtocolError::ContentLength)
}

/// Decodes a chunked body from a buffer that fills up over time.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
    trailers: Option<HeaderMap>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The last chunk and the trailer section have been read, with the
    /// trailer fields that may be passed on.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

impl ChunkedDecoder {
    /// Consumes framing from `buf` and returns the next piece of data, the
    /// end, or that more input is needed. Trailer fields are dropped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let nl = buf.iter().position(|&b| b == b'\n');
                    if nl.unwrap_or(buf.len()) > MAX_CHUNK_LINE {
                        return Err(ProtocolError::Chunked("chunk-size line too long"));
                    }
                    let Some(nl) = nl else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&buf[..nl])?;
                    buf.advance(nl + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = left.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    self.state = if take == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ProtocolError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                        if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                            return Err(ProtocolError::Chunked("trailer section too large"));
                        }
                        return Ok(Decoded::More);
                    };
                    // The size first: the same error whether the line
                    // arrived whole or its start alone went over the limit.
                    self.trailer_bytes += nl + 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(ProtocolError::Chunked("trailer section too large"));
                    }
                    if nl == 0 || buf[nl - 1] != b'\r' {
                        return Err(ProtocolError::Chunked("bare LF in the trailer section"));
                    }
                    if nl == 1 {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Decoded::End(self.trailers.take()));
                    }
                    let line = buf.split_to(nl + 1);
                    self.trailer_field(&line[..nl - 1])?;
                }
                ChunkState::Done => return Ok(Decoded::End(None)),
            }
        }
    }
}

impl ChunkedDecoder {
    /// Keeps one trailer field unless it is about the message's framing,
    /// routing or the connection (RFC 9110 6.5.1), a session directive, or
    /// a cookie: those never reach the client from a trailer.
    fn trailer_field(&mut self, line: &[u8]) -> Result<(), ProtocolError> {
        let invalid = ProtocolError::Chunked("invalid trailer field");
        let at = line.iter().position(|&b| b == b':').ok_or(invalid)?;
        let name = HeaderName::from_bytes(&line[..at])
            .map_err(|_| ProtocolError::Chunked("invalid trailer field name"))?;
        let value = HeaderValue::from_bytes(line[at + 1..].trim_ascii())
            .map_err(|_| ProtocolError::Chunked("invalid trailer field value"))?;
        let dropped = super::headers::is_hop_by_hop(&name)
            || crate::session::headers::is_reserved(&name)
            || matches!(
                name.as_str(),
                "content-length" | "host" | "set-cookie" | "content-encoding" | "content-type"
            );
        if !dropped {
            self.trailers
                .get_or_insert_with(HeaderMap::new)
                .append(name, value);
        }
        Ok(())
    }
}

/// `chunk-size [ chunk-ext ] CRLF`, given the line up to its LF.
fn chunk_size(line: &[u8]) -> Result<u64, ProtocolError> {
    let Some((&b'\r', line)) = line.split_last() else {
        return Err(ProtocolError::Chunked("chunk-size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Leading zeros do not count towards the 16 digits a u64 holds.
    let zeros = line[..digits].iter().take_while(|&&b| b == b'0').count();
    if digits == 0 || digits - zeros > 16 {
        return Err(ProtocolError::Chunked("invalid chunk size"));
    }
    // Only spaces and tabs (BWS) before an extension.
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(ProtocolError::Chunked("invalid chunk size"));
    }
    Ok(line[zeros..digits].iter().fold(0u64, |n, &d| {
        (n << 4) | u64::from((d as char).to_digit(16).expect("a hex digit"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, ProtocolError> {
        parse_head(&mut BytesMut::from(raw))
    }

    #[test]
    fn request_head_has_the_target_headers_and_framing() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("client.example"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("content-length", HeaderValue::from_static("99"));
        let added = b"x-session: {}\r\n";
        let mut out = Vec::new();
        let post = Method::POST;
        encode_head(
            &mut out,
            &post,
            "/p?q",
            b"up:8080",
            &h,
            added,
            SendFraming::Length(5),
        );
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /p?q HTTP/1.1\r\nhost: up:8080\r\nx-a: 1\r\nx-a: 2\r\n\
             x-session: {}\r\ncontent-length: 5\r\n\r\n"
        );
        encode_head(
            &mut out,
            &Method::GET,
            "/",
            b"up",
            &h,
            b"",
            SendFraming::None,
        );
        assert!(String::from_utf8(out.clone())
            .unwrap()
            .ends_with("content-length: 99\r\n\r\n"));
        h.remove("content-length");
        encode_head(
            &mut out,
            &Method::PUT,
            "/",
            b"up",
            &h,
            b"",
            SendFraming::Chunked,
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("x-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"));
        let mut c = Vec::new();
        encode_chunk(&mut c, &[b'x'; 26]);
        assert_eq!(&c[..4], b"1a\r\n");
        assert!(c.ends_with(b"x\r\n"));
    }

    #[test]
    fn response_head_needs_all_of_it_and_keeps_the_rest() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nokNEXT";
        for cut in 0..raw.len() - 6 {
            assert!(head(&raw[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let mut buf = BytesMut::from(raw);
        let h = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.version, Version::HTTP_11);
        let xa: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        assert_eq!(&buf[..], b"okNEXT");
    }

    #[test]
    fn broken_response_heads_are_errors() {
        assert!(head("garbage\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nbad header\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 099 Low\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n").is_err());
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(head(&huge), Err(ProtocolError::HeadTooLarge)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).is_err());
    }

    #[test]
    fn hop_by_hop_fields_are_left_out_of_the_head() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                   Transfer-Encoding: chunked\r\nTrailer: X\r\nUpgrade: h2c\r\nX-Kept: 1\r\n\r\n";
        let h = head(raw).unwrap().unwrap();
        let names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        let raw = "HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nX-Private: 1\r\n\r\n";
        let h = head(raw).unwrap().unwrap();
        assert_eq!(
            h.headers["connection"], "close, X-Private",
            "kept: it nominates a field"
        );
        assert!(h.close);
    }

    fn framing(method: Method, raw: &str) -> Result<(Framing, bool), ProtocolError> {
        let mut h = head(raw)?.expect("a complete head");
        Ok(response_framing(&method, &mut h))
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        let g = Method::GET;
        let cases: &[(&Method, &str, (Framing, bool))] = &[
            (
                &g,
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
                (Length(12), true),
            ),
            (
                &g,
                "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
                (Length(3), true),
            ),
            (
                &g,
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
                (Length(3), false),
            ),
            (
                &g,
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
                (Length(3), false),
            ),
            (&g, "HTTP/1.1 200 OK\r\n\r\n", (Close, false)),
            (
                &g,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                (Chunked, true),
            ),
            (
                &g,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                (Chunked, false),
            ),
            (
                &g,
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                (Length(0), true),
            ),
            (
                &g,
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                (Length(0), true),
            ),
            (
                &Method::HEAD,
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                (Length(0), true),
            ),
        ];
        for (m, raw, want) in cases {
            assert_eq!(framing((*m).clone(), raw).unwrap(), *want, "{raw:?}");
        }
        for bad in ["5, 6", "-1", "0x5", "", "1 2", "99999999999999999999"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(framing(Method::GET, &raw).is_err(), "{bad:?}");
        }
        let two = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(framing(Method::GET, two).is_err());
    }

    /// Feeds `raw` to a decoder `step` bytes at a time; returns the data and
    /// whatever followed the body.
    fn dechunk(raw: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ProtocolError> {
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::End(_) => {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&raw[fed..]);
                    return Ok((out, rest));
                }
                Decoded::More if fed < raw.len() => {
                    let end = (fed + step).min(raw.len());
                    buf.extend_from_slice(&raw[fed..end]);
                    fed = end;
                }
                Decoded::More => return Err(ProtocolError::Chunked("ran out of input")),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let raw = b"5\r\nhello\r\n1A;name=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0 ; last\r\nX-Trailer: 1\r\n\r\nNEXT";
        for step in 1..raw.len() {
            let (data, rest) = dechunk(raw, step).unwrap();
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[test]
    fn trailer_fields_are_kept_unless_they_are_about_framing_or_the_session() {
        let raw = b"1\r\na\r\n0\r\nGrpc-Status: 0\r\nContent-Length: 9\r\n\
                    X-Session-Update: {}\r\nSet-Cookie: a=b\r\nX-Checksum:  abc \r\n\r\n";
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&raw[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"a"))
        );
        let Decoded::End(Some(t)) = d.decode(&mut buf).unwrap() else {
            panic!("trailers expected")
        };
        let kept: Vec<_> = t
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
            .collect();
        assert_eq!(kept, ["grpc-status=0", "x-checksum=abc"]);
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"0\r\nno colon\r\n\r\n"[..]);
        assert!(d.decode(&mut buf).is_err());
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        for bad in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX: 1\n\r\n",
            // Only spaces and tabs may come between the size and `;`.
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                dechunk(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(
            dechunk(long.as_bytes(), 1 << 20).is_err(),
            "line and LF in one read"
        );
        assert!(
            dechunk(long.as_bytes(), 64).is_err(),
            "line over several reads"
        );
        // A trailer line over the limit that ends in a bare LF: the same
        // error whether it arrives at once or in pieces.
        let trailer = format!("0\r\nx: {}\n\r\n", "v".repeat(MAX_TRAILERS));
        for step in [1 << 20, 1000] {
            match dechunk(trailer.as_bytes(), step) {
                Err(ProtocolError::Chunked(m)) => assert_eq!(m, "trailer section too large"),
                other => panic!("{step}: {other:?}"),
            }
        }
    }

    #[test]
    fn chunk_sizes_allow_what_rfc_9112_allows() {
        for (raw, want) in [
            (&b"00000000000000000005\r\nhello\r\n0\r\n\r\n"[..], "hello"),
            (b"5 \t;ext=\"v\"\r\nhello\r\n0\r\n\r\n", "hello"),
            (b"5\r\nhello\r\n000\r\n\r\n", "hello"),
        ] {
            let (out, _) = dechunk(raw, 3).unwrap();
            assert_eq!(out, want.as_bytes(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn framing_fields_are_read_as_lists() {
        let te = |v: &str| {
            head(&format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: {v}\r\n\r\n"
            ))
            .map(|h| h.unwrap().chunked)
        };
        assert!(te("chunked,").unwrap());
        assert!(te(" , Chunked ,").unwrap());
        let refused = |raw: &str| match head(raw) {
            Err(ProtocolError::TransferCoding(v)) => v,
            other => panic!("{raw:?}: {other:?}"),
        };
        for v in [
            "gzip, chunked",
            "chunked, chunked",
            "chunked, gzip",
            "identity",
            "gzip",
            ",",
            "",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {v}\r\n\r\n");
            assert_eq!(refused(&raw), v);
        }
        assert_eq!(
            refused(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            "gzip, chunked"
        );
        assert_eq!(
            refused("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "chunked, chunked"
        );
        let long = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: {}\r\n\r\n",
            "x".repeat(500)
        );
        assert_eq!(refused(&long).len(), 67, "shortened");
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.content_length, Some(7));
        let all: Vec<_> = h.headers.get_all(CONTENT_LENGTH).iter().collect();
        assert_eq!(all, ["7"], "one field with the number");
        assert!(matches!(
            head("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ProtocolError::TransferEncodingInHttp10)
        ));
    }

    /// A small deterministic generator (xorshift64), so the property tests
    /// below need no extra crate and fail the same way on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// `bytes` with one to three bytes replaced at random.
        fn mutate(&mut self, bytes: &[u8]) -> Vec<u8> {
            let mut out = bytes.to_vec();
            for _ in 0..1 + self.below(3) {
                let i = self.below(out.len());
                out[i] = self.next() as u8;
            }
            out
        }
    }

    #[test]
    fn chunked_decoding_does_not_depend_on_how_the_bytes_arrive() {
        let mut rng = Rng(0x5e55_1096_a7e0_0001);
        for case in 0..3000 {
            let mut raw = Vec::new();
            let mut want = Vec::new();
            for _ in 0..rng.below(5) {
                let n = 1 + rng.below(40);
                let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                let size = match rng.below(3) {
                    0 => format!("{n:x}"),
                    1 => format!("{n:04X}"),
                    _ => format!("{n:x} ;ext=\"v\""),
                };
                raw.extend_from_slice(size.as_bytes());
                raw.extend_from_slice(b"\r\n");
                raw.extend_from_slice(&data);
                raw.extend_from_slice(b"\r\n");
                want.extend_from_slice(&data);
            }
            raw.extend_from_slice(b"0\r\n");
            if rng.below(2) == 0 {
                raw.extend_from_slice(b"X-Trailer: 1\r\n");
            }
            raw.extend_from_slice(b"\r\nNEXT");
            let step = 1 + rng.below(raw.len());
            assert_eq!(
                dechunk(&raw, step).unwrap(),
                (want, b"NEXT".to_vec()),
                "case {case}, step {step}"
            );
            // Damaged framing: never a panic, and the same outcome whether
            // it arrives whole or in pieces.
            let bad = rng.mutate(&raw);
            let step = 1 + rng.below(bad.len());
            let whole = dechunk(&bad, bad.len());
            let split = dechunk(&bad, step);
            match (&whole, &split) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "case {case}, step {step}"),
                (Err(_), Err(_)) => {}
                _ => panic!("case {case}, step {step}: whole {whole:?}, split {split:?}"),
            }
        }
    }

    #[test]
    fn a_response_head_is_never_refused_for_arriving_in_pieces() {
        let fields = [
            "Content-Length: 12",
            "Transfer-Encoding: chunked",
            "Connection: keep-alive",
            "Connection: close, x-hop",
            "X-Hop: 1",
            "Date: Sun, 29 Nov 2026 16:00:00 GMT",
            "Set-Cookie: a=b; Path=/",
            "X-Session-Update: {\"n\": 1}",
            "X-Empty:",
            "x-folded-ok:  spaced value ",
        ];
        let mut rng = Rng(0x4ead_0000_0000_0001);
        for case in 0..3000 {
            let mut raw = String::from(match rng.below(3) {
                0 => "HTTP/1.1 200 OK\r\n",
                1 => "HTTP/1.0 404 Not Found\r\n",
                _ => "HTTP/1.1 204 \r\n",
            });
            for _ in 0..rng.below(6) {
                raw.push_str(fields[rng.below(fields.len())]);
                raw.push_str("\r\n");
            }
            raw.push_str("\r\n");
            let raw = if rng.below(2) == 0 {
                raw.into_bytes()
            } else {
                rng.mutate(raw.as_bytes())
            };
            // Whatever the bytes, no panic; when the whole head parses,
            // every shorter prefix asks for more instead of failing.
            let whole = parse_head(&mut BytesMut::from(&raw[..]));
            if let Ok(Some(_)) = whole {
                for cut in 0..raw.len() {
                    let part = parse_head(&mut BytesMut::from(&raw[..cut]));
                    assert!(
                        matches!(part, Ok(None)),
                        "case {case}: prefix of {cut} bytes gave {part:?} for {:?}",
                        String::from_utf8_lossy(&raw)
                    );
                }
            }
        }
    }
}
