//! The properties the fuzz targets check (`fuzz/fuzz_targets/*.rs`), one
//! function per target, public so that `tests/fuzz_corpora.rs` replays the
//! committed corpora through the same checks on a stable toolchain.
//!
//! Every function takes the fuzzer's bytes, never panics on any input of
//! its own accord, and panics (failing the target or the test) when the
//! property it names does not hold. Not part of the supported API.

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, COOKIE};
use http::{Method, StatusCode};
use serde_json::{Map, Value};

use crate::proxy::h1::{self, ChunkedDecoder, Decoded, Framing, ProtocolError};
use crate::proxy::path;
use crate::session::{cookie, json, Expiry, Patch, Record, SessionKey, Stamp};
use crate::store::signed::{self, SignedCookies};

/// Cuts `data` into pieces whose lengths cycle through `sizes` (each at
/// least 1), the way bytes may arrive from a socket.
fn pieces<'a>(data: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = data;
    let mut i = 0usize;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = match sizes.get(i % sizes.len().max(1)) {
            Some(&s) => usize::from(s) + 1,
            None => rest.len(),
        };
        i += 1;
        let (a, b) = rest.split_at(n.min(rest.len()));
        rest = b;
        Some(a)
    })
}

/// Splits the control bytes off the front: the first byte says how many
/// follow (at most 7).
fn control(data: &[u8]) -> (&[u8], &[u8]) {
    match data.split_first() {
        Some((&n, rest)) => rest.split_at(usize::from(n % 8).min(rest.len())),
        None => (&[], &[]),
    }
}

// ---------------------------------------------------------------------------
// The upstream response head

/// A head's status and fields, and its framing when it is a final head.
type ParsedHead = (StatusCode, HeaderMap, Option<(Framing, bool)>);

/// What the proxy makes of the response heads at the front of a buffer:
/// each head (informational ones included) with its framing, then the
/// outcome and the bytes left over.
#[derive(Debug, PartialEq)]
struct Heads {
    heads: Vec<ParsedHead>,
    end: Result<bool, String>,
}

/// Parses heads as `upstream.rs` does: informational heads are skipped,
/// `101` ends the exchange, the first final head ends the parse.
fn parse_heads(buf: &mut BytesMut, method: &Method, out: &mut Heads) -> bool {
    loop {
        if buf.is_empty() {
            return false;
        }
        match h1::parse_head(buf) {
            Ok(None) => return false,
            Err(e) => {
                out.end = Err(error_kind(&e));
                return true;
            }
            Ok(Some(mut head)) => {
                check_head(&head);
                let informational = head.status.is_informational();
                let framing = (!informational).then(|| h1::response_framing(method, &mut head));
                if let Some((f, reusable)) = framing {
                    check_framing(&head, method, f, reusable);
                }
                out.heads.push((head.status, head.headers, framing));
                if !informational || head.status == StatusCode::SWITCHING_PROTOCOLS {
                    out.end = Ok(true);
                    return true;
                }
            }
        }
    }
}

/// Errors compared between two ways of feeding the same bytes: "too large"
/// depends on how much was buffered when the parser gave up, so it is only
/// compared as being an error.
fn error_kind(e: &ProtocolError) -> String {
    match e {
        ProtocolError::HeadTooLarge => "an error".into(),
        e => e.to_string(),
    }
}

fn check_head(head: &h1::Head) {
    for name in [
        "transfer-encoding",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert!(
            !head.headers.contains_key(name),
            "hop-by-hop {name} kept: {head:?}"
        );
    }
    for v in head.headers.get_all(http::header::CONNECTION) {
        let nominates = v.as_bytes().split(|&b| b == b',').any(|t| {
            let t = t.trim_ascii();
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
        });
        assert!(nominates, "Connection kept without nominating a field");
    }
    let lengths: Vec<_> = head.headers.get_all(CONTENT_LENGTH).iter().collect();
    assert!(lengths.len() <= 1, "more than one Content-Length kept");
    if let Some(v) = lengths.first() {
        let digits = v.as_bytes().trim_ascii();
        assert!(
            !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
            "Content-Length kept as {v:?}"
        );
    }
}

