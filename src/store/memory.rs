//! The `memory` engine: a sharded hash map of records plus a sharded expiry
//! index, so the sweep costs in proportion to what expired, not to what is
//! stored; and, with `[session] user_key`, a sharded index from a user to
//! that user's sessions (SPEC 9).
//!
//! Records are kept compact ([`Slot`]): the data as an exact-size boxed
//! slice (no spare capacity, no shared-buffer header), which keeps the
//! overhead per stored session under 300 bytes at a million sessions (see
//! BENCHMARKS.md). A load copies the data into a fresh buffer for the
//! request, which costs less than keeping it shareable.
//!
//! A patch is applied optimistically (see [`MemoryStore`]'s `apply`): the
//! shard's write lock covers a comparison and a swap, not the JSON work.
//!
//! The user index costs at most a few tens of bytes per session (issue 18):
//! the map is hashed and compared by a key's first 8 bytes (its *prefix*,
//! unique among stored keys: a fresh key whose prefix is taken is drawn
//! again; every lookup by a full key checks the full key), so the index
//! holds `(user tag, prefix)` pairs of 16 bytes, not 32-byte keys and user
//! names. The user tag is a keyed 32-bit hash of the user's text, kept in
//! the slot's padding; tags may collide, so every use of the index checks
//! the user against the session's data. The index is changed under the
//! lock of the map shard that holds the session, with the record: a session
//! is never in the wrong user's index, and a revoked session is gone from
//! the map before `revoke_user` returns (an in-flight write of it then
//! finds it [`Applied::Missing`]).

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Mutex, RwLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use bytes::Bytes;

use super::{Applied, KeyFilter, Store, StoreError, UserSession, WriteCtx};
use crate::session::key::KEY_LEN;
use crate::session::{Expiry, Patch, Record, SessionKey, Stamp};

/// A stored record, compact: 56 bytes (the expiry is split into a kind
/// and a value so that the user tag fits in what would be padding).
struct Slot {
    data: Box<[u8]>,
    expiry_value: i64,
    created: i64,
    modified: i64,
    expires_at: i64,
    expiry_kind: u8,
    /// The user's tag ([`UserIndex::tag`]); 0: in no user's index.
    user: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 56);

fn split_expiry(e: Expiry) -> (u8, i64) {
    match e {
        Expiry::Default => (0, 0),
        Expiry::Seconds(n) => (1, n),
        Expiry::BrowserClose => (2, 0),
        Expiry::At(t) => (3, t),
    }
}

impl Slot {
    fn from_record(r: &Record, user: u32) -> Slot {
        let (expiry_kind, expiry_value) = split_expiry(r.expiry);
        Slot {
            data: r.data.as_ref().into(),
            expiry_value,
            created: r.created,
            modified: r.modified,
            expires_at: r.expires_at,
            expiry_kind,
            user,
        }
    }

    fn expiry(&self) -> Expiry {
        match self.expiry_kind {
            1 => Expiry::Seconds(self.expiry_value),
            2 => Expiry::BrowserClose,
            3 => Expiry::At(self.expiry_value),
            _ => Expiry::Default,
        }
    }

    fn to_record(&self) -> Record {
        Record {
            data: Bytes::copy_from_slice(&self.data),
            expiry: self.expiry(),
            created: self.created,
            modified: self.modified,
            expires_at: self.expires_at,
            stamp: Stamp::NONE,
        }
    }

    fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Whether this slot still holds `r`, field for field. Equal states are
    /// interchangeable: a patch applied to either gives the same result.
    fn holds(&self, r: &Record) -> bool {
        *self.data == *r.data
            && self.expiry() == r.expiry
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

/// A key's first 8 bytes: what the map hashes and compares.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Prefix(u64);

impl Prefix {
    fn of(key: &SessionKey) -> Prefix {
        let mut w = [0u8; 8];
        w.copy_from_slice(&key.as_bytes()[..8]);
        Prefix(u64::from_le_bytes(w))
    }
}

impl Hash for Prefix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The prefix is 8 characters of a 36-letter alphabet: mix every bit
        // into every bit (the splitmix64 finaliser), so that the table's
        // low bits and the shard's high bits are both spread.
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        state.write_u64(x ^ (x >> 31));
    }
}

