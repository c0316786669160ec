//! Django's signing format (`django.core.signing.dumps` / `loads`), as the
//! `db` engine's `session_data` and Django's `signed_cookies` cookie use it.
//!
//! `dumps(obj, salt=SALT, compress=True)` is
//! `PAYLOAD:TIMESTAMP:SIGNATURE` where
//! - `PAYLOAD` is the compact JSON, zlib-compressed when that saves at least
//!   two bytes (then prefixed with `.`), in URL-safe base64 without padding;
//! - `TIMESTAMP` is the signing time in Unix seconds, base62
//!   (`0-9A-Za-z`);
//! - `SIGNATURE` is URL-safe base64 (no padding) of
//!   HMAC-SHA256(SHA256(SALT + "signer" + SECRET), "PAYLOAD:TIMESTAMP")
//!   (Django's `salted_hmac` with the key salt `SALT + "signer"`).
//!
//! Verification tries `secret_key`, then each of `secret_key_fallbacks`
//! (Django's `SECRET_KEY_FALLBACKS`), in constant time (`ring::hmac::verify`).
//! Test vectors made by Django itself are in `tests/django/vectors.json`.

use std::io::{Read, Write};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use ring::{digest, hmac};

/// `SessionBase.key_salt` for the `db`, `cache` and `file` backends.
pub const SESSION_SALT: &str = "django.contrib.sessions.SessionStore";
/// The `signed_cookies` backend's salt.
pub const SIGNED_COOKIES_SALT: &str = "django.contrib.sessions.backends.signed_cookies";

/// Decompressed payloads larger than this are refused (a zlib bomb in a row
/// or cookie must not exhaust memory).
const MAX_DECOMPRESSED: u64 = 16 * 1024 * 1024;

const B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a token was not accepted. Never carries the token or the data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSignature {
    #[error("not a signed value (no separator)")]
    Malformed,
    #[error("signature does not match")]
    Mismatch,
    #[error("bad timestamp")]
    Timestamp,
    #[error("signature age {age} s > {max_age} s")]
    Expired { age: i64, max_age: i64 },
    #[error("payload is not valid base64, zlib or UTF-8")]
    Payload,
}

/// Signs and verifies under one salt with a secret and its fallbacks.
pub struct Signer {
    /// The current key first, then the fallbacks.
    keys: Vec<hmac::Key>,
}

/// Django's `salted_hmac` key: SHA-256 of the key salt followed by the secret.
fn salted_key(salt: &str, secret: &[u8]) -> hmac::Key {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(salt.as_bytes());
    ctx.update(b"signer");
    ctx.update(secret);
    hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref())
}

pub fn b62_encode(mut n: u64) -> String {
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::with_capacity(11);
    while n > 0 {
        out.push(B62[(n % 62) as usize]);
        n /= 62;
    }
    out.reverse();
    String::from_utf8(out).expect("base62 digits are ASCII")
}

pub fn b62_decode(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for b in digits.bytes() {
        let d = B62.iter().position(|&c| c == b)? as i64;
        n = n.checked_mul(62)?.checked_add(d)?;
    }
    Some(if neg { -n } else { n })
}

impl Signer {
    pub fn new(salt: &str, secret: &[u8], fallbacks: &[Vec<u8>]) -> Signer {
        let keys = std::iter::once(secret)
            .chain(fallbacks.iter().map(Vec::as_slice))
            .map(|s| salted_key(salt, s))
            .collect();
        Signer { keys }
    }

