//! The `db` engine on PostgreSQL: `tokio-postgres` with a `deadpool-postgres`
//! pool, prepared statements (cached per connection), `expire_date` as
//! `timestamp with time zone` (as Django makes it).
//!
//! Each patch is one transaction that locks the newest row
//! (`SELECT ... FOR UPDATE`), applies the patch, writes and commits, so
//! patches from any number of sessiongate instances on one database are
//! serialised per session and none is lost.
//!
//! A write that follows a read of the same session in the same request
//! (the common case: the upstream answers with a directive) first tries
//! one statement with no explicit transaction: the patch is applied to the
//! row that read saw, and the `UPDATE` only matches while the row still
//! ends with the signature it had then ([`Seen`]). When another write came
//! in between, nothing matches and the patch goes the locking way above.
//! This is half the statements and round trips of the locking way (and
//! about 40 % more transactions per second for PostgreSQL, BENCHMARKS.md).
//! The reads and these writes go on a few connections each thread shares
//! and pipelines ([`Local`]).
//!
//! The pool connects lazily and replaces broken connections, so a database
//! that is down gives `503`s and sessiongate recovers by itself when it is
//! back. At start, a refused password or a missing database is an error
//! (the configuration is wrong); a database that is merely unreachable is
//! logged and the proxy starts.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use std::sync::Arc;

use super::cache::Cache;
use super::index::{self, IndexWrite};
use super::{apply_row, Codec, DbError, Migrated, Puts, UserIndex};
use crate::session::{Patch, Record, SessionKey};
use crate::store::{Applied, WriteCtx};

/// Connections per sessiongate instance (shared out among its threads, see
/// [`Local`]): enough for 64 concurrent writers to keep PostgreSQL's group
/// commit fed (BENCHMARKS.md).
const POOL: usize = 32;

struct Sql {
    load: String,
    lock: String,
    insert: String,
    update: String,
    /// `update` only while the row still ends with `$4` (see [`Seen`]).
    update_seen: String,
    delete: String,
    clear: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        Sql {
            load: format!(
                "SELECT session_data, expire_date FROM \"{table}\" WHERE session_key = $1"
            ),
            lock: format!(
                "SELECT session_data, expire_date FROM \"{table}\" WHERE session_key = $1 FOR UPDATE"
            ),
            insert: format!(
                "INSERT INTO \"{table}\" (session_key, session_data, expire_date) VALUES ($1, $2, $3) ON CONFLICT (session_key) DO NOTHING"
            ),
            update: format!(
                "UPDATE \"{table}\" SET session_data = $2, expire_date = $3 WHERE session_key = $1"
            ),
            update_seen: format!(
                "UPDATE \"{table}\" SET session_data = $2, expire_date = $3 WHERE session_key = $1 AND right(session_data, {}) = $4",
                index::TAIL
            ),
            delete: format!("DELETE FROM \"{table}\" WHERE session_key = $1"),
            clear: format!("DELETE FROM \"{table}\" WHERE expire_date < $1"),
        }
    }
}

pub(super) struct Postgres {
    /// Each thread's own connections, made on first use (see [`Local`]).
    local: thread_local::ThreadLocal<Local>,
    /// What every thread's pools connect with.
    connect: tokio_postgres::Config,
    timeout: Duration,
    sql: Sql,
    codec: Codec,
    cache: Option<Arc<Cache>>,
    /// What the last reads saw, for the write that may follow.
    seen: Seen,
}

/// Slots in [`Seen`]: the reads in flight at once that a write can follow
/// without the lock (a slot another key took only costs that write the
/// locking way).
const SEEN_SLOTS: usize = 1024;

/// The rows recent reads decoded, each with its signature (the last
/// [`index::TAIL`] characters of `session_data`: an HMAC of the rest, so a
/// row that ends the same has not been written since), in a fixed table of
/// slots by key. A write takes its key's entry out: two requests on one
/// session that read the same row cannot both write without the lock.
struct Seen {
    slots: Box<[std::sync::Mutex<Option<SeenRow>>]>,
}

/// A key, the signature of the row a read found under it, and its record.
type SeenRow = (SessionKey, Box<str>, Record);

impl Seen {
    fn new() -> Seen {
        Seen {
            slots: (0..SEEN_SLOTS)
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
        }
    }