/// The map's key: a full session key, split so that it hashes, compares
/// and borrows as its [`Prefix`] (unique among the stored keys, see
/// [`MemoryStore::insert_fresh`]). Whoever looks up a full key checks the
/// rest with [`MapKey::is`].
#[derive(Clone, Copy)]
struct MapKey {
    prefix: Prefix,
    rest: [u8; KEY_LEN - 8],
}

impl MapKey {
    fn new(key: &SessionKey) -> MapKey {
        let mut rest = [0u8; KEY_LEN - 8];
        rest.copy_from_slice(&key.as_bytes()[8..]);
        MapKey {
            prefix: Prefix::of(key),
            rest,
        }
    }

    fn is(&self, key: &SessionKey) -> bool {
        self.prefix == Prefix::of(key) && self.rest == key.as_bytes()[8..]
    }

    fn key(&self) -> SessionKey {
        let mut b = [0u8; KEY_LEN];
        b[..8].copy_from_slice(&self.prefix.0.to_le_bytes());
        b[8..].copy_from_slice(&self.rest);
        SessionKey::from_stored(b)
    }
}

impl PartialEq for MapKey {
    fn eq(&self, other: &Self) -> bool {
        self.prefix == other.prefix
    }
}
impl Eq for MapKey {}
impl Hash for MapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.prefix.hash(state)
    }
}
impl Borrow<Prefix> for MapKey {
    fn borrow(&self) -> &Prefix {
        &self.prefix
    }
}

const INDEX_SHARDS: usize = 32;
/// Shards of the user index, and stripes of [`UserIndex::stripes`].
const USER_SHARDS: usize = 64;

/// Optimistic attempts of a patch before it is applied under the lock.
const OPTIMISTIC_TRIES: usize = 8;

/// How often [`MemoryStore::apply`] found the slot changed under it and
/// applied the patch again, and how often it gave up and took the lock
/// (tests only).
#[cfg(test)]
static APPLY_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
#[cfg(test)]
static APPLY_LOCKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The index from a user to that user's sessions (`[session] user_key`).
struct UserIndex {
    /// The session key that names the user.
    key: String,
    /// Keys the user tags (a client may choose user names: a random key
    /// keeps it from making its tags collide with another user's on purpose).
    hasher: RandomState,
    /// `(tag, prefix)` of every stored session that names a user, sharded
    /// by tag.
    shards: Vec<Mutex<BTreeSet<(u32, Prefix)>>>,
    /// Cycle-Key takes a session out and puts it back under a new key: a
    /// revocation of its user must not fall in between. Cycle-Key holds the
    /// stripe of the session's user for reading, `revoke_user` for writing.
    stripes: Vec<RwLock<()>>,
}

impl UserIndex {
    fn new(key: String) -> UserIndex {
        UserIndex {
            key,
            hasher: RandomState::new(),
            shards: (0..USER_SHARDS)
                .map(|_| Mutex::new(BTreeSet::new()))
                .collect(),
            stripes: (0..USER_SHARDS).map(|_| RwLock::new(())).collect(),
        }
    }

    /// The tag of a user: never 0.
    fn tag(&self, user: &str) -> u32 {
        (self.hasher.hash_one(user) as u32).max(1)
    }

    /// The tag of the user the session data names; 0: none.
    fn tag_of(&self, data: &[u8]) -> u32 {
        super::with_user(data, &self.key, |u| self.tag(u)).unwrap_or(0)
    }

