//! The session cookie: finding it in `Cookie` headers, removing it from what
//! goes upstream, and writing `Set-Cookie` as Django's `set_cookie` does.

use std::time::{Duration, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderValue, COOKIE};

use crate::config::{SameSite, SessionConfig};

/// The value of the first cookie called `name`, across every `Cookie`
/// header in order (HTTP/2 may split them). Surrounding quotes are removed.
pub fn find<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for h in headers.get_all(COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for pair in s.split(';') {
            let pair = pair.trim_start_matches([' ', '\t']);
            if let Some(rest) = pair.strip_prefix(name) {
                if let Some(v) = rest.strip_prefix('=') {
                    let v = v.trim_end_matches([' ', '\t']);
                    let v = v
                        .strip_prefix('"')
                        .and_then(|x| x.strip_suffix('"'))
                        .unwrap_or(v);
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Whether a `Cookie` header holds a cookie called `name` at all.
fn has(s: &str, name: &str) -> bool {
    s.split(';').any(|p| {
        p.trim_start_matches([' ', '\t'])
            .strip_prefix(name)
            .is_some_and(|r| r.starts_with('='))
    })
}

/// Removes every cookie called `name` from the `Cookie` headers, keeping
/// the others byte for byte. A header left empty is dropped.
pub fn strip(headers: &mut HeaderMap, name: &str) {
    let needs = headers
        .get_all(COOKIE)
        .iter()
        .any(|h| h.to_str().map(|s| has(s, name)).unwrap_or(false));
    if !needs {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    headers.remove(COOKIE);
    for v in values {
        let Ok(s) = v.to_str() else {
            headers.append(COOKIE, v);
            continue;
        };
        if !has(s, name) {
            headers.append(COOKIE, v);
            continue;
        }
        let kept: Vec<&str> = s
            .split(';')
            .map(|p| p.trim_matches([' ', '\t']))
            .filter(|p| !p.is_empty())
            .filter(|p| !(p.strip_prefix(name).is_some_and(|r| r.starts_with('='))))
            .collect();
        if !kept.is_empty() {
            if let Ok(hv) = HeaderValue::from_str(&kept.join("; ")) {
                headers.append(COOKIE, hv);
            }
        }
    }
}

/// Whether a `Set-Cookie` value sets the cookie called `name`.
pub fn set_cookie_names(value: &HeaderValue, name: &str) -> bool {
    let b = value.as_bytes();
    let b = match b.iter().position(|&c| c != b' ' && c != b'\t') {
        Some(i) => &b[i..],
        None => return false,
    };
    b.starts_with(name.as_bytes())
        && b[name.len()..]
            .iter()
            .find(|&&c| c != b' ' && c != b'\t')
            .is_some_and(|&c| c == b'=')
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
    let mut out = String::with_capacity(160);
    out.push_str(&c.cookie_name);
    out.push('=');
    out.push_str(value);
    if let Some(age) = max_age {
        let age = age.max(0);
        let expires = UNIX_EPOCH + Duration::from_secs((now_ms.max(0) / 1000) as u64 + age as u64);
        out.push_str("; expires=");
        out.push_str(&httpdate::fmt_http_date(expires));
        out.push_str("; Max-Age=");
        out.push_str(&age.to_string());
    }
    attributes(&mut out, c);
    HeaderValue::from_str(&out).expect("cookie parts are validated ASCII")
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
    HeaderValue::from_str(&out).expect("cookie parts are validated ASCII")
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
        assert_eq!(find(&h, "sessionid"), Some("first"));
        let h = headers(&["xsessionid=no; a=1", "sessionid=\"quoted\""]);
        assert_eq!(find(&h, "sessionid"), Some("quoted"));
        assert_eq!(find(&headers(&["a=1"]), "sessionid"), None);
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