fn check_framing(head: &h1::Head, method: &Method, f: Framing, reusable: bool) {
    let bodiless = method == Method::HEAD
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    if bodiless {
        assert_eq!(f, Framing::Length(0), "a response without a body");
    }
    if reusable {
        assert_eq!(head.version, http::Version::HTTP_11, "reusable HTTP/1.0");
        assert_ne!(f, Framing::Close, "a close-delimited body is not reusable");
    }
    match f {
        Framing::Chunked => assert!(
            !head.headers.contains_key(CONTENT_LENGTH),
            "Content-Length kept beside chunked"
        ),
        Framing::Length(n) if !bodiless => {
            let v = head.headers.get(CONTENT_LENGTH).expect("the length field");
            assert_eq!(v.to_str().ok().and_then(|s| s.trim().parse().ok()), Some(n));
        }
        _ => {}
    }
}

/// Target `response_head`: byte 0 picks the method and how many split
/// sizes follow. The heads parsed from the whole input and from the same
/// input arriving in pieces are the same (status, fields, framing, error,
/// bytes left over), and every parsed head is free of hop-by-hop fields and
/// consistent with its framing.
pub fn response_head(data: &[u8]) {
    let method = match data.first() {
        Some(b) if b & 0x80 != 0 => Method::HEAD,
        _ => Method::GET,
    };
    let (sizes, input) = control(data);

    let mut whole = Heads {
        heads: Vec::new(),
        end: Ok(false),
    };
    let mut buf = BytesMut::from(input);
    parse_heads(&mut buf, &method, &mut whole);
    let whole_rest = buf;

    let mut split = Heads {
        heads: Vec::new(),
        end: Ok(false),
    };
    let mut buf = BytesMut::new();
    let mut done = false;
    for piece in pieces(input, sizes) {
        buf.extend_from_slice(piece);
        if !done {
            done = parse_heads(&mut buf, &method, &mut split);
        }
    }
    assert_eq!(whole, split, "whole input against pieces {sizes:?}");
    if whole.end == Ok(true) {
        assert_eq!(whole_rest, buf, "bytes after the head");
    }
}

// ---------------------------------------------------------------------------
// The chunked decoder

/// Decoded data, trailers, and the outcome (`Ok(true)`: ended; `Ok(false)`:
/// more input needed).
type Dechunked = (Vec<u8>, Option<HeaderMap>, Result<bool, String>);

fn dechunk(d: &mut ChunkedDecoder, buf: &mut BytesMut, out: &mut Dechunked) -> bool {
    loop {
        match d.decode(buf) {
            Ok(Decoded::Data(b)) => {
                assert!(!b.is_empty(), "an empty data piece");
                out.0.extend_from_slice(&b);
            }
            Ok(Decoded::End(t)) => {
                out.1 = t;
                out.2 = Ok(true);
                return true;
            }
            Ok(Decoded::More) => return false,
            Err(e) => {
                out.2 = Err(e.to_string());
                return true;
            }
        }
    }
}

