//! The `redis` and `cached_redis` engines: sessions shared by every
//! sessiongate instance that points at one Redis server, a primary managed
//! by Redis Sentinel, or a Redis Cluster (see [`topology`]).
//!
//! # Layout
//! One hash per session, `sessiongate:s:<key>`, with three fields:
//! - `v`: a random 64-bit version token, new on every write;
//! - `m`: the expiry setting and times, `"<expiry> <created> <modified> <expires_at>"`;
//! - `d`: the data, byte for byte the canonical ASCII JSON of the `X-Session`
//!   header (never re-encoded by Redis).
//!
//! Every write sets the key's TTL (`PEXPIRE`, relative, so clock skew between
//! the proxy and Redis does not matter): Redis forgets expired sessions by
//! itself and `clear_expired` has nothing to do.
//!
//! # Atomicity: optimistic concurrency with a compare-and-set script
//! A patch is applied in Rust by [`Record::apply_patch`], the same code as
//! every other engine (one source of truth for the merge, the `modified`
//! rule and the expiry arithmetic, and the data stays canonical JSON), on a
//! state read together with its version. A Lua script then writes the result
//! only if the version is still the one read; otherwise it returns the newest
//! state in the same reply and the patch is re-applied to it. Concurrent
//! patches to different keys of one session therefore all survive, on any
//! number of instances. The script returns "missing" when the key is gone
//! (flushed, cycled away, expired): nothing is resurrected.
//!
//! Every script touches exactly one key, so on Redis Cluster each runs
//! in the one slot that holds the session. Cycle-Key is two steps (the new
//! key is in another slot): the new record is created under a fresh key
//! (refused if the key exists: Rust then draws another), then the old one
//! is deleted by a compare-and-delete; if a concurrent patch changed the old
//! one in between, the new key is deleted and the cycle re-applied to the
//! newest state (see `apply_inner`).
//!
//! # `cached_redis`: a version-checked cache
//! Each instance keeps records with their version in memory. A load sends
//! the cached version to a script that answers "same" (one integer), "gone",
//! or the newest record, so a session another instance changed or deleted is
//! never served, without relying on invalidation messages that may arrive
//! late or be lost on a reconnect. The cost: a load is still one round trip
//! (a small one: no data comes back when it is current); the gain: writes
//! start from the cached state and go straight to the compare-and-set, one
//! round trip instead of two, and reads do not transfer the data.
//!
//! # Failures
//! Every call is bounded by `[store] timeout`; a timeout or a connection
//! failure is [`StoreError::Unavailable`] (a `503` on session routes). The
//! connection is made lazily and replaced after a failure, so the proxy
//! starts while Redis is down and recovers by itself when it returns. With
//! Sentinel every new connection asks the sentinels for the current primary
//! (and checks its role), so after a failover the first call that finds the
//! old connection dead reaches the promoted replica; a write refused by a
//! demoted primary (`READONLY`) also replaces the connection. With Cluster
//! the crate's connection follows `MOVED` and `ASK` and refreshes its slot
//! map by itself.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, Script, Value};

use super::memory::KeyHash;
use super::{Applied, Store, StoreError, WriteCtx};
use crate::session::{Expiry, Patch, Record, SessionKey};

pub mod topology;

pub use topology::{validate as validate_url, UrlError};
use topology::{Conn, Target, Where};

/// The prefix of every key this engine writes.
pub const KEY_PREFIX: &str = "sessiongate:s:";

/// Records kept by `cached_redis` per instance before the cache is pruned.
const CACHE_CAPACITY: usize = 100_000;

/// Writes a new record unless the key exists. ARGV: version, meta, data, ttl ms.
const CREATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'm', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Compare-and-set. KEYS: the session. ARGV: expected version, new
/// version, meta, data, ttl ms. Returns 0 (gone), 1 (written) or {v, m, d}
/// (the newest state, when the version differs).
const APPLY_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 0 end
if v ~= ARGV[1] then return redis.call('HMGET', KEYS[1], 'v', 'm', 'd') end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'm', ARGV[3], 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

/// Compare-and-delete, the second step of a Cycle-Key. ARGV: expected
/// version. Returns 0 (gone), 1 (deleted) or {v, m, d}.
const RETIRE_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 0 end
if v ~= ARGV[1] then return redis.call('HMGET', KEYS[1], 'v', 'm', 'd') end
redis.call('DEL', KEYS[1])
return 1
";

