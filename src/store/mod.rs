//! Session stores: one small async trait, one file per engine, and
//! [`AnyStore`], the enum the proxy holds (static dispatch, no boxing).
//!
//! The contract every engine keeps (checked by `tests/store_conformance.rs`):
//! - `load` never creates anything and never returns an expired record;
//! - `create` writes a new record under a fresh random key that was unused;
//! - `apply` changes the newest stored state atomically: concurrent patches
//!   to different keys of one session all survive; a session that is gone
//!   (flushed, cycled away, expired) is reported [`Applied::Missing`] and is
//!   never brought back; `apply_seen` is the same, given the record the
//!   request loaded (which may have gone stale since);
//! - `delete` is idempotent; `clear_expired` removes what has expired and
//!   says how many.
//! - with a user key (`[session] user_key`, SPEC 9), an engine with a server
//!   side keeps an index from a user (the text of that key's value, see
//!   [`user_of`]) to the user's sessions, through every write, Cycle-Key,
//!   delete and expiry; `user_sessions` lists the live ones and
//!   `revoke_user` ends them so that no instance serves them again.

pub mod db;
pub mod file;
pub mod memory;
pub mod redis;
pub mod signed;

use std::future::Future;

use crate::config::{Config, Engine};
use crate::session::{Patch, Policy, Record, SessionKey};

pub use db::DbStore;
pub use file::FileStore;
pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use signed::SignedCookies;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or failed; the request gets a 503.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// The store could not be opened at start.
    #[error("cannot open the session store: {0}")]
    Open(String),
}

/// What a write needs to know besides the patch.
#[derive(Debug, Clone, Copy)]
pub struct WriteCtx {
    pub now: i64,
    pub policy: Policy,
    /// Write (and refresh the expiry) even when the patch changes nothing
    /// (`save_every_request`).
    pub touch: bool,
    /// `refresh_interval` in ms when the request found its session due for
    /// a refresh (SPEC 10), else 0. A patch that changes nothing then
    /// writes only when the newest state is still that old: of a burst of
    /// requests that all found it due, one writes (the others find it
    /// just written).
    pub refresh_ms: i64,
    /// `max_session_size` (0: none): a patch that makes the stored data
    /// longer than this, and longer than it was, is not written
    /// ([`Applied::TooLarge`]). Checked on the newest state, so concurrent
    /// writes cannot together pass the limit.
    pub max_size: u64,
}

impl WriteCtx {
    /// Whether a patch that changes nothing still writes, on `base` (the
    /// newest state): `touch`, or a refresh still due on it.
    pub fn touches(&self, base: &Record) -> bool {
        self.touch || (self.refresh_ms > 0 && self.now - base.modified >= self.refresh_ms)
    }

    /// The size of `after`'s data when `max_size` refuses it (over the
    /// limit, and grown from `before`).
    pub fn too_large(&self, before: &Record, after: &Record) -> Option<usize> {
        let size = after.data.len();
        (self.max_size > 0 && size as u64 > self.max_size && size > before.data.len())
            .then_some(size)
    }
}

/// One live session of a user, as the admin API lists it (SPEC 9). The key
/// never leaves the process: the API shows its `X-Session-Id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSession {
    pub key: SessionKey,
    /// Unix ms, fixed at creation.
    pub created: i64,
    /// Unix ms of the last write.
    pub last_write: i64,
    /// Unix ms: the server-side end of life.
    pub expires_at: i64,
}

impl UserSession {
    pub fn of(key: SessionKey, r: &Record) -> UserSession {
        UserSession {
            key,
            created: r.created,
            last_write: r.modified,
            expires_at: r.expires_at,
        }
    }
}

/// The user a session belongs to under `user_key`, as text: a JSON string
/// as it is, a number as its JSON text (so `42` and `"42"` are one user, as
/// `?user=42` is). Any other value, the empty string, or no such key: no
/// user. The empty string is no user on every engine alike (Redis stores
/// "no user" as an empty field, and the admin API refuses `?user=`), as
/// Django's `_auth_user_id` is never empty.
pub fn user_of(data: &[u8], user_key: &str) -> Option<String> {
    with_user(data, user_key, str::to_owned)
}

