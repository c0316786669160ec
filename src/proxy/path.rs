//! Request paths are normalised before routing and forwarding, as nginx
//! does before matching a location: percent-encoded unreserved characters
//! decoded, `.` and `..` segments resolved, repeated slashes merged. The
//! upstream receives the same normalised path the route was chosen on, so
//! `/%61ccount` or `/static/../account` cannot slip past `login_required`.

use std::borrow::Cow;

/// Why a path was refused (the request gets a 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path must start with /")]
    NotAbsolute,
    #[error("invalid percent-encoding in the request path")]
    BadEscape,
    #[error("the request path climbs above the root")]
    AboveRoot,
    /// `.` or `..` between encoded slashes (`/a/..%2Fb`): the upstream
    /// would read a path the route was not chosen on.
    #[error("the request path has a . or .. segment made of encoded slashes")]
    EncodedDotSegment,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normalised form of `path` (borrowed when it is already normal).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let suspicious = b.contains(&b'%') || path.contains("//") || path.contains("/.");
    if !suspicious {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Decode %XX of unreserved characters; keep other escapes, upper-cased.
    // Bytes, not chars: runs between escapes (raw UTF-8 included) are
    // copied as they came, so the result stays the same UTF-8.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // `%` is ASCII, so the run ends on a char boundary.
            let end = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(b.len(), |n| i + n);
            decoded.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (h, l) = match (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (Some(h), Some(l)) => (h, l),
            _ => return Err(PathError::BadEscape),
        };
        let c = h * 16 + l;
        if unreserved(c) {
            decoded.push(char::from(c));
        } else {
            decoded.push('%');
            decoded.push(char::from(b"0123456789ABCDEF"[h as usize]));
            decoded.push(char::from(b"0123456789ABCDEF"[l as usize]));
        }
        i += 3;
    }
    // 2. Resolve dot segments and merge slashes.
    let mut segs: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                if segs.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// The path a route is chosen on: the normalised path (see
/// [`normalize`]) with each encoded slash (`%2F`, which [`normalize`]
/// keeps and upper-cases) read as `/`, then normalised again. Most
/// upstreams decode `%2F` themselves (WSGI's `PATH_INFO`, PHP, Rack), so
/// `/admin%2Fsecret` is `/admin/secret` to them: it must meet the routes
/// (and their `login_required`) as that, as nginx matches its locations on
/// the decoded path. The path sent upstream keeps its `%2F`.
pub fn for_routing(normalized: &str) -> Result<Cow<'_, str>, PathError> {
    if !normalized.contains("%2F") {
        return Ok(Cow::Borrowed(normalized));
    }
    let slashes = normalized.replace("%2F", "/");
    // Dot segments of the path itself are resolved already: any left here
    // come from encoded slashes. Resolved, they would choose a route for a
    // path the upstream does not get (`/account/..%2Fstatic`, which a
    // decoding upstream reads as `/account/../static`, would be routed as
    // `/static`): refused.
    if slashes.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(PathError::EncodedDotSegment);
    }
    Ok(Cow::Owned(normalize(&slashes)?.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_slashes_are_slashes_for_routing() {
        let r = |p: &str| for_routing(&normalize(p).unwrap()).map(|c| c.into_owned());
        assert_eq!(r("/admin%2Fsecret").unwrap(), "/admin/secret");
        assert_eq!(r("/admin%2fsecret").unwrap(), "/admin/secret");
        assert_eq!(r("/%2Fadmin").unwrap(), "/admin");
        assert_eq!(
            r("/x/..%2F..%2Fadmin").unwrap_err(),
            PathError::EncodedDotSegment
        );
        assert_eq!(
            r("/a/%2E%2E%2Fadmin").unwrap_err(),
            PathError::EncodedDotSegment
        );
        assert_eq!(
            r("/account/..%2Fstatic").unwrap_err(),
            PathError::EncodedDotSegment
        );
        assert_eq!(
            r("/account/.%2Fx").unwrap_err(),
            PathError::EncodedDotSegment
        );
        assert_eq!(r("/a%2F..b").unwrap(), "/a/..b", "not a dot segment");
        assert_eq!(
            r("/a%252Fb").unwrap(),
            "/a%252Fb",
            "an escaped % is not a slash"
        );
        assert!(matches!(for_routing("/plain/path"), Ok(Cow::Borrowed(_))));
    }

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(normalize("/a/b?"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a/b.css"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn bypass_attempts_are_normalised() {
        assert_eq!(n("/%61ccount").unwrap(), "/account");
        assert_eq!(n("/x/../account").unwrap(), "/account");
        assert_eq!(n("/static/../account/").unwrap(), "/account/");
        assert_eq!(n("/./account").unwrap(), "/account");
        assert_eq!(n("//account//x").unwrap(), "/account/x");
        assert_eq!(n("/%2e%2e/x").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/%2E/b").unwrap(), "/a/b");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
    }

    #[test]
    fn reserved_escapes_stay_escaped() {
        assert_eq!(n("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/caf%C3%A9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn raw_non_ascii_bytes_are_kept() {
        assert_eq!(n("/café//x").unwrap(), "/café/x");
        assert_eq!(n("/ü/./%61/../ß%2f").unwrap(), "/ü/ß%2F");
        assert_eq!(n("/日本//%E6%97%A5").unwrap(), "/日本/%E6%97%A5");
    }

    #[test]
    fn errors() {
        assert_eq!(n("..").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a%2").unwrap_err(), PathError::BadEscape);
    }
}
