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

use std::cell::RefCell;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
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

pub fn b62_encode(n: u64) -> String {
    let mut s = String::with_capacity(11);
    push_b62(&mut s, n);
    s
}

fn push_b62(s: &mut String, mut n: u64) {
    // u64::MAX has 11 base62 digits.
    let mut digits = [0u8; 11];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = B62[(n % 62) as usize];
        n /= 62;
        if n == 0 {
            break;
        }
    }
    s.extend(digits[i..].iter().map(|&b| char::from(b)));
}

thread_local! {
    /// One zlib compressor and one decompressor per thread, reset after each
    /// use: a new compressor state per call is a few hundred KB allocated,
    /// zeroed and handed back to the kernel (the profile in BENCHMARKS.md).
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Payloads shorter than this are not offered to deflate unless they look
/// compressible (see [`worth_deflating`]).
const SHORT: usize = 128;
/// See [`worth_deflating`].
const SHORT_DISTINCT: u32 = 20;

/// Whether a payload is worth a deflate attempt. A short payload with many
/// distinct bytes (at least [`SHORT_DISTINCT`] and a third of its length:
/// Huffman codes gain little) and few repeated three-byte sequences
/// (deflate's matches: fewer than one per eight bytes) is stored
/// uncompressed without trying: sessiongate's typical session,
/// `{"_sessiongate_created":…,"n":1,"r":"<32 hex digits>"}` (85 bytes),
/// would come out of zlib at most a few bytes shorter, and the attempt
/// costs more than the compression: resetting miniz_oxide's state clears
/// about 370 KB (BENCHMARKS.md). Django compresses such a payload when that
/// saves two bytes and reads it either way, so an uncompressed one is still
/// Django's format (and byte for byte what Django writes when it does not
/// compress). Repetitive short payloads (`{"a":"aaaa…"}`) are still tried.
fn worth_deflating(data: &[u8]) -> bool {
    if data.len() >= SHORT {
        return true;
    }
    let mut bytes = [0u64; 4];
    for &b in data {
        bytes[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    let distinct = bytes.iter().map(|w| w.count_ones()).sum::<u32>();
    if distinct < SHORT_DISTINCT || (distinct as usize) < data.len() / 3 {
        return true;
    }
    let mut trigrams = [0u64; 64]; // a 4096-bit set of trigram hashes
    let mut repeats = 0;
    for w in data.windows(3) {
        let h = (usize::from(w[0]) * 961 + usize::from(w[1]) * 31 + usize::from(w[2])) & 4095;
        let (word, bit) = (h / 64, 1u64 << (h % 64));
        // A repeat, or a hash collision: either counts.
        repeats += usize::from(trigrams[word] & bit != 0);
        trigrams[word] |= bit;
    }
    repeats >= data.len() / 8
}

/// zlib of `data` (as Python's `zlib.compress`, level 6), or `None` when it
/// would not be at least two bytes shorter (then Django keeps the
/// uncompressed form, and so do we).
fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    if !worth_deflating(data) {
        return None;
    }
    deflate_always(data)
}

/// [`deflate`] without the [`worth_deflating`] look.
fn deflate_always(data: &[u8]) -> Option<Vec<u8>> {
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let z = slot.get_or_insert_with(|| Compress::new(Compression::default(), true));
        // Room for anything worth keeping: output that reaches `data.len() - 1`
        // bytes is not used, so compression stops there.
        let limit = data.len().saturating_sub(2);
        let mut out = Vec::with_capacity(limit);
        let done = limit > 0
            && matches!(
                z.compress_vec(data, &mut out, FlushCompress::Finish),
                Ok(Status::StreamEnd)
            );
        z.reset();
        done.then_some(out)
    })
}

