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

use super::{apply_row, naive_utc_text, parse_iso, Codec, DbError, Migrated};
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
    blocking(timeout, move || {
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

async fn blocking<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, DbError> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(DbError::Timeout(timeout)),
        Ok(Err(join)) => Err(DbError::Worker(join)),
        Ok(Ok(r)) => r.map_err(DbError::Sqlite),
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
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
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
        let exists = blocking(timeout, move || i.with_conn(|c| table_exists(c, &t))).await?;
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
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, DbError> {
        let work = async {
            let _permit = self.permits.acquire().await.expect("never closed");
            let inner = self.inner.clone();
            match tokio::task::spawn_blocking(move || inner.with_conn(|c| f(&inner, c))).await {
                Err(join) => Err(DbError::Worker(join)),
                Ok(r) => r.map_err(DbError::Sqlite),
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, DbError> {
        let _one_writer = tokio::time::timeout(self.timeout, self.writer.lock())
            .await
            .map_err(|_| DbError::Timeout(self.timeout))?;
        self.run(f).await
    }

    pub(super) async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, DbError> {
        let key = *key;
        self.run(move |i, c| {
            Ok(i.read(c, &key)?
                .and_then(|(data, exp)| i.codec.decode(&data, exp, now)))
        })
        .await
    }

    pub(super) async fn create(&self, record: Record) -> Result<SessionKey, DbError> {
        self.write(move |i, c| {
            let data = i.codec.encode(&record);
            let exp = naive_utc_text(record.expires_at);
            let mut stmt = c.prepare_cached(&i.sql.insert)?;
            loop {
                let key = SessionKey::generate();
                match stmt.execute(params![key.as_str(), data, exp]) {
                    Ok(_) => return Ok(key),
                    Err(e) if is_duplicate_key(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
    }

    pub(super) async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, DbError> {
        let key = *key;
        let patch = patch.clone();
        self.write(move |i, c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(current) = i
                .read(&tx, &key)?
                .and_then(|(data, exp)| i.codec.decode(&data, exp, ctx.now))
            else {
                return Ok(Applied::Missing);
            };
            let applied = apply_row(&key, &current, &patch, ctx);
            let Applied::Saved {
                key: mut new_key,
                record,
            } = applied
            else {
                return Ok(applied);
            };
            let data = i.codec.encode(&record);
            let exp = naive_utc_text(record.expires_at);
            if new_key == key {
                tx.prepare_cached(&i.sql.update)?
                    .execute(params![key.as_str(), data, exp])?;
            } else {
                let mut insert = tx.prepare_cached(&i.sql.insert)?;
                loop {
                    match insert.execute(params![new_key.as_str(), data, exp]) {
                        Ok(_) => break,
                        Err(e) if is_duplicate_key(&e) => new_key = SessionKey::generate(),
                        Err(e) => return Err(e),
                    }
                }
                drop(insert);
                tx.prepare_cached(&i.sql.delete)?.execute([key.as_str()])?;
            }
            tx.commit()?;
            Ok(Applied::Saved {
                key: new_key,
                record,
            })
        })
        .await
    }

    pub(super) async fn delete(&self, key: &SessionKey) -> Result<(), DbError> {
        let key = *key;
        self.write(move |i, c| {
            c.prepare_cached(&i.sql.delete)?.execute([key.as_str()])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn clear_expired(&self, now: i64) -> Result<u64, DbError> {
        self.write(move |i, c| {
            let n = c
                .prepare_cached(&i.sql.clear)?
                .execute([naive_utc_text(now)])?;
            Ok(n as u64)
        })
        .await
    }
}
