//! The `signed_cookies` engine: the session lives in the cookie itself.
//!
//! Token = base64url( payload || HMAC-SHA256(mac_key, name || 0 || payload) ),
//! and with `encrypt = true` the signed bytes are sealed with AES-256-GCM
//! (random 96-bit nonce, the cookie name as associated data):
//! token = base64url( nonce || AES-256-GCM(enc_key, signed) ).
//! Both keys are derived from `secret_key` (HMAC-SHA256 with a label);
//! `secret_key_fallbacks` are tried in order for verification only. The MAC
//! is checked with `ring::hmac::verify` (constant time).
//!
//! The payload carries the session key (so `X-Session-Id` works and changes
//! on Cycle-Key), the creation and write times, the expiry setting and the
//! server-side end of life, so `set_expiry` is honoured (Django's cookie
//! backend ignores it: ticket 27775). There is no server state: a copied
//! cookie stays valid until it expires, and concurrent requests do not merge.
//!
//! Tokens longer than one cookie are split by the proxy across numbered
//! cookies (`name`, `name.1`, `name.2`, ...); see [`split`] and [`join`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderMap, COOKIE};
use ring::{aead, hmac};

use std::sync::Arc;

use crate::session::{Expiry, Record, SessionKey, Stamp};

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 32 + 8 * 3 + 1 + 8;
const MAC_LEN: usize = 32;
const NONCE_LEN: usize = 12;
/// Each cookie's name + `=` + value stays within this many bytes.
pub const MAX_COOKIE_BYTES: usize = 4096;
/// At most this many cookies carry one session.
pub const MAX_CHUNKS: usize = 10;

struct Keys {
    mac: hmac::Key,
    enc: aead::LessSafeKey,
}

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&k, label);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

impl Keys {
    fn new(secret: &[u8]) -> Keys {
        let mac = hmac::Key::new(
            hmac::HMAC_SHA256,
            &derive(secret, b"sessiongate.signed_cookies.mac"),
        );
        let enc_key = derive(secret, b"sessiongate.signed_cookies.enc");
        let enc = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &enc_key).expect("32-byte AES key"),
        );
        Keys { mac, enc }
    }
}

/// The token is larger than the cookies of its format can carry
/// (`MAX_CHUNKS`, or Django's one).
#[derive(Debug, thiserror::Error)]
#[error("the session is too large for signed cookies: {size} bytes encoded, at most {limit} fit in {}", in_cookies(*.cookies))]
pub struct TooLarge {
    pub size: usize,
    pub limit: usize,
    /// How many cookies the format may use.
    pub cookies: usize,
}

fn in_cookies(n: usize) -> String {
    if n == 1 {
        "one cookie (Django's format is not split)".into()
    } else {
        format!("{n} cookies")
    }
}

/// The engine's codec for one configuration (its cookie name, keys and
/// format), replaced whole when a reload changes them.
struct Codec {
    name: String,
    encrypt: bool,
    /// `format = "django"`: Django's `signed_cookies` format instead
    /// (`signing.dumps`, salt `django.contrib.sessions.backends.signed_cookies`,
    /// signed, not encrypted, one cookie), and the max age of its timestamp.
    django: Option<(crate::store::db::Signer, i64)>,
    /// Django's format with `absolute_timeout` set: the cookie also carries
    /// the session's creation time, as `_sessiongate_created` (Unix ms, as
    /// the db engine keeps it in a row), which Django's format has no
    /// place for. Without it, a session's age would count from its last
    /// write.
    keep_created: bool,
    /// The current key first, then the fallbacks.
    keys: Vec<Keys>,
}

impl Codec {
    fn new(cookie_name: &str, secret: &[u8], fallbacks: &[Vec<u8>], encrypt: bool) -> Self {
        let mut keys = vec![Keys::new(secret)];
        keys.extend(fallbacks.iter().map(|f| Keys::new(f)));
        Codec {
            name: cookie_name.to_string(),
            encrypt,
            keys,
            django: None,
            keep_created: false,
        }
    }

    /// Django's format only: whether the cookie carries the creation time
    /// (`absolute_timeout` set; see the field).
    fn keeping_creation(mut self, on: bool) -> Self {
        self.keep_created = on && self.django.is_some();
        self
    }