    fn slot(&self, key: &SessionKey) -> std::sync::MutexGuard<'_, Option<SeenRow>> {
        use std::hash::BuildHasher as _;
        // Keys are random: any hash spreads them.
        let h =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(key);
        self.slots[h as usize % SEEN_SLOTS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, key: &SessionKey, data: &str, record: &Record) {
        *self.slot(key) = Some((*key, index::tail(data).into(), record.clone()));
    }

    fn take(&self, key: &SessionKey) -> Option<(Box<str>, Record)> {
        let mut slot = self.slot(key);
        match slot.take() {
            Some((k, tail, r)) if k == *key => Some((tail, r)),
            other => {
                *slot = other;
                None
            }
        }
    }
}

fn ts(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn config(url: &str, timeout: Duration) -> Result<tokio_postgres::Config, DbError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(DbError::Url)?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(timeout);
    }
    Ok(cfg)
}

fn pool(cfg: &tokio_postgres::Config, size: usize) -> Result<Pool, DbError> {
    let mgr = Manager::from_config(
        cfg.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// The connections of one thread: a pool for the transactions and other
/// writes, and the shared connections of the reads and of the writes that
/// follow them ([`Shared`]), each made by and so
/// driven on the thread that uses it. sessiongate's workers are one
/// single-threaded runtime each; a connection made by another worker would
/// be driven there, and each statement would cost two wake-ups across
/// threads (with 2 workers, half of them did: BENCHMARKS.md). A thread's
/// share of [`POOL`], [`READERS`] and [`WRITERS`] is its part for one thread per CPU.
struct Local {
    pool: Pool,
    readers: Shared,
    writers: Shared,
}

impl Local {
    fn new(cfg: &tokio_postgres::Config) -> Result<Local, DbError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let readers = READERS.div_ceil(threads);
        let writers = WRITERS.div_ceil(threads);
        Ok(Local {
            pool: pool(cfg, POOL.div_ceil(threads).max(4))?,
            readers: Shared::new(pool(cfg, 2 * readers)?, readers),
            writers: Shared::new(pool(cfg, 2 * writers)?, writers),
        })
    }
}

/// Connections shared by the reads (see [`Shared`]), for all threads.
const READERS: usize = 4;

/// Connections shared by the one-statement writes that follow a read
/// ([`Seen`]), for all threads, apart from the readers' (a write waits for
/// its commit's WAL flush, and the reads queued behind it on the same
/// connection would wait too). Pipelined as the reads are: one backend
/// works through many writes without sleeping between them, where a pooled
/// connection per write cost a backend wake-up each (with [`Local`], 1.6x
/// the writes/s, BENCHMARKS.md); PostgreSQL's group commit still flushes
/// the commits of all of them at once.
const WRITERS: usize = 8;

/// A few connections that every read (or every write that follows a read)
/// uses at once: tokio-postgres pipelines the queries issued concurrently on
/// one client (one write for many queries, and a backend that works through
/// them without sleeping between), where a pooled connection per query
/// costs a round trip and a backend wake-up each. A plain `SELECT` takes no
/// row lock, so a read never waits for a writer's transaction; each of the
/// writes is one statement in its own implicit transaction. A closed
/// connection is replaced by the next query that finds it.
struct Shared {
    /// Their own pool (so they never wait for a transaction's slot).
    pool: Pool,
    slots: Vec<std::sync::Mutex<Option<Arc<deadpool_postgres::Object>>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// `n` shared connections from `pool` (room for twice as many: the
    /// replacements while reads still hold a closed one).
    fn new(pool: Pool, n: usize) -> Shared {
        Shared {
            pool,
            slots: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn slot(&self, i: usize) -> std::sync::MutexGuard<'_, Option<Arc<deadpool_postgres::Object>>> {
        self.slots[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self) -> Result<Arc<deadpool_postgres::Object>, DbError> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let held = self.slot(i).clone();
        match held {
            Some(c) if !c.is_closed() => return Ok(c),
            Some(_) => *self.slot(i) = None,
            None => {}
        }
        let c = Arc::new(self.pool.get().await.map_err(pool_error)?);
        *self.slot(i) = Some(c.clone());
        Ok(c)
    }

    /// After an error on `c`: a closed connection leaves its slot.
    fn forget(&self, c: &Arc<deadpool_postgres::Object>) {
        if !c.is_closed() {
            return;
        }
        for i in 0..self.slots.len() {
            let mut slot = self.slot(i);
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, c)) {
                *slot = None;
            }
        }
    }
}