/// Target `chunked`: byte 0 says how many split sizes follow. Decoding the
/// whole body in one go and in pieces gives the same data, trailers, error
/// and leftover bytes; trailers never carry framing or session fields.
pub fn chunked(data: &[u8]) {
    let (sizes, input) = control(data);
    let mut whole: Dechunked = (Vec::new(), None, Ok(false));
    let mut d = ChunkedDecoder::default();
    let mut buf = BytesMut::from(input);
    dechunk(&mut d, &mut buf, &mut whole);
    let whole_rest = buf;

    let mut split: Dechunked = (Vec::new(), None, Ok(false));
    let mut d = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut done = false;
    for piece in pieces(input, sizes) {
        buf.extend_from_slice(piece);
        if !done {
            done = dechunk(&mut d, &mut buf, &mut split);
        }
    }
    assert_eq!(whole, split, "whole input against pieces {sizes:?}");
    if whole.2 == Ok(true) {
        assert_eq!(whole_rest, buf, "bytes after the body");
    }
    if let Some(t) = &whole.1 {
        for name in t.keys() {
            let n = name.as_str();
            assert!(
                !crate::proxy::headers::is_hop_by_hop(name)
                    && !crate::session::headers::is_reserved(name)
                    && !matches!(n, "content-length" | "set-cookie" | "host"),
                "trailer {n} passed on"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Path normalisation

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The segments of `path` (after its first `/`) with escapes of unreserved
/// characters decoded and the others upper-cased, byte for byte otherwise;
/// `None` for a bad escape.
fn reference_segments(path: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for seg in path[1..].split(|&b| b == b'/') {
        let mut s = Vec::with_capacity(seg.len());
        let mut i = 0;
        while i < seg.len() {
            if seg[i] != b'%' {
                s.push(seg[i]);
                i += 1;
                continue;
            }
            let h = hex(*seg.get(i + 1)?)?;
            let l = hex(*seg.get(i + 2)?)?;
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                s.push(c);
            } else {
                s.extend_from_slice(format!("%{c:02X}").as_bytes());
            }
            i += 3;
        }
        out.push(s);
    }
    Some(out)
}

/// Target `path`: the input as a path (lossy UTF-8). Normalisation never
/// panics, is idempotent, leaves no `.`/`..` segment, empty segment or
/// escape of an unreserved character, and keeps every other byte: the
/// result's segments are the input's (decoded) segments with dot segments
/// resolved, and exactly them when there was none to resolve.
pub fn path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let p: &str = &text;
    let out = match path::normalize(p) {
        Ok(out) => out,
        Err(path::PathError::NotAbsolute) => {
            assert!(!p.starts_with('/'));
            return;
        }
        Err(e) => {
            assert!(p.starts_with('/'));
            let reference = reference_segments(p.as_bytes());
            match e {
                path::PathError::BadEscape => assert!(reference.is_none(), "{p:?}"),
                _ => assert!(reference.is_some(), "{p:?}: {e}"),
            }
            return;
        }
    };
    let o = out.as_bytes();
    assert!(o.starts_with(b"/"), "{p:?} -> {out:?}");
    assert!(!out.contains("//"), "{p:?} -> {out:?}");
    let segs: Vec<&[u8]> = o[1..].split(|&b| b == b'/').collect();
    let (last, inner) = segs.split_last().expect("one segment at least");
    for s in inner {
        assert!(
            !s.is_empty() && *s != b"." && *s != b"..",
            "{p:?} -> {out:?}"
        );
    }
    assert!(*last != b"." && *last != b"..", "{p:?} -> {out:?}");
    // Escapes left are of reserved bytes, upper-case.
    let mut i = 0;
    while let Some(at) = o[i..].iter().position(|&b| b == b'%') {
        let at = i + at;
        let (h, l) = (o[at + 1], o[at + 2]);
        assert!(h.is_ascii_digit() || h.is_ascii_uppercase(), "{out:?}");
        assert!(l.is_ascii_digit() || l.is_ascii_uppercase(), "{out:?}");
        let c = hex(h).unwrap() * 16 + hex(l).unwrap();
        assert!(
            !(c.is_ascii_alphanumeric() || b"-._~".contains(&c)),
            "{out:?}"
        );
        i = at + 3;
    }
    // Idempotent.
    let again = path::normalize(&out).expect("a normal path is valid");
    assert_eq!(again, out, "normalising twice");
    // Bytes kept: the result's segments, in order, are the input's.
    let input = reference_segments(p.as_bytes()).expect("valid escapes");
    let kept: Vec<&[u8]> = segs.iter().copied().filter(|s| !s.is_empty()).collect();
    let mut stack: Vec<&[u8]> = Vec::new();
    for s in &input {
        match s.as_slice() {
            b"" | b"." => {}
            b".." => {
                stack
                    .pop()
                    .expect("Ok only when nothing climbs above the root");
            }
            s => stack.push(s),
        }
    }
    assert_eq!(kept, stack, "{p:?} -> {out:?}");
    // The path routes are chosen on: no encoded slash, normal (so no
    // `//` or dot segment an encoded slash could have made), and the same
    // path when there was no encoded slash.
    match path::for_routing(&out) {
        Ok(r) => {
            assert!(!r.contains("%2F"), "{out:?} -> {r:?}");
            assert_eq!(path::normalize(&r).expect("normal"), r, "{out:?}");
            if !out.contains("%2F") {
                assert_eq!(r, out);
            }
        }
        Err(e) => {
            assert!(out.contains("%2F"), "{out:?}: {e}");
            assert_eq!(e, path::PathError::EncodedDotSegment, "{out:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Session directives

const DIRECTIVES: [&str; 10] = [
    "x-session-update",
    "x-session-delete",
    "x-session-replace",
    "x-session-clear",
    "x-session-flush",
    "x-session-cycle-key",
    "x-session-expiry",
    "x-session-id",
    "x-session-logout-others",
    "x-session-logout-user",
];

/// A `X-Session-Logout-User` value as the user it names, by the rule of
/// SPEC 9: a JSON string (its text) or a JSON number (its JSON text);
/// `None` for anything else.
fn reference_user(v: &HeaderValue) -> Option<String> {
    let t = std::str::from_utf8(v.as_bytes()).ok()?.trim();
    match serde_json::from_str::<Value>(t).ok()? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Response headers from lines: the first byte of a line picks a directive
/// name, the rest is the value (lines that are not valid values are left
/// out).
fn directive_headers(data: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&pick, value)) = line.split_first() else {
            continue;
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(
                HeaderName::from_static(DIRECTIVES[usize::from(pick) % DIRECTIVES.len()]),
                v,
            );
        }
    }
    h
}

/// Target `directives`: parsing never panics, errors are one line naming
/// the header, a patch is empty when no directive was sent, and
/// applying a patch twice gives what applying it once does (a retried write
/// lands the same). The user directives: `X-Session-Logout-User` values
/// are accepted exactly when each is a JSON string or number, and give the
/// users in header order; an error about one names that header;
/// `X-Session-Logout-Others` alone is never taken for a data change.
pub fn directives(data: &[u8]) {
    let (seed, lines) = data.split_at(data.len().min(1));
    let headers = directive_headers(lines);
    let sent = headers
        .keys()
        .any(|k| k.as_str() != "x-session-id" && DIRECTIVES.contains(&k.as_str()));
    let users: Vec<Option<String>> = headers
        .get_all("x-session-logout-user")
        .iter()
        .map(reference_user)
        .collect();
    let only_users = headers
        .keys()
        .all(|k| k.as_str() == "x-session-logout-user");
    match Patch::parse(&headers) {
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
            assert!(msg.starts_with("X-Session-"), "{msg:?}");
            if msg.starts_with("X-Session-Logout-User:") {
                assert!(users.iter().any(Option::is_none), "{msg:?}: {users:?}");
            }
            if only_users {
                assert!(msg.starts_with("X-Session-Logout-User:"), "{msg:?}");
            }
        }
        Ok(p) => {
            assert!(sent || p.is_empty(), "{p:?}");
            let want: Option<Vec<String>> = users.into_iter().collect();
            assert_eq!(Some(&p.logout_users), want.as_ref(), "users named");
            assert_eq!(
                p.ends_sessions(),
                p.logout_others || !p.logout_users.is_empty()
            );
            if p.ends_sessions() {
                assert!(!p.is_empty(), "{p:?}");
            }
            if !p.touches_data() {
                let mut d: Map<String, Value> = Map::new();
                d.insert("k".into(), Value::from(1));
                let before = d.clone();
                let mut ex = Expiry::Default;
                p.apply_data(&mut d, &mut ex);
                assert_eq!(d, before, "a patch that touches no data changed it");
            }
            let mut data: Map<String, Value> = Map::new();
            for (i, k) in ["a", "b", "user_id", ""].iter().enumerate() {
                if seed.first().is_some_and(|s| s & (1 << i) != 0) {
                    data.insert((*k).into(), Value::from(i));
                }
            }
            let mut expiry = Expiry::Default;
            p.apply_data(&mut data, &mut expiry);
            let once = (data.clone(), expiry);
            p.apply_data(&mut data, &mut expiry);
            assert_eq!((data.clone(), expiry), once, "applied twice");
            let text = json::encode_object(&data);
            assert!(text.is_ascii());
            assert_eq!(json::parse_object(&text), Some(data), "stored form");
        }
    }
}

// ---------------------------------------------------------------------------
// Cookies

/// Python's `str.strip()` on Latin-1 text, as Django's `parse_cookie`
/// applies it (the model; `cookie::trim` is the code).
fn py_strip(mut b: &[u8]) -> &[u8] {
    let ws = |c: u8| c.is_ascii_whitespace() || matches!(c, 0x0b | 0x1c..=0x1f | 0x85 | 0xa0);
    while let [c, rest @ ..] = b {
        if !ws(*c) {
            break;
        }
        b = rest;
    }
    while let [rest @ .., c] = b {
        if !ws(*c) {
            break;
        }
        b = rest;
    }
    b
}

/// `name=value` pairs of `Cookie` values, stripped, empty ones left out.
fn cookie_pairs(h: &HeaderMap) -> Vec<Vec<u8>> {
    h.get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .map(|p| py_strip(p).to_vec())
        .filter(|p| !p.is_empty())
        .collect()
}

fn names(pair: &[u8], name: &str) -> bool {
    pair.strip_prefix(name.as_bytes())
        .is_some_and(|r| py_strip(r).first() == Some(&b'='))
}

/// Target `cookie`: the first line is the cookie name (default
/// `sessionid`), every other line a `Cookie` header. `find` gives the first
/// pair with that name (spaces around its `=` allowed; the value's spaces,
/// then its quotes, removed); `strip` removes every such pair
/// and keeps the others, in order, byte for byte; every signed-cookie
/// chunk of the name is listed for stripping; `set_cookie_names` never
/// panics.
pub fn cookie(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let name = lines
        .next()
        .and_then(|n| std::str::from_utf8(n).ok())
        .filter(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'=' && b != b';')
        })
        .unwrap_or("sessionid")
        .to_string();
    let mut h = HeaderMap::new();
    for line in lines {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            let _ = cookie::set_cookie_names(&v, &name);
            h.append(COOKIE, v);
        }
    }
    let pairs = cookie_pairs(&h);
    let want = pairs.iter().find(|p| names(p, &name)).map(|p| {
        let rest = py_strip(&p[name.len()..]);
        let v = py_strip(&rest[1..]);
        match v {
            [b'"', inner @ .., b'"'] => inner.to_vec(),
            v => v.to_vec(),
        }
    });
    assert_eq!(cookie::find(&h, &name).map(<[u8]>::to_vec), want, "find");
    let others: Vec<Vec<u8>> = pairs.into_iter().filter(|p| !names(p, &name)).collect();
    let mut stripped = h.clone();
    cookie::strip(&mut stripped, &name);
    assert_eq!(
        cookie::find(&stripped, &name),
        None,
        "strip left the cookie"
    );
    assert_eq!(cookie_pairs(&stripped), others, "strip kept the others");
    // Every chunk `signed::join` could read (`NAME.i`, read as `find`
    // reads names) is listed, so the proxy strips it before forwarding.
    let listed = signed::presented_chunks(&h, &name);
    for i in 1..=signed::MAX_CHUNKS {
        if cookie::find(&h, &signed::chunk_name(&name, i)).is_some() {
            assert!(
                listed.contains(&i),
                "chunk {i} can be joined but is not listed"
            );
        }
    }
}