    /// Django's `signed_cookies` format (SPEC 8), verified with `secret`
    /// then `fallbacks`, valid `max_age_secs` (`cookie_age`) from its signing.
    fn django(cookie_name: &str, secret: &[u8], fallbacks: &[Vec<u8>], max_age_secs: i64) -> Self {
        let mut s = Self::new(cookie_name, secret, fallbacks, false);
        s.django = Some((
            crate::store::db::Signer::new(
                crate::store::db::django::SIGNED_COOKIES_SALT,
                secret,
                fallbacks,
            ),
            max_age_secs,
        ));
        s
    }

    fn from_config(config: &crate::config::Config) -> Self {
        let (s, c) = (&config.session, &config.store);
        if c.django_format {
            Codec::django(
                &s.cookie_name,
                &s.secret_key,
                &s.secret_key_fallbacks,
                s.cookie_age.as_secs() as i64,
            )
            .keeping_creation(!s.absolute_timeout.is_zero())
        } else {
            Codec::new(
                &s.cookie_name,
                &s.secret_key,
                &s.secret_key_fallbacks,
                c.encrypt,
            )
        }
    }

    /// Whether this is Django's format: no key in the cookie (`X-Session-Id`
    /// is empty), one cookie only.
    pub fn is_django(&self) -> bool {
        self.django.is_some()
    }

    /// The request's token: [`join`] of the numbered cookies, or Django's one cookie.
    pub fn token(&self, headers: &HeaderMap) -> Option<Option<String>> {
        if self.django.is_some() {
            let v = crate::session::cookie::find(headers, &self.name)?;
            return Some(std::str::from_utf8(v).ok().map(str::to_string));
        }
        join(headers, &self.name)
    }

    /// The cookie values for `token`: [`split`], or Django's one cookie.
    pub fn cookie_values(&self, token: &str) -> Result<Vec<String>, TooLarge> {
        if self.django.is_some() {
            let limit = MAX_COOKIE_BYTES - self.name.len() - 1;
            if token.len() > limit {
                return Err(TooLarge {
                    size: token.len(),
                    limit,
                    cookies: 1,
                });
            }
            return Ok(vec![token.to_string()]);
        }
        split(&self.name, token)
    }

    /// The numbered chunk cookies the request carried (none in Django's format).
    pub fn chunks(&self, headers: &HeaderMap) -> Vec<usize> {
        if self.django.is_some() {
            return Vec::new();
        }
        presented_chunks(headers, &self.name)
    }

    fn encode_django(&self, signer: &crate::store::db::Signer, r: &Record) -> String {
        let mut map = r.data_map();
        if self.keep_created {
            map.insert(crate::store::db::CREATED_KEY.into(), r.created.into());
        }
        use serde_json::Value;
        let key = crate::store::db::EXPIRY_KEY;
        // The expiry is the record's, never a key an upstream wrote (SPEC 8).
        map.remove(key);
        match r.expiry {
            Expiry::Default => {}
            Expiry::BrowserClose => {
                map.insert(key.into(), Value::from(0));
            }
            Expiry::Seconds(n) => {
                map.insert(key.into(), Value::from(n));
            }
            Expiry::At(t) => {
                map.insert(key.into(), Value::from(crate::store::db::iso_aware(t)));
            }
        }
        signer.dumps(
            &crate::session::json::to_ascii_vec(&map),
            r.modified.div_euclid(1000),
        )
    }