/// zlib-decompresses `raw`, refusing more than [`MAX_DECOMPRESSED`] bytes.
fn inflate(raw: &[u8]) -> Result<Vec<u8>, BadSignature> {
    INFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(|| Decompress::new(true));
        let cap = MAX_DECOMPRESSED as usize + 1;
        let mut out = Vec::with_capacity((raw.len() * 4).clamp(64, cap));
        let result = loop {
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    break Err(BadSignature::Payload);
                }
                out.reserve_exact(out.len().min(cap - out.len()));
            }
            let (in_before, out_before) = (d.total_in(), out.len());
            let input = &raw[in_before as usize..];
            match d.decompress_vec(input, &mut out, FlushDecompress::None) {
                Ok(Status::StreamEnd) => break Ok(()),
                Ok(_) if d.total_in() != in_before || out.len() != out_before => {}
                // No progress with room to write: the stream is truncated.
                Ok(_) | Err(_) => break Err(BadSignature::Payload),
            }
        };
        d.reset(true);
        result.map(|()| out)
    })
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
        let mut value = String::with_capacity(json.len() * 4 / 3 + 64);
        match deflate(json) {
            Some(compressed) => {
                value.push('.');
                URL_SAFE_NO_PAD.encode_string(&compressed, &mut value);
            }
            None => URL_SAFE_NO_PAD.encode_string(json, &mut value),
        }
        value.push(':');
        push_b62(&mut value, now_secs.max(0) as u64);
        let tag = hmac::sign(&self.keys[0], value.as_bytes());
        value.push(':');
        URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut value);
        value
    }

    /// [`Signer::loads`], with the signing time (Unix seconds).
    pub fn loads_at(
        &self,
        token: &str,
        max_age: Option<(i64, i64)>,
    ) -> Result<(Vec<u8>, i64), BadSignature> {
        let ts = token
            .rsplit(':')
            .nth(1)
            .and_then(b62_decode)
            .ok_or(BadSignature::Malformed)?;
        Ok((self.loads(token, max_age)?, ts))
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
        let out = inflate(&raw)?;
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

    /// A signed token whose payload is `.` + base64 of `z` (any bytes).
    fn signed_compressed(s: &Signer, z: &[u8]) -> String {
        let value = format!(".{}:{}", URL_SAFE_NO_PAD.encode(z), b62_encode(1_000));
        let tag = hmac::sign(&s.keys[0], value.as_bytes());
        format!("{value}:{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    #[test]
    fn short_payloads_skip_deflate_only_where_it_would_save_a_few_bytes() {
        // Seeded xorshift: sessiongate-like sessions, and short payloads over
        // alphabets of 4 to 60 bytes with skewed frequencies.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let gain = |data: &[u8]| deflate_always(data).map_or(0, |z| data.len() - z.len());
        let (mut sessions_skipped, mut worst_session, mut worst_other) = (0, 0, 0);
        for i in 0..20_000 {
            if i % 2 == 0 {
                let r: String = (0..16).map(|_| format!("{:02x}", next() as u8)).collect();
                let data = format!(
                    "{{\"_sessiongate_created\":{},\"n\":{},\"r\":\"{r}\"}}",
                    1_796_196_716_000 + next() % 1_000_000,
                    next() % 1_000
                );
                if !worth_deflating(data.as_bytes()) {
                    sessions_skipped += 1;
                    worst_session = worst_session.max(gain(data.as_bytes()));
                }
            } else {
                let k = 4 + (next() % 57) as usize;
                let alphabet: Vec<u8> = (0..k).map(|_| 33 + (next() % 94) as u8).collect();
                let len = 8 + (next() % 120) as usize;
                let data: Vec<u8> = (0..len)
                    .map(|_| alphabet[((next() % (k * k) as u64) as f64).sqrt() as usize % k])
                    .collect();
                if !worth_deflating(&data) {
                    worst_other = worst_other.max(gain(&data));
                }
            }
        }
        assert!(sessions_skipped > 9_000, "{sessions_skipped}");
        assert!(worst_session <= 6, "{worst_session}");
        assert!(worst_other <= 12, "{worst_other}");
        // Repetitive short payloads and long ones are still compressed.
        let rep = br#"{"a":"aaaaaaaaaaaaaaaaaaaa"}"#;
        assert!(deflate(rep).is_some());
        let long = format!("{{\"big\":\"{}\"}}", "ab".repeat(64));
        assert!(deflate(long.as_bytes()).is_some());
    }

    #[test]
    fn the_reused_zlib_state_gives_the_same_answers() {
        let s = Signer::new(SESSION_SALT, b"k".repeat(40).as_slice(), &[]);
        let big = format!("{{\"big\":\"{}\"}}", "ab".repeat(500));
        let first = s.dumps(big.as_bytes(), 1_000);
        // Small, incompressible, empty and large payloads in turn on one thread.
        for i in 0..20 {
            let small = format!("{{\"n\":{i}}}");
            let t = s.dumps(small.as_bytes(), 1_000);
            assert!(!t.starts_with('.'), "{t}");
            assert_eq!(s.loads(&t, None).unwrap(), small.as_bytes());
            assert_eq!(s.dumps(big.as_bytes(), 1_000), first, "deterministic");
            assert_eq!(s.loads(&first, None).unwrap(), big.as_bytes());
            assert_eq!(s.loads(&s.dumps(b"", 0), None).unwrap(), b"");
        }
        let huge = format!("{{\"h\":\"{}\"}}", "xyz".repeat(100_000));
        let t = s.dumps(huge.as_bytes(), 1_000);
        assert!(t.starts_with('.') && t.len() < huge.len() / 10);
        assert_eq!(s.loads(&t, None).unwrap(), huge.as_bytes());
        assert_eq!(b62_encode(0), "0");
        assert_eq!(b62_encode(u64::MAX).len(), 11);
    }

    #[test]
    fn truncated_or_oversized_zlib_is_refused() {
        let s = Signer::new(SESSION_SALT, b"k".repeat(40).as_slice(), &[]);
        let z = deflate(&b"a".repeat(10_000)).unwrap();
        assert_eq!(
            s.loads(&signed_compressed(&s, &z[..z.len() - 6]), None),
            Err(BadSignature::Payload)
        );
        assert_eq!(
            s.loads(&signed_compressed(&s, b"not zlib"), None),
            Err(BadSignature::Payload)
        );
        // The state is reset after a failure: a good one still decodes.
        assert_eq!(
            s.loads(&signed_compressed(&s, &z), None).unwrap(),
            b"a".repeat(10_000)
        );
        let bomb = deflate(&vec![b' '; MAX_DECOMPRESSED as usize + 1]).unwrap();
        assert_eq!(
            s.loads(&signed_compressed(&s, &bomb), None),
            Err(BadSignature::Payload)
        );
        let at_limit = deflate(&vec![b' '; MAX_DECOMPRESSED as usize]).unwrap();
        assert_eq!(
            s.loads(&signed_compressed(&s, &at_limit), None)
                .map(|v| v.len()),
            Ok(MAX_DECOMPRESSED as usize)
        );
    }
}