/// Version check. ARGV: the version the caller holds. Returns 0 (gone),
/// 1 (still current) or {v, m, d}.
const FRESH_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 0 end
if v == ARGV[1] then return 1 end
return redis.call('HMGET', KEYS[1], 'v', 'm', 'd')
";

/// A stored record with the version it was read or written at.
#[derive(Clone)]
struct Versioned {
    version: String,
    record: Record,
}

/// What the version check said.
enum Fresh {
    Gone,
    Same,
    Changed(Versioned),
}

pub struct RedisStore {
    /// Boxed: the client's connection settings are large, and the store
    /// sits in an enum with small engines.
    link: Box<Link>,
    timeout: Duration,
    cache: Option<DashMap<SessionKey, Versioned, KeyHash>>,
}

struct Scripts {
    create: Script,
    apply: Script,
    retire: Script,
    fresh: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create: Script::new(CREATE_LUA),
    apply: Script::new(APPLY_LUA),
    retire: Script::new(RETIRE_LUA),
    fresh: Script::new(FRESH_LUA),
});

/// One multiplexed connection, made on first use and replaced after a
/// failure. Not `redis::aio::ConnectionManager`: it cannot be created while
/// Redis is down, it only reconnects after I/O errors (a reconnection that
/// fails otherwise, a refused AUTH say, leaves its shared connection future
/// failed until the process restarts), and it retries in the background with
/// its own backoff. Here every call that finds no connection makes one
/// attempt, within its own timeout.
struct Link {
    target: Target,
    config: AsyncConnectionConfig,
    /// The current connection and its generation.
    current: Mutex<Option<(u64, Conn)>>,
    /// Held while connecting, so a burst of requests makes one attempt.
    connecting: tokio::sync::Mutex<()>,
    generations: AtomicU64,
}

impl Link {
    fn current(&self) -> Option<(u64, Conn)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current connection, or a new one; `true` when new.
    async fn get(&self) -> Result<(u64, Conn, bool), RedisError> {
        if let Some((g, c)) = self.current() {
            return Ok((g, c, false));
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some((g, c)) = self.current() {
            return Ok((g, c, false));
        }
        let conn = self.target.connect(&self.config).await?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, conn.clone()));
        if generation > 1 {
            tracing::info!("redis connection re-established");
        }
        Ok((generation, conn, true))
    }

    /// Drops connection `generation` (if still current): the next call
    /// connects afresh.
    ///
    /// Never for a cluster connection: it keeps one connection per node and
    /// re-makes the broken ones itself (from the slot map, else from the
    /// URL's nodes). Replacing it would make every session wait on the
    /// new connection's handshake with every node, a hung one included:
    /// one bad node would take down the sessions of the healthy ones.
    fn reset(&self, generation: u64) {
        if matches!(self.target, Target::Cluster(_)) {
            return;
        }
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(&*cur, Some((g, _)) if *g == generation) {
            *cur = None;
        }
    }
}

/// Errors that arrive as a well-formed reply on a healthy connection; every
/// other error replaces the connection.
fn connection_is_fine(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ResponseError
            | ErrorKind::ExtensionError
            | ErrorKind::TypeError
            | ErrorKind::NoScriptError
            | ErrorKind::ExecAbortError
    )
}

/// Errors at start that a retry will not fix: the configuration is wrong.
fn is_misconfiguration(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || (e.kind() == ErrorKind::ResponseError
        && e.to_string().contains("refused to switch database"))
}

fn redis_key(key: &SessionKey) -> String {
    let mut k = String::with_capacity(KEY_PREFIX.len() + key.as_str().len());
    k.push_str(KEY_PREFIX);
    k.push_str(key.as_str());
    k
}

fn new_version() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    format!("{:016x}", u64::from_le_bytes(b))
}

/// The `m` field.
fn encode_meta(r: &Record) -> String {
    let e = match r.expiry {
        Expiry::Default => "d".to_string(),
        Expiry::BrowserClose => "c".to_string(),
        Expiry::Seconds(n) => format!("s{n}"),
        Expiry::At(t) => format!("a{t}"),
    };
    format!("{e} {} {} {}", r.created, r.modified, r.expires_at)
}