    fn decode_django(
        &self,
        signer: &crate::store::db::Signer,
        max_age: i64,
        token: &[u8],
        now: i64,
    ) -> Option<(SessionKey, Record)> {
        let token = std::str::from_utf8(token).ok()?;
        let (json, ts) = signer
            .loads_at(token, Some((now.div_euclid(1000), max_age)))
            .ok()?;
        let mut map = crate::session::json::parse_object(&json)?;
        let expiry = crate::store::db::expiry_from_value(map.remove(crate::store::db::EXPIRY_KEY));
        let signed = ts * 1000;
        // A cookie from before `absolute_timeout` was set, or Django's own,
        // counts from its signing.
        let created = match self.keep_created {
            true => map
                .remove(crate::store::db::CREATED_KEY)
                .and_then(|v| v.as_i64())
                .map_or(signed, |c| c.min(signed)),
            false => signed,
        };
        let expires_at = match expiry {
            Expiry::Seconds(n) => signed + n * 1000,
            Expiry::At(t) => t,
            Expiry::Default | Expiry::BrowserClose => signed + max_age * 1000,
        };
        let r = Record {
            data: crate::session::json::encode_object(&map),
            expiry,
            created,
            // The end of the signing second (Django stamps whole seconds),
            // as the db engine reads its rows: `refresh_interval` never
            // counts a write as older than it is.
            modified: signed.saturating_add(999).min(now),
            expires_at,
            stamp: Stamp::NONE,
        };
        // The cookie carries no key: a fresh one per request stands in for it
        // (never shown: `X-Session-Id` is empty in this format).
        r.is_live(now).then(|| (SessionKey::generate(), r))
    }

    fn mac(&self, k: &Keys, payload: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&k.mac);
        ctx.update(self.name.as_bytes());
        ctx.update(&[0]);
        ctx.update(payload);
        ctx.sign()
    }

    /// Encodes a session as one token (before splitting into cookies).
    pub fn encode(&self, key: &SessionKey, r: &Record) -> String {
        if let Some((signer, _)) = &self.django {
            return self.encode_django(signer, r);
        }
        let mut buf = Vec::with_capacity(NONCE_LEN + HEADER_LEN + r.data.len() + MAC_LEN + 16);
        if self.encrypt {
            buf.extend_from_slice(&[0u8; NONCE_LEN]);
        }
        let start = buf.len();
        buf.push(VERSION);
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&r.created.to_le_bytes());
        buf.extend_from_slice(&r.modified.to_le_bytes());
        buf.extend_from_slice(&r.expires_at.to_le_bytes());
        let (kind, value) = match r.expiry {
            Expiry::Default => (0u8, 0i64),
            Expiry::Seconds(n) => (1, n),
            Expiry::BrowserClose => (2, 0),
            Expiry::At(t) => (3, t),
        };
        buf.push(kind);
        buf.extend_from_slice(&value.to_le_bytes());
        buf.extend_from_slice(&r.data);
        let tag = self.mac(&self.keys[0], &buf[start..]);
        buf.extend_from_slice(tag.as_ref());
        if self.encrypt {
            let mut nonce = [0u8; NONCE_LEN];
            getrandom::fill(&mut nonce).expect("the OS random number generator failed");
            buf[..NONCE_LEN].copy_from_slice(&nonce);
            let mut sealed = buf.split_off(NONCE_LEN);
            self.keys[0]
                .enc
                .seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(self.name.as_bytes()),
                    &mut sealed,
                )
                .expect("AES-GCM sealing of a small buffer");
            buf.extend_from_slice(&sealed);
        }
        URL_SAFE_NO_PAD.encode(&buf)
    }

    /// Decodes a token: `None` when it is malformed, tampered with, made
    /// with an unknown key, or expired at `now`.
    pub fn decode(&self, token: &[u8], now: i64) -> Option<(SessionKey, Record)> {
        if let Some((signer, max_age)) = &self.django {
            return self.decode_django(signer, *max_age, token, now);
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        for k in &self.keys {
            let signed: Vec<u8>;
            let signed_ref: &[u8] = if self.encrypt {
                if raw.len() < NONCE_LEN + aead::AES_256_GCM.tag_len() {
                    return None;
                }
                let nonce = aead::Nonce::try_assume_unique_for_key(&raw[..NONCE_LEN]).ok()?;
                let mut ct = raw[NONCE_LEN..].to_vec();
                match k
                    .enc
                    .open_in_place(nonce, aead::Aad::from(self.name.as_bytes()), &mut ct)
                {
                    Ok(plain) => {
                        signed = plain.to_vec();
                        &signed
                    }
                    Err(_) => continue,
                }
            } else {
                &raw
            };
            if signed_ref.len() < HEADER_LEN + MAC_LEN {
                return None;
            }
            let (payload, tag) = signed_ref.split_at(signed_ref.len() - MAC_LEN);
            let mut ctx_bytes = Vec::with_capacity(self.name.len() + 1 + payload.len());
            ctx_bytes.extend_from_slice(self.name.as_bytes());
            ctx_bytes.push(0);
            ctx_bytes.extend_from_slice(payload);
            if hmac::verify(&k.mac, &ctx_bytes, tag).is_err() {
                continue;
            }
            return parse_payload(payload, now);
        }
        None
    }
}

