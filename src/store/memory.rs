//! The `memory` engine: a sharded hash map of records plus a sharded expiry
//! index, so the sweep costs in proportion to what expired, not to what is
//! stored.
//!
//! Records are kept compact ([`Slot`]): the data as an exact-size boxed
//! slice (no spare capacity, no shared-buffer header), which keeps the
//! overhead per stored session under 300 bytes at a million sessions (see
//! BENCHMARKS.md). A load copies the data into a fresh buffer for the
//! request, which costs less than keeping it shareable.
//!
//! A patch is applied optimistically (see [`MemoryStore`]'s `apply`): the
//! shard's write lock covers a comparison and a swap, not the JSON work.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use bytes::Bytes;

use super::{Applied, Store, StoreError, WriteCtx};
use crate::session::{Expiry, Patch, Record, SessionKey};

/// A stored record, compact.
struct Slot {
    data: Box<[u8]>,
    expiry: Expiry,
    created: i64,
    modified: i64,
    expires_at: i64,
}

impl Slot {
    fn from_record(r: &Record) -> Slot {
        Slot {
            data: r.data.as_ref().into(),
            expiry: r.expiry,
            created: r.created,
            modified: r.modified,
            expires_at: r.expires_at,
        }
    }

    fn to_record(&self) -> Record {
        Record {
            data: Bytes::copy_from_slice(&self.data),
            expiry: self.expiry,
            created: self.created,
            modified: self.modified,
            expires_at: self.expires_at,
        }
    }

    fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Whether this slot still holds `r`, field for field. Equal states are
    /// interchangeable: a patch applied to either gives the same result.
    fn holds(&self, r: &Record) -> bool {
        *self.data == *r.data
            && self.expiry == r.expiry
            && self.created == r.created
            && self.modified == r.modified
            && self.expires_at == r.expires_at
    }
}

/// Keys are random and chosen by us, never by a client, so hashing need not
/// resist collision attacks: a cheap mix of the key's bytes is enough.
#[derive(Clone, Default)]
pub struct KeyHash;

#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

const INDEX_SHARDS: usize = 32;

/// Optimistic attempts of a patch before it is applied under the lock.
const OPTIMISTIC_TRIES: usize = 8;

