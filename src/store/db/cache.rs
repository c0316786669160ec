//! `cached_db`: Redis in front of the `db` table, never stale across
//! sessiongate instances.
//!
//! One hash per session, `sessiongate:db:<key>`:
//! - `d`: the row's `session_data` (`""`: deleted), `e`: its `expire_date` (Unix ms);
//! - `v`: the version of `d`; `n`: the last version handed out;
//! - `p`: the version of a write in progress.
//!
//! A write takes a version with [`Cache::bump`] while it holds the row's
//! lock, before it commits: that drops `d` and marks the write pending, so
//! versions follow commit order and nobody serves the old `d` meanwhile.
//! After the commit, [`Cache::put`] stores the new `d` unless a newer
//! version is already there, and clears `p` if it is its own. A read serves
//! `d` when present and nothing is pending; otherwise it reads the table and
//! [`Cache::fill`]s the cache only if still nothing is pending and no `d`
//! arrived (with `v = n`, so an older write's late `put` cannot overwrite it).
//! A write whose `put` fails leaves `p` set: reads go to the table (slower,
//! never stale) until the next write of that session or the hash expires.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Client, Script};

use super::DbError;
use crate::session::SessionKey;

/// How long a hash holding only a counter, a pending mark or a deletion lives.
const META_TTL_MS: i64 = 24 * 3600 * 1000;

const BUMP_LUA: &str = r"
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'p', n)
redis.call('HDEL', KEYS[1], 'd')
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// ARGV: version, data ('' = deleted), expire ms (absolute), meta ttl ms.
const PUT_LUA: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
local mine = tonumber(ARGV[1])
if redis.call('HGET', KEYS[1], 'p') == ARGV[1] then redis.call('HDEL', KEYS[1], 'p') end
if v >= mine then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'e', ARGV[3])
if ARGV[2] == '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
end
return 1
";

/// ARGV: data, expire ms (absolute).
const FILL_LUA: &str = r"
if redis.call('HEXISTS', KEYS[1], 'p') == 1 or redis.call('HEXISTS', KEYS[1], 'd') == 1 then return 0 end
local n = redis.call('HGET', KEYS[1], 'n') or '0'
redis.call('HSET', KEYS[1], 'v', n, 'd', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
";

struct Scripts {
    bump: Script,
    put: Script,
    fill: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    bump: Script::new(BUMP_LUA),
    put: Script::new(PUT_LUA),
    fill: Script::new(FILL_LUA),
});

/// What the cache holds for a session.
pub(crate) enum Cached {
    /// Not cached (or a write is in progress): read the table.
    Unknown,
    /// Deleted.
    Gone,
    /// `session_data` and `expire_date` (Unix ms).
    Row(String, i64),
}

/// `cached_db`: after a commit, each written row (or its deletion) goes to
/// Redis, unless a newer version is there already.
pub(crate) async fn put_all(
    cache: Option<&Cache>,
    puts: super::Puts,
) -> Result<(), super::DbError> {
    if let Some(c) = cache {
        for (k, v, row) in puts {
            c.put(&k, v, row.as_ref().map(|(d, e)| (d.as_str(), *e)))
                .await?;
        }
    }
    Ok(())
}

pub(crate) struct Cache {
    client: Client,
    /// Each thread's connection: a multiplexed connection is driven on the
    /// thread (the worker's runtime) that made it, so one for all threads
    /// would cost the other workers' calls two wake-ups across threads.
    conns: thread_local::ThreadLocal<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    timeout: Duration,
}

fn redis_key(key: &SessionKey) -> String {
    format!("sessiongate:db:{}", key.as_str())
}

impl Cache {
    pub(crate) fn new(url: &str, timeout: Duration) -> Result<Cache, DbError> {
        let client = Client::open(url).map_err(DbError::Redis)?;
        Ok(Cache {
            client,
            conns: thread_local::ThreadLocal::new(),
            timeout,
        })
    }