/// The `signed_cookies` engine: the [`Codec`] of the running configuration.
/// A reload that changes `secret_key`, its fallbacks, the cookie's name or
/// age (or `absolute_timeout`, for Django's format) takes effect here at
/// once ([`SignedCookies::follow`]): a key rotated by a reload signs the
/// next cookie, and a key dropped from the fallbacks verifies no more.
pub struct SignedCookies {
    codec: arc_swap::ArcSwap<Codec>,
}

impl SignedCookies {
    fn with(codec: Codec) -> Self {
        SignedCookies {
            codec: arc_swap::ArcSwap::from_pointee(codec),
        }
    }

    /// sessiongate's own format, signed with `secret` (and verified with it
    /// and then `fallbacks`), encrypted too when `encrypt`.
    pub fn new(cookie_name: &str, secret: &[u8], fallbacks: &[Vec<u8>], encrypt: bool) -> Self {
        Self::with(Codec::new(cookie_name, secret, fallbacks, encrypt))
    }

    /// Django's `signed_cookies` format (SPEC 8), verified with `secret`
    /// then `fallbacks`, valid `max_age_secs` (`cookie_age`) from its signing.
    pub fn django(
        cookie_name: &str,
        secret: &[u8],
        fallbacks: &[Vec<u8>],
        max_age_secs: i64,
    ) -> Self {
        Self::with(Codec::django(cookie_name, secret, fallbacks, max_age_secs))
    }

    /// The engine `config` describes (`[store] format` and `encrypt`, and
    /// the `[session]` keys the cookie depends on).
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::with(Codec::from_config(config))
    }

    /// Django's format only: whether the cookie carries the creation time
    /// (`absolute_timeout` set; see [`Codec`]'s field).
    pub fn keeping_creation(self, on: bool) -> Self {
        let codec = Arc::try_unwrap(self.codec.into_inner())
            .unwrap_or_else(|_| unreachable!("the builder holds the only reference"));
        Self::with(codec.keeping_creation(on))
    }

    /// The keys and names in effect now, frozen: a proxy generation reads
    /// and makes every cookie of a request with one codec, the one its
    /// configuration says, even while a reload swaps in the next (which
    /// [`SignedCookies::follow`] installs before the workers take the new
    /// generation up).
    pub fn snapshot(&self) -> SignedCookies {
        SignedCookies {
            codec: arc_swap::ArcSwap::new(self.codec.load_full()),
        }
    }

    /// A reload: cookies from now on are made and read with what `config`
    /// says (its `[store]` is the running one: a reload refuses another).
    pub fn follow(&self, config: &crate::config::Config) {
        self.codec.store(Arc::new(Codec::from_config(config)));
    }

    /// Whether this is Django's format: no key in the cookie (`X-Session-Id`
    /// is empty), one cookie only.
    pub fn is_django(&self) -> bool {
        self.codec.load().is_django()
    }

    /// The request's token: [`join`] of the numbered cookies, or Django's one cookie.
    pub fn token(&self, headers: &HeaderMap) -> Option<Option<String>> {
        self.codec.load().token(headers)
    }

    /// The cookie values for `token`: [`split`], or Django's one cookie.
    pub fn cookie_values(&self, token: &str) -> Result<Vec<String>, TooLarge> {
        self.codec.load().cookie_values(token)
    }

    /// The numbered chunk cookies the request carried (none in Django's format).
    pub fn chunks(&self, headers: &HeaderMap) -> Vec<usize> {
        self.codec.load().chunks(headers)
    }

    /// Encodes a session as one token (before splitting into cookies).
    pub fn encode(&self, key: &SessionKey, r: &Record) -> String {
        self.codec.load().encode(key, r)
    }

    /// Decodes a token: `None` when it is malformed, tampered with, made
    /// with an unknown key, or expired at `now`.
    pub fn decode(&self, token: &[u8], now: i64) -> Option<(SessionKey, Record)> {
        self.codec.load().decode(token, now)
    }
}

