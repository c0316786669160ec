//! Header hygiene in both directions (SPEC 3.1).

use http::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONNECTION, VARY};

use crate::session::headers::is_reserved;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether the map holds a field called `name`. A lookup of an absent
/// name hashes it and probes the table (about 100 to 150 instructions,
/// callgrind); a head has a handful of fields, so comparing the name with
/// each of theirs is cheaper. For the names a head usually lacks, before
/// the lookup that reads them.
#[inline]
pub fn has(h: &HeaderMap, name: &HeaderName) -> bool {
    h.keys().any(|k| k == name)
}

/// Removes every field named in `names` (see [`has`]).
pub fn remove_each(h: &mut HeaderMap, names: &[&HeaderName]) {
    for name in names {
        if has(h, name) {
            h.remove(*name);
        }
    }
}

/// Whether a lower-case field name is one of the forwarding fields a proxy
/// in front sets: `X-Forwarded-*` (For, Proto, Host, Port, Prefix, ...),
/// `Forwarded` (RFC 7239) and `X-Real-IP`. From a peer that is not a
/// trusted proxy they are the client's claims, and go (as Traefik drops
/// them); the proxy sets its own `X-Forwarded-For`, `-Proto` and `-Host`.
#[inline]
pub fn is_forwarding_name(name: &str) -> bool {
    name.starts_with("x-forwarded-") || name == "forwarded" || name == "x-real-ip"
}

/// Removes every forwarding field ([`is_forwarding_name`]): one pass over
/// the names when there is none.
pub fn remove_forwarding(h: &mut HeaderMap) {
    if !h.keys().any(|k| is_forwarding_name(k.as_str())) {
        return;
    }
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| is_forwarding_name(k.as_str()))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// Removes the fields whose name holds `_` and, read with `-` for `_`, is
/// one the proxy owns: the `X-Session` space, the forwarding fields
/// ([`is_forwarding_name`]) and the `forward` names (`owned`). CGI, WSGI,
/// PHP and Rack upstreams see `X_User` and `X-User` as one variable
/// (`HTTP_X_USER`), so such a field would pass for the proxy's own (nginx
/// ignores every name with `_` by default; Django's runserver drops them).
/// Other names with `_` pass untouched.
pub fn remove_underscore_aliases(h: &mut HeaderMap, owned: &[HeaderName]) {
    if !h.keys().any(|k| k.as_str().as_bytes().contains(&b'_')) {
        return;
    }
    let aliases: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            let name = k.as_str();
            if !name.as_bytes().contains(&b'_') {
                return false;
            }
            let dashed = name.replace('_', "-");
            dashed.starts_with("x-session")
                || is_forwarding_name(&dashed)
                || owned.iter().any(|o| o.as_str() == dashed)
        })
        .cloned()
        .collect();
    for n in aliases {
        h.remove(n);
    }
}

/// Removes the hop-by-hop headers: first every name the `Connection`
/// header nominates, then the fixed list. Done before the proxy adds
/// anything, so a client cannot nominate a header the proxy sets.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    if has(h, &CONNECTION) {
        // Usually only `keep-alive`, `close` or `upgrade`, which the fixed
        // list covers: then nothing is collected or allocated.
        let nominated: Vec<HeaderName> = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !is_fixed_hop_by_hop(t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in nominated {
            h.remove(n);
        }
    }
    let fixed: Vec<HeaderName> = h.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    for n in fixed {
        h.remove(n);
    }
}

/// The hop-by-hop header names of RFC 9110 7.6.1 (plus the legacy
/// `Keep-Alive` and `Proxy-Connection`), in lower case: the one list every
/// part of the proxy uses (request and response hygiene, the upstream
/// response parser, trailers, the `forward` names the configuration
/// refuses).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "transfer-encoding",
    "keep-alive",
    "proxy-connection",
];

/// Whether a lower-case header name (as `HeaderName` and the response
/// parser hold them) is hop-by-hop.
#[inline]
pub fn is_hop_by_hop_name(name: &str) -> bool {
    // A slice comparison checks the length first: this runs for every
    // header of every request and response.
    HOP_BY_HOP.contains(&name)
}

/// Whether a header name is hop-by-hop.
#[inline]
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str())
}

/// A connection token naming a header of the fixed hop-by-hop list, in any
/// case.
fn is_fixed_hop_by_hop(token: &str) -> bool {
    HOP_BY_HOP.iter().any(|n| token.eq_ignore_ascii_case(n))
}

