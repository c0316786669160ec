//! The `db` engine (SPEC 8): sessions in Django's own `django_session`
//! table, in Django's own format, so a Django app and sessiongate can share
//! them.
//!
//! # The row
//! - `session_key`: the 32-character key;
//! - `session_data`: `signing.dumps(data, salt=SESSION_SALT, compress=True)`
//!   (see [`django`]), where `data` is the session's keys plus
//!   `_session_expiry` (Django's `set_expiry`: an integer, `0`, or an aware
//!   ISO 8601 string) and `_sessiongate_created` (the creation time in Unix
//!   ms, for `absolute_timeout`; Django carries it along like any key). Both
//!   are hidden from `X-Session` and cannot be set by an upstream;
//! - `expire_date`: the server-side end of life. On SQLite naive UTC text
//!   `YYYY-MM-DD HH:MM:SS[.ffffff]`, as Django writes it.
//!
//! # Writes
//! A patch is applied by [`crate::store::apply_local`] (the code every
//! engine shares) to the newest row read inside one transaction that holds
//! the write lock (`BEGIN IMMEDIATE` on SQLite), so concurrent patches to
//! different keys all survive. A row that is gone, expired or badly signed
//! is [`Applied::Missing`].

mod cache;
pub mod django;
pub mod index;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use super::{Applied, Store, StoreError, WriteCtx};
use crate::config::DbUrl;
use crate::session::{json, Expiry, Patch, Record, SessionKey, Stamp};

pub use django::{BadSignature, Signer};

/// Django's `set_expiry` value in the session data.
pub const EXPIRY_KEY: &str = "_session_expiry";
/// sessiongate's creation time (Unix ms) in the session data.
pub const CREATED_KEY: &str = "_sessiongate_created";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the database worker stopped: {0}")]
    Worker(#[source] tokio::task::JoinError),
    #[error("postgres: {}", pg_message(.0))]
    Postgres(#[source] tokio_postgres::Error),
    #[error("[store] url: not a PostgreSQL URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("redis (cache_url): {0}")]
    Redis(#[source] redis::RedisError),
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("table {table:?} does not exist: run `sessiongate migrate --config FILE` (or Django's `manage.py migrate`)")]
    NoTable { table: String },
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        DbError::Sqlite(e)
    }
}

/// Cache updates to make after a commit: key, version, the row (`None`: deleted).
pub(crate) type Puts = Vec<(SessionKey, i64, Option<(String, i64)>)>;

/// The server's own message when there is one (tokio-postgres says only
/// "db error" for those).
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }
}

/// What `migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    Created,
    AlreadyThere,
}

/// Encodes and decodes rows (shared by the databases).
pub(crate) struct Codec {
    /// `session_data`'s signer: `secret_key` and its fallbacks, shared by
    /// the store's codecs and replaced by a reload ([`DbStore::rekey`]).
    signer: Arc<arc_swap::ArcSwap<Signer>>,
    /// `[session] user_key` and the index statements (SPEC 9).
    /// Boxed: most stores have none, and the store sits in an enum.
    pub(crate) index: Option<Box<UserIndex>>,
}

/// The user index of a database (see [`index`]).
pub(crate) struct UserIndex {
    pub user_key: String,
    pub sql: index::IndexSql,
    /// The session table.
    pub table: String,
}

impl Codec {
    /// The user a row names, decoded (`None`: gone, expired, unreadable or
    /// no user).
    pub(crate) fn user_in_row(
        &self,
        user_key: &str,
        data: &str,
        exp: i64,
        now: i64,
    ) -> Option<(String, Record)> {
        let r = self.decode(data, exp, now)?;
        let u = super::user_of(&r.data, user_key)?;
        Some((u, r))
    }
}