type Params<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// A transaction driven by hand so that its statements are pipelined
/// (tokio-postgres sends requests issued together on one connection without
/// waiting for each answer): `BEGIN` goes with the first statement and
/// `COMMIT` with the last, so a patch is two round trips, not four.
///
/// Dropped before [`Tx::commit`], [`Tx::rollback`] or
/// [`Tx::execute_and_commit`] succeeded (an error, or `store.timeout`), its
/// connection is closed instead of going back to the pool: the server rolls
/// the transaction back and the pool makes a new connection.
struct Tx {
    client: Option<deadpool_postgres::Object>,
}

impl Tx {
    fn client(&self) -> &deadpool_postgres::Object {
        self.client
            .as_ref()
            .expect("a Tx has its client until it ends")
    }

    /// `BEGIN` and `st` (a row-returning query) in one round trip.
    async fn begin_query_opt(
        client: deadpool_postgres::Object,
        st: &tokio_postgres::Statement,
        params: &Params<'_>,
    ) -> Result<(Tx, Option<tokio_postgres::Row>), DbError> {
        let tx = Tx {
            client: Some(client),
        };
        let c = tx.client();
        let (begun, row) =
            futures_util::future::join(c.batch_execute("BEGIN"), c.query_opt(st, params)).await;
        begun.map_err(DbError::Postgres)?;
        let row = row.map_err(DbError::Postgres)?;
        Ok((tx, row))
    }

    /// `BEGIN` and `st` (a write) in one round trip; the rows it changed.
    async fn begin_execute(
        client: deadpool_postgres::Object,
        st: &tokio_postgres::Statement,
        params: &Params<'_>,
    ) -> Result<(Tx, u64), DbError> {
        let tx = Tx {
            client: Some(client),
        };
        let c = tx.client();
        let (begun, n) =
            futures_util::future::join(c.batch_execute("BEGIN"), c.execute(st, params)).await;
        begun.map_err(DbError::Postgres)?;
        let n = n.map_err(DbError::Postgres)?;
        Ok((tx, n))
    }

    /// `st` and `COMMIT` in one round trip. When `st` fails, PostgreSQL
    /// answers the `COMMIT` of the aborted transaction with a rollback, and
    /// `st`'s error is returned.
    async fn execute_and_commit(
        mut self,
        st: &tokio_postgres::Statement,
        params: &Params<'_>,
    ) -> Result<u64, DbError> {
        let c = self.client();
        let (n, committed) =
            futures_util::future::join(c.execute(st, params), c.batch_execute("COMMIT")).await;
        let n = n.map_err(DbError::Postgres)?;
        committed.map_err(DbError::Postgres)?;
        self.client.take();
        Ok(n)
    }

    async fn commit(self) -> Result<(), DbError> {
        self.end("COMMIT").await
    }

    async fn rollback(self) -> Result<(), DbError> {
        self.end("ROLLBACK").await
    }

    async fn end(mut self, sql: &str) -> Result<(), DbError> {
        self.client()
            .batch_execute(sql)
            .await
            .map_err(DbError::Postgres)?;
        // Back to the pool, outside any transaction.
        self.client.take();
        Ok(())
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Unfinished: close the connection (the server rolls back).
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// Errors that mean the configuration is wrong, not that the database is down.
fn is_misconfiguration(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::INVALID_PASSWORD
            || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            || *c == SqlState::INVALID_CATALOG_NAME
    })
}

fn pool_error(e: deadpool_postgres::PoolError) -> DbError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => DbError::Postgres(e),
        other => DbError::Pool(other.to_string()),
    }
}

async fn table_exists(
    c: &deadpool_postgres::Client,
    table: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("\"{table}\"")],
        )
        .await?;
    row.try_get(0)
}

/// Django's `sessions.0001_initial` on PostgreSQL (`manage.py sqlmigrate sessions 0001`).
fn create_sql(table: &str) -> String {
    let (idx, like) = if table == "django_session" {
        (
            "django_session_expire_date_a5c62663".to_string(),
            "django_session_session_key_c0390e0f_like".to_string(),
        )
    } else {
        (
            format!("{table}_expire_date_idx"),
            format!("{table}_session_key_like"),
        )
    };
    format!(
        "BEGIN;\n\
         CREATE TABLE \"{table}\" (\"session_key\" varchar(40) NOT NULL PRIMARY KEY, \"session_data\" text NOT NULL, \"expire_date\" timestamp with time zone NOT NULL);\n\
         CREATE INDEX \"{idx}\" ON \"{table}\" (\"expire_date\");\n\
         CREATE INDEX \"{like}\" ON \"{table}\" (\"session_key\" varchar_pattern_ops);\n\
         COMMIT;"
    )
}

