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

fn bool_value(b: bool) -> &'static [u8] {
    if b {
        b"true"
    } else {
        b"false"
    }
}

/// Request fields the proxy adds, already in their wire form
/// (`name: value\r\n` each), so they go into the upstream request head
/// without passing through the request's header map (an insertion there
/// hashes the name, may grow the map, and copies the value).
#[derive(Debug, Default, Clone)]
pub struct Added {
    buf: Vec<u8>,
}

impl Added {
    pub fn with_capacity(bytes: usize) -> Added {
        Added {
            buf: Vec::with_capacity(bytes),
        }
    }

    /// Adds a field; a value that is not a valid field value (a control
    /// character other than HTAB) is refused and `false` returned.
    pub fn push(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        // No early exit, so the check runs over whole vectors of bytes.
        let valid = value.iter().fold(true, |ok, &b| {
            ok & (((b >= 0x20) & (b != 0x7f)) | (b == b'\t'))
        });
        if valid {
            self.put(name, value);
        }
        valid
    }

    /// Adds a field whose value is already a valid header value.
    pub fn push_value(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.put(name, value.as_bytes());
    }

    fn put(&mut self, name: &HeaderName, value: &[u8]) {
        self.buf.extend_from_slice(name.as_str().as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(value);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// The fields as they are sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.buf
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r")?;
                let at = line.iter().position(|&b| b == b':')?;
                let name = std::str::from_utf8(&line[..at]).ok()?;
                Some((name, &line[at + 2..]))
            })
    }

    /// Inserts the fields into a header map (replacing fields of the same
    /// name), for a request hyper sends.
    pub fn apply_to(&self, h: &mut HeaderMap) {
        for (name, value) in self.iter() {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                h.insert(n, v);
            }
        }
    }

    pub fn to_map(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        self.apply_to(&mut h);
        h
    }
}

/// Adds the `X-Session*` headers and the route's `forward` headers.
/// `data_map` is the parsed session data when the caller already has it.
pub fn inject(
    out: &mut Added,
    view: &View<'_>,
    now: i64,
    policy: &Policy,
    ids: &IdKey,
    forward: &[(HeaderName, String)],
    data_map: Option<&Map<String, Value>>,
) {
    let empty = Bytes::from_static(super::EMPTY_DATA);
    let (data, expiry, created) = match view.record {
        Some(r) => (&r.data, r.expiry, r.created),
        None => (&empty, Expiry::Default, now),
    };
    if !forward.is_empty() {
        let parsed;
        let map = match data_map {
            Some(m) => m,
            None => {
                parsed = json::parse_object(data).unwrap_or_default();
                &parsed
            }
        };
        for (name, key) in forward {
            if let Some(v) = map.get(key) {
                out.push(name, &json::forward_value(v));
            }
        }
    }
    // Stored data is ASCII JSON by construction; fall back to {} if not.
    if !out.push(&X_SESSION, data) {
        out.push(&X_SESSION, b"{}");
    }
    match view.key {
        Some(k) => out.push(&X_SESSION_ID, &k.public_id_hex(ids)),
        None => out.push(&X_SESSION_ID, b""),
    };
    out.push(&X_SESSION_NEW, bool_value(view.is_new));
    let age = super::expiry_age(expiry, created, now, policy);
    out.push(&X_SESSION_EXPIRY_AGE, itoa(age, &mut [0; 20]));
    let date = super::expiry_date(expiry, created, now, policy);
    out.push(&X_SESSION_EXPIRY_DATE, &rfc3339_bytes(date));
    out.push(
        &X_SESSION_EXPIRE_AT_BROWSER_CLOSE,
        bool_value(super::expire_at_browser_close(expiry, policy)),
    );
}

/// A signed decimal number, without allocating.
fn itoa(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut m = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
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
        let view = View {
            key: None,
            record: None,
            is_new: true,
        };
        let mut added = Added::default();
        inject(&mut added, &view, 0, &p, &IdKey::new(b"k"), &[], None);
        let h = added.to_map();
        assert_eq!(h["x-session"], "{}");
        assert_eq!(h["x-session-id"], "");
        assert_eq!(h["x-session-new"], "true");
        assert_eq!(h["x-session-expiry-age"], "60");
        assert_eq!(h["x-session-expiry-date"], "1970-01-01T00:01:00Z");
        assert_eq!(h["x-session-expire-at-browser-close"], "false");
    }

    #[test]
    fn added_fields_are_wire_form_and_refuse_control_characters() {
        let mut a = Added::default();
        assert!(a.push(&X_SESSION_ID, b"abc"));
        assert!(a.push(&X_SESSION, b"{\"a\": \"\t\xe9\"}"));
        assert!(!a.push(&X_SESSION_NEW, b"bad\r\nx-injected: 1"));
        assert!(!a.push(&X_SESSION_NEW, b"nul\0"));
        assert_eq!(
            a.as_bytes(),
            b"x-session-id: abc\r\nx-session: {\"a\": \"\t\xe9\"}\r\n"
        );
        let pairs: Vec<_> = a.iter().collect();
        assert_eq!(pairs[0], ("x-session-id", &b"abc"[..]));
        assert_eq!(a.to_map().len(), 2);
        assert_eq!(itoa(-1209600, &mut [0; 20]), b"-1209600");
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(
            itoa(i64::MIN, &mut [0; 20]),
            i64::MIN.to_string().as_bytes()
        );
    }
}