/// Target `signed_cookie`: byte 0 picks encryption and a fallback key, the
/// rest is a presented token first (arbitrary bytes never decode: nobody
/// forges a MAC), then the material of a record that must come back whole
/// through encode, split into cookies, join and decode, and that one
/// changed character makes invalid.
pub fn signed_cookie(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let encrypt = flags & 1 != 0;
    let fallbacks = if flags & 2 != 0 {
        vec![b"an-old-secret-key-0123456789".to_vec()]
    } else {
        Vec::new()
    };
    let sc = SignedCookies::new(
        "sessionid",
        b"fuzz-secret-0123456789abcdef",
        &fallbacks,
        encrypt,
    );
    let (token, material) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    assert!(sc.decode(token, 0).is_none(), "a forged token decoded");
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(token) {
        h.append(COOKIE, v);
        let _ = signed::join(&h, "sessionid");
        let _ = signed::presented_chunks(&h, "sessionid");
    }

    // A record from the material.
    let word = |i: usize| -> i64 {
        let mut a = [0u8; 8];
        for (j, b) in a.iter_mut().enumerate() {
            *b = material.get(i * 8 + j).copied().unwrap_or(0);
        }
        i64::from_le_bytes(a)
    };
    let mut key = [b'a'; 32];
    for (k, b) in key.iter_mut().zip(material) {
        *k = b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(*b) % 36];
    }
    let key = SessionKey::parse_bytes(&key).expect("a key of the alphabet");
    let expiry = match flags >> 2 & 3 {
        0 => Expiry::Default,
        1 => Expiry::Seconds(word(3)),
        2 => Expiry::BrowserClose,
        _ => Expiry::At(word(3)),
    };
    let text = String::from_utf8_lossy(material.get(32..).unwrap_or_default());
    let mut map = Map::new();
    map.insert("v".into(), Value::String(text.into_owned()));
    // Large enough, now and then, to take several cookies or too many.
    map.insert(
        "pad".into(),
        Value::String("x".repeat(usize::from(flags >> 4) * 2000)),
    );
    let record = Record {
        data: json::encode_object(&map),
        expiry,
        created: word(0),
        modified: word(1),
        expires_at: word(2),
        stamp: Stamp::NONE,
    };
    let now = word(2).wrapping_sub(1 + i64::from(flags & 0x40 != 0) * 7);
    let encoded = sc.encode(&key, &record);
    let parts = match signed::split("sessionid", &encoded) {
        Ok(parts) => parts,
        Err(e) => {
            assert!(e.size > e.limit);
            return;
        }
    };
    let cookie_line = parts
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{}={v}", signed::chunk_name("sessionid", i)))
        .collect::<Vec<_>>()
        .join("; ");
    for (i, v) in parts.iter().enumerate() {
        assert!(signed::chunk_name("sessionid", i).len() + 1 + v.len() <= signed::MAX_COOKIE_BYTES);
    }
    let mut h = HeaderMap::new();
    h.insert(
        COOKIE,
        HeaderValue::from_str(&cookie_line).expect("cookie text"),
    );
    let joined = signed::join(&h, "sessionid")
        .expect("the first cookie")
        .expect("all parts");
    assert_eq!(joined, encoded, "split and join");
    let live = record.is_live(now);
    match sc.decode(joined.as_bytes(), now) {
        Some((k, r)) => {
            assert!(live);
            assert_eq!(k, key);
            assert_eq!(r, record);
        }
        None => assert!(!live, "a live record did not decode"),
    }
    // One character changed.
    let mut tampered = joined.into_bytes();
    let at = usize::from(material.first().copied().unwrap_or(0)) * 7 % tampered.len();
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    assert!(
        sc.decode(&tampered, now).is_none(),
        "a changed token decoded"
    );
    // Made with the fallback key only: still read when it is a fallback.
    let old = SignedCookies::new("sessionid", b"an-old-secret-key-0123456789", &[], encrypt);
    let by_old = old.encode(&key, &record);
    assert_eq!(
        sc.decode(by_old.as_bytes(), now).is_some(),
        live && !fallbacks.is_empty(),
        "fallback keys"
    );
}

