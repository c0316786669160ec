//! Header hygiene in both directions (SPEC 3.1).

use http::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONNECTION, VARY};

use crate::config::is_hop_by_hop;
use crate::session::headers::is_reserved;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers: first every name the `Connection`
/// header nominates, then the fixed list. Done before the proxy adds
/// anything, so a client cannot nominate a header the proxy sets.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(CONNECTION) {
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

/// A connection token naming a header of the fixed hop-by-hop list, in any
/// case.
fn is_fixed_hop_by_hop(token: &str) -> bool {
    [
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "connection",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
    ]
    .iter()
    .any(|n| token.eq_ignore_ascii_case(n))
}

/// The protocol a request asks to switch to, when it is a real HTTP/1.1
/// upgrade (`Connection: upgrade` and an `Upgrade` header).
pub fn upgrade_request(version: http::Version, h: &HeaderMap) -> Option<HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let proto = h.get(http::header::UPGRADE)?;
    let asked = h.get_all(CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    asked.then(|| proto.clone())
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
    let present = h.get_all(VARY).iter().any(|v| {
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