impl Codec {
    /// `session_data` for `r`.
    pub(crate) fn encode(&self, r: &Record) -> String {
        let mut map = r.data_map();
        // The expiry is the record's, never a key an upstream wrote
        // (SPEC 8), whatever the path that made the record.
        map.remove(EXPIRY_KEY);
        match r.expiry {
            Expiry::Default => {}
            Expiry::BrowserClose => {
                map.insert(EXPIRY_KEY.into(), Value::from(0));
            }
            Expiry::Seconds(n) => {
                map.insert(EXPIRY_KEY.into(), Value::from(n));
            }
            Expiry::At(t) => {
                map.insert(EXPIRY_KEY.into(), Value::from(iso_aware(t)));
            }
        }
        map.insert(CREATED_KEY.into(), Value::from(r.created));
        let text = json::to_ascii_vec(&map);
        self.signer.load().dumps(&text, r.modified.div_euclid(1000))
    }

    /// The record in a row, or `None` when the row has expired at `now` or
    /// its signature or data is bad (never adopted, SPEC 4.3).
    pub(crate) fn decode(&self, data: &str, expires_at: i64, now: i64) -> Option<Record> {
        if expires_at <= now {
            return None;
        }
        let (text, signed) = match self.signer.load().loads_at(data, None) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "session row not adopted: bad signature or data");
                return None;
            }
        };
        let Some(mut map) = json::parse_object(&text) else {
            tracing::warn!("session row not adopted: its data is not a JSON object");
            return None;
        };
        let expiry = expiry_from_value(map.remove(EXPIRY_KEY));
        let modified = last_write(signed, now);
        // A row Django made has no creation time of ours: it is at least as
        // old as its signature.
        let created = map
            .remove(CREATED_KEY)
            .and_then(|v| v.as_i64())
            .unwrap_or(modified);
        Some(Record {
            data: json::encode_object(&map),
            expiry,
            created,
            modified,
            expires_at,
            stamp: Stamp::NONE,
        })
    }
}

/// The time of a row's last write in Unix ms, from its signature's
/// timestamp (Unix seconds: `signing.dumps` stamps every save, Django's and
/// ours): the end of that second, so that `refresh_interval` never counts
/// a write as older than it is; `now` at most. Shown to the second (the
/// admin API's `last_write`), it is the second of the write.
fn last_write(signed_secs: i64, now: i64) -> i64 {
    signed_secs
        .saturating_mul(1000)
        .saturating_add(999)
        .min(now)
}

/// Django's `_session_expiry` value as an [`Expiry`].
pub fn expiry_from_value(v: Option<Value>) -> Expiry {
    match v {
        None | Some(Value::Null) => Expiry::Default,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(0) => Expiry::BrowserClose,
            Some(n) => Expiry::Seconds(n),
            None => match n.as_f64() {
                Some(0.0) => Expiry::BrowserClose,
                Some(f) => Expiry::Seconds(f as i64),
                None => Expiry::Default,
            },
        },
        Some(Value::String(s)) => match parse_iso(&s) {
            Some(t) => Expiry::At(t),
            None => Expiry::Default,
        },
        Some(_) => Expiry::Default,
    }
}

/// Removes the keys the row keeps for itself from what an upstream wrote.
fn strip_reserved(r: &mut Record) {
    let text = r.data.as_ref();
    let has = |k: &str| text.windows(k.len()).any(|w| w == k.as_bytes());
    if has(EXPIRY_KEY) || has(CREATED_KEY) {
        let mut map: Map<String, Value> = r.data_map();
        map.remove(EXPIRY_KEY);
        map.remove(CREATED_KEY);
        r.data = json::encode_object(&map);
    }
}

/// Applies a patch to the row's record; strips reserved keys from the result.
pub(crate) fn apply_row(key: &SessionKey, r: &Record, patch: &Patch, ctx: WriteCtx) -> Applied {
    match super::apply_local(key, r, patch, ctx) {
        Applied::Saved { key, mut record } => {
            strip_reserved(&mut record);
            Applied::Saved { key, record }
        }
        other => other,
    }
}

fn utc(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn push_date_time(out: &mut String, t: OffsetDateTime, sep: char) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if t.microsecond() != 0 {
        let _ = write!(out, ".{:06}", t.microsecond());
    }
}

