//! The `db` engine on SQLite: `rusqlite` (bundled SQLite) on tokio's
//! blocking threads, a few pooled connections, WAL mode (readers never wait
//! for the writer) and a busy timeout (Django may write the same file).
//!
//! Writes from this process queue on an async mutex before they take a
//! connection, so they never spin in SQLite's busy handler against each
//! other; the busy timeout is only for other processes (Django, another
//! sessiongate). Each write is one `BEGIN IMMEDIATE` transaction: read the
//! newest row, apply the patch, write, commit.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::cache::Cache;
use super::index::{self, IndexWrite};
use super::{apply_row, naive_utc_text, parse_iso, Codec, DbError, Migrated, Puts, UserIndex};
use crate::session::{Patch, Record, SessionKey};
use crate::store::{Applied, WriteCtx};

/// Connections kept open (and blocking threads used) at most.
const POOL: usize = 8;

struct Sql {
    load: String,
    insert: String,
    update: String,
    delete: String,
    clear: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        Sql {
            load: format!(
                "SELECT session_data, expire_date FROM \"{table}\" WHERE session_key = ?1"
            ),
            insert: format!(
                "INSERT INTO \"{table}\" (session_key, session_data, expire_date) VALUES (?1, ?2, ?3)"
            ),
            update: format!(
                "UPDATE \"{table}\" SET session_data = ?2, expire_date = ?3 WHERE session_key = ?1"
            ),
            delete: format!("DELETE FROM \"{table}\" WHERE session_key = ?1"),
            clear: format!("DELETE FROM \"{table}\" WHERE expire_date < ?1"),
        }
    }
}

struct Inner {
    path: PathBuf,
    busy: Duration,
    idle: Mutex<Vec<Connection>>,
    sql: Sql,
    codec: Codec,
}

pub(super) struct Sqlite {
    inner: Arc<Inner>,
    timeout: Duration,
    permits: tokio::sync::Semaphore,
    writer: tokio::sync::Mutex<()>,
    cache: Option<Arc<Cache>>,
}

fn connect(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(busy)?;
    // Returns the mode; WAL persists in the file once set.
    let _: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    Ok(c)
}

fn table_exists(c: &Connection, table: &str) -> rusqlite::Result<bool> {
    c.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Django's `sessions.0001_initial` on SQLite (`manage.py sqlmigrate sessions 0001`).
fn create_sql(table: &str) -> String {
    let index = if table == "django_session" {
        "django_session_expire_date_a5c62663".to_string()
    } else {
        format!("{table}_expire_date_idx")
    };
    format!(
        "BEGIN;\n\
         CREATE TABLE \"{table}\" (\"session_key\" varchar(40) NOT NULL PRIMARY KEY, \"session_data\" text NOT NULL, \"expire_date\" datetime NOT NULL);\n\
         CREATE INDEX \"{index}\" ON \"{table}\" (\"expire_date\");\n\
         COMMIT;"
    )
}

pub(super) async fn migrate(
    path: &Path,
    table: &str,
    timeout: Duration,
) -> Result<Migrated, DbError> {
    let path = path.to_path_buf();
    let table = table.to_string();
    blocking(timeout, move || -> rusqlite::Result<Migrated> {
        if let Some(dir) = path.parent() {
            // As Django's sqlite backend, the file is made on first use; its
            // directory too, here.
            let _ = std::fs::create_dir_all(dir);
        }
        let c = connect(&path, timeout)?;
        if table_exists(&c, &table)? {
            return Ok(Migrated::AlreadyThere);
        }
        c.execute_batch(&create_sql(&table))?;
        Ok(Migrated::Created)
    })
    .await
}

async fn blocking<T: Send + 'static, E: Into<DbError> + Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, DbError> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(DbError::Timeout(timeout)),
        Ok(Err(join)) => Err(DbError::Worker(join)),
        Ok(Ok(r)) => r.map_err(Into::into),
    }
}