/// Signed cookies keep no server state: the proxy decodes the cookie on
/// load ([`SignedCookies::decode`]) and applies patches with
/// [`super::apply_local`]. The trait methods are what "no server side"
/// means for each operation.
impl super::Store for SignedCookies {
    async fn load(
        &self,
        _key: &SessionKey,
        _now: i64,
    ) -> Result<Option<Record>, super::StoreError> {
        Ok(None)
    }
    async fn create(&self, _record: Record) -> Result<SessionKey, super::StoreError> {
        Ok(SessionKey::generate())
    }
    async fn apply(
        &self,
        _key: &SessionKey,
        _patch: &crate::session::Patch,
        _ctx: super::WriteCtx,
    ) -> Result<super::Applied, super::StoreError> {
        Err(super::StoreError::Unavailable(
            "signed cookies are patched in the proxy, not in a store".into(),
        ))
    }
    async fn delete(&self, _key: &SessionKey) -> Result<(), super::StoreError> {
        Ok(())
    }
    async fn clear_expired(&self, _now: i64) -> Result<u64, super::StoreError> {
        Ok(0)
    }
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(a)
}

fn parse_payload(p: &[u8], now: i64) -> Option<(SessionKey, Record)> {
    if p.len() < HEADER_LEN || p[0] != VERSION {
        return None;
    }
    let key = SessionKey::parse_bytes(&p[1..33])?;
    let created = i64_at(p, 33);
    let modified = i64_at(p, 41);
    let expires_at = i64_at(p, 49);
    let value = i64_at(p, 58);
    let expiry = match p[57] {
        0 => Expiry::Default,
        1 => Expiry::Seconds(value),
        2 => Expiry::BrowserClose,
        3 => Expiry::At(value),
        _ => return None,
    };
    let data = &p[HEADER_LEN..];
    // Written by us, so canonical; still refuse anything that is not an
    // ASCII JSON object rather than send it upstream.
    if !data.is_ascii() || crate::session::json::parse_object(data).is_none() {
        return None;
    }
    let r = Record {
        data: Bytes::copy_from_slice(data),
        expiry,
        created,
        modified,
        expires_at,
        stamp: Stamp::NONE,
    };
    r.is_live(now).then_some((key, r))
}

/// The name of chunk `i` (0 is the base name).
pub fn chunk_name(base: &str, i: usize) -> String {
    if i == 0 {
        base.to_string()
    } else {
        format!("{base}.{i}")
    }
}

/// Splits a token into cookie values: the first is `<count>.<part>`, the
/// rest plain parts, each cookie's `name=value` within [`MAX_COOKIE_BYTES`].
pub fn split(base: &str, token: &str) -> Result<Vec<String>, TooLarge> {
    let cap = |i: usize| MAX_COOKIE_BYTES - chunk_name(base, i).len() - 1;
    // "N." prefix: N has at most two digits with MAX_CHUNKS = 10.
    let first_cap = cap(0) - 3;
    let limit = first_cap + (1..MAX_CHUNKS).map(cap).sum::<usize>();
    if token.len() > limit {
        return Err(TooLarge {
            size: token.len(),
            limit,
            cookies: MAX_CHUNKS,
        });
    }
    let mut parts = Vec::new();
    let mut rest = token;
    let mut i = 0;
    while i == 0 || !rest.is_empty() {
        let c = if i == 0 { first_cap } else { cap(i) };
        let (a, b) = rest.split_at(c.min(rest.len()));
        parts.push(a.to_string());
        rest = b;
        i += 1;
    }
    let n = parts.len();
    parts[0] = format!("{n}.{}", parts[0]);
    Ok(parts)
}

/// Reassembles a token from the request's cookies: `None` when the first
/// cookie is absent; `Some(None)` when it is present but the set is
/// malformed or incomplete.
pub fn join(headers: &HeaderMap, base: &str) -> Option<Option<String>> {
    let first = crate::session::cookie::find(headers, base)?;
    let first = std::str::from_utf8(first).ok();
    Some(first.and_then(|first| {
        let (n, part) = first.split_once('.')?;
        let n: usize = n.parse().ok()?;
        if n == 0 || n > MAX_CHUNKS {
            return None;
        }
        let mut token = part.to_string();
        for i in 1..n {
            let v = crate::session::cookie::find(headers, &chunk_name(base, i))?;
            token.push_str(std::str::from_utf8(v).ok()?);
        }
        Some(token)
    }))
}