pub(super) async fn migrate(
    url: &str,
    table: &str,
    timeout: Duration,
) -> Result<Migrated, DbError> {
    let pool = pool(&config(url, timeout)?, 1)?;
    let work = async {
        let c = pool.get().await.map_err(pool_error)?;
        if table_exists(&c, table).await.map_err(DbError::Postgres)? {
            return Ok(Migrated::AlreadyThere);
        }
        c.batch_execute(&create_sql(table))
            .await
            .map_err(DbError::Postgres)?;
        Ok(Migrated::Created)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DbError::Timeout(timeout))?
}

impl Postgres {
    pub(super) async fn open(
        url: &str,
        table: &str,
        timeout: Duration,
        codec: Codec,
        cache: Option<Arc<Cache>>,
    ) -> Result<Postgres, DbError> {
        let store = Postgres {
            local: thread_local::ThreadLocal::new(),
            connect: config(url, timeout)?,
            timeout,
            sql: Sql::new(table),
            codec,
            cache,
            seen: Seen::new(),
        };
        let check = async {
            let c = store.pool()?.get().await.map_err(pool_error)?;
            table_exists(&c, table).await.map_err(DbError::Postgres)
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return Err(DbError::NoTable {
                    table: table.to_string(),
                })
            }
            Ok(Err(DbError::Postgres(e))) if is_misconfiguration(&e) => {
                return Err(DbError::Postgres(e))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "PostgreSQL is not reachable at start; session routes answer 503 until it is");
            }
            Err(_) => {
                tracing::warn!(
                    ?timeout,
                    "PostgreSQL did not answer at start; session routes answer 503 until it does"
                );
            }
        }
        Ok(store)
    }

    /// This thread's connections (see [`Local`]).
    fn local(&self) -> Result<&Local, DbError> {
        self.local.get_or_try(|| Local::new(&self.connect))
    }

    /// This thread's pool for writes and transactions.
    fn pool(&self) -> Result<&Pool, DbError> {
        self.local().map(|l| &l.pool)
    }

    /// Whether a write is the row alone: no cache version to move, no
    /// index entry to keep in step.
    fn row_only(&self) -> bool {
        self.cache.is_none() && self.codec.index.is_none()
    }

    /// Notes the row a read decoded (`data` as stored), for the write that
    /// may follow it (see [`Seen`]): only on a store with no cache and no
    /// index, whose writes are the row alone.
    pub(super) fn saw(&self, key: &SessionKey, data: &str, record: &Record) {
        if self.row_only() {
            self.seen.put(key, data, record);
        }
    }

    /// The write of a patch to the row a read saw, in one statement (see
    /// [`Seen`]); `None` when that does not apply (nothing seen, the patch
    /// cycles the key or changes nothing, or the row changed since): the
    /// locking way decides.
    async fn apply_to_seen_row(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Option<Applied>, DbError> {
        let Some((tail, current)) = self.seen.take(key) else {
            return Ok(None);
        };
        if current.expires_at <= ctx.now {
            return Ok(None);
        }
        // Only a write of the same key: what the patch does to an older row
        // (nothing, or too large) is not decided on it.
        let record = match apply_row(key, &current, patch, ctx) {
            Applied::Saved { key: k, record } if k == *key => record,
            _ => return Ok(None),
        };
        let data = self.codec.encode(&record);
        let exp = ts(record.expires_at);
        let n = self
            .bounded(async {
                let writers = &self.local()?.writers;
                let c = writers.get().await?;
                async {
                    let st = c.prepare_cached(&self.sql.update_seen).await?;
                    c.execute(&st, &[&key.as_str(), &data, &exp, &&*tail]).await
                }
                .await
                .map_err(|e| {
                    writers.forget(&c);
                    DbError::Postgres(e)
                })
            })
            .await?;
        Ok((n == 1).then_some(Applied::Saved { key: *key, record }))
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?
    }

    /// The row as stored: `session_data` and `expire_date` in Unix ms.
    pub(super) async fn load_raw(
        &self,
        key: &SessionKey,
    ) -> Result<Option<(String, i64)>, DbError> {
        self.bounded(async {
            let readers = &self.local()?.readers;
            let c = readers.get().await?;
            let row = async {
                let st = c.prepare_cached(&self.sql.load).await?;
                c.query_opt(&st, &[&key.as_str()]).await
            }
            .await
            .map_err(|e| {
                readers.forget(&c);
                DbError::Postgres(e)
            })?;
            Ok(row.map(|r| {
                let data: String = r.get(0);
                let exp: OffsetDateTime = r.get(1);
                (data, ms(exp))
            }))
        })
        .await
    }

    async fn bump(&self, key: &SessionKey) -> Result<Option<i64>, DbError> {
        match &self.cache {
            Some(c) => c.bump(key).await.map(Some),
            None => Ok(None),
        }
    }

    async fn put_all(&self, puts: Puts) -> Result<(), DbError> {
        super::cache::put_all(self.cache.as_deref(), puts).await
    }

    pub(super) async fn create(&self, record: Record) -> Result<SessionKey, DbError> {
        if self.codec.index.is_some() {
            return self.create_indexed(record).await;
        }
        let data = self.codec.encode(&record);
        let exp = ts(record.expires_at);
        let (key, puts) = self
            .bounded(async {
                let c = self.pool()?.get().await.map_err(pool_error)?;
                let st = c
                    .prepare_cached(&self.sql.insert)
                    .await
                    .map_err(DbError::Postgres)?;
                loop {
                    let key = SessionKey::generate();
                    // Nobody else knows the key yet: its version may come first.
                    let v = self.bump(&key).await?;
                    let n = c
                        .execute(&st, &[&key.as_str(), &data, &exp])
                        .await
                        .map_err(DbError::Postgres)?;
                    if n == 1 {
                        let puts: Puts = v
                            .map(|v| (key, v, Some((data.clone(), record.expires_at))))
                            .into_iter()
                            .collect();
                        return Ok((key, puts));
                    }
                }
            })
            .await?;
        self.bounded(self.put_all(puts)).await?;
        Ok(key)
    }

    pub(super) async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, DbError> {
        if self.row_only() {
            if let Some(applied) = self.apply_to_seen_row(key, patch, ctx).await? {
                return Ok(applied);
            }
        }
        let (applied, puts) = self
            .bounded(async {
                let c = self.pool()?.get().await.map_err(pool_error)?;
                let lock = c
                    .prepare_cached(&self.sql.lock)
                    .await
                    .map_err(DbError::Postgres)?;
                let update = c
                    .prepare_cached(&self.sql.update)
                    .await
                    .map_err(DbError::Postgres)?;
                let insert = c
                    .prepare_cached(&self.sql.insert)
                    .await
                    .map_err(DbError::Postgres)?;
                let delete = c
                    .prepare_cached(&self.sql.delete)
                    .await
                    .map_err(DbError::Postgres)?;
                // BEGIN and the row lock in one round trip; the write and
                // COMMIT in another (see `Tx`).
                let (tx, row) = Tx::begin_query_opt(c, &lock, &[&key.as_str()]).await?;
                let Some(current) = row.and_then(|r| {
                    let data: &str = r.get(0);
                    let exp: OffsetDateTime = r.get(1);
                    self.codec.decode(data, ms(exp), ctx.now)
                }) else {
                    tx.rollback().await?;
                    return Ok((Applied::Missing, Puts::new()));
                };
                let applied = apply_row(key, &current, patch, ctx);
                let Applied::Saved {
                    key: mut new_key,
                    record,
                } = applied
                else {
                    tx.rollback().await?;
                    return Ok((applied, Puts::new()));
                };
                let data = self.codec.encode(&record);
                let exp = ts(record.expires_at);
                let mut puts = Puts::new();
                if new_key == *key {
                    if let Some(ix) = &self.codec.index {
                        let w = index::plan(&ix.user_key, key, &current, &new_key, &record);
                        index_write(ix, tx.client(), &w, index::tail(&data)).await?;
                    }
                    let v = self.bump(key).await?;
                    tx.execute_and_commit(&update, &[&key.as_str(), &data, &exp])
                        .await?;
                    puts.extend(v.map(|v| (*key, v, Some((data, record.expires_at)))));
                } else {
                    while tx
                        .client()
                        .execute(&insert, &[&new_key.as_str(), &data, &exp])
                        .await
                        .map_err(DbError::Postgres)?
                        == 0
                    {
                        new_key = SessionKey::generate();
                    }
                    if let Some(ix) = &self.codec.index {
                        let w = index::plan(&ix.user_key, key, &current, &new_key, &record);
                        index_write(ix, tx.client(), &w, index::tail(&data)).await?;
                    }
                    let v_new = self.bump(&new_key).await?;
                    let v_old = self.bump(key).await?;
                    tx.execute_and_commit(&delete, &[&key.as_str()]).await?;
                    puts.extend(v_new.map(|v| (new_key, v, Some((data, record.expires_at)))));
                    puts.extend(v_old.map(|v| (*key, v, None)));
                }
                Ok((
                    Applied::Saved {
                        key: new_key,
                        record,
                    },
                    puts,
                ))
            })
            .await?;
        self.bounded(self.put_all(puts)).await?;
        Ok(applied)
    }

    pub(super) async fn delete(&self, key: &SessionKey) -> Result<(), DbError> {
        let puts = self
            .bounded(async {
                let c = self.pool()?.get().await.map_err(pool_error)?;
                let st = c
                    .prepare_cached(&self.sql.delete)
                    .await
                    .map_err(DbError::Postgres)?;
                if self.row_only() {
                    // One statement: its own transaction.
                    c.execute(&st, &[&key.as_str()])
                        .await
                        .map_err(DbError::Postgres)?;
                    return Ok(Puts::new());
                }
                // The cache's version moves, and the index entry goes, while
                // the row is locked.
                let (tx, _) = Tx::begin_execute(c, &st, &[&key.as_str()]).await?;
                if let Some(ix) = &self.codec.index {
                    let w = IndexWrite {
                        delete: Some(*key),
                        upsert: None,
                    };
                    index_write(ix, tx.client(), &w, "").await?;
                }
                let v = self.bump(key).await?;
                tx.commit().await?;
                Ok(v.map(|v| (*key, v, None)).into_iter().collect::<Puts>())
            })
            .await?;
        self.bounded(self.put_all(puts)).await
    }

    pub(super) async fn clear_expired(&self, now: i64) -> Result<u64, DbError> {
        self.bounded(async {
            let c = self.pool()?.get().await.map_err(pool_error)?;
            if let Some(ix) = &self.codec.index {
                let st = c
                    .prepare_cached(&ix.sql.clear)
                    .await
                    .map_err(DbError::Postgres)?;
                c.execute(&st, &[&ts(now)])
                    .await
                    .map_err(DbError::Postgres)?;
                c.batch_execute(&ix.sql.orphans)
                    .await
                    .map_err(DbError::Postgres)?;
            }
            let st = c
                .prepare_cached(&self.sql.clear)
                .await
                .map_err(DbError::Postgres)?;
            c.execute(&st, &[&ts(now)]).await.map_err(DbError::Postgres)
        })
        .await
    }
}