/// Whether a request is a real WebSocket upgrade: HTTP/1.1,
/// `Connection: upgrade` and `Upgrade: websocket` (the token in any case,
/// RFC 6455 4.1; a version after a `/` is allowed). The only upgrade the
/// proxy relays: any other (`h2c` above all) would open a tunnel whose
/// bytes skip the header rules.
pub fn upgrade_request(version: http::Version, h: &HeaderMap) -> Option<HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    if !has(h, &http::header::UPGRADE) {
        return None;
    }
    let proto = h.get(http::header::UPGRADE)?;
    let websocket = proto.to_str().is_ok_and(|s| {
        s.split(',').any(|t| {
            let t = t.trim();
            let name = t.split_once('/').map_or(t, |(n, _)| n);
            name.eq_ignore_ascii_case("websocket")
        })
    });
    if !websocket {
        return None;
    }
    let asked = h.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    asked.then(|| HeaderValue::from_static("websocket"))
}

/// Why a request's authority (`Host`, `:authority` or an absolute-form
/// target) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("the host carries userinfo")]
    Userinfo,
    #[error("the host has a character not allowed in a host name")]
    BadChar,
    #[error("the port is not a number")]
    BadPort,
    #[error("invalid IPv6 literal")]
    BadIpv6,
}

/// Checks that an authority is `host[:port]` (RFC 3986 3.2.2: a reg-name
/// of unreserved and sub-delim characters, an IPv4 address, or an IP
/// literal in brackets) with no userinfo. A port, when its colon is there,
/// is 1 to 5 digits.
/// The bytes of a `reg-name` or IPv4 host: unreserved, pct-encoded and
/// sub-delims (RFC 3986 3.2.2). A table: on every request, each byte of the
/// host is one lookup rather than a search of the punctuation.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let punct = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < punct.len() {
        t[punct[i] as usize] = true;
        i += 1;
    }
    t
};

pub fn check_host(v: &[u8]) -> Result<(), HostError> {
    if v.is_empty() {
        return Err(HostError::Empty);
    }
    if v.contains(&b'@') {
        return Err(HostError::Userinfo);
    }
    let (host, port) = if v[0] == b'[' {
        let end = v
            .iter()
            .position(|&b| b == b']')
            .ok_or(HostError::BadIpv6)?;
        let inner = &v[1..end];
        let lit = std::str::from_utf8(inner).map_err(|_| HostError::BadIpv6)?;
        if lit.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HostError::BadIpv6);
        }
        match &v[end + 1..] {
            [] => (&v[..0], None),
            [b':', port @ ..] => (&v[..0], Some(port)),
            _ => return Err(HostError::BadChar),
        }
    } else {
        match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.iter().all(u8::is_ascii_digit) {
            return Err(HostError::BadPort);
        }
    }
    if v[0] != b'[' {
        if host.is_empty() {
            return Err(HostError::Empty);
        }
        if !host.iter().all(|&b| REG_NAME[usize::from(b)]) {
            return Err(HostError::BadChar);
        }
    }
    Ok(())
}

/// Why a request's `Transfer-Encoding` was refused: the coding named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Coding(pub String);

/// A request's transfer codings must be exactly one `chunked` (the only
/// coding the proxy decodes): anything else (`gzip, chunked`,
/// `chunked, chunked`, `identity`) would reach the upstream as content
/// with a coding dropped (RFC 9112 6.1: 501 for a coding not understood).
pub fn check_transfer_coding(h: &HeaderMap) -> Result<(), Coding> {
    if !has(h, &http::header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let mut values = h.get_all(http::header::TRANSFER_ENCODING).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    let mut codings = std::iter::once(first)
        .chain(values)
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    let name = |c: &[u8]| Coding(String::from_utf8_lossy(c).into_owned());
    match (codings.next(), codings.next()) {
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        (Some(c), None) => Err(name(c)),
        (Some(c), Some(d)) if c.eq_ignore_ascii_case(b"chunked") => Err(name(d)),
        (Some(c), Some(_)) => Err(name(c)),
        (None, _) => Err(Coding("an empty Transfer-Encoding".into())),
    }
}

/// Removes every header in the `X-Session` space; returns them in order.
pub fn take_reserved(h: &mut HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    if !h.keys().any(is_reserved) {
        return Vec::new();
    }
    let names: Vec<HeaderName> = h.keys().filter(|k| is_reserved(k)).cloned().collect();
    let mut out = Vec::new();
    for n in names {
        // `get_all` keeps the order of repeated headers.
        for v in h.get_all(&n) {
            out.push((n.clone(), v.clone()));
        }
        h.remove(&n);
    }
    out
}

/// Adds `Vary: Cookie` unless it is already there (or `Vary: *`).
pub fn add_vary_cookie(h: &mut HeaderMap) {
    let present = has(h, &VARY)
        && h.get_all(VARY).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("cookie") || t.trim() == "*")
            })
        });
    if !present {
        h.append(VARY, HeaderValue::from_static("Cookie"));
    }
}