fn is_duplicate_key(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

/// The row's `expire_date` text in Unix ms (unparsable: long expired).
fn expire_ms(text: &str) -> i64 {
    parse_iso(text).unwrap_or(i64::MIN)
}

impl Inner {
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut c = match popped {
            Some(c) => c,
            None => connect(&self.path, self.busy)?,
        };
        let r = f(&mut c);
        // A connection left inside a transaction (an error mid-way rolls
        // back on drop of the Transaction, so this is rare) is not reused.
        if c.is_autocommit() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
        r
    }

    fn read(&self, c: &Connection, key: &SessionKey) -> rusqlite::Result<Option<(String, i64)>> {
        c.prepare_cached(&self.sql.load)?
            .query_row([key.as_str()], |r| {
                let data: String = r.get(0)?;
                let exp: String = r.get(1)?;
                Ok((data, expire_ms(&exp)))
            })
            .optional()
    }
}

impl Sqlite {
    pub(super) async fn open(
        path: &Path,
        table: &str,
        timeout: Duration,
        codec: Codec,
        cache: Option<Arc<Cache>>,
    ) -> Result<Sqlite, DbError> {
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            busy: timeout,
            idle: Mutex::new(Vec::new()),
            sql: Sql::new(table),
            codec,
        });
        let i = inner.clone();
        let t = table.to_string();
        let exists = blocking(timeout, move || i.with_conn(|c| Ok(table_exists(c, &t)?))).await?;
        if !exists {
            return Err(DbError::NoTable {
                table: table.to_string(),
            });
        }
        Ok(Sqlite {
            inner,
            timeout,
            permits: tokio::sync::Semaphore::new(POOL),
            writer: tokio::sync::Mutex::new(()),
            cache,
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let work = async {
            let _permit = self.permits.acquire().await.expect("never closed");
            let inner = self.inner.clone();
            match tokio::task::spawn_blocking(move || inner.with_conn(|c| f(&inner, c))).await {
                Err(join) => Err(DbError::Worker(join)),
                Ok(r) => r,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let _one_writer = tokio::time::timeout(self.timeout, self.writer.lock())
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?;
        self.run(f).await
    }

    /// The row as stored: `session_data` and `expire_date` in Unix ms.
    pub(super) async fn load_raw(
        &self,
        key: &SessionKey,
    ) -> Result<Option<(String, i64)>, DbError> {
        let key = *key;
        self.run(move |i, c| Ok(i.read(c, &key)?)).await
    }

    /// A cache version for `key`, taken inside the transaction (blocking
    /// thread): see `cache.rs`.
    fn bump(
        cache: &Option<(Arc<Cache>, tokio::runtime::Handle)>,
        key: &SessionKey,
    ) -> Result<Option<i64>, DbError> {
        match cache {
            Some((c, rt)) => rt.block_on(c.bump(key)).map(Some),
            None => Ok(None),
        }
    }

    fn with_cache(&self) -> Option<(Arc<Cache>, tokio::runtime::Handle)> {
        self.cache
            .as_ref()
            .map(|c| (c.clone(), tokio::runtime::Handle::current()))
    }

    async fn put_all(&self, puts: Puts) -> Result<(), DbError> {
        super::cache::put_all(self.cache.as_deref(), puts).await
    }

    pub(super) async fn create(&self, record: Record) -> Result<SessionKey, DbError> {
        if self.inner.codec.index.is_some() {
            return self.create_indexed(record).await;
        }
        let cache = self.with_cache();
        let (key, puts) = self
            .write(move |i, c| {
                let data = i.codec.encode(&record);
                let exp = naive_utc_text(record.expires_at);
                let mut stmt = c.prepare_cached(&i.sql.insert)?;
                loop {
                    let key = SessionKey::generate();
                    // Nobody else knows the key yet: its version may come first.
                    let v = Self::bump(&cache, &key)?;
                    match stmt.execute(params![key.as_str(), data, exp]) {
                        Ok(_) => {
                            let puts: Puts = v
                                .map(|v| (key, v, Some((data, record.expires_at))))
                                .into_iter()
                                .collect();
                            return Ok((key, puts));
                        }
                        Err(e) if is_duplicate_key(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            })
            .await?;
        self.put_all(puts).await?;
        Ok(key)
    }

    pub(super) async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, DbError> {
        let key = *key;
        let patch = patch.clone();
        let cache = self.with_cache();
        let (applied, puts) = self
            .write(move |i, c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let Some(current) = i
                    .read(&tx, &key)?
                    .and_then(|(data, exp)| i.codec.decode(&data, exp, ctx.now))
                else {
                    return Ok((Applied::Missing, Puts::new()));
                };
                let applied = apply_row(&key, &current, &patch, ctx);
                let Applied::Saved {
                    key: mut new_key,
                    record,
                } = applied
                else {
                    return Ok((applied, Puts::new()));
                };
                let data = i.codec.encode(&record);
                let exp = naive_utc_text(record.expires_at);
                let tail = i
                    .codec
                    .index
                    .as_ref()
                    .map(|_| index::tail(&data).to_owned());
                let mut puts = Puts::new();
                if new_key == key {
                    let v = Self::bump(&cache, &key)?;
                    tx.prepare_cached(&i.sql.update)?
                        .execute(params![key.as_str(), data, exp])?;
                    puts.extend(v.map(|v| (key, v, Some((data, record.expires_at)))));
                } else {
                    let mut insert = tx.prepare_cached(&i.sql.insert)?;
                    loop {
                        match insert.execute(params![new_key.as_str(), data, exp]) {
                            Ok(_) => break,
                            Err(e) if is_duplicate_key(&e) => new_key = SessionKey::generate(),
                            Err(e) => return Err(e.into()),
                        }
                    }
                    drop(insert);
                    tx.prepare_cached(&i.sql.delete)?.execute([key.as_str()])?;
                    let v_new = Self::bump(&cache, &new_key)?;
                    let v_old = Self::bump(&cache, &key)?;
                    puts.extend(v_new.map(|v| (new_key, v, Some((data, record.expires_at)))));
                    puts.extend(v_old.map(|v| (key, v, None)));
                }
                if let Some(ix) = &i.codec.index {
                    let w = index::plan(&ix.user_key, &key, &current, &new_key, &record);
                    index_write(ix, &tx, &w, tail.as_deref().unwrap_or_default())?;
                }
                tx.commit()?;
                Ok((
                    Applied::Saved {
                        key: new_key,
                        record,
                    },
                    puts,
                ))
            })
            .await?;
        self.put_all(puts).await?;
        Ok(applied)
    }

    pub(super) async fn delete(&self, key: &SessionKey) -> Result<(), DbError> {
        let key = *key;
        let cache = self.with_cache();
        let puts = self
            .write(move |i, c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.prepare_cached(&i.sql.delete)?.execute([key.as_str()])?;
                if let Some(ix) = &i.codec.index {
                    tx.prepare_cached(&ix.sql.delete)?.execute([key.as_str()])?;
                }
                let v = Self::bump(&cache, &key)?;
                tx.commit()?;
                Ok(v.map(|v| (key, v, None)).into_iter().collect::<Puts>())
            })
            .await?;
        self.put_all(puts).await
    }

    pub(super) async fn clear_expired(&self, now: i64) -> Result<u64, DbError> {
        self.write(move |i, c| {
            if let Some(ix) = &i.codec.index {
                c.prepare_cached(&ix.sql.clear)?
                    .execute([naive_utc_text(now)])?;
                c.prepare_cached(&ix.sql.orphans)?.execute([])?;
            }
            let n = c
                .prepare_cached(&i.sql.clear)?
                .execute([naive_utc_text(now)])?;
            Ok(n as u64)
        })
        .await
    }
}

/// The user index table (see [`index`]), when missing.
pub(super) async fn migrate_index(
    path: &Path,
    table: &str,
    timeout: Duration,
) -> Result<(), DbError> {
    let path = path.to_path_buf();
    let table = table.to_string();
    blocking(timeout, move || -> rusqlite::Result<()> {
        make_index_table(&mut connect(&path, timeout)?, &table)
    })
    .await
}

/// Makes the index table when missing, or again when it has an earlier
/// schema (no `tail`: see [`index`]), in one transaction.
fn make_index_table(c: &mut Connection, table: &str) -> rusqlite::Result<()> {
    let idx = index::table_name(table);
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (columns, tail): (i64, i64) = tx.query_row(
        "SELECT count(*), count(*) FILTER (WHERE name = 'tail') FROM pragma_table_info(?1)",
        [&idx],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if columns > 0 && tail == 0 {
        tracing::info!(table = %idx, "the user index has an earlier schema: made again");
        tx.execute_batch(&format!("DROP TABLE \"{idx}\""))?;
    }
    tx.execute_batch(&index::create_sql(table))?;
    tx.commit()
}

/// Carries out an index write inside the caller's transaction; `tail` is
/// that of the row's new data.
fn index_write(ix: &UserIndex, c: &Connection, w: &IndexWrite, tail: &str) -> rusqlite::Result<()> {
    if let Some(k) = &w.delete {
        c.prepare_cached(&ix.sql.delete)?.execute([k.as_str()])?;
    }
    if let Some((u, k)) = &w.upsert {
        c.prepare_cached(&ix.sql.upsert)?
            .execute(params![u, k.as_str(), tail])?;
    }
    Ok(())
}

/// Indexes one batch of the live rows that have no entry or changed since
/// (see [`index`]): rows Django wrote. Returns how many it looked at.
fn index_batch(i: &Inner, ix: &UserIndex, c: &Connection, now: i64) -> rusqlite::Result<usize> {
    let rows: Vec<(String, String, String)> = c
        .prepare_cached(&ix.sql.unindexed)?
        .query_map([naive_utc_text(now)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut upsert = c.prepare_cached(&ix.sql.upsert)?;
    for (key, data, exp) in &rows {
        let user = i
            .codec
            .user_in_row(&ix.user_key, data, expire_ms(exp), now)
            .map(|(u, _)| u);
        upsert.execute(params![user, key, index::tail(data)])?;
    }
    Ok(rows.len())
}

impl Sqlite {
    pub(super) async fn create_index_table(&self, table: &str) -> Result<(), DbError> {
        let table = table.to_string();
        self.write(move |_, c| Ok(make_index_table(c, &table)?))
            .await
    }

    /// Indexes the rows Django wrote (see [`index`]) before a listing or
    /// revocation: a transaction per [`index::BATCH`] rows, so a first scan
    /// of a large table makes progress under `store.timeout` and lets
    /// request writes in between.
    async fn index_unindexed(&self, now: i64) -> Result<(), DbError> {
        loop {
            let n = self
                .write(move |i, c| {
                    let ix = i.codec.index.as_ref().expect("indexed");
                    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let n = index_batch(i, ix, &tx, now)?;
                    tx.commit()?;
                    Ok(n)
                })
                .await?;
            if n < index::BATCH {
                return Ok(());
            }
        }
    }

    pub(super) fn set_index(&mut self, ix: Box<UserIndex>) {
        Arc::get_mut(&mut self.inner)
            .expect("the store is not shared while it is opened")
            .codec
            .index = Some(ix);
    }

    /// [`Sqlite::create`] with the index entry, in one transaction.
    async fn create_indexed(&self, record: Record) -> Result<SessionKey, DbError> {
        let cache = self.with_cache();
        let (key, puts) = self
            .write(move |i, c| {
                let ix = i.codec.index.as_ref().expect("indexed");
                let data = i.codec.encode(&record);
                let exp = naive_utc_text(record.expires_at);
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let key = loop {
                    let key = SessionKey::generate();
                    match tx.prepare_cached(&i.sql.insert)?.execute(params![
                        key.as_str(),
                        data,
                        exp
                    ]) {
                        Ok(_) => break key,
                        Err(e) if is_duplicate_key(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                let w = index::plan_create(&ix.user_key, &key, &record);
                index_write(ix, &tx, &w, index::tail(&data))?;
                let v = Self::bump(&cache, &key)?;
                tx.commit()?;
                let puts: Puts = v
                    .map(|v| (key, v, Some((data, record.expires_at))))
                    .into_iter()
                    .collect();
                Ok((key, puts))
            })
            .await?;
        self.put_all(puts).await?;
        Ok(key)
    }

    /// The live sessions the index lists for `user` and whose row still
    /// names that user; the other entries are deleted (lazy repair). One
    /// write transaction, so no sessiongate write races the repair.
    pub(super) async fn user_sessions(
        &self,
        user: &str,
        now: i64,
    ) -> Result<Vec<crate::store::UserSession>, DbError> {
        let Some(_) = &self.inner.codec.index else {
            return Ok(Vec::new());
        };
        self.index_unindexed(now).await?;
        let user = user.to_string();
        self.write(move |i, c| {
            let ix = i.codec.index.as_ref().expect("indexed");
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let keys = keys_of(ix, &tx, &user)?;
            let mut live = Vec::new();
            for k in keys {
                let row = i.read(&tx, &k)?;
                match row.and_then(|(d, e)| i.codec.user_in_row(&ix.user_key, &d, e, now)) {
                    Some((u, r)) if u == user => {
                        live.push(crate::store::UserSession::of(k, &r));
                    }
                    _ => {
                        tx.prepare_cached(&ix.sql.delete)?.execute([k.as_str()])?;
                    }
                }
            }
            tx.commit()?;
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
        let Some(_) = &self.inner.codec.index else {
            return Ok(0);
        };
        self.index_unindexed(now).await?;
        let user = user.to_string();
        let cache = self.with_cache();
        let (n, puts) = self
            .write(move |i, c| {
                let ix = i.codec.index.as_ref().expect("indexed");
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let keys = keys_of(ix, &tx, &user)?;
                let mut ended = Vec::new();
                for k in keys.into_iter().filter(|k| Some(*k) != keep) {
                    let row = i.read(&tx, &k)?;
                    let names =
                        row.and_then(|(d, e)| i.codec.user_in_row(&ix.user_key, &d, e, now));
                    if matches!(&names, Some((u, _)) if *u == user) {
                        tx.prepare_cached(&i.sql.delete)?.execute([k.as_str()])?;
                        ended.push(k);
                    }
                    tx.prepare_cached(&ix.sql.delete)?.execute([k.as_str()])?;
                }
                let versions = match &cache {
                    Some((c, rt)) => rt.block_on(c.bump_many(&ended))?,
                    None => Vec::new(),
                };
                tx.commit()?;
                let puts: Puts = ended
                    .iter()
                    .zip(versions)
                    .map(|(k, v)| (*k, v, None))
                    .collect();
                Ok((ended.len() as u64, puts))
            })
            .await?;
        super::cache::put_many(self.cache.as_deref(), puts).await?;
        Ok(n)
    }

    /// Every key of a live row (a full scan of the table).
    pub(super) async fn live_keys(
        &self,
        table: &str,
        now: i64,
    ) -> Result<Vec<SessionKey>, DbError> {
        let sql = format!("SELECT session_key FROM \"{table}\" WHERE expire_date > ?1");
        self.run(move |_, c| {
            let mut st = c.prepare(&sql)?;
            let keys = st
                .query_map([naive_utc_text(now)], |r| r.get::<_, String>(0))?
                .filter_map(|k| k.ok().and_then(|k| SessionKey::parse(&k)))
                .collect();
            Ok(keys)
        })
        .await
    }
}

fn keys_of(ix: &UserIndex, c: &Connection, user: &str) -> rusqlite::Result<Vec<SessionKey>> {
    let mut st = c.prepare_cached(&ix.sql.keys_of)?;
    let keys = st
        .query_map([user], |r| r.get::<_, String>(0))?
        .filter_map(|k| k.ok().and_then(|k| SessionKey::parse(&k)))
        .collect();
    Ok(keys)
}
