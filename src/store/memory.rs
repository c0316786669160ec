//! The `memory` engine: a sharded hash map of records plus a sharded expiry
//! index, so the sweep costs in proportion to what expired, not to what is
//! stored.
//!
//! Records are kept compact ([`Slot`]): the data as an exact-size boxed
//! slice (no spare capacity, no shared-buffer header), which keeps the
//! overhead per stored session under 300 bytes at a million sessions (see
//! BENCHMARKS.md). A load copies the data into a fresh buffer for the
//! request, which costs less than keeping it shareable.

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
            record.apply_patch(patch, ctx.now, &ctx.policy);
            let new_key = self.insert_fresh(&record);
            return Ok(Applied::Saved {
                key: new_key,
                record,
            });
        }
        let Some(mut r) = self.map.get_mut(key) else {
            return Ok(Applied::Missing);
        };
        if !r.is_live(ctx.now) {
            drop(r);
            self.remove(key);
            return Ok(Applied::Missing);
        }
        let applied = super::apply_local(key, &r.to_record(), patch, ctx);
        if let Applied::Saved { record, .. } = &applied {
            // Index under the map's shard lock, so a sweep cannot interleave.
            self.index_move(key, Some(r.expires_at), Some(record.expires_at));
            *r = Slot::from_record(record);
        }
        Ok(applied)
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