/// Python's `datetime.isoformat()` of an aware UTC datetime.
pub fn iso_aware(ms: i64) -> String {
    let mut s = String::with_capacity(32);
    push_date_time(&mut s, utc(ms), 'T');
    s.push_str("+00:00");
    s
}

/// `str(datetime)` of a naive UTC datetime: how Django stores
/// `expire_date` on SQLite.
pub fn naive_utc_text(ms: i64) -> String {
    let mut s = String::with_capacity(26);
    push_date_time(&mut s, utc(ms), ' ');
    s
}

/// Parses ISO 8601 as Django writes it (aware, or naive meaning UTC) to Unix ms.
pub fn parse_iso(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        let s = s.replacen(' ', "T", 1);
        let fmt = time::macros::format_description!(
            version = 2,
            "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
        );
        PrimitiveDateTime::parse(&s, fmt)
            .ok()
            .map(|p| p.assume_offset(UtcOffset::UTC))
    })?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// The `db` engine (and `cached_db`, with a cache).
pub struct DbStore {
    backend: Backend,
    codec: Codec,
    cache: Option<Arc<cache::Cache>>,
    table: String,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    /// Boxed: its table of per-thread connections is half a kilobyte.
    Postgres(Box<postgres::Postgres>),
}

impl DbStore {
    /// Keeps the index of a user's sessions under `user_key` (SPEC 9), in
    /// a table of ours (see [`index`]), created here when missing.
    pub async fn with_user_key(mut self, user_key: Option<String>) -> Result<Self, StoreError> {
        let Some(user_key) = user_key else {
            return Ok(self);
        };
        let open = |e: DbError| StoreError::Open(format!("the user index table: {e}"));
        match &mut self.backend {
            Backend::Sqlite(b) => {
                b.create_index_table(&self.table).await.map_err(open)?;
                b.set_index(Box::new(UserIndex {
                    user_key,
                    sql: index::IndexSql::new(&self.table, false),
                    table: self.table.clone(),
                }));
            }
            Backend::Postgres(b) => {
                b.create_index_table(&self.table).await.map_err(open)?;
                b.set_index(Box::new(UserIndex {
                    user_key,
                    sql: index::IndexSql::new(&self.table, true),
                    table: self.table.clone(),
                }));
            }
        }
        Ok(self)
    }

    /// `sessiongate migrate` with `user_key` set: the index table too.
    pub async fn migrate_user_index(
        url: &DbUrl,
        table: &str,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let r = match url {
            DbUrl::Sqlite(path) => sqlite::migrate_index(path, table, timeout).await,
            DbUrl::Postgres(u) => postgres::migrate_index(u, table, timeout).await,
        };
        r.map_err(|e| StoreError::Open(e.to_string()))
    }

    /// Opens the table (which must exist: see [`DbStore::migrate`]).
    pub async fn open(
        url: &DbUrl,
        table: &str,
        timeout: Duration,
        secret: &[u8],
        fallbacks: &[Vec<u8>],
    ) -> Result<DbStore, StoreError> {
        Self::open_cached(url, table, timeout, secret, fallbacks, None).await
    }

    /// [`DbStore::open`] with Redis at `cache_url` in front (`cached_db`).
    pub async fn open_cached(
        url: &DbUrl,
        table: &str,
        timeout: Duration,
        secret: &[u8],
        fallbacks: &[Vec<u8>],
        cache_url: Option<&str>,
    ) -> Result<DbStore, StoreError> {
        let signer = Arc::new(arc_swap::ArcSwap::from_pointee(Signer::new(
            django::SESSION_SALT,
            secret,
            fallbacks,
        )));
        let codec = || Codec {
            signer: signer.clone(),
            index: None,
        };
        let cache = match cache_url {
            Some(u) => Some(Arc::new(
                cache::Cache::new(u, timeout).map_err(|e| StoreError::Open(e.to_string()))?,
            )),
            None => None,
        };
        let backend = match url {
            DbUrl::Sqlite(path) => Backend::Sqlite(
                sqlite::Sqlite::open(path, table, timeout, codec(), cache.clone())
                    .await
                    .map_err(|e| StoreError::Open(e.to_string()))?,
            ),
            DbUrl::Postgres(url) => Backend::Postgres(Box::new(
                postgres::Postgres::open(url, table, timeout, codec(), cache.clone())
                    .await
                    .map_err(|e| StoreError::Open(e.to_string()))?,
            )),
        };
        Ok(DbStore {
            backend,
            codec: codec(),
            cache,
            table: table.to_string(),
        })
    }