/// The user index table (see [`index`]), when missing.
pub(super) async fn migrate_index(
    url: &str,
    table: &str,
    timeout: Duration,
) -> Result<(), DbError> {
    let pool = pool(&config(url, timeout)?, 1)?;
    let work = async {
        let c = pool.get().await.map_err(pool_error)?;
        c.batch_execute(&make_index_sql(table))
            .await
            .map_err(DbError::Postgres)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DbError::Timeout(timeout))?
}

/// Makes the index table when missing, or again when it has an earlier
/// schema (see [`index`]), in one transaction.
fn make_index_sql(table: &str) -> String {
    format!(
        "BEGIN;\n{}\n{}\nCOMMIT;",
        index::pg_drop_old_sql(table),
        index::create_sql(table)
    )
}

/// Carries out an index write inside the caller's transaction; `tail` is
/// that of the row's new data.
async fn index_write<C: deadpool_postgres::GenericClient + Sync>(
    ix: &UserIndex,
    tx: &C,
    w: &IndexWrite,
    tail: &str,
) -> Result<(), DbError> {
    if let Some(k) = &w.delete {
        let st = tx
            .prepare_cached(&ix.sql.delete)
            .await
            .map_err(DbError::Postgres)?;
        tx.execute(&st, &[&k.as_str()])
            .await
            .map_err(DbError::Postgres)?;
    }
    if let Some((u, k)) = &w.upsert {
        let st = tx
            .prepare_cached(&ix.sql.upsert)
            .await
            .map_err(DbError::Postgres)?;
        tx.execute(&st, &[u, &k.as_str(), &tail])
            .await
            .map_err(DbError::Postgres)?;
    }
    Ok(())
}

