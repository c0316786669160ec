//! The session cookie: finding it in `Cookie` headers, removing it from what
//! goes upstream, and writing `Set-Cookie` as Django's `set_cookie` does.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderValue, COOKIE};

use crate::config::{SameSite, SessionConfig};

/// Strips what Django's `parse_cookie` strips (Python's `str.strip()` of
/// the header decoded as Latin-1, as WSGI and ASGI give it): of the bytes a
/// header value may hold, space, tab, NEL (0x85) and NBSP (0xA0). So
/// `sessionid\xa0=K` is the session cookie here as it is to Django, and is
/// never forwarded.
#[inline]
pub(crate) fn trim(b: &[u8]) -> &[u8] {
    #[inline]
    fn ws(c: u8) -> bool {
        matches!(c, b' ' | b'\t' | 0x85 | 0xa0)
    }
    // The usual pair (`name=value`, after the `; `'s space) has nothing to
    // trim: one look at each end.
    match b {
        [first, .., last] if !ws(*first) && !ws(*last) => return b,
        _ => {}
    }
    let start = b.iter().position(|&c| !ws(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|&c| !ws(c)).map_or(start, |i| i + 1);
    &b[start..end]
}

/// The `;`-separated pairs of a `Cookie` value, as `split` would give them
/// (empty ones included), each separator found by `memchr`.
fn pairs(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(v);
    std::iter::from_fn(move || {
        let r = rest?;
        Some(match memchr::memchr(b';', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                &r[..i]
            }
            None => {
                rest = None;
                r
            }
        })
    })
}

/// The value of `pair` when it is the cookie called `name`. Spaces around
/// the `=` are allowed, as Django (`parse_cookie` strips the name and the
/// value) and werkzeug read them: `sessionid =K` is the session cookie, so
/// it is found and never forwarded.
fn value_of<'a>(pair: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let pair = trim(pair);
    let rest = pair.strip_prefix(name.as_bytes())?;
    let v = trim(rest).strip_prefix(b"=")?;
    Some(match trim(v) {
        [b'"', inner @ .., b'"'] => inner,
        v => v,
    })
}

/// The value of the first cookie called `name`, across every `Cookie`
/// header in order (HTTP/2 may split them). Surrounding quotes are removed.
/// Works on bytes: another cookie holding non-ASCII bytes does not hide it.
pub fn find<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|h| pairs(h.as_bytes()))
        .find_map(|pair| value_of(pair, name))
}

/// Removes every cookie called `name` from the `Cookie` headers, keeping
/// the others byte for byte. A header left empty is dropped.
pub fn strip(headers: &mut HeaderMap, name: &str) {
    let has = |v: &HeaderValue| presence(v.as_bytes(), name).0;
    if headers.len() == headers.keys_len() {
        // No name is repeated, so there is at most one Cookie header (the
        // usual case). Not `entry`: it makes room for a new field first, and
        // a map built to its head's size grows (reallocates) for it.
        let Some(only) = headers.get(COOKIE) else {
            return;
        };
        match presence(only.as_bytes(), name) {
            (false, _) => {}
            (true, false) => {
                headers.remove(COOKIE);
            }
            (true, true) => match HeaderValue::from_bytes(&without(only, name)) {
                Ok(kept) => {
                    if let Some(v) = headers.get_mut(COOKIE) {
                        *v = kept;
                    }
                }
                Err(_) => {
                    headers.remove(COOKIE);
                }
            },
        }
        return;
    }
    if !headers.get_all(COOKIE).iter().any(has) {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    headers.remove(COOKIE);
    for v in values {
        if !has(&v) {
            headers.append(COOKIE, v);
            continue;
        }
        let kept = without(&v, name);
        if !kept.is_empty() {
            if let Ok(hv) = HeaderValue::from_bytes(&kept) {
                headers.append(COOKIE, hv);
            }
        }
    }
}

/// Whether the `Cookie` value `v` holds the cookie called `name`, and
/// whether it holds any other cookie.
fn presence(v: &[u8], name: &str) -> (bool, bool) {
    let (mut found, mut other) = (false, false);
    for pair in pairs(v) {
        if value_of(pair, name).is_some() {
            found = true;
        } else if !trim(pair).is_empty() {
            other = true;
        }
    }
    (found, other)
}

/// The cookies of one `Cookie` value other than `name`, joined by "; ".
fn without(v: &HeaderValue, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pairs(v.as_bytes())
        .map(trim)
        .filter(|p| !p.is_empty() && value_of(p, name).is_none())
    {
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(p);
    }
    out
}

/// Whether a `Set-Cookie` value sets the cookie called `name`, or one of
/// its numbered chunks (`name.1`, `name.2`, ... used by signed cookies).
pub fn set_cookie_names(value: &HeaderValue, name: &str) -> bool {
    let b = trim(value.as_bytes());
    let Some(rest) = b.strip_prefix(name.as_bytes()) else {
        return false;
    };
    let rest = match rest.strip_prefix(b".") {
        Some(r) => {
            let digits = r.iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return false;
            }
            &r[digits..]
        }
        None => rest,
    };
    trim(rest).first() == Some(&b'=')
}