/// How often [`MemoryStore::apply`] found the slot changed under it and
/// applied the patch again, and how often it gave up and took the lock
/// (tests only).
#[cfg(test)]
static APPLY_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
#[cfg(test)]
static APPLY_LOCKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct MemoryStore {
    map: DashMap<SessionKey, Slot, KeyHash>,
    /// (expires_at, key) for every stored record, sharded by key.
    index: Vec<Mutex<BTreeSet<(i64, SessionKey)>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Keeps the index of a user's sessions under `user_key` (SPEC 9).
    pub fn with_user_key(self, user_key: Option<String>) -> Self {
        // Not built yet for this engine.
        let _ = user_key;
        self
    }

    pub fn new() -> MemoryStore {
        MemoryStore {
            map: DashMap::with_hasher(KeyHash),
            index: (0..INDEX_SHARDS)
                .map(|_| Mutex::new(BTreeSet::new()))
                .collect(),
        }
    }

    /// Stored records, live or not yet swept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn shard(&self, key: &SessionKey) -> &Mutex<BTreeSet<(i64, SessionKey)>> {
        &self.index[(KeyHash.hash_one(key) >> 59) as usize % INDEX_SHARDS]
    }

    fn index_move(&self, key: &SessionKey, old: Option<i64>, new: Option<i64>) {
        if old == new {
            return;
        }
        let mut set = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = old {
            set.remove(&(o, *key));
        }
        if let Some(n) = new {
            set.insert((n, *key));
        }
    }

    fn insert_fresh(&self, record: &Record) -> SessionKey {
        loop {
            let key = SessionKey::generate();
            if let Entry::Vacant(v) = self.map.entry(key) {
                let exp = record.expires_at;
                v.insert(Slot::from_record(record));
                self.index_move(&key, None, Some(exp));
                return key;
            }
        }
    }

    /// Applies a patch that does not cycle the key, to the newest state:
    /// up to `tries` times optimistically, then under the shard's lock.
    fn patch_in_place(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
        tries: usize,
    ) -> Applied {
        // Optimistic: read the newest state, apply the patch with no lock
        // held, and swap the result in only if the slot is still what was
        // read (else again, on the newer state). The shard's write lock is
        // then held for a comparison and a swap, not for the JSON work: a
        // worker thread that blocks on it blocks every connection it serves,
        // and the holder may have been preempted. A writer that keeps losing
        // the race applies its patch under the write lock instead.
        for _ in 0..tries {
            let read = {
                let Some(r) = self.map.get(key) else {
                    return Applied::Missing;
                };
                r.is_live(ctx.now).then(|| r.to_record())
            };
            let Some(read) = read else {
                if let Some((_, dead)) = self.map.remove_if(key, |_, r| !r.is_live(ctx.now)) {
                    self.index_move(key, Some(dead.expires_at), None);
                }
                return Applied::Missing;
            };
            let applied = super::apply_local(key, &read, patch, ctx);
            let Applied::Saved { record, .. } = &applied else {
                return applied;
            };
            let next = Slot::from_record(record);
            let Some(mut r) = self.map.get_mut(key) else {
                return Applied::Missing;
            };
            if !r.holds(&read) {
                #[cfg(test)]
                APPLY_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            // Index under the map's shard lock, so a sweep cannot interleave.
            self.index_move(key, Some(r.expires_at), Some(next.expires_at));
            let old = std::mem::replace(&mut *r, next);
            drop(r);
            drop(old); // freed outside the lock
            return applied;
        }
        #[cfg(test)]
        APPLY_LOCKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(mut r) = self.map.get_mut(key) else {
            return Applied::Missing;
        };
        if !r.is_live(ctx.now) {
            drop(r);
            self.remove(key);
            return Applied::Missing;
        }
        let applied = super::apply_local(key, &r.to_record(), patch, ctx);
        if let Applied::Saved { record, .. } = &applied {
            self.index_move(key, Some(r.expires_at), Some(record.expires_at));
            *r = Slot::from_record(record);
        }
        applied
    }

    fn remove(&self, key: &SessionKey) -> Option<Record> {
        let (_, r) = self.map.remove(key)?;
        self.index_move(key, Some(r.expires_at), None);
        Some(r.to_record())
    }
}