/// [`user_of`], handing the user's text to `f` without copying it when the
/// data holds it as it is (a string without escapes): on every login's
/// write, only that key's value is looked at, and the other keys and
/// values are skipped without allocating.
pub fn with_user<R>(data: &[u8], user_key: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::borrow::Cow;
    struct Find<'a>(&'a str);
    struct KeyIs<'a>(&'a str);
    /// A user's value: its text, or `None` for a value that names no user.
    struct UserText;
    impl<'de> Visitor<'de> for KeyIs<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E>(self, v: &str) -> Result<bool, E> {
            Ok(v == self.0)
        }
    }
    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }
    // The text: a string as it is, a number as serde_json writes it.
    impl<'de> Visitor<'de> for UserText {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(serde_json::Number::from(v).to_string())))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(serde_json::Number::from(v).to_string())))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(serde_json::Number::from_f64(v).map(|n| Cow::Owned(n.to_string())))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
            while s.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    impl<'de> DeserializeSeed<'de> for UserText {
        type Value = Option<Cow<'de, str>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(hit) = m.next_key_seed(KeyIs(self.0))? {
                if hit {
                    // The last one wins, as when the object is parsed whole.
                    found = m.next_value_seed(UserText)?;
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(data);
    let found = de.deserialize_map(Find(user_key)).ok()?;
    de.end().ok()?;
    found.filter(|u| !u.is_empty()).map(|u| f(&u))
}

/// Whether `patch` may change the user a session names under `user_key`
/// (else the user stays what it was, and no index needs to look).
pub fn touches_user(patch: &Patch, user_key: &str) -> bool {
    patch.replace.is_some()
        || patch.clear
        || patch.update.contains_key(user_key)
        || patch.delete.iter().any(|k| k == user_key)
}

#[cfg(test)]
mod user_of_tests {
    use super::user_of;

    #[test]
    fn finds_the_users_text_and_nothing_else() {
        assert_eq!(
            user_of(br#"{"a":[1,{"uid":2}],"uid":"alice"}"#, "uid").as_deref(),
            Some("alice")
        );
        assert_eq!(user_of(br#"{"uid":42}"#, "uid").as_deref(), Some("42"));
        assert_eq!(user_of(br#"{"uid":-7}"#, "uid").as_deref(), Some("-7"));
        assert_eq!(user_of(br#"{"uid":1e3}"#, "uid").as_deref(), Some("1000.0"));
        assert_eq!(
            user_of(br#"{"uid":{"a":[1]},"x":2}"#, "uid"),
            None,
            "an object names no user"
        );
        assert_eq!(
            user_of(br#"{"uid":"a","uid":true}"#, "uid"),
            None,
            "the last one wins"
        );
        assert_eq!(
            user_of(br#"{"u\u0069d":1.5}"#, "uid").as_deref(),
            Some("1.5")
        );
        assert_eq!(
            user_of(br#"{"uid":"a\"b"}"#, "uid").as_deref(),
            Some("a\"b")
        );
        for none in [
            &br#"{"uid":null}"#[..],
            br#"{"uid":[1]}"#,
            br#"{"x":1}"#,
            b"[1]",
            b"{",
            br#"{"uid":1} x"#,
            br#"{"uid":""}"#,
            br#"{"uid":"\u0041","uid":""}"#,
        ] {
            assert_eq!(
                user_of(none, "uid"),
                None,
                "{}",
                String::from_utf8_lossy(none)
            );
        }
    }
}

/// A predicate over keys (the admin API's `DELETE /sessions/ID` matches the
/// `X-Session-Id` computed from each key).
pub type KeyFilter<'a> = &'a (dyn Fn(&SessionKey) -> bool + Send + Sync);

/// The result of [`Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The patch was applied; the key is new when the patch cycled it.
    Saved { key: SessionKey, record: Record },
    /// The patch changed nothing and `touch` was off: nothing was written.
    Unchanged,
    /// The session no longer exists (deleted by a concurrent Flush or
    /// Cycle-Key, or expired): nothing was written.
    Missing,
    /// The result would be over `max_session_size` (its data's size in
    /// bytes): nothing was written.
    TooLarge { size: usize },
}

pub trait Store: Send + Sync + 'static {
    /// The live record for `key`, if any. Never creates.
    fn load(
        &self,
        key: &SessionKey,
        now: i64,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Writes `record` under a fresh random key and returns the key.
    fn create(&self, record: Record)
        -> impl Future<Output = Result<SessionKey, StoreError>> + Send;

    /// Applies `patch` (including Cycle-Key, not Flush) to the newest state.
    fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send;

    /// [`Store::apply`] for a request that loaded `seen`, this key's
    /// record, before it went upstream. An engine whose writes compare and
    /// set may start from `seen` (its [`Stamp`](crate::session::Stamp))
    /// instead of reading the session again; the patch is still applied to
    /// the newest state: a `seen` that has gone stale costs a retry, never
    /// a lost change.
    fn apply_seen(
        &self,
        key: &SessionKey,
        seen: &Record,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> impl Future<Output = Result<Applied, StoreError>> + Send {
        let _ = seen;
        self.apply(key, patch, ctx)
    }

    /// Deletes the record; deleting an absent key is not an error.
    fn delete(&self, key: &SessionKey) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes every expired record; returns how many.
    fn clear_expired(&self, now: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Makes every acknowledged write durable (shutdown).
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }

    /// Whether the store answers (`/readyz`). Engines inside the process
    /// always do.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }

    /// The live sessions of `user` (SPEC 9), oldest first. Empty when no
    /// user key is configured.
    fn user_sessions(
        &self,
        user: &str,
        now: i64,
    ) -> impl Future<Output = Result<Vec<UserSession>, StoreError>> + Send {
        let _ = (user, now);
        async { Err(StoreError::Unavailable(NO_INDEX.into())) }
    }

    /// Ends every session of `user` but `keep`: deleted for every instance
    /// and every engine cache. Returns how many were live.
    fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = (user, keep, now);
        async { Err(StoreError::Unavailable(NO_INDEX.into())) }
    }

    /// Ends every live session whose key `matches` (a scan: the admin API's
    /// `DELETE /sessions/ID`, not a request path). Returns how many.
    fn revoke_matching(
        &self,
        matches: KeyFilter<'_>,
        now: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = (matches, now);
        async { Err(StoreError::Unavailable(NO_INDEX.into())) }
    }
}

/// What an engine without a user index answers.
const NO_INDEX: &str = "this engine keeps no index of a user's sessions";

/// The configured engine.
pub enum AnyStore {
    Memory(MemoryStore),
    /// `file`, and `cached_file` (the store keeps its own cache).
    File(FileStore),
    /// `redis`, and `cached_redis` (the store keeps its own cache).
    Redis(RedisStore),
    /// `signed_cookies`: no server state; the proxy encodes and decodes
    /// the session in the cookie (see [`AnyStore::as_signed`]).
    Signed(SignedCookies),
    /// `db`: Django's table on SQLite or PostgreSQL (boxed: it is several
    /// times the size of the other engines' handles).
    Db(Box<DbStore>),
}

impl AnyStore {
    /// Opens the engine the configuration names.
    pub async fn open(config: &Config) -> Result<AnyStore, StoreError> {
        let c = &config.store;
        // `check` refuses it with signed_cookies, which keeps no index.
        let user_key = config.session.user_key.clone();
        match c.engine {
            Engine::SignedCookies => Ok(AnyStore::Signed(SignedCookies::from_config(config))),
            Engine::Memory => Ok(AnyStore::Memory(MemoryStore::new().with_user_key(user_key))),
            Engine::Db | Engine::CachedDb => {
                let url =
                    c.db.as_ref()
                        .ok_or_else(|| StoreError::Open("[store] url is required".into()))?;
                let s = &config.session;
                Ok(AnyStore::Db(Box::new(
                    DbStore::open_cached(
                        url,
                        &c.table,
                        c.timeout,
                        &s.secret_key,
                        &s.secret_key_fallbacks,
                        c.cache_url.as_deref(),
                    )
                    .await?
                    .with_user_key(user_key)
                    .await?,
                )))
            }
            Engine::File | Engine::CachedFile => {
                let path = c
                    .path
                    .as_deref()
                    .ok_or_else(|| StoreError::Open("[store] path is required".into()))?;
                Ok(AnyStore::File(
                    FileStore::open_with_user_key(path, c.engine == Engine::CachedFile, user_key)
                        .await?,
                ))
            }
            Engine::Redis | Engine::CachedRedis => {
                let url = c
                    .url
                    .as_deref()
                    .ok_or_else(|| StoreError::Open("[store] url is required".into()))?;
                Ok(AnyStore::Redis(
                    RedisStore::open(url, c.timeout, c.engine == Engine::CachedRedis)
                        .await?
                        .with_user_key(user_key),
                ))
            }
        }
    }

    /// A reload: what the engine takes from `[session]` follows `config`
    /// (its `[store]` is the running one: a reload refuses another). The
    /// keys above all: `signed_cookies` signs and verifies its cookies, and
    /// `db`/`cached_db` its rows, with the reloaded `secret_key` and
    /// `secret_key_fallbacks`, so a key rotated (or dropped after a leak)
    /// by a reload is rotated, not kept until a restart.
    pub fn follow(&self, config: &Config) {
        match self {
            AnyStore::Signed(s) => s.follow(config),
            AnyStore::Db(d) => d.rekey(
                &config.session.secret_key,
                &config.session.secret_key_fallbacks,
            ),
            AnyStore::Memory(_) | AnyStore::File(_) | AnyStore::Redis(_) => {}
        }
    }

    /// The signed-cookie codec, when that is the engine.
    pub fn as_signed(&self) -> Option<&SignedCookies> {
        match self {
            AnyStore::Signed(s) => Some(s),
            _ => None,
        }
    }

    /// The memory engine, when that is what this is (tests, benches).
    pub fn as_memory(&self) -> Option<&MemoryStore> {
        match self {
            AnyStore::Memory(m) => Some(m),
            _ => None,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Memory($s) => $e.await,
            AnyStore::File($s) => $e.await,
            // Boxed: a Redis call's future is about 2 KB, and inline it
            // would make every request's future (and each move of it) that
            // much larger, whatever the engine.
            AnyStore::Redis($s) => Box::pin($e).await,
            AnyStore::Signed($s) => $e.await,
            // Boxed for the same reason.
            AnyStore::Db($s) => Box::pin($e).await,
        }
    };
}

/// Applies a patch to a record held in hand (the memory engine on a copy of
/// the newest state, the signed-cookie engine on the decoded cookie): Cycle-Key takes a
/// fresh key; a patch that changes nothing is `Unchanged` unless `touch`.
pub fn apply_local(key: &SessionKey, record: &Record, patch: &Patch, ctx: WriteCtx) -> Applied {
    let mut next = record.clone();
    let modified = next.apply_patch(patch, ctx.now, &ctx.policy);
    if !modified && !ctx.touches(record) && !patch.cycle {
        return Applied::Unchanged;
    }
    if let Some(size) = ctx.too_large(record, &next) {
        return Applied::TooLarge { size };
    }
    let key = if patch.cycle {
        SessionKey::generate()
    } else {
        *key
    };
    Applied::Saved { key, record: next }
}

impl Store for AnyStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        dispatch!(self, s => s.load(key, now))
    }
    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        dispatch!(self, s => s.create(record))
    }
    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        dispatch!(self, s => s.apply(key, patch, ctx))
    }
    async fn apply_seen(
        &self,
        key: &SessionKey,
        seen: &Record,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        dispatch!(self, s => s.apply_seen(key, seen, patch, ctx))
    }
    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete(key))
    }
    async fn clear_expired(&self, now: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.clear_expired(now))
    }
    async fn flush(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.flush())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping())
    }
    async fn user_sessions(&self, user: &str, now: i64) -> Result<Vec<UserSession>, StoreError> {
        dispatch!(self, s => s.user_sessions(user, now))
    }
    async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.revoke_user(user, keep, now))
    }
    async fn revoke_matching(&self, matches: KeyFilter<'_>, now: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.revoke_matching(matches, now))
    }
}

/// Fixtures shared by the engines' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::WriteCtx;
    use crate::session::{Patch, Policy, Record};

    pub const POLICY: Policy = Policy {
        cookie_age_secs: 3600,
        expire_at_browser_close: false,
        absolute_timeout_ms: 0,
    };
    /// A fixed "now" far from 0 (Unix ms).
    pub const T0: i64 = 1_800_000_000_000;

    pub fn ctx(now: i64) -> WriteCtx {
        WriteCtx {
            now,
            policy: POLICY,
            touch: false,
            refresh_ms: 0,
            max_size: 0,
        }
    }

    /// A patch that sets `key` to `value`.
    pub fn set(key: &str, value: impl Into<serde_json::Value>) -> Patch {
        let mut p = Patch::default();
        p.update.insert(key.into(), value.into());
        p.has_update = true;
        p
    }

    /// A record created at `now` holding `key: value`.
    pub fn record(now: i64, key: &str, value: impl Into<serde_json::Value>) -> Record {
        let mut r = Record::new_at(now);
        r.apply_patch(&set(key, value), now, &POLICY);
        r
    }
}