fn attributes(out: &mut String, c: &SessionConfig) {
    if !c.cookie_domain.is_empty() {
        out.push_str("; Domain=");
        out.push_str(&c.cookie_domain);
    }
    if c.cookie_httponly {
        out.push_str("; HttpOnly");
    }
    out.push_str("; Path=");
    out.push_str(&c.cookie_path);
    match c.cookie_samesite {
        SameSite::Strict => out.push_str("; SameSite=Strict"),
        SameSite::Lax => out.push_str("; SameSite=Lax"),
        SameSite::None => out.push_str("; SameSite=None"),
        SameSite::Omit => {}
    }
    if c.cookie_secure {
        out.push_str("; Secure");
    }
}

/// `Set-Cookie` for a live session. `max_age` is `None` for a browser-close
/// cookie (no `Max-Age`, no `Expires`); otherwise `Expires` is `now + max_age`
/// as an IMF-fixdate, so the two agree.
pub fn set(c: &SessionConfig, value: &str, max_age: Option<i64>, now_ms: i64) -> HeaderValue {
    set_named(c, &c.cookie_name, value, max_age, now_ms)
}

/// Like [`set`] for another cookie name (numbered chunk cookies).
pub fn set_named(
    c: &SessionConfig,
    name: &str,
    value: &str,
    max_age: Option<i64>,
    now_ms: i64,
) -> HeaderValue {
    let mut out = String::with_capacity(160 + value.len());
    out.push_str(name);
    out.push('=');
    out.push_str(value);
    if let Some(age) = max_age {
        let age = age.max(0);
        let secs = (now_ms.max(0) / 1000).saturating_add(age);
        let secs = secs.min(super::directives::MAX_COOKIE_SECS) as u64;
        let expires = UNIX_EPOCH + Duration::from_secs(secs);
        // Written in place: no intermediate strings on every saving request.
        let _ = write!(
            out,
            "; expires={}; Max-Age={age}",
            httpdate::HttpDate::from(expires)
        );
    }
    attributes(&mut out, c);
    into_value(out)
}

/// A built cookie line as a header value, without copying it.
fn into_value(out: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out.into_bytes()))
        .expect("cookie parts are validated ASCII")
}

/// `Set-Cookie` that deletes the cookie: empty value, `Max-Age=0`, `Expires`
/// in 1970, same path and domain (Django's `delete_cookie`).
pub fn delete(c: &SessionConfig) -> HeaderValue {
    delete_named(c, &c.cookie_name)
}