fn decode_record(meta: &[u8], data: Vec<u8>) -> Option<Record> {
    let meta = std::str::from_utf8(meta).ok()?;
    let mut it = meta.split(' ');
    let e = it.next()?;
    let expiry = match e.as_bytes().first()? {
        b'd' if e.len() == 1 => Expiry::Default,
        b'c' if e.len() == 1 => Expiry::BrowserClose,
        b's' => Expiry::Seconds(e[1..].parse().ok()?),
        b'a' => Expiry::At(e[1..].parse().ok()?),
        _ => return None,
    };
    let created = it.next()?.parse().ok()?;
    let modified = it.next()?.parse().ok()?;
    let expires_at = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(Record {
        data: Bytes::from(data),
        expiry,
        created,
        modified,
        expires_at,
    })
}

fn bulk(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// Parses `{v, m, d}` (an `HMGET` reply). `None`: the key does not exist.
/// A record this engine cannot read is treated as absent (and logged).
fn parse_state(key: &str, fields: Vec<Value>) -> Option<Versioned> {
    let mut it = fields.into_iter();
    let version = bulk(it.next()?)?;
    let parsed = (|| {
        let meta = bulk(it.next()?)?;
        let data = bulk(it.next()?)?;
        Some(Versioned {
            version: String::from_utf8(version).ok()?,
            record: decode_record(&meta, data)?,
        })
    })();
    if parsed.is_none() {
        // The Redis key holds the session key: never logged.
        let _ = key;
        tracing::warn!(
            "unreadable session record in redis (another program's key, or damaged): ignored"
        );
    }
    parsed
}

fn unexpected(what: &str, v: &Value) -> RedisError {
    RedisError::from((
        ErrorKind::TypeError,
        "unexpected reply from a sessiongate script",
        format!("{what}: {v:?}"),
    ))
}

impl RedisStore {
    /// Keeps the index of a user's sessions under `user_key` (SPEC 9).
    pub fn with_user_key(self, user_key: Option<String>) -> Self {
        // Not built yet for this engine.
        let _ = user_key;
        self
    }

    /// Parses `url` (`redis://`, `rediss://` for TLS, with an optional
    /// `:password@` or `user:password@` and `/db`; or a Sentinel or Cluster
    /// URL, see [`topology`]) and tries to connect.
    ///
    /// A URL that does not parse, a refused password or database number
    /// fail here. Redis being unreachable does not: the proxy starts, session
    /// routes answer `503` until Redis answers, and the connection is made by
    /// the first call that finds it up.
    pub async fn open(
        url: &str,
        timeout: Duration,
        cached: bool,
    ) -> Result<RedisStore, StoreError> {
        let (target, parsed) = Target::open(url, timeout)
            .map_err(|e| StoreError::Open(format!("invalid redis url: {e}")))?;
        let where_ = Where(&parsed, &target).to_string();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let store = RedisStore {
            link: Box::new(Link {
                target,
                config,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                generations: AtomicU64::new(0),
            }),
            timeout,
            cache: cached.then(|| DashMap::with_hasher(KeyHash)),
        };
        let first = tokio::time::timeout(timeout, async {
            let (_, mut c, _) = store.link.get().await?;
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await;
        match first {
            Ok(Ok(())) => tracing::info!(redis = %where_, cached, "redis session store connected"),
            Ok(Err(e)) if is_misconfiguration(&e) => {
                return Err(StoreError::Open(format!("redis at {where_}: {e}")))
            }
            Ok(Err(e)) => tracing::warn!(
                redis = %where_, error = %e,
                "redis unreachable at start: session routes answer 503 until it is"
            ),
            Err(_) => tracing::warn!(
                redis = %where_,
                "redis did not answer within {timeout:?} at start: session routes answer 503 until it does"
            ),
        }
        Ok(store)
    }

    /// Whether this is `cached_redis`.
    pub fn is_cached(&self) -> bool {
        self.cache.is_some()
    }

    /// Runs one store call on the connection, bounded by the timeout; maps
    /// every failure to [`StoreError::Unavailable`] and drops a connection
    /// that failed.
    ///
    /// `idempotent`: the call may run twice. It then gets one more attempt
    /// on a new connection when a connection made earlier turns out to be
    /// dead (Redis restarted since): reads do not fail once per restart.
    async fn op<T, F, Fut>(&self, idempotent: bool, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let used = AtomicU64::new(0);
        let attempt = async {
            let mut tries = 0;
            loop {
                tries += 1;
                let (generation, conn, fresh) = self.link.get().await?;
                used.store(generation, Ordering::Relaxed);
                match f(conn).await {
                    Err(e) if !connection_is_fine(&e) => {
                        self.link.reset(generation);
                        if idempotent && !fresh && tries == 1 {
                            continue;
                        }
                        return Err(e);
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Unavailable(format!(
                "redis did not answer within {:?}",
                self.timeout
            ))),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis: {e}"))),
            Err(_) => {
                // A connection that stopped answering (a half-open socket
                // after a network failure) is replaced; a merely slow Redis
                // costs one reconnection per timeout.
                self.link.reset(used.load(Ordering::Relaxed));
                Err(StoreError::Unavailable(format!(
                    "redis did not answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    fn cached(&self, key: &SessionKey) -> Option<Versioned> {
        self.cache.as_ref()?.get(key).map(|e| e.clone())
    }

    fn remember(&self, key: SessionKey, v: Versioned, now: i64) {
        let Some(cache) = &self.cache else { return };
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&key) {
            cache.retain(|_, e| e.record.is_live(now));
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, v);
    }

    fn forget(&self, key: &SessionKey) {
        if let Some(cache) = &self.cache {
            cache.remove(key);
        }
    }

    async fn fetch(c: &mut Conn, rkey: &str) -> Result<Option<Versioned>, RedisError> {
        let fields: Vec<Value> = redis::cmd("HMGET")
            .arg(rkey)
            .arg("v")
            .arg("m")
            .arg("d")
            .query_async(c)
            .await?;
        Ok(parse_state(rkey, fields))
    }

    async fn check(&self, c: &mut Conn, rkey: &str, version: &str) -> Result<Fresh, RedisError> {
        let v: Value = SCRIPTS.fresh.key(rkey).arg(version).invoke_async(c).await?;
        match v {
            Value::Int(0) => Ok(Fresh::Gone),
            Value::Int(1) => Ok(Fresh::Same),
            Value::Array(fields) => Ok(match parse_state(rkey, fields) {
                Some(s) => Fresh::Changed(s),
                None => Fresh::Gone,
            }),
            other => Err(unexpected("version check", &other)),
        }
    }

    async fn load_inner(
        &self,
        mut c: Conn,
        key: &SessionKey,
        now: i64,
    ) -> Result<Option<Record>, RedisError> {
        let rkey = redis_key(key);
        let state = match self.cached(key) {
            Some(held) => match self.check(&mut c, &rkey, &held.version).await? {
                Fresh::Gone => None,
                Fresh::Same => return Ok(held.record.is_live(now).then_some(held.record)),
                Fresh::Changed(s) => Some(s),
            },
            None => Self::fetch(&mut c, &rkey).await?,
        };
        match state {
            Some(s) => {
                let r = s.record.clone();
                self.remember(*key, s, now);
                Ok(r.is_live(now).then_some(r))
            }
            None => {
                self.forget(key);
                Ok(None)
            }
        }
    }

    async fn apply_inner(
        &self,
        mut c: Conn,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, RedisError> {
        let rkey = redis_key(key);
        // `verified`: the state was read from Redis during this call. A
        // cached state is good enough to attempt the compare-and-set (which
        // checks it), but not to decide "unchanged" or "expired" alone.
        let (mut state, mut verified) = match self.cached(key) {
            Some(s) => (Some(s), false),
            None => (Self::fetch(&mut c, &rkey).await?, true),
        };
        loop {
            let Some(cur) = state.take() else {
                self.forget(key);
                return Ok(Applied::Missing);
            };
            let mut next = cur.record.clone();
            let modified = next.apply_patch(patch, ctx.now, &ctx.policy);
            let live = cur.record.is_live(ctx.now);
            let unchanged = !patch.cycle && !modified && !ctx.touch;
            let too_large = ctx.too_large(&cur.record, &next);
            if !verified && (!live || unchanged || too_large.is_some()) {
                state = match self.check(&mut c, &rkey, &cur.version).await? {
                    Fresh::Gone => None,
                    Fresh::Same => Some(cur),
                    Fresh::Changed(s) => Some(s),
                };
                verified = true;
                continue;
            }
            if !live {
                return Ok(Applied::Missing);
            }
            if unchanged {
                return Ok(Applied::Unchanged);
            }
            if let Some(size) = too_large {
                return Ok(Applied::TooLarge { size });
            }
            let version = new_version();
            let ttl = (next.expires_at - ctx.now).max(1);
            let meta = encode_meta(&next);
            let reply: Value = if patch.cycle {
                // Two keys, which on Cluster live in different slots: no
                // script may touch both. First the new record under a fresh
                // key nobody else knows (so nothing can race on it), then
                // the old one deleted only if it is still the version the
                // patch was applied to. A concurrent patch that landed in
                // between makes the delete refuse: the new key is dropped
                // and the patch re-applied to the newest state, so that
                // change is carried over, never lost. A crash between the
                // two steps leaves an orphan nobody holds a cookie for,
                // which its TTL removes.
                let new_key = loop {
                    let k = SessionKey::generate();
                    let written: i64 = SCRIPTS
                        .create
                        .key(redis_key(&k))
                        .arg(&version)
                        .arg(&meta)
                        .arg(next.data.as_ref())
                        .arg(ttl)
                        .invoke_async(&mut c)
                        .await?;
                    if written == 1 {
                        break k;
                    }
                };
                let reply: Value = SCRIPTS
                    .retire
                    .key(&rkey)
                    .arg(&cur.version)
                    .invoke_async(&mut c)
                    .await?;
                if reply == Value::Int(1) {
                    self.forget(key);
                    self.remember(
                        new_key,
                        Versioned {
                            version,
                            record: next.clone(),
                        },
                        ctx.now,
                    );
                    return Ok(Applied::Saved {
                        key: new_key,
                        record: next,
                    });
                }
                redis::cmd("DEL")
                    .arg(redis_key(&new_key))
                    .query_async::<()>(&mut c)
                    .await?;
                reply
            } else {
                SCRIPTS
                    .apply
                    .key(&rkey)
                    .arg(&cur.version)
                    .arg(&version)
                    .arg(&meta)
                    .arg(next.data.as_ref())
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await?
            };
            match reply {
                Value::Int(1) => {
                    self.remember(
                        *key,
                        Versioned {
                            version,
                            record: next.clone(),
                        },
                        ctx.now,
                    );
                    return Ok(Applied::Saved {
                        key: *key,
                        record: next,
                    });
                }
                Value::Int(0) => {
                    self.forget(key);
                    return Ok(Applied::Missing);
                }
                Value::Array(fields) => {
                    // Someone wrote first: re-apply to the newest state.
                    state = parse_state(&rkey, fields);
                    verified = true;
                }
                other => return Err(unexpected("apply", &other)),
            }
        }
    }
}

impl Store for RedisStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        self.op(true, |c| self.load_inner(c, key, now)).await
    }

    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        let version = new_version();
        let meta = encode_meta(&record);
        let ttl = (record.expires_at - record.modified).max(1);
        let (v, m, d) = (&version, &meta, record.data.as_ref());
        let key = self
            .op(false, |mut c| async move {
                loop {
                    let key = SessionKey::generate();
                    let written: i64 = SCRIPTS
                        .create
                        .key(redis_key(&key))
                        .arg(v)
                        .arg(m)
                        .arg(d)
                        .arg(ttl)
                        .invoke_async(&mut c)
                        .await?;
                    if written == 1 {
                        return Ok(key);
                    }
                }
            })
            .await?;
        let now = record.modified;
        self.remember(key, Versioned { version, record }, now);
        Ok(key)
    }

    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        self.op(false, |c| self.apply_inner(c, key, patch, ctx))
            .await
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        // Forget first: even if the DEL fails, this instance must not serve
        // the session from memory.
        self.forget(key);
        self.op(true, |mut c| async move {
            redis::cmd("DEL")
                .arg(redis_key(key))
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Redis expires every session by its TTL (set on each write): there is
    /// nothing to sweep.
    async fn clear_expired(&self, _now: i64) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// `PING`, within the timeout.
    async fn ping(&self) -> Result<(), StoreError> {
        self.op(true, |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        for expiry in [
            Expiry::Default,
            Expiry::BrowserClose,
            Expiry::Seconds(300),
            Expiry::At(1_893_456_000_000),
            Expiry::At(-5),
        ] {
            let r = Record {
                data: Bytes::from_static(br#"{"a":"\u00e9"}"#),
                expiry,
                created: 1,
                modified: 2,
                expires_at: 3,
            };
            let back = decode_record(encode_meta(&r).as_bytes(), r.data.to_vec()).unwrap();
            assert_eq!(back, r);
        }
        assert!(decode_record(b"x 1 2 3", vec![]).is_none());
        assert!(decode_record(b"d 1 2", vec![]).is_none());
        assert!(decode_record(b"d 1 2 3 4", vec![]).is_none());
        assert!(decode_record(b"dd 1 2 3", vec![]).is_none());
    }

    #[test]
    fn versions_are_distinct() {
        assert_ne!(new_version(), new_version());
        assert_eq!(new_version().len(), 16);
    }
}