    /// A reload: rows are signed with `secret` from now on and verified
    /// with it, then `fallbacks` (Django's `SECRET_KEY_FALLBACKS`), by every
    /// connection of the store.
    pub fn rekey(&self, secret: &[u8], fallbacks: &[Vec<u8>]) {
        self.codec.signer.store(Arc::new(Signer::new(
            django::SESSION_SALT,
            secret,
            fallbacks,
        )));
    }

    async fn load_raw(&self, key: &SessionKey) -> Result<Option<(String, i64)>, DbError> {
        match &self.backend {
            Backend::Sqlite(b) => b.load_raw(key).await,
            Backend::Postgres(b) => b.load_raw(key).await,
        }
    }

    /// Creates the table and its index when missing (as Django's
    /// `manage.py migrate` does); does nothing when the table exists.
    pub async fn migrate(
        url: &DbUrl,
        table: &str,
        timeout: Duration,
    ) -> Result<Migrated, StoreError> {
        match url {
            DbUrl::Sqlite(path) => sqlite::migrate(path, table, timeout)
                .await
                .map_err(|e| StoreError::Open(e.to_string())),
            DbUrl::Postgres(u) => postgres::migrate(u, table, timeout)
                .await
                .map_err(|e| StoreError::Open(e.to_string())),
        }
    }
}

macro_rules! backend {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sqlite($b) => Ok($e.await?),
            Backend::Postgres($b) => Ok($e.await?),
        }
    };
}

