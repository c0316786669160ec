//! Sessions: keys, records, expiry (Django's `get_expiry_age` family), the
//! upstream's directives as a patch, the cookie, and the request headers.

pub mod cookie;
pub mod directives;
pub mod headers;
pub mod json;
pub mod key;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value};

pub use directives::{DirectiveError, Patch};
pub use key::SessionKey;

/// A session as stored: the data as canonical ASCII JSON text (the exact
/// bytes of the `X-Session` request header), its expiry setting and times.
///
/// Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub data: Bytes,
    pub expiry: Expiry,
    /// When the session was first written (for `absolute_timeout`).
    pub created: i64,
    /// The last write.
    pub modified: i64,
    /// Server-side end of life, computed at the last write.
    pub expires_at: i64,
    /// Which stored state this record was read from, for an engine whose
    /// writes compare and set: not part of the record's value.
    pub stamp: Stamp,
}

/// The version of the stored state a record was read from, for an engine
/// whose writes compare and set (Redis): a request's write can then start
/// from the record it loaded instead of reading it again, and the
/// compare-and-set still catches a state that changed since. None
/// elsewhere, and for a record not read from a store.
///
/// A mark, not a value: two records are equal whatever their stamps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamp {
    /// The stored state's version.
    pub version: Option<u64>,
    /// With a user index (SPEC 9): until when (Unix ms) the user's index
    /// set was known to live at that version. 0: the state carried no
    /// index fields at all; negative: fields that make no entry (an empty
    /// user, or one without a readable `until`).
    pub indexed_until: i64,
}

impl Stamp {
    pub const NONE: Stamp = Stamp {
        version: None,
        indexed_until: 0,
    };
}

impl PartialEq for Stamp {
    fn eq(&self, _: &Stamp) -> bool {
        true
    }
}

/// `session.set_expiry(...)` as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No custom expiry: the global policy (`cookie_age`, `expire_at_browser_close`).
    Default,
    /// Seconds of inactivity (from the last write).
    Seconds(i64),
    /// `set_expiry(0)`: a browser-close cookie; the server keeps it `cookie_age`.
    BrowserClose,
    /// A fixed end, Unix milliseconds.
    At(i64),
}

/// The global session policy the expiry computations need.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub cookie_age_secs: i64,
    pub expire_at_browser_close: bool,
    /// 0: no absolute timeout.
    pub absolute_timeout_ms: i64,
}

impl Policy {
    pub fn from_config(c: &crate::config::SessionConfig) -> Policy {
        Policy {
            cookie_age_secs: c.cookie_age.as_secs() as i64,
            expire_at_browser_close: c.expire_at_browser_close,
            absolute_timeout_ms: c.absolute_timeout.as_millis() as i64,
        }
    }
}

pub const EMPTY_DATA: &[u8] = b"{}";