/// The chunk numbers (>= 1) the request carried, for deleting leftovers.
pub fn presented_chunks(headers: &HeaderMap, base: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for h in headers.get_all(COOKIE) {
        for pair in h.as_bytes().split(|&b| b == b';') {
            // Read as `cookie::find` reads names (spaces around the `=`
            // allowed, as Django's), so every chunk `join` used is listed
            // (and stripped before forwarding).
            let pair = crate::session::cookie::trim(pair);
            let Some(rest) = pair.strip_prefix(base.as_bytes()) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix(b".") else {
                continue;
            };
            let digits: Vec<u8> = rest
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            if crate::session::cookie::trim(&rest[digits.len()..]).first() == Some(&b'=') {
                if let Some(i) = std::str::from_utf8(&digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                {
                    // Past MAX_CHUNKS `join` reads nothing: not listed,
                    // so a head of 4,000 `NAME.i=` costs no 4,000 strips.
                    if (1..=MAX_CHUNKS).contains(&i) && !out.contains(&i) {
                        out.push(i);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Policy;
    use http::HeaderValue;

    /// A chunk named with a space before its `=` is joined (as Django
    /// reads names): it is listed too, so it is stripped and cleaned up.
    #[test]
    fn a_spaced_chunk_is_joined_and_listed_alike() {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("sessionid=3.AAA; sessionid.1 =BBB;\tsessionid.2\t= CCC"),
        );
        assert_eq!(join(&h, "sessionid"), Some(Some("AAABBBCCC".to_string())));
        assert_eq!(presented_chunks(&h, "sessionid"), vec![1, 2]);
        // Not a chunk: another name, or no `=`.
        h.insert(
            COOKIE,
            HeaderValue::from_static("sessionid.1x=B; sessionid.2; sessionid.3 x=C"),
        );
        assert!(presented_chunks(&h, "sessionid").is_empty());
    }

    const P: Policy = Policy {
        cookie_age_secs: 3600,
        expire_at_browser_close: false,
        absolute_timeout_ms: 0,
    };

    fn rec(data: &str, now: i64) -> Record {
        let mut r = Record::new_at(now);
        r.data = Bytes::from(data.to_string());
        r.touch(now, &P);
        r
    }

    fn codec(encrypt: bool) -> SignedCookies {
        SignedCookies::new(
            "sessionid",
            b"0123456789abcdef0123456789abcdef",
            &[],
            encrypt,
        )
    }

    #[test]
    fn round_trip_both_modes() {
        for encrypt in [true, false] {
            let c = codec(encrypt);
            let k = SessionKey::generate();
            let r = rec(r#"{"a":1}"#, 1000);
            let t = c.encode(&k, &r);
            let (k2, r2) = c.decode(t.as_bytes(), 1001).unwrap();
            assert_eq!(k2, k);
            assert_eq!(r2, r);
        }
    }

    /// Django stamps whole seconds: a cookie signed at 12.3 s was written
    /// at 12 s on its face, and read as written at the end of that second
    /// (`now` at most), so `refresh_interval` never counts it older than it
    /// is and never refreshes early.
    #[test]
    fn djangos_cookie_reads_as_written_at_the_end_of_its_second() {
        let c = SignedCookies::django("sessionid", b"0123456789abcdef0123456789abcdef", &[], 3600);
        let t = c.encode(&SessionKey::generate(), &rec(r#"{"a":1}"#, 12_300));
        let (_, r) = c.decode(t.as_bytes(), 15_000).unwrap();
        assert_eq!(r.modified, 12_999);
        assert_eq!(r.created, 12_000);
        let (_, r) = c.decode(t.as_bytes(), 12_500).unwrap();
        assert_eq!(r.modified, 12_500, "never after now");
    }

    #[test]
    fn encrypted_tokens_hide_the_data() {
        let c = codec(true);
        let t = c.encode(&SessionKey::generate(), &rec(r#"{"secret":"hunter2"}"#, 0));
        let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        assert!(!raw.windows(7).any(|w| w == b"hunter2"));
        let plain =
            codec(false).encode(&SessionKey::generate(), &rec(r#"{"secret":"hunter2"}"#, 0));
        let raw = URL_SAFE_NO_PAD.decode(&plain).unwrap();
        assert!(
            raw.windows(7).any(|w| w == b"hunter2"),
            "signed only, as Django"
        );
    }

    #[test]
    fn tampering_truncation_and_foreign_keys_fail() {
        for encrypt in [true, false] {
            let c = codec(encrypt);
            let t = c.encode(&SessionKey::generate(), &rec(r#"{"user":1}"#, 0));
            let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
            for i in [0, raw.len() / 2, raw.len() - 1] {
                raw[i] ^= 1;
                assert!(
                    c.decode(URL_SAFE_NO_PAD.encode(&raw).as_bytes(), 1)
                        .is_none(),
                    "flip at {i}"
                );
                raw[i] ^= 1;
            }
            assert!(
                c.decode(&t.as_bytes()[..t.len() - 4], 1).is_none(),
                "truncated"
            );
            assert!(c.decode(b"not base64!!", 1).is_none());
            let other = SignedCookies::new(
                "sessionid",
                b"another-secret-another-secret-xx",
                &[],
                encrypt,
            );
            assert!(other.decode(t.as_bytes(), 1).is_none(), "foreign key");
            let renamed = SignedCookies::new(
                "othername",
                b"0123456789abcdef0123456789abcdef",
                &[],
                encrypt,
            );
            assert!(
                renamed.decode(t.as_bytes(), 1).is_none(),
                "bound to the cookie name"
            );
        }
    }

    #[test]
    fn fallback_keys_verify_old_tokens() {
        let old = SignedCookies::new("sessionid", b"old-secret-old-secret-old-secret", &[], true);
        let t = old.encode(&SessionKey::generate(), &rec("{}", 0));
        let rotated = SignedCookies::new(
            "sessionid",
            b"new-secret-new-secret-new-secret",
            &[b"old-secret-old-secret-old-secret".to_vec()],
            true,
        );
        assert!(rotated.decode(t.as_bytes(), 1).is_some());
        let t2 = rotated.encode(&SessionKey::generate(), &rec("{}", 0));
        assert!(
            old.decode(t2.as_bytes(), 1).is_none(),
            "new tokens use the new key"
        );
    }

    #[test]
    fn expiry_inside_the_payload_is_enforced() {
        let c = codec(true);
        let mut r = rec("{}", 0);
        r.expiry = Expiry::Seconds(10);
        r.touch(0, &P);
        let t = c.encode(&SessionKey::generate(), &r);
        assert!(c.decode(t.as_bytes(), 9_999).is_some());
        assert!(c.decode(t.as_bytes(), 10_000).is_none());
    }

    #[test]
    fn split_and_join() {
        let big = "x".repeat(9000);
        let parts = split("sessionid", &big).unwrap();
        assert_eq!(parts.len(), 3);
        assert!(parts[0].starts_with("3."));
        for (i, p) in parts.iter().enumerate() {
            assert!(chunk_name("sessionid", i).len() + 1 + p.len() <= MAX_COOKIE_BYTES);
        }
        let mut h = HeaderMap::new();
        let cookie: Vec<String> = parts
            .iter()
            .enumerate()
            .rev()
            .map(|(i, p)| format!("{}={p}", chunk_name("sessionid", i)))
            .collect();
        h.insert(COOKIE, HeaderValue::from_str(&cookie.join("; ")).unwrap());
        assert_eq!(join(&h, "sessionid"), Some(Some(big.clone())));
        assert_eq!(presented_chunks(&h, "sessionid"), vec![2, 1]);
        // A missing chunk makes the set invalid.
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("sessionid={}", parts[0])).unwrap(),
        );
        assert_eq!(join(&h, "sessionid"), Some(None));
        let small = split("sessionid", "abc").unwrap();
        assert_eq!(small, vec!["1.abc"]);
        assert!(split("sessionid", &"x".repeat(50_000)).is_err());
    }
}
