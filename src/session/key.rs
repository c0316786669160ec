//! Session keys: 32 characters from `[a-z0-9]`, drawn from the OS CSPRNG.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
pub const KEY_LEN: usize = 32;

/// A session key. `Debug` never shows it: keys are secrets.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey([u8; KEY_LEN]);

/// The secret prepared for [`SessionKey::public_id_hex`]: the HMAC key
/// blocks and the fixed prefix are hashed once, at start-up, so a request
/// pays for two SHA-256 blocks instead of four (the prefix waits in the
/// context's buffer and goes into the same block as the key). The context
/// is a fixed-size value: cloning it allocates nothing.
#[derive(Clone)]
pub struct IdKey {
    mac: hmac::Context,
    /// Names this secret in the per-thread cache of identifiers (clones
    /// share it: same secret, same identifiers). Never 0.
    serial: u64,
}

impl IdKey {
    pub fn new(secret: &[u8]) -> IdKey {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, secret));
        mac.update(b"sessiongate.session-id\0");
        IdKey {
            mac,
            serial: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Identifiers computed lately on this thread, by key. A browser sends the
/// same cookie on every request, so a worker mostly finds its session here
/// and skips the HMAC (the largest piece of the read path's own work).
///
/// Direct-mapped: a key has one slot ([`slot`]), and two sessions that
/// share it replace each other (the identifier is then computed again).
/// 256 slots of 72 bytes, 18 KiB per thread. The entries hold session keys
/// until replaced, deleted and cycled ones too: with the file, Redis and
/// signed-cookie engines these are the only keys the process keeps between
/// requests. A presented key is compared with a cached one by [`same_key`].
const ID_CACHE_SLOTS: usize = 256;

#[derive(Clone, Copy)]
struct CachedId {
    serial: u64,
    key: [u8; KEY_LEN],
    id: [u8; 32],
}

/// The cache slot of a key: its first four bytes, Fibonacci-hashed.
fn slot(k: &[u8; KEY_LEN]) -> usize {
    let h = u32::from_le_bytes([k[0], k[1], k[2], k[3]]).wrapping_mul(0x9E37_79B9);
    (h >> 24) as usize % ID_CACHE_SLOTS
}

/// Compares every byte whatever the first difference, so the time taken
/// does not tell how much of a presented key matched a cached one. The
/// fold compiles to vector xors and an or-reduction with no branch (checked
/// in the assembly with rustc 1.95); `black_box` keeps the optimiser from
/// turning it into an early-exit comparison, as far as it can promise.
fn same_key(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

thread_local! {
    static ID_CACHE: RefCell<[CachedId; ID_CACHE_SLOTS]> = const {
        RefCell::new([CachedId { serial: 0, key: [0; KEY_LEN], id: [0; 32] }; ID_CACHE_SLOTS])
    };
}

#[cfg(test)]
thread_local! {
    /// Identifiers computed through the cache on this thread (misses).
    static ID_CACHE_MISSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdKey(..)")
    }
}

impl SessionKey {
    /// Orders before every real key (range bounds in indexes).
    pub const MIN: SessionKey = SessionKey([0; KEY_LEN]);

    /// A fresh random key (rejection sampling keeps the 36 symbols uniform:
    /// about 165 bits of entropy).
    pub fn generate() -> SessionKey {
        let mut out = [0u8; KEY_LEN];
        let mut filled = 0;
        let mut buf = [0u8; 48];
        while filled < KEY_LEN {
            getrandom::fill(&mut buf).expect("the OS random number generator failed");
            for &b in &buf {
                // 252 = 7 * 36: values above would bias the alphabet.
                if b < 252 && filled < KEY_LEN {
                    out[filled] = ALPHABET[(b % 36) as usize];
                    filled += 1;
                }
            }
        }
        SessionKey(out)
    }

    /// Accepts exactly 32 characters of `[a-z0-9]`; anything else is `None`.
    pub fn parse(s: &str) -> Option<SessionKey> {
        SessionKey::parse_bytes(s.as_bytes())
    }

    /// [`SessionKey::parse`] on raw cookie bytes.
    pub fn parse_bytes(b: &[u8]) -> Option<SessionKey> {
        if b.len() != KEY_LEN {
            return None;
        }
        // No early exit, so the check runs over whole vectors of bytes (it
        // runs on every request that presents a cookie).
        let valid = b.iter().fold(true, |ok, c| {
            ok & (c.is_ascii_lowercase() | c.is_ascii_digit())
        });
        if !valid {
            return None;
        }
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(b);
        Some(SessionKey(out))
    }

    /// A key from the bytes of one that was generated or parsed (an
    /// engine's compact copy of its own stored keys).
    pub(crate) fn from_stored(b: [u8; KEY_LEN]) -> SessionKey {
        debug_assert!(SessionKey::parse_bytes(&b).is_some());
        SessionKey(b)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The non-secret identifier sent upstream as `X-Session-Id`: an HMAC of
    /// the key, so it cannot be turned back into a cookie.
    pub fn public_id(&self, secret: &[u8]) -> String {
        String::from_utf8(self.public_id_hex(&IdKey::new(secret)).to_vec()).expect("hex is ASCII")
    }

    /// [`SessionKey::public_id`] as 32 hex bytes, without allocating.
    pub fn public_id_hex(&self, ids: &IdKey) -> [u8; 32] {
        let k = &self.0;
        ID_CACHE
            .try_with(|cache| {
                let mut cache = cache.borrow_mut();
                let e = &mut cache[slot(k)];
                if e.serial == ids.serial && same_key(&e.key, k) {
                    return e.id;
                }
                #[cfg(test)]
                ID_CACHE_MISSES.with(|m| m.set(m.get() + 1));
                let id = self.compute_public_id(ids);
                *e = CachedId {
                    serial: ids.serial,
                    key: *k,
                    id,
                };
                id
            })
            // The thread is being torn down: no cache.
            .unwrap_or_else(|_| self.compute_public_id(ids))
    }

    fn compute_public_id(&self, ids: &IdKey) -> [u8; 32] {
        let mut mac = ids.mac.clone();
        mac.update(&self.0);
        let tag = mac.sign();
        let tag = tag.as_ref();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in tag[..16].iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        out
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_keys_have_the_django_shape_and_differ() {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let k = SessionKey::generate();
            let s = k.as_str();
            assert_eq!(s.len(), 32);
            assert!(s
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
            assert_eq!(SessionKey::parse(s), Some(k));
            assert!(seen.insert(k));
        }
    }

    #[test]
    fn every_symbol_appears() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.extend(SessionKey::generate().as_str().bytes());
        }
        assert_eq!(seen.len(), 36);
    }

    #[test]
    fn parse_rejects_bad_shapes() {
        assert!(SessionKey::parse("").is_none());
        assert!(SessionKey::parse("abc").is_none());
        assert!(SessionKey::parse(&"A".repeat(32)).is_none());
        assert!(SessionKey::parse(&"a".repeat(33)).is_none());
        assert!(SessionKey::parse(&format!("{}-", "a".repeat(31))).is_none());
        assert!(SessionKey::parse(&"a".repeat(32)).is_some());
    }

    #[test]
    fn parse_bytes_takes_exactly_lowercase_letters_and_digits_at_every_place() {
        let good = SessionKey::generate();
        for at in 0..KEY_LEN {
            for byte in 0..=255u8 {
                let mut b = *good.as_bytes();
                b[at] = byte;
                let want = byte.is_ascii_lowercase() || byte.is_ascii_digit();
                assert_eq!(
                    SessionKey::parse_bytes(&b).is_some(),
                    want,
                    "byte {byte:#04x} at {at}"
                );
            }
        }
    }

    #[test]
    fn public_id_is_stable_secret_dependent_and_not_the_key() {
        let k = SessionKey::generate();
        let a = k.public_id(b"0123456789abcdef0123456789abcdef");
        assert_eq!(a, k.public_id(b"0123456789abcdef0123456789abcdef"));
        assert_ne!(a, k.public_id(b"fedcba9876543210fedcba9876543210"));
        assert_ne!(a, k.as_str());
        assert_eq!(a.len(), 32);
        assert!(!format!("{k:?}").contains(k.as_str()));
    }

    const PINNED_ID: &str = "eba4bacff8ae45c0d582a171828077f8";

    #[test]
    fn public_id_is_hmac_sha256_of_the_prefixed_key() {
        // Python: hmac.new(secret, b"sessiongate.session-id\0" + key,
        // "sha256").hexdigest()[:32]; the same value the RustCrypto
        // implementation gave, so identifiers survive the change of stack.
        let k = SessionKey::parse("abcdefghijklmnopqrstuvwxyz012345").unwrap();
        assert_eq!(k.public_id(b"0123456789abcdef0123456789abcdef"), PINNED_ID);
    }

    #[test]
    fn cached_ids_are_the_computed_ones_for_each_secret() {
        let (one, two) = (IdKey::new(b"first secret"), IdKey::new(b"second secret"));
        // More keys than cache slots, each asked for several times and
        // under both secrets in turn: evictions, hits and a secret change
        // on the same slot all happen.
        let keys: Vec<SessionKey> = (0..2 * ID_CACHE_SLOTS)
            .map(|_| SessionKey::generate())
            .collect();
        for round in 0..3 {
            for k in &keys {
                for ids in [&one, &two, &one.clone()] {
                    assert_eq!(
                        k.public_id_hex(ids),
                        k.compute_public_id(ids),
                        "round {round}"
                    );
                }
                assert_ne!(k.public_id_hex(&one), k.public_id_hex(&two));
            }
        }
        // Two keys that share a slot replace each other without mixing up.
        let a = SessionKey::generate();
        let b = std::iter::repeat_with(SessionKey::generate)
            .find(|b| b != &a && slot(&b.0) == slot(&a.0))
            .unwrap();
        for _ in 0..2 {
            assert_eq!(a.public_id_hex(&one), a.compute_public_id(&one));
            assert_eq!(b.public_id_hex(&one), b.compute_public_id(&one));
            assert_ne!(a.public_id_hex(&one), b.public_id_hex(&one));
        }
    }

    #[test]
    fn a_session_seen_again_is_served_from_the_cache() {
        let ids = IdKey::new(b"a secret");
        let misses = || ID_CACHE_MISSES.with(|m| m.get());
        let k = SessionKey::generate();
        let before = misses();
        let first = k.public_id_hex(&ids);
        for _ in 0..3 {
            assert_eq!(k.public_id_hex(&ids), first);
            assert_eq!(k.public_id_hex(&ids.clone()), first);
        }
        assert_eq!(misses() - before, 1, "computed once, then found");
        // Another secret is another entry.
        k.public_id_hex(&IdKey::new(b"another secret"));
        assert_eq!(misses() - before, 2);
    }

    #[test]
    fn slots_spread_keys_over_the_whole_cache() {
        let mut used = vec![0u32; ID_CACHE_SLOTS];
        for _ in 0..ID_CACHE_SLOTS * 20 {
            used[slot(&SessionKey::generate().0)] += 1;
        }
        // 20 keys a slot on average: an empty or a crowded slot means the
        // hash leaves part of the cache unused.
        assert!(used.iter().all(|&n| (2..=60).contains(&n)), "{used:?}");
    }
}