    /// Whether `data` names `user`.
    fn names(&self, data: &[u8], user: &str) -> bool {
        super::with_user(data, &self.key, |u| u == user).unwrap_or(false)
    }

    /// Whether the patch may change the user (else the tag stays).
    fn touched_by(&self, patch: &Patch) -> bool {
        super::touches_user(patch, &self.key)
    }

    fn shard(&self, tag: u32) -> std::sync::MutexGuard<'_, BTreeSet<(u32, Prefix)>> {
        self.shards[tag as usize % USER_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn stripe(&self, tag: u32) -> &RwLock<()> {
        &self.stripes[tag as usize % USER_SHARDS]
    }

    /// Moves a session from one tag to another (0: none). Called under the
    /// lock of the map shard that holds the session.
    fn relink(&self, prefix: Prefix, old: u32, new: u32) {
        if old == new {
            return;
        }
        if old != 0 {
            self.shard(old).remove(&(old, prefix));
        }
        if new != 0 {
            self.shard(new).insert((new, prefix));
        }
    }

    /// The prefixes indexed under `tag`.
    fn prefixes(&self, tag: u32) -> Vec<Prefix> {
        self.shard(tag)
            .range((tag, Prefix(0))..=(tag, Prefix(u64::MAX)))
            .map(|&(_, p)| p)
            .collect()
    }
}

pub struct MemoryStore {
    map: DashMap<MapKey, Slot, KeyHash>,
    /// (expires_at, key) for every stored record, sharded by key.
    index: Vec<Mutex<BTreeSet<(i64, SessionKey)>>>,
    /// With `user_key`: a user's sessions.
    users: Option<Box<UserIndex>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Keeps the index of a user's sessions under `user_key` (SPEC 9). Call
    /// it before anything is stored.
    pub fn with_user_key(mut self, user_key: Option<String>) -> Self {
        debug_assert!(self.map.is_empty());
        self.users = user_key.map(|k| Box::new(UserIndex::new(k)));
        self
    }

    pub fn new() -> MemoryStore {
        MemoryStore {
            map: DashMap::with_hasher(KeyHash),
            index: (0..INDEX_SHARDS)
                .map(|_| Mutex::new(BTreeSet::new()))
                .collect(),
            users: None,
        }
    }