/// Like [`delete`] for another cookie name (numbered chunk cookies).
pub fn delete_named(c: &SessionConfig, name: &str) -> HeaderValue {
    let mut out = String::with_capacity(128);
    out.push_str(name);
    out.push_str("=\"\"; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0");
    attributes(&mut out, c);
    into_value(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn cfg(extra: &str) -> SessionConfig {
        let text = format!(
            "[server]\nlisten=\"127.0.0.1:0\"\ntls=false\n[session]\nsecret_key=\"0123456789abcdef0123456789abcdef\"\n{extra}\n[[route]]\nupstream=\"http://127.0.0.1:1\"\n"
        );
        Config::parse(&text, Path::new("t.toml")).unwrap().session
    }

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn finds_the_first_session_cookie() {
        let h = headers(&["a=1; sessionid=first; sessionid=second", "sessionid=third"]);
        assert_eq!(find(&h, "sessionid"), Some(&b"first"[..]));
        let h = headers(&["xsessionid=no; a=1", "sessionid=\"quoted\""]);
        assert_eq!(find(&h, "sessionid"), Some(&b"quoted"[..]));
        assert_eq!(find(&headers(&["a=1"]), "sessionid"), None);
    }

    #[test]
    fn spaces_around_the_equals_sign_are_djangos() {
        // Django: parse_cookie('a=1; sessionid =K') == {'a': '1', 'sessionid': 'K'},
        // and parse_cookie('sessionid= K') == {'sessionid': 'K'}.
        for (cookie, want) in [
            ("a=1; sessionid =K", "K"),
            ("sessionid= K", "K"),
            ("sessionid\t=\t\"K\" ", "K"),
        ] {
            let mut h = headers(&[cookie]);
            assert_eq!(find(&h, "sessionid"), Some(want.as_bytes()), "{cookie}");
            strip(&mut h, "sessionid");
            assert_eq!(find(&h, "sessionid"), None, "{cookie}: stripped");
        }
        let mut h = headers(&["a=1; sessionid =K", "b=2"]);
        strip(&mut h, "sessionid");
        let v: Vec<_> = h.get_all(COOKIE).iter().collect();
        assert_eq!(v, ["a=1", "b=2"]);
        assert_eq!(find(&headers(&["sessionid x=K"]), "sessionid"), None);
        // Python's str.strip() also takes NEL and NBSP (Latin-1 0x85,
        // 0xA0): parse_cookie('sessionid\xa0=K\x85') == {'sessionid': 'K'}.
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"a=1; sessionid\xa0=\x85K\x85; b=2").unwrap(),
        );
        assert_eq!(find(&h, "sessionid"), Some(&b"K"[..]));
        strip(&mut h, "sessionid");
        assert_eq!(h.get(COOKIE).unwrap().as_bytes(), b"a=1; b=2");
    }

    #[test]
    fn non_ascii_neighbours_do_not_hide_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"pref=caf\xc3\xa9; sessionid=k1; z=1").unwrap(),
        );
        assert_eq!(find(&h, "sessionid"), Some(&b"k1"[..]));
        strip(&mut h, "sessionid");
        assert_eq!(h.get(COOKIE).unwrap().as_bytes(), b"pref=caf\xc3\xa9; z=1");
    }

    #[test]
    fn strip_keeps_other_cookies() {
        let mut h = headers(&["a=1; sessionid=k; b=2", "sessionid=x", "c=3"]);
        strip(&mut h, "sessionid");
        let v: Vec<_> = h
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(v, vec!["a=1; b=2", "c=3"]);
        let mut h = headers(&["a=1;b=2"]);
        strip(&mut h, "sessionid");
        assert_eq!(h.get(COOKIE).unwrap(), "a=1;b=2", "untouched when absent");
        for only in [" sessionid=k ", "sessionid=\"k\""] {
            let mut h = headers(&[only]);
            strip(&mut h, "sessionid");
            assert!(h.get(COOKIE).is_none(), "{only}: header dropped");
        }
        let mut h = headers(&["sessionidx=k"]);
        strip(&mut h, "sessionid");
        assert_eq!(h.get(COOKIE).unwrap(), "sessionidx=k", "another name kept");
    }

    #[test]
    fn pairs_are_what_split_gives() {
        for v in [
            "",
            ";",
            ";;",
            "a",
            "a=1",
            "a=1;",
            ";a=1",
            "a=1; b=2",
            "a=1;;b=2; ",
            "a=1; b=\"x;y\"",
            " sessionid=k ; c",
        ] {
            let want: Vec<&[u8]> = v.as_bytes().split(|&b| b == b';').collect();
            assert_eq!(pairs(v.as_bytes()).collect::<Vec<_>>(), want, "{v:?}");
        }
    }

    #[test]
    fn strip_one_cookie_header_with_and_without_repeated_names() {
        for repeated in [false, true] {
            for (cookie, want) in [
                ("a=1; sessionid=k; b=2", Some("a=1; b=2")),
                ("sessionid=k;", None),
                (" ; sessionid=k; ;", None),
                ("sessionid=k; sessionid=j; c=3", Some("c=3")),
                ("a=1;b=2", Some("a=1;b=2")),
            ] {
                let mut h = headers(&[cookie]);
                if repeated {
                    // Another name with two values: the general path.
                    h.append("accept", HeaderValue::from_static("a"));
                    h.append("accept", HeaderValue::from_static("b"));
                }
                strip(&mut h, "sessionid");
                let got: Vec<_> = h.get_all(COOKIE).iter().collect();
                assert_eq!(
                    got.iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>(),
                    want.into_iter().collect::<Vec<_>>(),
                    "{cookie:?}, repeated names: {repeated}"
                );
                assert_eq!(h.get_all("accept").iter().count(), 2 * repeated as usize);
            }
        }
    }

    #[test]
    fn set_cookie_matches_django_shape() {
        let c = cfg("");
        let v = set(&c, "abc", Some(1209600), 0);
        assert_eq!(
            v.to_str().unwrap(),
            "sessionid=abc; expires=Thu, 15 Jan 1970 00:00:00 GMT; Max-Age=1209600; HttpOnly; Path=/; SameSite=Lax; Secure"
        );
        let v = set(&c, "abc", None, 0);
        assert_eq!(
            v.to_str().unwrap(),
            "sessionid=abc; HttpOnly; Path=/; SameSite=Lax; Secure"
        );
    }

    #[test]
    fn attributes_follow_config() {
        let c = cfg("cookie_domain=\".example.com\"\ncookie_path=\"/app\"\ncookie_httponly=false\ncookie_secure=false\ncookie_samesite=\"\"");
        let v = set(&c, "abc", None, 0);
        assert_eq!(
            v.to_str().unwrap(),
            "sessionid=abc; Domain=.example.com; Path=/app"
        );
        let d = delete(&c);
        assert_eq!(
            d.to_str().unwrap(),
            "sessionid=\"\"; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Domain=.example.com; Path=/app"
        );
    }

    #[test]
    fn recognises_upstream_set_cookie_for_the_session_name() {
        let n = "sessionid";
        assert!(set_cookie_names(
            &HeaderValue::from_static("sessionid=x; Path=/"),
            n
        ));
        assert!(set_cookie_names(
            &HeaderValue::from_static(" sessionid =x"),
            n
        ));
        assert!(!set_cookie_names(
            &HeaderValue::from_static("sessionidx=1"),
            n
        ));
        assert!(!set_cookie_names(
            &HeaderValue::from_static("csrftoken=1"),
            n
        ));
    }
}