/// The wall clock, in Unix milliseconds, with an offset tests can move.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    pub fn now_ms(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        real + self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, d: std::time::Duration) {
        self.offset_ms
            .fetch_add(d.as_millis() as i64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Record {
    /// A record about to be written for the first time.
    pub fn new_at(now: i64) -> Record {
        Record {
            data: Bytes::from_static(EMPTY_DATA),
            expiry: Expiry::Default,
            created: now,
            modified: now,
            expires_at: now,
            stamp: Stamp::NONE,
        }
    }

    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Parses the stored data (only needed when it is changed or inspected).
    pub fn data_map(&self) -> Map<String, Value> {
        json::parse_object(&self.data).unwrap_or_default()
    }

    pub fn data_is_empty(&self) -> bool {
        self.data.as_ref() == EMPTY_DATA
    }

    /// Applies Replace, Clear, Update, Delete and Expiry (not Flush or
    /// Cycle-Key, which act on the key) and marks the record written at
    /// `now`. Returns whether the session counts as modified.
    pub fn apply_patch(&mut self, patch: &Patch, now: i64, p: &Policy) -> bool {
        let modified = if patch.touches_data() {
            let mut map = if patch.replace.is_some() || patch.clear {
                Map::new()
            } else {
                self.data_map()
            };
            let m = patch.apply_data(&mut map, &mut self.expiry);
            self.data = json::encode_object(&map);
            m
        } else {
            patch.apply_data(&mut Map::new(), &mut self.expiry)
        };
        self.touch(now, p);
        modified
    }

    /// Marks the record written at `now`: computes its server-side end of life.
    pub fn touch(&mut self, now: i64, p: &Policy) {
        self.modified = now;
        self.expires_at = server_expiry(self.expiry, self.created, now, p);
    }

    /// `get_expiry_age()` in whole seconds, as seen at `now`.
    pub fn expiry_age(&self, now: i64, p: &Policy) -> i64 {
        expiry_age(self.expiry, self.created, now, p)
    }

    /// `get_expiry_date()` in Unix milliseconds, as seen at `now`.
    pub fn expiry_date(&self, now: i64, p: &Policy) -> i64 {
        expiry_date(self.expiry, self.created, now, p)
    }

    pub fn expire_at_browser_close(&self, p: &Policy) -> bool {
        expire_at_browser_close(self.expiry, p)
    }
}

fn absolute_end(created: i64, p: &Policy) -> Option<i64> {
    (p.absolute_timeout_ms > 0).then(|| created.saturating_add(p.absolute_timeout_ms))
}

/// Django's `get_expiry_date` (capped by `absolute_timeout`), Unix ms.
pub fn expiry_date(e: Expiry, created: i64, now: i64, p: &Policy) -> i64 {
    let d = match e {
        Expiry::Default | Expiry::BrowserClose => now + p.cookie_age_secs * 1000,
        Expiry::Seconds(n) => now + n * 1000,
        Expiry::At(t) => t,
    };
    match absolute_end(created, p) {
        Some(end) => d.min(end),
        None => d,
    }
}

/// Django's `get_expiry_age` in whole seconds (capped by `absolute_timeout`).
pub fn expiry_age(e: Expiry, created: i64, now: i64, p: &Policy) -> i64 {
    match (e, absolute_end(created, p)) {
        (Expiry::Default | Expiry::BrowserClose, None) => p.cookie_age_secs,
        (Expiry::Seconds(n), None) => n,
        _ => (expiry_date(e, created, now, p) - now).div_euclid(1000),
    }
}

/// Where the server forgets a session written at `now`.
pub fn server_expiry(e: Expiry, created: i64, now: i64, p: &Policy) -> i64 {
    expiry_date(e, created, now, p)
}

pub fn expire_at_browser_close(e: Expiry, p: &Policy) -> bool {
    match e {
        Expiry::Default => p.expire_at_browser_close,
        Expiry::BrowserClose => true,
        Expiry::Seconds(_) | Expiry::At(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        cookie_age_secs: 1000,
        expire_at_browser_close: false,
        absolute_timeout_ms: 0,
    };

    #[test]
    fn expiry_forms_follow_django() {
        let now = 1_000_000;
        assert_eq!(expiry_age(Expiry::Default, now, now, &P), 1000);
        assert_eq!(expiry_age(Expiry::BrowserClose, now, now, &P), 1000);
        assert_eq!(expiry_age(Expiry::Seconds(60), now, now, &P), 60);
        assert_eq!(expiry_age(Expiry::At(now + 90_500), now, now, &P), 90);
        assert_eq!(expiry_date(Expiry::Seconds(60), now, now, &P), now + 60_000);
        assert!(expire_at_browser_close(Expiry::BrowserClose, &P));
        assert!(!expire_at_browser_close(Expiry::Default, &P));
        let p2 = Policy {
            expire_at_browser_close: true,
            ..P
        };
        assert!(expire_at_browser_close(Expiry::Default, &p2));
        assert!(!expire_at_browser_close(Expiry::Seconds(5), &p2));
    }

    #[test]
    fn absolute_timeout_caps_everything() {
        let p = Policy {
            absolute_timeout_ms: 100_000,
            ..P
        };
        let created = 0;
        let now = 40_000;
        assert_eq!(expiry_age(Expiry::Default, created, now, &p), 60);
        assert_eq!(expiry_date(Expiry::Seconds(500), created, now, &p), 100_000);
        assert_eq!(expiry_age(Expiry::Seconds(10), created, now, &p), 10);
        let mut r = Record::new_at(created);
        r.touch(now, &p);
        assert_eq!(r.expires_at, 100_000);
    }
}