/// `Cache-Control: private` when the upstream set none.
pub fn add_private(h: &mut HeaderMap) {
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("private"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn has_agrees_with_the_maps_own_lookup() {
        let h = map(&[
            ("host", "a"),
            ("cookie", "x=1"),
            ("cookie", "y=2"),
            ("x-session-id", "spoofed"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        let names = [
            http::header::HOST,
            http::header::COOKIE,
            http::header::TRANSFER_ENCODING,
            http::header::REFERER,
            X_FORWARDED_FOR.clone(),
            X_FORWARDED_HOST.clone(),
            HeaderName::from_static("x-session-id"),
            HeaderName::from_static("x-session"),
        ];
        for n in &names {
            assert_eq!(has(&h, n), h.contains_key(n), "{n}");
        }
        assert!(!has(&HeaderMap::new(), &http::header::HOST));
    }

    #[test]
    fn remove_each_takes_every_value_of_the_names_there_and_nothing_else() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("accept", "*/*"),
            ("X-Forwarded-For", "7.7.7.7"),
            ("expect", "100-continue"),
        ]);
        remove_each(
            &mut h,
            &[&http::header::EXPECT, &X_FORWARDED_FOR, &X_FORWARDED_HOST],
        );
        let left: Vec<_> = h
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(left, [("accept", "*/*")]);
        remove_each(&mut h, &[&X_FORWARDED_PROTO]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn connection_nominated_and_fixed_names_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret , close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("trailer", "x"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
    }

    #[test]
    fn hosts() {
        for ok in [
            "a",
            "example.com",
            "example.com:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
            "a-b_c~d.e",
            "xn--caf-dma.example",
        ] {
            assert_eq!(check_host(ok.as_bytes()), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", HostError::Empty),
            (":80", HostError::Empty),
            ("a b", HostError::BadChar),
            ("a/b", HostError::BadChar),
            ("user@a", HostError::Userinfo),
            ("user:pw@a", HostError::Userinfo),
            ("a:b:c", HostError::BadPort),
            ("a:", HostError::BadPort),
            ("a:8x", HostError::BadPort),
            ("a:123456", HostError::BadPort),
            ("[::1", HostError::BadIpv6),
            ("[zz]", HostError::BadIpv6),
            ("[::1]x", HostError::BadChar),
            ("a\u{7f}", HostError::BadChar),
        ] {
            assert_eq!(check_host(bad.as_bytes()), Err(why), "{bad:?}");
        }
        // Every byte, against RFC 3986's reg-name set written out.
        for b in 0..=255u8 {
            let allowed = b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
            let host = [b'a', b, b'z'];
            let got = check_host(&host);
            match (allowed, b) {
                (true, _) => assert_eq!(got, Ok(()), "{b:#x}"),
                (false, b'@') => assert_eq!(got, Err(HostError::Userinfo)),
                (false, b':') => assert_eq!(got, Err(HostError::BadPort)),
                (false, _) => assert_eq!(got, Err(HostError::BadChar), "{b:#x}"),
            }
        }
    }

    #[test]
    fn transfer_codings() {
        let te = |v: &str| check_transfer_coding(&map(&[("transfer-encoding", v)]));
        assert_eq!(check_transfer_coding(&HeaderMap::new()), Ok(()));
        assert_eq!(te("chunked"), Ok(()));
        assert_eq!(te("Chunked"), Ok(()));
        assert_eq!(te("gzip, chunked"), Err(Coding("gzip".into())));
        assert_eq!(te("chunked, chunked"), Err(Coding("chunked".into())));
        assert_eq!(te("chunked, gzip"), Err(Coding("gzip".into())));
        assert_eq!(te("identity"), Err(Coding("identity".into())));
        let two = map(&[
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ]);
        assert_eq!(check_transfer_coding(&two), Err(Coding("gzip".into())));
    }

    #[test]
    fn only_websocket_upgrades() {
        let v11 = http::Version::HTTP_11;
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert_eq!(upgrade_request(v11, &ws).unwrap(), "websocket");
        let h2c = map(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        assert_eq!(upgrade_request(v11, &h2c), None);
        let no_conn = map(&[("upgrade", "websocket")]);
        assert_eq!(upgrade_request(v11, &no_conn), None);
        assert_eq!(upgrade_request(http::Version::HTTP_10, &ws), None);
    }

    #[test]
    fn reserved_headers_taken_in_order() {
        let mut h = map(&[
            ("x-session-update", "{\"a\":1}"),
            ("content-type", "text/html"),
            ("X-Session-Update", "{\"b\":2}"),
            ("x-sessionfoo", "1"),
        ]);
        let taken = take_reserved(&mut h);
        assert_eq!(taken.len(), 3);
        assert_eq!(taken[0].1, "{\"a\":1}");
        assert_eq!(taken[1].1, "{\"b\":2}");
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn vary_is_not_duplicated() {
        let mut h = map(&[("vary", "Accept-Encoding, cookie")]);
        add_vary_cookie(&mut h);
        assert_eq!(h.get_all(VARY).iter().count(), 1);
        let mut h = map(&[("vary", "Accept-Encoding")]);
        add_vary_cookie(&mut h);
        assert_eq!(h.get_all(VARY).iter().count(), 2);
    }
}