impl Store for DbStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        if let Some(c) = &self.cache {
            match c.get(key).await? {
                cache::Cached::Gone => return Ok(None),
                cache::Cached::Row(d, e) => return Ok(self.codec.decode(&d, e, now)),
                cache::Cached::Unknown => {}
            }
            let raw = self.load_raw(key).await?;
            if let Some((d, e)) = &raw {
                if *e > now {
                    c.fill(key, d, *e).await?;
                }
            }
            return Ok(raw.and_then(|(d, e)| self.codec.decode(&d, e, now)));
        }
        let Some((d, e)) = self.load_raw(key).await? else {
            return Ok(None);
        };
        let record = self.codec.decode(&d, e, now);
        if let (Backend::Postgres(b), Some(r)) = (&self.backend, &record) {
            b.saw(key, &d, r);
        }
        Ok(record)
    }
    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        backend!(self, b => b.create(record))
    }
    /// `/readyz`: the table answers a read (of a key no session has), as
    /// a request's would, and `cached_db`'s Redis answers `PING`.
    async fn ping(&self) -> Result<(), StoreError> {
        self.load_raw(&SessionKey::generate()).await?;
        if let Some(c) = &self.cache {
            c.ping().await?;
        }
        Ok(())
    }
    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        backend!(self, b => b.apply(key, patch, ctx))
    }
    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        backend!(self, b => b.delete(key))
    }
    async fn clear_expired(&self, now: i64) -> Result<u64, StoreError> {
        backend!(self, b => b.clear_expired(now))
    }

    /// The index entries are checked against the rows (which Django may
    /// have rewritten or deleted behind sessiongate's back); entries that
    /// no longer match are deleted.
    async fn user_sessions(
        &self,
        user: &str,
        now: i64,
    ) -> Result<Vec<super::UserSession>, StoreError> {
        let mut v: Vec<super::UserSession> = match &self.backend {
            Backend::Sqlite(b) => b.user_sessions(user, now).await?,
            Backend::Postgres(b) => b.user_sessions(user, now).await?,
        };
        v.sort_by_key(|s| (s.created, *s.key.as_bytes()));
        Ok(v)
    }

    async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> Result<u64, StoreError> {
        backend!(self, b => b.revoke_user(user, keep.copied(), now))
    }

    /// Reads every key of the table (a scan: for the admin API's
    /// `DELETE /sessions/ID`, not a request path).
    async fn revoke_matching(
        &self,
        matches: super::KeyFilter<'_>,
        now: i64,
    ) -> Result<u64, StoreError> {
        let keys = match &self.backend {
            Backend::Sqlite(b) => b.live_keys(&self.table, now).await?,
            Backend::Postgres(b) => b.live_keys(&self.table, now).await?,
        };
        let mut n = 0;
        for k in keys.iter().filter(|k| matches(k)) {
            self.delete(k).await?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{record, T0};

    fn codec() -> Codec {
        Codec {
            signer: Arc::new(arc_swap::ArcSwap::from_pointee(Signer::new(
                django::SESSION_SALT,
                &[b'k'; 40],
                &[],
            ))),
            index: None,
        }
    }

    #[test]
    fn dates_as_django_writes_them() {
        assert_eq!(naive_utc_text(1_800_000_000_000), "2027-01-15 08:00:00");
        assert_eq!(
            naive_utc_text(1_800_000_000_123),
            "2027-01-15 08:00:00.123000"
        );
        assert_eq!(iso_aware(1_800_000_000_000), "2027-01-15T08:00:00+00:00");
        assert_eq!(
            parse_iso("2027-01-15T08:00:00+00:00"),
            Some(1_800_000_000_000)
        );
        assert_eq!(
            parse_iso("2027-01-15T09:00:00.5+01:00"),
            Some(1_800_000_000_500)
        );
        assert_eq!(
            parse_iso("2027-01-15 08:00:00.123456"),
            Some(1_800_000_000_123)
        );
        assert_eq!(parse_iso("not a date"), None);
    }

    #[test]
    fn rows_round_trip_with_django_expiry() {
        let c = codec();
        for expiry in [
            Expiry::Default,
            Expiry::BrowserClose,
            Expiry::Seconds(300),
            Expiry::At(T0 + 7_000),
        ] {
            let mut r = record(T0, "cart", serde_json::json!([1, 2]));
            r.expiry = expiry;
            let data = c.encode(&r);
            let text = c.signer.load().loads(&data, None).unwrap();
            let map = json::parse_object(&text).unwrap();
            match expiry {
                Expiry::Default => assert!(!map.contains_key(EXPIRY_KEY)),
                Expiry::BrowserClose => assert_eq!(map[EXPIRY_KEY], 0),
                Expiry::Seconds(n) => assert_eq!(map[EXPIRY_KEY], n),
                Expiry::At(t) => assert_eq!(map[EXPIRY_KEY], iso_aware(t).as_str()),
            }
            let back = c.decode(&data, T0 + 10_000, T0).unwrap();
            assert_eq!(back.expiry, expiry);
            assert_eq!(back.data, r.data, "reserved keys hidden");
            assert_eq!(back.created, T0);
            assert!(c.decode(&data, T0, T0).is_none(), "expired");
        }
        let other = Codec {
            signer: Arc::new(arc_swap::ArcSwap::from_pointee(Signer::new(
                django::SESSION_SALT,
                &[b'o'; 40],
                &[],
            ))),
            index: None,
        };
        let data = c.encode(&record(T0, "a", 1));
        assert!(other.decode(&data, T0 + 1, T0).is_none(), "bad signature");
    }

    #[test]
    fn an_upstream_cannot_set_reserved_keys() {
        let r = record(T0, "a", 1);
        let mut p = crate::store::test_support::set(EXPIRY_KEY, 5);
        p.update.insert(CREATED_KEY.into(), 1.into());
        let Applied::Saved { record, .. } = apply_row(
            &SessionKey::generate(),
            &r,
            &p,
            crate::store::test_support::ctx(T0),
        ) else {
            panic!()
        };
        assert_eq!(record.data.as_ref(), br#"{"a":1}"#);
        assert_eq!(record.expiry, Expiry::Default);
    }
}