    /// `signing.dumps(obj, compress=True)` where `json` is the compact JSON
    /// of `obj`, signed at `now_secs` (Unix seconds). `json` must be ASCII
    /// (non-ASCII escaped, as `session::json::to_ascii_vec` writes it):
    /// Django decodes the payload as Latin-1.
    pub fn dumps(&self, json: &[u8], now_secs: i64) -> String {
        let mut enc = ZlibEncoder::new(
            Vec::with_capacity(json.len() / 2 + 16),
            Compression::default(),
        );
        enc.write_all(json)
            .expect("compressing into memory cannot fail");
        let compressed = enc.finish().expect("compressing into memory cannot fail");
        let mut value = String::with_capacity(json.len() * 4 / 3 + 64);
        if compressed.len() + 1 < json.len() {
            value.push('.');
            URL_SAFE_NO_PAD.encode_string(&compressed, &mut value);
        } else {
            URL_SAFE_NO_PAD.encode_string(json, &mut value);
        }
        value.push(':');
        value.push_str(&b62_encode(now_secs.max(0) as u64));
        let tag = hmac::sign(&self.keys[0], value.as_bytes());
        value.push(':');
        URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut value);
        value
    }

    /// `signing.loads(token, max_age=...)`: the JSON bytes of the payload.
    /// `max_age` is `(now_secs, max_age_secs)`.
    pub fn loads(&self, token: &str, max_age: Option<(i64, i64)>) -> Result<Vec<u8>, BadSignature> {
        let (value, sig) = token.rsplit_once(':').ok_or(BadSignature::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| BadSignature::Mismatch)?;
        if !self
            .keys
            .iter()
            .any(|k| hmac::verify(k, value.as_bytes(), &sig).is_ok())
        {
            return Err(BadSignature::Mismatch);
        }
        let (payload, stamp) = value.rsplit_once(':').ok_or(BadSignature::Malformed)?;
        let ts = b62_decode(stamp).ok_or(BadSignature::Timestamp)?;
        if let Some((now, max)) = max_age {
            let age = now - ts;
            if age > max {
                return Err(BadSignature::Expired { age, max_age: max });
            }
        }
        let (compressed, b64) = match payload.strip_prefix('.') {
            Some(rest) => (true, rest),
            None => (false, payload),
        };
        let raw = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| BadSignature::Payload)?;
        if !compressed {
            return Ok(raw);
        }
        let mut out = Vec::with_capacity(raw.len() * 3);
        ZlibDecoder::new(raw.as_slice())
            .take(MAX_DECOMPRESSED + 1)
            .read_to_end(&mut out)
            .map_err(|_| BadSignature::Payload)?;
        if out.len() as u64 > MAX_DECOMPRESSED {
            return Err(BadSignature::Payload);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Vectors written by real Django (`tests/django/vectors.py generate`).
    const VECTORS: &str = include_str!("../../../tests/django/vectors.json");

    fn vectors() -> Vec<Value> {
        let v: Value = serde_json::from_str(VECTORS).unwrap();
        v["vectors"].as_array().unwrap().clone()
    }

    fn signer(v: &Value) -> Signer {
        let fallbacks: Vec<Vec<u8>> = v["fallbacks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().unwrap().as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default();
        Signer::new(
            v["salt"].as_str().unwrap(),
            v["secret"].as_str().unwrap().as_bytes(),
            &fallbacks,
        )
    }

    #[test]
    fn decodes_what_django_signed() {
        let vs = vectors();
        assert!(vs.len() > 15);
        let mut compressed = 0;
        for v in &vs {
            let token = v["token"].as_str().unwrap();
            let got = signer(v).loads(token, None);
            if v["valid"].as_bool().unwrap() {
                let json: Value =
                    serde_json::from_slice(&got.unwrap_or_else(|e| panic!("{token}: {e}")))
                        .unwrap();
                assert_eq!(json, v["data"], "{token}");
                compressed += usize::from(token.starts_with('.'));
            } else {
                assert_eq!(got, Err(BadSignature::Mismatch), "{}", v["why"]);
            }
        }
        assert!(compressed >= 2, "the vectors include compressed payloads");
    }

    #[test]
    fn signs_as_django_does() {
        // Uncompressed payloads are byte-for-byte Django's when the JSON
        // text is the same (Python's json.dumps with separators=(",", ":")).
        for v in vectors().iter().filter(|v| v["valid"].as_bool().unwrap()) {
            let token = v["token"].as_str().unwrap();
            if token.starts_with('.') || v["fallbacks"].is_array() {
                continue;
            }
            let json = URL_SAFE_NO_PAD
                .decode(token.split(':').next().unwrap())
                .unwrap();
            let ts = v["timestamp"].as_i64().unwrap();
            assert_eq!(signer(v).dumps(&json, ts), token);
        }
    }

    #[test]
    fn round_trip_compressed_and_max_age() {
        let s = Signer::new(SESSION_SALT, b"k".repeat(40).as_slice(), &[]);
        let json = format!("{{\"big\":\"{}\"}}", "ab".repeat(500));
        let t = s.dumps(json.as_bytes(), 1_000);
        assert!(t.starts_with('.'), "{t}");
        assert_eq!(s.loads(&t, None).unwrap(), json.as_bytes());
        assert!(s.loads(&t, Some((1_010, 10))).is_ok());
        assert_eq!(
            s.loads(&t, Some((1_011, 10))),
            Err(BadSignature::Expired {
                age: 11,
                max_age: 10
            })
        );
        let other = Signer::new(SIGNED_COOKIES_SALT, b"k".repeat(40).as_slice(), &[]);
        assert_eq!(other.loads(&t, None), Err(BadSignature::Mismatch));
        assert_eq!(s.loads("nocolon", None), Err(BadSignature::Malformed));
        assert_eq!(b62_decode(&b62_encode(1_790_000_000)), Some(1_790_000_000));
        assert_eq!(b62_encode(1_790_000_000), "1x8elk");
    }
}