impl Store for MemoryStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        Ok(self
            .map
            .get(key)
            .filter(|r| r.is_live(now))
            .map(|r| r.to_record()))
    }

    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        Ok(self.insert_fresh(&record))
    }

    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        if patch.cycle {
            // Take the old record out first: a concurrent request on the old
            // key now finds it gone, exactly as after Django's cycle_key.
            let Some(mut record) = self.remove(key) else {
                return Ok(Applied::Missing);
            };
            if !record.is_live(ctx.now) {
                return Ok(Applied::Missing);
            }
            let before = record.clone();
            record.apply_patch(patch, ctx.now, &ctx.policy);
            if let Some(size) = ctx.too_large(&before, &record) {
                // Put back as it was: nothing changes.
                self.index_move(key, None, Some(before.expires_at));
                self.map.insert(*key, Slot::from_record(&before));
                return Ok(Applied::TooLarge { size });
            }
            let new_key = self.insert_fresh(&record);
            return Ok(Applied::Saved {
                key: new_key,
                record,
            });
        }
        Ok(self.patch_in_place(key, patch, ctx, OPTIMISTIC_TRIES))
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        self.remove(key);
        Ok(())
    }

    async fn clear_expired(&self, now: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        for shard in &self.index {
            let expired = {
                let mut set = shard.lock().unwrap_or_else(|e| e.into_inner());
                let rest = set.split_off(&(now + 1, SessionKey::MIN));
                std::mem::replace(&mut *set, rest)
            };
            for (_, key) in expired {
                // A record rewritten since is live again: keep it.
                if self.map.remove_if(&key, |_, r| !r.is_live(now)).is_some() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::super::test_support::{ctx, record, set, T0};
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// The expiry times the index holds for `key`.
    fn indexed(store: &MemoryStore, key: &SessionKey) -> Vec<i64> {
        store
            .index
            .iter()
            .flat_map(|s| {
                let set = s.lock().unwrap();
                set.iter()
                    .filter(|(_, k)| k == key)
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Four threads patch one session at once, each its own keys, with no
    /// await point to take turns at: the patches race between reading the
    /// slot and swapping it. None may be lost, and the race must have been
    /// lost at least once (else this test would not test the retry).
    #[test]
    fn racing_patches_on_one_session_are_all_kept() {
        const THREADS: usize = 4;
        const EACH: usize = 300;
        let store = Arc::new(MemoryStore::new());
        let rt = runtime();
        let key = rt.block_on(store.create(record(T0, "start", 0))).unwrap();
        let retries_before = APPLY_RETRIES.load(Ordering::Relaxed);
        let start = Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, start) = (store.clone(), start.clone());
                std::thread::spawn(move || {
                    let rt = runtime();
                    start.wait();
                    for i in 0..EACH {
                        let patch = set(&format!("t{t}-{i}"), i);
                        let got = rt
                            .block_on(store.apply(&key, &patch, ctx(T0 + i as i64)))
                            .unwrap();
                        assert!(matches!(got, Applied::Saved { .. }), "{got:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stored = rt.block_on(store.load(&key, T0 + 1000)).unwrap().unwrap();
        // The expiry index holds the record once, at its newest expiry, and
        // the sweep at that time removes it.
        assert_eq!(indexed(&store, &key), vec![stored.expires_at]);
        let data: Value = serde_json::from_slice(&stored.data).unwrap();
        let obj = data.as_object().unwrap();
        assert_eq!(obj.len(), 1 + THREADS * EACH, "patches lost");
        for t in 0..THREADS {
            for i in 0..EACH {
                assert_eq!(obj[&format!("t{t}-{i}")], json!(i));
            }
        }
        assert_eq!(
            rt.block_on(store.clear_expired(stored.expires_at - 1))
                .unwrap(),
            0
        );
        assert_eq!(
            rt.block_on(store.clear_expired(stored.expires_at)).unwrap(),
            1
        );
        assert!(store.is_empty());
        if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
            assert!(
                APPLY_RETRIES.load(Ordering::Relaxed) > retries_before,
                "no patch ever found the slot changed: the race was not exercised"
            );
        }
    }

    /// A patch to a session that has expired but was not swept yet finds it
    /// missing and removes it, index entry and all.
    #[test]
    fn a_patch_to_an_expired_session_is_missing_and_removes_it() {
        let store = MemoryStore::new();
        let rt = runtime();
        let first = record(T0, "a", 1);
        let key = rt.block_on(store.create(first.clone())).unwrap();
        let got = rt
            .block_on(store.apply(&key, &set("b", 2), ctx(first.expires_at)))
            .unwrap();
        assert_eq!(got, Applied::Missing);
        assert!(store.is_empty());
        assert!(store.index.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    /// The fallback for a writer that keeps losing the race (no optimistic
    /// try left) applies the patch under the lock, with the same result.
    #[test]
    fn the_locked_fallback_applies_the_patch_and_moves_the_index() {
        let store = MemoryStore::new();
        let rt = runtime();
        let key = rt.block_on(store.create(record(T0, "a", 1))).unwrap();
        let locked_before = APPLY_LOCKED.load(Ordering::Relaxed);
        let got = store.patch_in_place(&key, &set("b", 2), ctx(T0 + 5_000), 0);
        assert!(APPLY_LOCKED.load(Ordering::Relaxed) > locked_before);
        let Applied::Saved { record: saved, .. } = got else {
            panic!("{got:?}")
        };
        assert_eq!(&saved.data[..], br#"{"a":1,"b":2}"#);
        assert_eq!(
            rt.block_on(store.load(&key, T0 + 5_000)).unwrap(),
            Some(saved.clone())
        );
        assert_eq!(indexed(&store, &key), vec![saved.expires_at]);
        assert_eq!(
            rt.block_on(store.clear_expired(saved.expires_at)).unwrap(),
            1
        );
        // And on an expired session it finds nothing.
        let again = record(T0, "a", 1);
        let key = rt.block_on(store.create(again.clone())).unwrap();
        let got = store.patch_in_place(&key, &set("b", 2), ctx(again.expires_at), 0);
        assert_eq!(got, Applied::Missing);
        assert!(store.is_empty());
    }
}