// ---------------------------------------------------------------------------
// Configuration

/// Target `config`: any text either loads or is refused with one line;
/// nothing panics. Texts naming a file under /dev, /proc or /sys are
/// skipped.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `secret_key_file` is read while parsing: /dev/zero would never end.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let at = std::path::Path::new("/nonexistent/sessiongate-fuzz/sessiongate.toml");
    if let Err(e) = crate::config::Config::parse(text, at) {
        let msg = e.to_string();
        assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
    }
}

/// Target `request_head`: the input as the bytes at the front of a
/// client connection. The server's own HTTP/1.1 path ([`crate::server::h1`])
/// takes a head only when it is whole (no cut of it is taken), reads the
/// same request from the head alone as from the head with what follows,
/// and never takes what it must leave to hyper: `HEAD`, `CONNECT`, a body,
/// `Transfer-Encoding`, `Upgrade`, `Expect`, `TE`, HTTP/1.0. `Connection:
/// close` is seen wherever its token is.
pub fn request_head(data: &[u8]) {
    use crate::server::h1::{parse, Head};
    let (parts, len, close) = match parse(data) {
        Head::Simple { parts, len, close } => (parts, len, close),
        Head::Partial => {
            assert!(data.len() < crate::server::MAX_REQUEST_HEAD);
            return;
        }
        Head::Other => return,
    };
    assert!(len <= data.len() && data[..len].ends_with(b"\n"), "{len}");
    match parse(&data[..len]) {
        Head::Simple {
            parts: p,
            len: l,
            close: c,
        } => {
            assert_eq!((l, c), (len, close));
            assert_eq!(
                (&p.method, &p.uri, &p.headers),
                (&parts.method, &parts.uri, &parts.headers)
            );
        }
        other => panic!("the head alone: {other:?}"),
    }
    for cut in [len - 1, len / 2] {
        assert!(
            !matches!(parse(&data[..cut]), Head::Simple { .. }),
            "cut at {cut}"
        );
    }
    assert_eq!(parts.version, http::Version::HTTP_11);
    assert!(parts.method != Method::HEAD && parts.method != Method::CONNECT);
    for name in ["transfer-encoding", "upgrade", "expect", "te"] {
        assert!(!parts.headers.contains_key(name), "{name}");
    }
    let lengths: Vec<_> = parts.headers.get_all(CONTENT_LENGTH).iter().collect();
    assert!(lengths.len() <= 1 && lengths.iter().all(|v| v.as_bytes() == b"0"));
    let says_close = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
    assert_eq!(close, says_close);
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};

    use crate::session::json;

    /// Session data goes through JSON text at every write: a number must
    /// come back as the same number (serde_json's `float_roundtrip`).
    #[test]
    fn stored_numbers_come_back_exactly() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lost = Vec::new();
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            let mut m = Map::new();
            m.insert("n".into(), Value::from(f));
            let back = json::parse_object(&json::encode_object(&m)).expect("an object");
            if back["n"].as_f64() != Some(f) {
                lost.push(f);
            }
        }
        assert!(
            lost.is_empty(),
            "{} numbers changed, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(3)]
        );
    }
}