    /// This thread's connection, made on first use and after a failure.
    async fn conn(&self) -> Result<MultiplexedConnection, DbError> {
        let mut c = self.conns.get_or_default().lock().await;
        if let Some(conn) = &*c {
            return Ok(conn.clone());
        }
        let conn = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(DbError::Redis)?;
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// Drops this thread's connection after a failure (a multi-threaded
    /// runtime may have moved the task; another thread's connection, if
    /// broken too, is dropped by its own next failure).
    async fn forget(&self) {
        *self.conns.get_or_default().lock().await = None;
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, DbError> {
        let work = async {
            let mut conn = self.conn().await?;
            let r = inv.invoke_async(&mut conn).await;
            if let Err(e) = &r {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.forget().await;
                }
            }
            r.map_err(DbError::Redis)
        };
        self.bounded(work).await
    }

    /// `work` within the store's timeout; past it, this thread's
    /// connection is dropped (it may be stuck).
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                self.forget().await;
                Err(DbError::Timeout(self.timeout))
            }
        }
    }

    /// `/readyz`: the cache answers `PING` within the store's timeout.
    pub(crate) async fn ping(&self) -> Result<(), DbError> {
        self.bounded(async {
            let mut conn = self.conn().await?;
            let r: redis::RedisResult<()> = redis::cmd("PING").query_async(&mut conn).await;
            if r.is_err() {
                self.forget().await;
            }
            r.map_err(DbError::Redis)
        })
        .await
    }

    pub(crate) async fn get(&self, key: &SessionKey) -> Result<Cached, DbError> {
        let work = async {
            let mut conn = self.conn().await?;
            let r: redis::RedisResult<(Option<String>, Option<i64>, Option<String>)> =
                redis::cmd("HMGET")
                    .arg(redis_key(key))
                    .arg("d")
                    .arg("e")
                    .arg("p")
                    .query_async(&mut conn)
                    .await;
            if r.is_err() {
                self.forget().await;
            }
            r.map_err(DbError::Redis)
        };
        let (d, e, p) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DbError::Timeout(self.timeout))??;
        Ok(match (d, e, p) {
            (_, _, Some(_)) | (None, _, _) => Cached::Unknown,
            (Some(d), _, None) if d.is_empty() => Cached::Gone,
            (Some(d), Some(e), None) => Cached::Row(d, e),
            (Some(_), None, None) => Cached::Unknown,
        })
    }

    /// A version for a write of `key`; call it holding the row's lock, before the commit.
    pub(crate) async fn bump(&self, key: &SessionKey) -> Result<i64, DbError> {
        let mut inv = SCRIPTS.bump.prepare_invoke();
        inv.key(redis_key(key)).arg(META_TTL_MS);
        self.call(inv).await
    }

    /// After the commit: the row as written (`None`: deleted).
    pub(crate) async fn put(
        &self,
        key: &SessionKey,
        version: i64,
        row: Option<(&str, i64)>,
    ) -> Result<(), DbError> {
        let (d, e) = row.unwrap_or(("", 0));
        let mut inv = SCRIPTS.put.prepare_invoke();
        inv.key(redis_key(key))
            .arg(version)
            .arg(d)
            .arg(e)
            .arg(META_TTL_MS);
        let _: i64 = self.call(inv).await?;
        Ok(())
    }

    /// After a read of the table, when nothing was cached.
    pub(crate) async fn fill(
        &self,
        key: &SessionKey,
        data: &str,
        expires_at: i64,
    ) -> Result<(), DbError> {
        let mut inv = SCRIPTS.fill.prepare_invoke();
        inv.key(redis_key(key)).arg(data).arg(expires_at);
        let _: i64 = self.call(inv).await?;
        Ok(())
    }
}

/// How many cache calls run at once for a batch (a revocation).
const BATCH_IN_FLIGHT: usize = 256;

impl Cache {
    /// [`Cache::bump`] for many keys at once (in the keys' order).
    pub(crate) async fn bump_many(&self, keys: &[SessionKey]) -> Result<Vec<i64>, DbError> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        stream::iter(keys.iter().copied())
            .map(|k| async move { self.bump(&k).await })
            .buffered(BATCH_IN_FLIGHT)
            .try_collect()
            .await
    }
}

/// [`put_all`] with many puts in flight at once.
pub(crate) async fn put_many(cache: Option<&Cache>, puts: super::Puts) -> Result<(), DbError> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let Some(c) = cache else { return Ok(()) };
    stream::iter(puts)
        .map(|(k, v, row)| async move {
            c.put(&k, v, row.as_ref().map(|(d, e)| (d.as_str(), *e)))
                .await
        })
        .buffer_unordered(BATCH_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}