/// What the index lists for a user, with the rows locked: (key, decoded
/// user and record when the row is live and names one).
type Listed = Vec<(SessionKey, Option<(String, Record)>)>;

impl Postgres {
    pub(super) async fn create_index_table(&self, table: &str) -> Result<(), DbError> {
        let sql = make_index_sql(table);
        match self
            .bounded(async {
                let c = self.pool()?.get().await.map_err(pool_error)?;
                c.batch_execute(&sql).await.map_err(DbError::Postgres)
            })
            .await
        {
            // A database that is down at start: the proxy starts (503s
            // until it is back); the table is made by `migrate`, or at the
            // next start.
            Err(DbError::Postgres(e)) if e.as_db_error().is_some() => Err(DbError::Postgres(e)),
            Err(e) => {
                tracing::warn!(error = %e, "could not check the user index table at start");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    pub(super) fn set_index(&mut self, ix: Box<UserIndex>) {
        self.codec.index = Some(ix);
    }

    /// [`Postgres::create`] with the index entry, in one transaction.
    async fn create_indexed(&self, record: Record) -> Result<SessionKey, DbError> {
        let ix = self.codec.index.as_ref().expect("indexed");
        let data = self.codec.encode(&record);
        let exp = ts(record.expires_at);
        let (key, puts) = self
            .bounded(async {
                let mut c = self.pool()?.get().await.map_err(pool_error)?;
                let st = c
                    .prepare_cached(&self.sql.insert)
                    .await
                    .map_err(DbError::Postgres)?;
                let tx = c.transaction().await.map_err(DbError::Postgres)?;
                let key = loop {
                    let key = SessionKey::generate();
                    let n = tx
                        .execute(&st, &[&key.as_str(), &data, &exp])
                        .await
                        .map_err(DbError::Postgres)?;
                    if n == 1 {
                        break key;
                    }
                };
                let w = index::plan_create(&ix.user_key, &key, &record);
                index_write(ix, &tx, &w, index::tail(&data)).await?;
                let v = self.bump(&key).await?;
                tx.commit().await.map_err(DbError::Postgres)?;
                let puts: Puts = v
                    .map(|v| (key, v, Some((data.clone(), record.expires_at))))
                    .into_iter()
                    .collect();
                Ok((key, puts))
            })
            .await?;
        self.bounded(self.put_all(puts)).await?;
        Ok(key)
    }

    /// Indexes the rows Django wrote (see [`index`]) before a listing or
    /// revocation: a transaction per [`index::BATCH`] rows, so a first scan
    /// of a large table makes progress under `store.timeout`. A row that a
    /// write changes meanwhile keeps an entry whose tail differs from it:
    /// the next scan looks at it again.
    async fn index_unindexed(&self, ix: &UserIndex, now: i64) -> Result<(), DbError> {
        loop {
            let n = self
                .bounded(async {
                    let mut c = self.pool()?.get().await.map_err(pool_error)?;
                    let tx = c.transaction().await.map_err(DbError::Postgres)?;
                    let rows = tx
                        .query(&ix.sql.unindexed, &[&ts(now)])
                        .await
                        .map_err(DbError::Postgres)?;
                    let upsert = tx
                        .prepare_cached(&ix.sql.upsert)
                        .await
                        .map_err(DbError::Postgres)?;
                    for r in &rows {
                        let key: &str = r.get(0);
                        let data: &str = r.get(1);
                        let exp: OffsetDateTime = r.get(2);
                        let user = self
                            .codec
                            .user_in_row(&ix.user_key, data, ms(exp), now)
                            .map(|(u, _)| u);
                        tx.execute(&upsert, &[&user, &key, &index::tail(data)])
                            .await
                            .map_err(DbError::Postgres)?;
                    }
                    tx.commit().await.map_err(DbError::Postgres)?;
                    Ok(rows.len())
                })
                .await?;
            if n < index::BATCH {
                return Ok(());
            }
        }
    }

    /// The keys the index lists for `user`, their rows locked and decoded.
    async fn listed(
        &self,
        ix: &UserIndex,
        tx: &deadpool_postgres::Transaction<'_>,
        user: &str,
        now: i64,
    ) -> Result<Listed, DbError> {
        let st = tx
            .prepare_cached(&ix.sql.keys_of)
            .await
            .map_err(DbError::Postgres)?;
        let keys: Vec<String> = tx
            .query(&st, &[&user])
            .await
            .map_err(DbError::Postgres)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let lock = format!(
            "SELECT session_key, session_data, expire_date FROM \"{}\" WHERE session_key = ANY($1) FOR UPDATE",
            ix.table
        );
        let rows = tx.query(&lock, &[&keys]).await.map_err(DbError::Postgres)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for r in rows {
            let k: String = r.get(0);
            let data: String = r.get(1);
            let exp: OffsetDateTime = r.get(2);
            found.insert(k, self.codec.user_in_row(&ix.user_key, &data, ms(exp), now));
        }
        Ok(keys
            .iter()
            .filter_map(|k| {
                let key = SessionKey::parse(k)?;
                Some((key, found.remove(k).flatten()))
            })
            .collect())
    }

    async fn delete_entries(
        &self,
        ix: &UserIndex,
        tx: &deadpool_postgres::Transaction<'_>,
        keys: &[String],
    ) -> Result<(), DbError> {
        if keys.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "DELETE FROM \"{}\" WHERE session_key = ANY($1)",
            index::table_name(&ix.table)
        );
        tx.execute(&sql, &[&keys])
            .await
            .map_err(DbError::Postgres)?;
        Ok(())
    }

    /// The live sessions the index lists for `user` and whose row still
    /// names that user; the other entries are deleted (lazy repair), with
    /// the rows locked so no sessiongate write races the repair.
    pub(super) async fn user_sessions(
        &self,
        user: &str,
        now: i64,
    ) -> Result<Vec<crate::store::UserSession>, DbError> {
        let Some(ix) = &self.codec.index else {
            return Ok(Vec::new());
        };
        self.index_unindexed(ix, now).await?;
        self.bounded(async {
            let mut c = self.pool()?.get().await.map_err(pool_error)?;
            let tx = c.transaction().await.map_err(DbError::Postgres)?;
            let mut live = Vec::new();
            let mut stale = Vec::new();
            for (k, names) in self.listed(ix, &tx, user, now).await? {
                match names {
                    Some((u, r)) if u == user => live.push(crate::store::UserSession::of(k, &r)),
                    _ => stale.push(k.as_str().to_string()),
                }
            }
            self.delete_entries(ix, &tx, &stale).await?;
            tx.commit().await.map_err(DbError::Postgres)?;
            Ok(live)
        })
        .await
    }

    /// Deletes, in one transaction, every row the index lists for `user`
    /// that still names that user (but `keep`), and the entries.
    pub(super) async fn revoke_user(
        &self,
        user: &str,
        keep: Option<SessionKey>,
        now: i64,
    ) -> Result<u64, DbError> {
        let Some(ix) = &self.codec.index else {
            return Ok(0);
        };
        self.index_unindexed(ix, now).await?;
        let (n, puts) = self
            .bounded(async {
                let mut c = self.pool()?.get().await.map_err(pool_error)?;
                let tx = c.transaction().await.map_err(DbError::Postgres)?;
                let mut ended = Vec::new();
                let mut entries = Vec::new();
                for (k, names) in self.listed(ix, &tx, user, now).await? {
                    if Some(k) == keep {
                        continue;
                    }
                    if matches!(&names, Some((u, _)) if u == user) {
                        ended.push(k);
                    }
                    entries.push(k.as_str().to_string());
                }
                let ended_text: Vec<String> =
                    ended.iter().map(|k| k.as_str().to_string()).collect();
                if !ended_text.is_empty() {
                    let sql = format!("DELETE FROM \"{}\" WHERE session_key = ANY($1)", ix.table);
                    tx.execute(&sql, &[&ended_text])
                        .await
                        .map_err(DbError::Postgres)?;
                }
                self.delete_entries(ix, &tx, &entries).await?;
                let versions = match &self.cache {
                    Some(c) => c.bump_many(&ended).await?,
                    None => Vec::new(),
                };
                tx.commit().await.map_err(DbError::Postgres)?;
                let puts: Puts = ended
                    .iter()
                    .zip(versions)
                    .map(|(k, v)| (*k, v, None))
                    .collect();
                Ok((ended.len() as u64, puts))
            })
            .await?;
        self.bounded(super::cache::put_many(self.cache.as_deref(), puts))
            .await?;
        Ok(n)
    }

    /// Every key of a live row (a full scan of the table).
    pub(super) async fn live_keys(
        &self,
        table: &str,
        now: i64,
    ) -> Result<Vec<SessionKey>, DbError> {
        let sql = format!("SELECT session_key FROM \"{table}\" WHERE expire_date > $1");
        self.bounded(async {
            let c = self.pool()?.get().await.map_err(pool_error)?;
            let rows = c
                .query(&sql, &[&ts(now)])
                .await
                .map_err(DbError::Postgres)?;
            Ok(rows
                .iter()
                .filter_map(|r| SessionKey::parse(r.get::<_, &str>(0)))
                .collect())
        })
        .await
    }
}