    /// Stored records, live or not yet swept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries of the user index (tests, benches).
    pub fn user_index_len(&self) -> usize {
        self.users.as_ref().map_or(0, |u| {
            u.shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
                .sum()
        })
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

    /// Under the map shard's lock: the user index follows a slot's change
    /// of user.
    fn relink(&self, key: &SessionKey, old: u32, new: u32) {
        if let Some(u) = &self.users {
            u.relink(Prefix::of(key), old, new);
        }
    }

    /// The user tag of a new record.
    fn tag_of(&self, data: &[u8]) -> u32 {
        self.users.as_ref().map_or(0, |u| u.tag_of(data))
    }

    /// The user tag after `patch` turned `old` (tagged `old_tag`) into `new`.
    fn tag_after(&self, old_tag: u32, patch: &Patch, new: &Record) -> u32 {
        match &self.users {
            Some(u) if u.touched_by(patch) => u.tag_of(&new.data),
            _ => old_tag,
        }
    }

    /// Stores `record` under a fresh key whose prefix no stored key has.
    fn insert_fresh(&self, record: &Record, tag: u32) -> SessionKey {
        loop {
            let key = SessionKey::generate();
            if let Entry::Vacant(v) = self.map.entry(MapKey::new(&key)) {
                let exp = record.expires_at;
                let slot = v.insert(Slot::from_record(record, tag));
                self.relink(&key, 0, tag);
                drop(slot);
                self.index_move(&key, None, Some(exp));
                return key;
            }
        }
    }

    /// Removes the session `key` if `pred` holds for it, under the map
    /// shard's lock, user index and all; the expiry index after.
    fn remove_where(&self, key: &SessionKey, pred: impl FnOnce(&Slot) -> bool) -> Option<Slot> {
        let (_, slot) = self.map.remove_if(&Prefix::of(key), |k, s| {
            let hit = k.is(key) && pred(s);
            if hit {
                self.relink(key, s.user, 0);
            }
            hit
        })?;
        self.index_move(key, Some(slot.expires_at), None);
        Some(slot)
    }

    fn remove(&self, key: &SessionKey) -> Option<Record> {
        self.remove_where(key, |_| true).map(|s| s.to_record())
    }

    /// The newest state of `key` if it is live; a dead one is removed.
    fn read(&self, key: &SessionKey, now: i64) -> Option<(Record, u32)> {
        let read = {
            let r = self.map.get(&Prefix::of(key)).filter(|r| r.key().is(key))?;
            r.is_live(now).then(|| (r.to_record(), r.user))
        };
        if read.is_none() {
            self.remove_where(key, |s| !s.is_live(now));
        }
        read
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
            let Some((read, tag)) = self.read(key, ctx.now) else {
                return Applied::Missing;
            };
            let applied = super::apply_local(key, &read, patch, ctx);
            let Applied::Saved { record, .. } = &applied else {
                return applied;
            };
            let new_tag = self.tag_after(tag, patch, record);
            let next = Slot::from_record(record, new_tag);
            let Some(mut r) = self
                .map
                .get_mut(&Prefix::of(key))
                .filter(|r| r.key().is(key))
            else {
                return Applied::Missing;
            };
            if !r.holds(&read) {
                #[cfg(test)]
                APPLY_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            // Indexes under the map's shard lock, so a sweep or a
            // revocation cannot interleave.
            self.index_move(key, Some(r.expires_at), Some(next.expires_at));
            self.relink(key, r.user, new_tag);
            let old = std::mem::replace(&mut *r, next);
            drop(r);
            drop(old); // freed outside the lock
            return applied;
        }
        #[cfg(test)]
        APPLY_LOCKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(mut r) = self
            .map
            .get_mut(&Prefix::of(key))
            .filter(|r| r.key().is(key))
        else {
            return Applied::Missing;
        };
        if !r.is_live(ctx.now) {
            drop(r);
            self.remove(key);
            return Applied::Missing;
        }
        let applied = super::apply_local(key, &r.to_record(), patch, ctx);
        if let Applied::Saved { record, .. } = &applied {
            let new_tag = self.tag_after(r.user, patch, record);
            self.index_move(key, Some(r.expires_at), Some(record.expires_at));
            self.relink(key, r.user, new_tag);
            *r = Slot::from_record(record, new_tag);
        }
        applied
    }

    /// Cycle-Key: the session moves to a fresh key. The old one is taken
    /// out first, so a concurrent request on it finds it gone, exactly as
    /// after Django's cycle_key.
    fn cycle(&self, key: &SessionKey, patch: &Patch, ctx: WriteCtx) -> Applied {
        // Read, patch, check the size, then take the old key out only if it
        // still holds what was read (else again). With a user index, the
        // move from the old key to the new must not straddle a revocation
        // of the user: it is done under the user's stripe, which needs the
        // user after the patch, known only from the state read.
        loop {
            let Some((read, _)) = self.read(key, ctx.now) else {
                return Applied::Missing;
            };
            let mut record = read.clone();
            record.apply_patch(patch, ctx.now, &ctx.policy);
            if let Some(size) = ctx.too_large(&read, &record) {
                return Applied::TooLarge { size };
            }
            let tag = self.tag_of(&record.data);
            let _stripe = self
                .users
                .as_ref()
                .map(|users| users.stripe(tag).read().unwrap_or_else(|e| e.into_inner()));
            let mut changed = false;
            let taken = self.remove_where(key, |s| {
                changed = !s.holds(&read);
                !changed
            });
            if taken.is_none() {
                if changed {
                    continue;
                }
                return Applied::Missing;
            }
            let new_key = self.insert_fresh(&record, tag);
            return Applied::Saved {
                key: new_key,
                record,
            };
        }
    }
}

impl Store for MemoryStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        Ok(self
            .map
            .get(&Prefix::of(key))
            .filter(|r| r.key().is(key) && r.is_live(now))
            .map(|r| r.to_record()))
    }

    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        let tag = self.tag_of(&record.data);
        Ok(self.insert_fresh(&record, tag))
    }

    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        if patch.cycle {
            return Ok(self.cycle(key, patch, ctx));
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
                // A record rewritten since is live again: keep it (its
                // expiry index entry is the newer one).
                let dead = self.map.remove_if(&Prefix::of(&key), |k, s| {
                    let hit = k.is(&key) && !s.is_live(now);
                    if hit {
                        self.relink(&key, s.user, 0);
                    }
                    hit
                });
                if dead.is_some() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn user_sessions(&self, user: &str, now: i64) -> Result<Vec<UserSession>, StoreError> {
        let Some(users) = &self.users else {
            return Ok(Vec::new());
        };
        let tag = users.tag(user);
        let mut out: Vec<UserSession> = users
            .prefixes(tag)
            .into_iter()
            .filter_map(|p| {
                let r = self.map.get(&p)?;
                (r.user == tag && r.is_live(now) && users.names(&r.data, user))
                    .then(|| UserSession::of(r.key().key(), &r.to_record()))
            })
            .collect();
        out.sort_by_key(|s| (s.created, s.key));
        Ok(out)
    }

    async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> Result<u64, StoreError> {
        let Some(users) = &self.users else {
            return Ok(0);
        };
        let tag = users.tag(user);
        // No Cycle-Key of this user's sessions is half done while this runs.
        let _stripe = users.stripe(tag).write().unwrap_or_else(|e| e.into_inner());
        let mut ended = 0;
        for p in users.prefixes(tag) {
            let gone = self.map.remove_if(&p, |k, s| {
                let hit = s.user == tag
                    && keep.is_none_or(|keep| !k.is(keep))
                    && users.names(&s.data, user);
                if hit {
                    users.relink(p, tag, 0);
                }
                hit
            });
            if let Some((k, s)) = gone {
                self.index_move(&k.key(), Some(s.expires_at), None);
                ended += u64::from(s.is_live(now));
            }
        }
        Ok(ended)
    }

    async fn revoke_matching(&self, matches: KeyFilter<'_>, now: i64) -> Result<u64, StoreError> {
        let keys: Vec<SessionKey> = self
            .map
            .iter()
            .map(|e| e.key().key())
            .filter(|k| matches(k))
            .collect();
        let mut ended = 0;
        for k in keys {
            if let Some(s) = self.remove_where(&k, |_| true) {
                ended += u64::from(s.is_live(now));
            }
        }
        Ok(ended)
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

    fn with_users() -> MemoryStore {
        MemoryStore::new().with_user_key(Some("uid".into()))
    }

    fn users_of(rt: &tokio::runtime::Runtime, store: &MemoryStore, user: &str) -> Vec<SessionKey> {
        rt.block_on(store.user_sessions(user, T0))
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect()
    }

    /// The index follows creation, a login as another user, Cycle-Key, the
    /// removal of the user key, a delete and the sweep; numbers and strings
    /// are one user.
    #[test]
    fn the_user_index_follows_every_change() {
        let store = with_users();
        let rt = runtime();
        let a = rt.block_on(store.create(record(T0, "uid", 42))).unwrap();
        let b = rt.block_on(store.create(record(T0, "uid", "42"))).unwrap();
        let c = rt.block_on(store.create(record(T0, "x", 1))).unwrap();
        let mut both = vec![a, b];
        both.sort_by_key(|k| rt.block_on(store.load(k, T0)).unwrap().unwrap().created);
        assert_eq!(users_of(&rt, &store, "42").len(), 2);
        assert_eq!(store.user_index_len(), 2);
        // c logs in as bob, then a as bob too.
        rt.block_on(store.apply(&c, &set("uid", "bob"), ctx(T0)))
            .unwrap();
        rt.block_on(store.apply(&a, &set("uid", "bob"), ctx(T0)))
            .unwrap();
        assert_eq!(users_of(&rt, &store, "42"), vec![b]);
        let mut bobs = users_of(&rt, &store, "bob");
        bobs.sort();
        let mut want = vec![a, c];
        want.sort();
        assert_eq!(bobs, want);
        // A patch that leaves the user key alone keeps the session where it is.
        rt.block_on(store.apply(&a, &set("cart", 3), ctx(T0 + 1)))
            .unwrap();
        assert_eq!(users_of(&rt, &store, "bob").len(), 2);
        // Cycle-Key moves it to the new key.
        let mut cycle = set("seen", 1);
        cycle.cycle = true;
        let Applied::Saved { key: a2, .. } =
            rt.block_on(store.apply(&a, &cycle, ctx(T0 + 2))).unwrap()
        else {
            panic!()
        };
        assert!(users_of(&rt, &store, "bob").contains(&a2));
        assert!(!users_of(&rt, &store, "bob").contains(&a));
        // Deleting the user key takes it out of every index.
        let mut logout = Patch::default();
        logout.delete.push("uid".into());
        rt.block_on(store.apply(&a2, &logout, ctx(T0 + 3))).unwrap();
        assert_eq!(users_of(&rt, &store, "bob"), vec![c]);
        // Delete (Flush) and the sweep.
        rt.block_on(store.delete(&c)).unwrap();
        assert!(users_of(&rt, &store, "bob").is_empty());
        let expires = rt.block_on(store.load(&b, T0)).unwrap().unwrap().expires_at;
        assert_eq!(rt.block_on(store.clear_expired(expires)).unwrap(), 1);
        assert!(users_of(&rt, &store, "42").is_empty());
        assert_eq!(store.user_index_len(), 0);
        let _ = both;
    }

    /// Revoking a user ends that user's live sessions but the kept one, and
    /// no other user's; a write in flight of a revoked session is Missing
    /// and does not bring it back; expired sessions are not listed.
    #[test]
    fn revoking_a_user_ends_exactly_their_sessions() {
        let store = with_users();
        let rt = runtime();
        let keys: Vec<_> = (0..5)
            .map(|_| {
                rt.block_on(store.create(record(T0, "uid", "alice")))
                    .unwrap()
            })
            .collect();
        let other = rt.block_on(store.create(record(T0, "uid", "bob"))).unwrap();
        let old = rt
            .block_on(store.create(record(T0 - 3_600_000, "uid", "alice")))
            .unwrap();
        assert_eq!(
            users_of(&rt, &store, "alice").len(),
            5,
            "the expired one is not listed"
        );
        let ended = rt
            .block_on(store.revoke_user("alice", Some(&keys[0]), T0))
            .unwrap();
        assert_eq!(
            ended, 4,
            "live sessions ended, the kept one and the expired one not counted"
        );
        assert_eq!(users_of(&rt, &store, "alice"), vec![keys[0]]);
        assert_eq!(users_of(&rt, &store, "bob"), vec![other]);
        assert!(rt.block_on(store.load(&old, T0)).unwrap().is_none());
        for k in &keys[1..] {
            assert!(rt.block_on(store.load(k, T0)).unwrap().is_none());
            let got = rt
                .block_on(store.apply(k, &set("late", 1), ctx(T0)))
                .unwrap();
            assert_eq!(got, Applied::Missing);
        }
        assert_eq!(store.len(), 2);
        assert_eq!(
            rt.block_on(store.revoke_user("alice", None, T0)).unwrap(),
            1
        );
        assert_eq!(
            rt.block_on(store.revoke_user("nobody", None, T0)).unwrap(),
            0
        );
        assert_eq!(store.user_index_len(), 1);
        assert!(
            store
                .index
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>()
                == 1
        );
    }

    /// Sessions whose users' tags collide are told apart by their data.
    #[test]
    fn colliding_tags_are_checked_against_the_data() {
        let store = with_users();
        let rt = runtime();
        let a = rt
            .block_on(store.create(record(T0, "uid", "alice")))
            .unwrap();
        let b = rt.block_on(store.create(record(T0, "uid", "bob"))).unwrap();
        // Force a collision: index b under alice's tag too, and tag its slot so.
        let users = store.users.as_ref().unwrap();
        let tag = users.tag("alice");
        {
            let mut s = store.map.get_mut(&Prefix::of(&b)).unwrap();
            users.relink(Prefix::of(&b), s.user, tag);
            s.user = tag;
        }
        assert_eq!(users_of(&rt, &store, "alice"), vec![a]);
        assert_eq!(
            rt.block_on(store.revoke_user("alice", None, T0)).unwrap(),
            1
        );
        assert!(rt.block_on(store.load(&b, T0)).unwrap().is_some());
    }

    /// Cycle-Key racing a revocation of the same user: whichever wins, no
    /// session of the user survives the revocation that started after it,
    /// and the index never holds a key the map does not.
    #[test]
    fn cycle_key_does_not_escape_a_concurrent_revocation() {
        let rt = runtime();
        for round in 0..200 {
            let store = Arc::new(with_users());
            let key = rt
                .block_on(store.create(record(T0, "uid", "alice")))
                .unwrap();
            let start = Arc::new(std::sync::Barrier::new(2));
            let cycler = {
                let (store, start) = (store.clone(), start.clone());
                std::thread::spawn(move || {
                    let rt = runtime();
                    let mut p = set("n", round);
                    p.cycle = true;
                    start.wait();
                    rt.block_on(store.apply(&key, &p, ctx(T0))).unwrap()
                })
            };
            start.wait();
            rt.block_on(store.revoke_user("alice", None, T0)).unwrap();
            let cycled = cycler.join().unwrap();
            // The revocation may have run first (the cycle then found the
            // session gone) or second (then it ended the new key); a cycle
            // that saved after the revocation started is not possible
            // without the revocation seeing it.
            let left = users_of(&rt, &store, "alice");
            match cycled {
                Applied::Missing => assert!(left.is_empty()),
                Applied::Saved { key: new, .. } => {
                    assert!(left.is_empty() || left == vec![new]);
                    if !left.is_empty() {
                        // Cycled after the revocation: a second one ends it.
                        assert_eq!(
                            rt.block_on(store.revoke_user("alice", None, T0)).unwrap(),
                            1
                        );
                    }
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(store.len(), store.user_index_len());
        }
    }

    /// The user index costs nothing without a user key; the map finds a
    /// key by its full value only (a key that shares the prefix is not it).
    #[test]
    fn a_key_that_shares_a_prefix_is_not_the_session() {
        let store = MemoryStore::new();
        let rt = runtime();
        let key = rt.block_on(store.create(record(T0, "a", 1))).unwrap();
        let mut b = *key.as_bytes();
        b[31] = if b[31] == b'a' { b'b' } else { b'a' };
        let twin = SessionKey::parse_bytes(&b).unwrap();
        assert!(rt.block_on(store.load(&twin, T0)).unwrap().is_none());
        assert_eq!(
            rt.block_on(store.apply(&twin, &set("b", 2), ctx(T0)))
                .unwrap(),
            Applied::Missing
        );
        rt.block_on(store.delete(&twin)).unwrap();
        assert!(rt.block_on(store.load(&key, T0)).unwrap().is_some());
        assert_eq!(store.user_index_len(), 0);
        assert!(store.users.is_none());
    }
}
