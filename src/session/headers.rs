//! The `X-Session*` request headers that tell the upstream what is in the
//! session (SPEC 3.2).

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::key::IdKey;
use super::{json, Expiry, Policy, Record, SessionKey};

pub static X_SESSION: HeaderName = HeaderName::from_static("x-session");
pub static X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
pub static X_SESSION_NEW: HeaderName = HeaderName::from_static("x-session-new");
pub static X_SESSION_EXPIRY_AGE: HeaderName = HeaderName::from_static("x-session-expiry-age");
pub static X_SESSION_EXPIRY_DATE: HeaderName = HeaderName::from_static("x-session-expiry-date");
pub static X_SESSION_EXPIRE_AT_BROWSER_CLOSE: HeaderName =
    HeaderName::from_static("x-session-expire-at-browser-close");

/// Whether a (lower-case) header name is in the reserved `X-Session` space.
pub fn is_reserved(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-session")
}

/// RFC 3339 in UTC, whole seconds (`YYYY-MM-DDTHH:MM:SSZ`), formatted
/// directly (civil-from-days, H. Hinnant) since it is on every request.
pub fn rfc3339_bytes(ms: i64) -> [u8; 20] {
    let secs = ms
        .div_euclid(1000)
        .clamp(0, super::directives::MAX_COOKIE_SECS);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, v: i64, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, sod / 3600, 2);
    put(14, sod / 60 % 60, 2);
    put(17, sod % 60, 2);
    out
}

/// [`rfc3339_bytes`] as a `String`.
pub fn rfc3339(ms: i64) -> String {
    String::from_utf8(rfc3339_bytes(ms).to_vec()).expect("ASCII")
}

/// What the upstream is told about the session of one request.
pub struct View<'a> {
    pub key: Option<&'a SessionKey>,
    pub record: Option<&'a Record>,
    /// True when the browser presented no valid session cookie.
    pub is_new: bool,
}

static TRUE: HeaderValue = HeaderValue::from_static("true");
static FALSE: HeaderValue = HeaderValue::from_static("false");

fn bool_value(b: bool) -> HeaderValue {
    if b {
        TRUE.clone()
    } else {
        FALSE.clone()
    }
}

/// Adds the `X-Session*` headers and the route's `forward` headers.
/// `data_map` is the parsed session data when the caller already has it.
pub fn inject(
    headers: &mut HeaderMap,
    view: &View<'_>,
    now: i64,
    policy: &Policy,
    ids: &IdKey,
    forward: &[(HeaderName, String)],
    data_map: Option<&Map<String, Value>>,
) {
    let (data, expiry, created) = match view.record {
        Some(r) => (r.data.clone(), r.expiry, r.created),
        None => (Bytes::from_static(super::EMPTY_DATA), Expiry::Default, now),
    };
    if !forward.is_empty() {
        let parsed;
        let map = match data_map {
            Some(m) => m,
            None => {
                parsed = json::parse_object(&data).unwrap_or_default();
                &parsed
            }
        };
        for (name, key) in forward {
            if let Some(v) = map.get(key) {
                if let Ok(hv) = HeaderValue::from_maybe_shared(Bytes::from(json::forward_value(v)))
                {
                    headers.insert(name.clone(), hv);
                }
            }
        }
    }
    // Stored data is ASCII JSON by construction; fall back to {} if not.
    let data =
        HeaderValue::from_maybe_shared(data).unwrap_or_else(|_| HeaderValue::from_static("{}"));
    headers.insert(X_SESSION.clone(), data);
    let id = match view.key {
        Some(k) => HeaderValue::from_bytes(&k.public_id_hex(ids)).expect("hex"),
        None => HeaderValue::from_static(""),
    };
    headers.insert(X_SESSION_ID.clone(), id);
    headers.insert(X_SESSION_NEW.clone(), bool_value(view.is_new));
    let age = super::expiry_age(expiry, created, now, policy);
    headers.insert(X_SESSION_EXPIRY_AGE.clone(), HeaderValue::from(age));
    let date = super::expiry_date(expiry, created, now, policy);
    headers.insert(
        X_SESSION_EXPIRY_DATE.clone(),
        HeaderValue::from_bytes(&rfc3339_bytes(date)).expect("ascii date"),
    );
    headers.insert(
        X_SESSION_EXPIRE_AT_BROWSER_CLOSE.clone(),
        bool_value(super::expire_at_browser_close(expiry, policy)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_893_456_000_999), "2030-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_827_696_000), "2000-02-29T12:34:56Z");
        assert_eq!(rfc3339(253_402_300_799_000), "9999-12-31T23:59:59Z");
        // Agrees with the time crate over a wide range.
        let mut t: i64 = -86_400_000;
        while t < 4_102_444_800_000 {
            let want = time::OffsetDateTime::from_unix_timestamp(t.div_euclid(1000).max(0))
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            assert_eq!(rfc3339(t.max(0)), want, "{t}");
            t += 7_777_777_777;
        }
    }

    #[test]
    fn new_session_headers() {
        let p = Policy {
            cookie_age_secs: 60,
            expire_at_browser_close: false,
            absolute_timeout_ms: 0,
        };
        let mut h = HeaderMap::new();
        let view = View {
            key: None,
            record: None,
            is_new: true,
        };
        inject(&mut h, &view, 0, &p, &IdKey::new(b"k"), &[], None);
        assert_eq!(h["x-session"], "{}");
        assert_eq!(h["x-session-id"], "");
        assert_eq!(h["x-session-new"], "true");
        assert_eq!(h["x-session-expiry-age"], "60");
        assert_eq!(h["x-session-expiry-date"], "1970-01-01T00:01:00Z");
        assert_eq!(h["x-session-expire-at-browser-close"], "false");
    }
}
