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
//! The state a write starts from is the one the request loaded before it
//! went upstream (its record's [`Stamp`] holds the version), so a write is
//! the load and the script, with no read in between. This rests on a rule
//! every script keeps: the index fields `u` and `x` change only together
//! with the version `v`, so a version names the whole stored state.
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
//! Each instance keeps records with their version in memory. A load reads
//! the stored version (`HGET`): the same as the cached one, the copy is
//! served; none, the session is gone; another, the newest record is read
//! (`HMGET`). So a session another instance changed or deleted is never
//! served, without relying on invalidation messages that may arrive late or
//! be lost on a reconnect. The cost: a load is still one round trip (a
//! small one: no data comes back when it is current), two when the session
//! changed; the gain: reads do not transfer the data, and writes start from
//! the cached state.
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
//! map by itself; in front of it, a command whose keys are in one slot goes
//! straight to that slot's primary, and comes back to the crate's
//! connection on a redirect or a failure (see [`slots`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, Script, Value};

use super::memory::KeyHash;
use super::{Applied, Store, StoreError, WriteCtx};
use crate::session::{Expiry, Patch, Record, SessionKey, Stamp};

mod slots;
pub mod topology;

#[doc(hidden)]
pub use slots::{direct_commands, fallback_commands};

pub use topology::{validate as validate_url, UrlError};
use topology::{Conn, Target, Where};

/// The prefix of every key this engine writes.
pub const KEY_PREFIX: &str = "sessiongate:s:";

/// Records kept by `cached_redis` per instance before the cache is pruned.
const CACHE_CAPACITY: usize = 100_000;

/// The prefix of the user index sets (`sessiongate:u:<user>`).
pub const USER_PREFIX: &str = "sessiongate:u:";

/// Writes a new record unless the key exists. ARGV: version, meta, data,
/// ttl ms, user ('': none), index-until ms.
const CREATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[5] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'm', ARGV[2], 'd', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'm', ARGV[2], 'd', ARGV[3], 'u', ARGV[5], 'x', ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

// Every script that writes `u` or `x` writes a new `v` with them (see the
// module's notes: a write starts from a version alone).

/// Compare-and-set. KEYS: the session. ARGV: expected version, new
/// version, meta, data, ttl ms, user ('': none), index-until ms; '1' and
/// the expected `u` when the caller's index entry was not read but derived
/// from the data (a stamp: `from_seen`); '1' when the expected version has
/// neither `u` nor `x` (`Versioned::bare`). Returns 0 (gone), 1 (written)
/// or {v, m, d, u, x} (the newest state, when the version, or the expected
/// `u`, differs).
///
/// Three calls inside Redis for a write that lands, four when the user is
/// checked: each call a script makes costs the server about as much as a
/// command of its own (callgrind counted 5,000 instructions for the `HDEL`
/// of absent fields, a tenth of the whole write: BENCHMARKS.md), so `u`
/// and `x` are deleted only when the expected version may have them, and
/// written in the one `HSET`.
const APPLY_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 0 end
if v ~= ARGV[1] or (ARGV[8] == '1' and redis.call('HGET', KEYS[1], 'u') ~= ARGV[9]) then
  return redis.call('HMGET', KEYS[1], 'v', 'm', 'd', 'u', 'x')
end
if ARGV[6] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'm', ARGV[3], 'd', ARGV[4])
  if ARGV[10] ~= '1' then redis.call('HDEL', KEYS[1], 'u', 'x') end
else
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'm', ARGV[3], 'd', ARGV[4], 'u', ARGV[6], 'x', ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

/// Compare-and-delete, the second step of a Cycle-Key. ARGV: expected
/// version. Returns 0 (gone), 1 (deleted) or {v, m, d, u, x}.
const RETIRE_LUA: &str = r"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 0 end
if v ~= ARGV[1] then return redis.call('HMGET', KEYS[1], 'v', 'm', 'd', 'u', 'x') end
redis.call('DEL', KEYS[1])
return 1
";

/// Adds a session to a user's index set and makes the set live at least
/// ARGV[2] ms. KEYS: the set. ARGV: the session key, ttl ms.
const INDEX_ADD_LUA: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
local t = redis.call('PTTL', KEYS[1])
if t < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
";

/// Ends a session if it still belongs to the user. KEYS: the session.
/// ARGV: the user, now (Unix ms). Returns 1 (a live session deleted), 3 (a
/// session already past its end of life deleted: not counted), 0 (gone
/// already) or 2 (it belongs to another user, or none, now).
const REVOKE_LUA: &str = r"
local u = redis.call('HGET', KEYS[1], 'u')
if u == ARGV[1] then
  local m = redis.call('HGET', KEYS[1], 'm')
  redis.call('DEL', KEYS[1])
  local e = m and tonumber(string.match(m, '(%-?%d+)$'))
  if e and e <= tonumber(ARGV[2]) then return 3 end
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return 2
";

/// Deletes a session; returns {deleted (0/1), its user ('': none)}.
const DELETE_LUA: &str = r"
local u = redis.call('HGET', KEYS[1], 'u')
local n = redis.call('DEL', KEYS[1])
return {n, u or ''}
";

/// A stored record with the version it was read or written at.
#[derive(Clone)]
struct Versioned {
    version: String,
    record: Record,
    /// The user index entry the record carries (fields `u` and `x`).
    index: Option<Index>,
    /// The entry's user was derived from the data, not read (a state made
    /// from a stamp, [`from_seen`]): the compare-and-set checks
    /// that `u` is that user.
    derived_user: bool,
    /// At `version` the stored hash has neither `u` nor `x` (`u` and `x`
    /// change only with `v`): a write that keeps no entry need not delete
    /// them. False when unknown.
    bare: bool,
}

impl Versioned {
    /// The state at `version` as read or written, its record stamped with
    /// the version and the index entry (see [`Stamp::indexed_until`]): an
    /// entry with an empty user (the scripts store that as no entry) or
    /// with no `until` is not one.
    fn new(version: String, mut record: Record, index: Option<Index>, bare: bool) -> Versioned {
        record.stamp = Stamp {
            version: parse_version(&version),
            indexed_until: match &index {
                Some(i) if !i.user.is_empty() && i.until > 0 => i.until,
                _ if bare => 0,
                _ => -1,
            },
        };
        Versioned {
            version,
            record,
            index,
            derived_user: false,
            bare,
        }
    }

    /// The state a script of this engine just wrote at `version`: it has
    /// `u` and `x` exactly when it has an entry.
    fn written(version: String, record: Record, index: Option<Index>) -> Versioned {
        let bare = index.is_none();
        Versioned::new(version, record, index, bare)
    }
}

/// A session's place in the user index: the user (field `u`) and the Unix
/// ms until which its index set is known to live (field `x`).
#[derive(Clone, Debug, PartialEq)]
struct Index {
    user: String,
    until: i64,
}

/// How many index commands run at once when listing or revoking.
const FAN_OUT: usize = 256;

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
    /// `[session] user_key`: keep the user index (SPEC 9).
    user_key: Option<String>,
}

struct Scripts {
    create: Script,
    apply: Script,
    retire: Script,
    index_add: Script,
    revoke: Script,
    delete: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create: Script::new(CREATE_LUA),
    apply: Script::new(APPLY_LUA),
    retire: Script::new(RETIRE_LUA),
    index_add: Script::new(INDEX_ADD_LUA),
    revoke: Script::new(REVOKE_LUA),
    delete: Script::new(DELETE_LUA),
});

/// One multiplexed connection per thread, made on first use and replaced
/// after a failure. Not `redis::aio::ConnectionManager`: it cannot be created while
/// Redis is down, it only reconnects after I/O errors (a reconnection that
/// fails otherwise, a refused AUTH say, leaves its shared connection future
/// failed until the process restarts), and it retries in the background with
/// its own backoff. Here every call that finds no connection makes one
/// attempt, within its own timeout.
///
/// Per thread: a multiplexed connection is driven by a task on the runtime
/// that made it, and sessiongate's workers are one single-threaded runtime
/// each; one connection for all of them would cost each command of the
/// other workers two wake-ups across threads (as it did on PostgreSQL,
/// BENCHMARKS.md).
struct Link {
    target: Target,
    config: AsyncConnectionConfig,
    /// Each thread's connection.
    slots: thread_local::ThreadLocal<Slot>,
    generations: AtomicU64,
}

/// One thread's connection (see [`Link`]).
#[derive(Default)]
struct Slot {
    /// The current connection and its generation (unique in the [`Link`]).
    current: Mutex<Option<(u64, Conn)>>,
    /// Held while connecting, so a burst of requests makes one attempt.
    connecting: tokio::sync::Mutex<()>,
    /// Whether this thread had a connection before (for the log).
    had: std::sync::atomic::AtomicBool,
    /// Sentinel: the watch's version when the connection was made (see
    /// `topology::PrimaryWatch`).
    primary_version: AtomicU64,
}

impl Slot {
    fn current(&self) -> Option<(u64, Conn)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Link {
    fn slot(&self) -> &Slot {
        self.slots.get_or_default()
    }

    /// This thread's current connection, or a new one; `true` when new.
    async fn get(&self) -> Result<(u64, Conn, bool), RedisError> {
        let slot = self.slot();
        if let Target::Sentinel(_, watch) = &self.target {
            watch.poll();
            // A connection made before the named primary last changed
            // (or while it changed) may point at one that no longer is.
            if slot.primary_version.load(Ordering::Relaxed) != watch.version() {
                *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        if let Some((g, c)) = slot.current() {
            return Ok((g, c, false));
        }
        let _one_at_a_time = slot.connecting.lock().await;
        if let Some((g, c)) = slot.current() {
            return Ok((g, c, false));
        }
        if let Target::Sentinel(_, watch) = &self.target {
            // Read before connecting: a change while connecting makes the
            // next call connect again.
            slot.primary_version
                .store(watch.version(), Ordering::Relaxed);
        }
        let conn = self.target.connect(&self.config).await?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *slot.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, conn.clone()));
        if slot.had.swap(true, Ordering::Relaxed) {
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
        if matches!(self.target, Target::Cluster(..)) {
            return;
        }
        // Every thread's: the caller may have moved to another thread (a
        // multi-threaded runtime) since it got the connection.
        for slot in self.slots.iter() {
            let mut cur = slot.current.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(&*cur, Some((g, _)) if *g == generation) {
                *cur = None;
            }
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

/// A connection made earlier that Redis (or something on the way) had
/// closed: the crate answers a bare `BrokenPipe` for it (Redis's idle
/// `timeout`, `CLIENT KILL`, a restart, Sentinel's reconfiguration). A write
/// gets one more attempt on a new connection then, as a read does: on such
/// a connection the write went nowhere, or it was in flight as the
/// connection closed, and the compare-and-set scripts make a second run
/// of a patch find the state the first left (an Update or Delete applies
/// the same), at worst a 400 for a Cycle-Key whose first run went through.
/// A reset or a timeout (the write may have run) is not retried.
fn found_closed(e: &RedisError) -> bool {
    // The crate keeps the io::Error's kind to itself: of the dropped
    // connections (BrokenPipe, ConnectionReset, UnexpectedEof), BrokenPipe
    // is told by its text ("broken pipe", or "Broken pipe (os error 32)").
    e.is_connection_dropped()
        && e.to_string()
            .to_ascii_lowercase()
            .starts_with("broken pipe")
}

/// Errors at start that a retry will not fix: the configuration is wrong.
fn is_misconfiguration(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || (e.kind() == ErrorKind::ResponseError
        && e.to_string().contains("refused to switch database"))
        // A server (a sentinel, or the primary a sentinel named) that wants
        // a password the URL does not give.
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
        // The cluster client's "Failed to create initial connections" carries
        // the nodes' own error as text only.
        || (e.kind() == ErrorKind::IoError
            && e.detail().is_some_and(|d| {
                let d = d.to_ascii_lowercase();
                d.contains("authentication failed") || d.contains("noauth") || d.contains("wrongpass")
            }))
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

/// A version as [`new_version`] writes it, as a number (another text: none;
/// the compare-and-set compares the text).
fn parse_version(v: &str) -> Option<u64> {
    (v.len() == 16 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u64::from_str_radix(v, 16).ok())
        .flatten()
}

/// The state a request loaded, as a write may start from it, from its
/// record's stamp: the version, and the index entry at that version (`u`
/// and `x` change only with `v`): none, or `until` from the stamp and the
/// user derived from the data under `user_key`, which the compare-and-set
/// checks against `u`. `None` (the write reads the session first): no
/// stamp, or an entry and no user key to derive its user.
fn from_seen(seen: &Record, user_key: Option<&str>) -> Option<Versioned> {
    let v = seen.stamp.version?;
    let index = match seen.stamp.indexed_until {
        until if until <= 0 => None,
        until => Some(Index {
            user: super::user_of(&seen.data, user_key?)?,
            until,
        }),
    };
    Some(Versioned {
        version: format!("{v:016x}"),
        record: seen.clone(),
        derived_user: index.is_some(),
        bare: seen.stamp.indexed_until == 0,
        index,
    })
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
        stamp: Stamp::NONE,
    })
}

fn bulk(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn user_set(user: &str) -> String {
    let mut k = String::with_capacity(USER_PREFIX.len() + user.len());
    k.push_str(USER_PREFIX);
    k.push_str(user);
    k
}

/// Parses `u` and `x` (absent or unreadable: not indexed).
fn parse_index(u: Option<Value>, x: Option<Value>) -> Option<Index> {
    let user = String::from_utf8(bulk(u?)?).ok()?;
    let until = std::str::from_utf8(&bulk(x?)?).ok()?.parse().ok()?;
    Some(Index { user, until })
}

/// Parses `{v, m, d[, u, x]}` (an `HMGET` reply). `None`: the key does not
/// exist. A record this engine cannot read is treated as absent (and logged).
fn parse_state(key: &str, fields: Vec<Value>) -> Option<Versioned> {
    let mut it = fields.into_iter();
    let version = bulk(it.next()?)?;
    let parsed = (|| {
        let meta = bulk(it.next()?)?;
        let data = bulk(it.next()?)?;
        let (u, x) = (it.next(), it.next());
        let absent = |f: &Option<Value>| matches!(f, None | Some(Value::Nil));
        let bare = absent(&u) && absent(&x);
        Some(Versioned::new(
            String::from_utf8(version).ok()?,
            decode_record(&meta, data)?,
            parse_index(u, x),
            bare,
        ))
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
    /// Keeps the index of a user's sessions under `user_key` (SPEC 9): a
    /// set per user, `sessiongate:u:<user>`, of session keys (see
    /// [`RedisStore::user_sessions`] for how it is kept and repaired).
    pub fn with_user_key(mut self, user_key: Option<String>) -> Self {
        self.user_key = user_key;
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
                slots: thread_local::ThreadLocal::new(),
                generations: AtomicU64::new(0),
            }),
            timeout,
            cache: cached.then(|| DashMap::with_hasher(KeyHash)),
            user_key: None,
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
                        if (idempotent || found_closed(&e)) && !fresh && tries == 1 {
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
            .arg("u")
            .arg("x")
            .query_async(c)
            .await?;
        Ok(parse_state(rkey, fields))
    }

    /// Whether the state at `version` is still the stored one: a plain
    /// `HGET` of the version, and the whole state read only when it moved.
    /// Not a script: Redis spends about a third of a script's instructions
    /// on the `HGET` (BENCHMARKS.md), and the check is every `cached_redis`
    /// load. Versions are random, so one seen again is the same state.
    async fn check(&self, c: &mut Conn, rkey: &str, version: &str) -> Result<Fresh, RedisError> {
        let stored: Option<Vec<u8>> = redis::cmd("HGET").arg(rkey).arg("v").query_async(c).await?;
        Ok(match stored {
            None => Fresh::Gone,
            Some(v) if v == version.as_bytes() => Fresh::Same,
            Some(_) => match Self::fetch(c, rkey).await? {
                Some(s) => Fresh::Changed(s),
                None => Fresh::Gone,
            },
        })
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
        seen: Option<&Record>,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, RedisError> {
        let rkey = redis_key(key);
        // `verified`: the state was read from Redis during this call. A
        // cached state, or the one the request loaded, is good enough to
        // attempt the compare-and-set (which checks it), but not to decide
        // "unchanged" or "expired" alone.
        let held = self
            .cached(key)
            .or_else(|| seen.and_then(|r| from_seen(r, self.user_key.as_deref())));
        let (mut state, mut verified) = match held {
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
            let unchanged = !patch.cycle && !modified && !ctx.touches(&cur.record);
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
            // The user index (SPEC 9): what the record will carry, and
            // whether its set must be written. For a key the browser
            // already holds, the set is written *before* the record, so a
            // failure in between leaves an extra member (repaired lazily),
            // never an unindexed session.
            let plan = self.plan_index(cur.index.as_ref(), &next, ctx.now, patch.cycle);
            let (u_arg, x_arg) = match &plan.index {
                Some(i) => (i.user.as_str(), i.until),
                None => ("", 0),
            };
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
                        .arg(u_arg)
                        .arg(x_arg)
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
                    // The new key reached nobody yet: indexing it after the
                    // write is enough (a failure here is a 503, no cookie).
                    if let Some(i) = &plan.index {
                        index_add(&mut c, &i.user, &new_key, i.until - ctx.now).await?;
                    }
                    if let Some(old) = &cur.index {
                        srem(&mut c, &old.user, &[*key]).await?;
                    }
                    self.forget(key);
                    // Stamped with the version just written.
                    let held = Versioned::written(version, next, plan.index);
                    let record = held.record.clone();
                    self.remember(new_key, held, ctx.now);
                    return Ok(Applied::Saved {
                        key: new_key,
                        record,
                    });
                }
                redis::cmd("DEL")
                    .arg(redis_key(&new_key))
                    .query_async::<()>(&mut c)
                    .await?;
                reply
            } else {
                if plan.add {
                    if let Some(i) = &plan.index {
                        index_add(&mut c, &i.user, key, i.until - ctx.now).await?;
                    }
                }
                SCRIPTS
                    .apply
                    .key(&rkey)
                    .arg(&cur.version)
                    .arg(&version)
                    .arg(&meta)
                    .arg(next.data.as_ref())
                    .arg(ttl)
                    .arg(u_arg)
                    .arg(x_arg)
                    .arg(if cur.derived_user { "1" } else { "0" })
                    .arg(cur.index.as_ref().map_or("", |i| i.user.as_str()))
                    .arg(if cur.bare { "1" } else { "0" })
                    .invoke_async(&mut c)
                    .await?
            };
            match reply {
                Value::Int(1) => {
                    if plan.moved {
                        // A new user for this key: added again after the
                        // write, in case a repair of that user's set
                        // removed it between the first add and the write.
                        if let Some(i) = &plan.index {
                            index_add(&mut c, &i.user, key, i.until - ctx.now).await?;
                        }
                        if let Some(old) = &cur.index {
                            if plan.index.as_ref().map(|i| &i.user) != Some(&old.user) {
                                self.remove_checked(&mut c, &old.user, key, ctx.now).await?;
                            }
                        }
                    }
                    // Stamped with the version just written.
                    let held = Versioned::written(version, next, plan.index);
                    let record = held.record.clone();
                    self.remember(*key, held, ctx.now);
                    return Ok(Applied::Saved { key: *key, record });
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

    /// What the index must become for a write of `next` over a record that
    /// carried `cur`.
    fn plan_index(&self, cur: Option<&Index>, next: &Record, now: i64, cycle: bool) -> Plan {
        let Some(user_key) = self.user_key.as_deref() else {
            // No index kept: a leftover entry is dropped from the record
            // (the set forgets it lazily).
            return Plan::default();
        };
        let Some(user) = super::user_of(&next.data, user_key) else {
            return Plan {
                index: None,
                add: false,
                moved: cur.is_some(),
            };
        };
        match cur {
            // Same user, and the set outlives the new expiry: nothing to
            // write but the record (the steady state: no extra command).
            Some(i) if i.user == user && i.until >= next.expires_at && !cycle => Plan {
                index: Some(i.clone()),
                add: false,
                moved: false,
            },
            _ => {
                // The set is made to live twice the session's remaining
                // lifetime, so a sliding session renews it about once per
                // lifetime, not on every write.
                let ttl = (next.expires_at - now).max(1);
                let moved = cur.map(|i| &i.user) != Some(&user);
                Plan {
                    index: Some(Index {
                        user,
                        until: now + 2 * ttl,
                    }),
                    add: true,
                    moved,
                }
            }
        }
    }

    /// Removes `key` from `user`'s set, then puts it back if the session
    /// belongs to that user after all (a concurrent write moved it back): a
    /// removal never leaves a session of the user outside its set.
    async fn remove_checked(
        &self,
        c: &mut Conn,
        user: &str,
        key: &SessionKey,
        now: i64,
    ) -> Result<(), RedisError> {
        srem(c, user, &[*key]).await?;
        let (u, x): (Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(redis_key(key))
            .arg("u")
            .arg("x")
            .query_async(c)
            .await?;
        if u.as_deref() == Some(user) {
            let ttl = x.map(|x| x - now).unwrap_or(1);
            index_add(c, user, key, ttl).await?;
        }
        Ok(())
    }

    /// The members of `user`'s set.
    async fn members(c: &mut Conn, user: &str) -> Result<Vec<SessionKey>, RedisError> {
        let raw: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
            .arg(user_set(user))
            .query_async(c)
            .await?;
        Ok(raw
            .iter()
            .filter_map(|m| SessionKey::parse_bytes(m))
            .collect())
    }

    /// Deletes a session and drops it from its user's set.
    async fn delete_inner(&self, mut c: Conn, key: &SessionKey) -> Result<bool, RedisError> {
        let (n, user): (i64, String) = SCRIPTS
            .delete
            .key(redis_key(key))
            .invoke_async(&mut c)
            .await?;
        if !user.is_empty() {
            srem(&mut c, &user, &[*key]).await?;
        }
        Ok(n == 1)
    }

    /// Every key of the sessions this engine wrote, node by node on
    /// Cluster (`SCAN`: it walks the whole keyspace, in steps).
    async fn scan_sessions(&self, c: &mut Conn) -> Result<Vec<SessionKey>, RedisError> {
        let pattern = format!("{KEY_PREFIX}*");
        let mut keys = Vec::new();
        let nodes: Vec<Option<(String, u16)>> = match c {
            Conn::Single(_) => vec![None],
            Conn::Cluster(cc) => {
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(cc.crate_conn())
                    .await?;
                primaries(&text).into_iter().map(Some).collect()
            }
        };
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let reply: Value = match (&mut *c, &node) {
                    (Conn::Cluster(cc), Some((host, port))) => {
                        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                        cc.crate_conn()
                            .route_command(
                                &cmd,
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                }),
                            )
                            .await?
                    }
                    _ => cmd.query_async(c).await?,
                };
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::from_redis_value(&reply)?;
                keys.extend(batch.iter().filter_map(|k| {
                    k.strip_prefix(KEY_PREFIX.as_bytes())
                        .and_then(SessionKey::parse_bytes)
                }));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        keys.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        keys.dedup();
        Ok(keys)
    }

    async fn user_sessions_inner(
        &self,
        mut c: Conn,
        user: &str,
        now: i64,
    ) -> Result<Vec<super::UserSession>, RedisError> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        let members = Self::members(&mut c, user).await?;
        let states: Vec<(SessionKey, Option<Versioned>)> = stream::iter(members)
            .map(|k| {
                let mut c = c.clone();
                async move {
                    let s = Self::fetch(&mut c, &redis_key(&k)).await?;
                    Ok::<_, RedisError>((k, s))
                }
            })
            .buffer_unordered(FAN_OUT)
            .try_collect()
            .await?;
        let mut live = Vec::new();
        let mut gone = Vec::new();
        let mut moved = Vec::new();
        for (k, s) in states {
            match s {
                None => gone.push(k),
                Some(v) if v.index.as_ref().map(|i| i.user.as_str()) != Some(user) => moved.push(k),
                Some(v) if v.record.is_live(now) => live.push(super::UserSession::of(k, &v.record)),
                Some(_) => {}
            }
        }
        // Lazy repair: a gone session never comes back (keys are never
        // reused), so it is dropped as is; one that now names another user
        // (or none) is dropped with a re-check.
        for chunk in gone.chunks(1000) {
            srem(&mut c, user, chunk).await?;
        }
        for k in &moved {
            self.remove_checked(&mut c, user, k, now).await?;
        }
        live.sort_by_key(|s| (s.created, *s.key.as_bytes()));
        Ok(live)
    }

    async fn revoke_user_inner(
        &self,
        mut c: Conn,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> Result<u64, RedisError> {
        use futures_util::stream::{self, StreamExt, TryStreamExt};
        let members: Vec<SessionKey> = Self::members(&mut c, user)
            .await?
            .into_iter()
            .filter(|k| Some(k) != keep)
            .collect();
        // Forget first: this instance must not serve them from memory even
        // if a call below fails. Other instances' caches check the version
        // on every load and find the key gone.
        for k in &members {
            self.forget(k);
        }
        // One script per session (atomic: delete only if it still names
        // this user), many in flight at once: on Cluster each goes to the
        // node of its slot.
        let results: Vec<(SessionKey, i64)> = stream::iter(members)
            .map(|k| {
                let mut c = c.clone();
                async move {
                    let n: i64 = SCRIPTS
                        .revoke
                        .key(redis_key(&k))
                        .arg(user)
                        .arg(now)
                        .invoke_async(&mut c)
                        .await?;
                    Ok::<_, RedisError>((k, n))
                }
            })
            .buffer_unordered(FAN_OUT)
            .try_collect()
            .await?;
        let deleted = results.iter().filter(|(_, n)| *n == 1).count() as u64;
        let drop: Vec<SessionKey> = results
            .into_iter()
            .filter(|(_, n)| *n != 2)
            .map(|(k, _)| k)
            .collect();
        for chunk in drop.chunks(1000) {
            srem(&mut c, user, chunk).await?;
        }
        Ok(deleted)
    }
}

/// What [`RedisStore::plan_index`] decided.
#[derive(Default)]
struct Plan {
    /// The `u`/`x` fields the record will carry.
    index: Option<Index>,
    /// Write the set (add the key, extend its life).
    add: bool,
    /// The user changed: the old set loses the key.
    moved: bool,
}

async fn index_add(c: &mut Conn, user: &str, key: &SessionKey, ttl: i64) -> Result<(), RedisError> {
    let _: i64 = SCRIPTS
        .index_add
        .key(user_set(user))
        .arg(key.as_str())
        .arg(ttl.max(1))
        .invoke_async(c)
        .await?;
    Ok(())
}

async fn srem(c: &mut Conn, user: &str, keys: &[SessionKey]) -> Result<(), RedisError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("SREM");
    cmd.arg(user_set(user));
    for k in keys {
        cmd.arg(k.as_str());
    }
    cmd.query_async::<()>(c).await
}

/// The primaries in a `CLUSTER NODES` reply, as `(host, port)`.
fn primaries(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let _id = f.next()?;
            let addr = f.next()?;
            let flags = f.next()?;
            if !flags.split(',').any(|x| x == "master") || flags.contains("fail") {
                return None;
            }
            let addr = addr.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

impl Store for RedisStore {
    async fn load(&self, key: &SessionKey, now: i64) -> Result<Option<Record>, StoreError> {
        self.op(true, |c| self.load_inner(c, key, now)).await
    }

    async fn create(&self, record: Record) -> Result<SessionKey, StoreError> {
        let version = new_version();
        let meta = encode_meta(&record);
        let now = record.modified;
        let ttl = (record.expires_at - now).max(1);
        let index = self.plan_index(None, &record, now, false).index;
        let (v, m, d, ix) = (&version, &meta, record.data.as_ref(), &index);
        let key = self
            .op(false, |mut c| async move {
                let (u, x) = match ix {
                    Some(i) => (i.user.as_str(), i.until),
                    None => ("", 0),
                };
                let key = loop {
                    let key = SessionKey::generate();
                    let written: i64 = SCRIPTS
                        .create
                        .key(redis_key(&key))
                        .arg(v)
                        .arg(m)
                        .arg(d)
                        .arg(ttl)
                        .arg(u)
                        .arg(x)
                        .invoke_async(&mut c)
                        .await?;
                    if written == 1 {
                        break key;
                    }
                };
                // Nobody holds the key until this call returns: indexing
                // it after the write is enough.
                if let Some(i) = ix {
                    index_add(&mut c, &i.user, &key, i.until - now).await?;
                }
                Ok(key)
            })
            .await?;
        self.remember(key, Versioned::written(version, record, index), now);
        Ok(key)
    }

    async fn apply(
        &self,
        key: &SessionKey,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        self.op(false, |c| self.apply_inner(c, key, None, patch, ctx))
            .await
    }

    async fn apply_seen(
        &self,
        key: &SessionKey,
        seen: &Record,
        patch: &Patch,
        ctx: WriteCtx,
    ) -> Result<Applied, StoreError> {
        self.op(false, |c| self.apply_inner(c, key, Some(seen), patch, ctx))
            .await
    }

    async fn delete(&self, key: &SessionKey) -> Result<(), StoreError> {
        // Forget first: even if the DEL fails, this instance must not serve
        // the session from memory.
        self.forget(key);
        self.op(true, |c| self.delete_inner(c, key)).await?;
        Ok(())
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

    /// The index is a set per user, apart from the sessions (on Cluster
    /// in another slot), so it can be behind: the set may hold sessions
    /// that are gone or name another user now. Each member is read and
    /// checked here, and those are dropped from the set (lazy repair).
    async fn user_sessions(
        &self,
        user: &str,
        now: i64,
    ) -> Result<Vec<super::UserSession>, StoreError> {
        if self.user_key.is_none() {
            return Ok(Vec::new());
        }
        self.op(true, |c| self.user_sessions_inner(c, user, now))
            .await
    }

    async fn revoke_user(
        &self,
        user: &str,
        keep: Option<&SessionKey>,
        now: i64,
    ) -> Result<u64, StoreError> {
        if self.user_key.is_none() {
            return Ok(0);
        }
        self.op(true, |c| self.revoke_user_inner(c, user, keep, now))
            .await
    }

    /// Walks every session key with `SCAN` (on Cluster, on every primary):
    /// for the admin API's `DELETE /sessions/ID`, not for a request path.
    async fn revoke_matching(
        &self,
        matches: super::KeyFilter<'_>,
        _now: i64,
    ) -> Result<u64, StoreError> {
        self.op(true, |mut c| async move {
            let keys = self.scan_sessions(&mut c).await?;
            let mut n = 0;
            for k in keys.iter().filter(|k| matches(k)) {
                self.forget(k);
                if self.delete_inner(c.clone(), k).await? {
                    n += 1;
                }
            }
            Ok(n)
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
                stamp: Stamp::NONE,
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
    fn cluster_primaries() {
        let text = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                    c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n\
                    d4 127.0.0.1:7003@17003 master,fail - 0 0 3 connected\n";
        assert_eq!(
            primaries(text),
            vec![
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7001)
            ]
        );
    }

    #[test]
    fn index_fields() {
        let v = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            parse_index(Some(v("42")), Some(v("1000"))),
            Some(Index {
                user: "42".into(),
                until: 1000
            })
        );
        assert_eq!(parse_index(Some(Value::Nil), Some(Value::Nil)), None);
        assert_eq!(parse_index(None, None), None);
    }

    #[test]
    fn versions_are_distinct() {
        assert_ne!(new_version(), new_version());
        assert_eq!(new_version().len(), 16);
    }

    /// A stamp gives back the version text it was made from, so the
    /// compare-and-set started from it succeeds; any other text stamps
    /// nothing (that write reads the session first, as before stamps). An
    /// index entry comes back with its `until` and the user of the data,
    /// marked for the script to check.
    #[test]
    fn a_stamp_gives_back_the_version_and_the_index_entry() {
        for _ in 0..100 {
            let v = new_version();
            let held = Versioned::new(v.clone(), Record::new_at(1), None, true);
            let back = from_seen(&held.record, None).unwrap();
            assert_eq!(back.version, v);
            assert_eq!(
                (back.index, back.derived_user, back.bare),
                (None, false, true)
            );
        }
        // Fields that make no entry (an empty user, no readable `until`):
        // no entry, and not bare, so that a write deletes them.
        for index in [
            None,
            Some(Index {
                user: String::new(),
                until: 5,
            }),
            Some(Index {
                user: "ann".into(),
                until: 0,
            }),
        ] {
            let held = Versioned::new(new_version(), Record::new_at(1), index.clone(), false);
            let back = from_seen(&held.record, Some("uid")).unwrap();
            assert_eq!(
                (back.index, back.derived_user, back.bare),
                (None, false, false),
                "{index:?}"
            );
        }
        let v = "00000000000000ff".to_string();
        let held = Versioned::new(v.clone(), Record::new_at(1), None, true);
        assert_eq!(from_seen(&held.record, None).unwrap().version, v);
        for other in [
            "00000000000000FF",
            "+0000000000000ff",
            "ff",
            "0000000000000000f",
            "x",
        ] {
            assert_eq!(parse_version(other), None, "{other}");
        }
        let mut r = Record::new_at(1);
        r.data = bytes::Bytes::from_static(br#"{"uid":"ann"}"#);
        let index = Some(Index {
            user: "ann".into(),
            until: 5,
        });
        let held = Versioned::new(new_version(), r, index.clone(), false);
        let back = from_seen(&held.record, Some("uid")).unwrap();
        assert_eq!(
            (back.index, back.derived_user, back.bare),
            (index, true, false)
        );
        assert!(
            from_seen(&held.record, None).is_none(),
            "no user key: the entry's user cannot be derived"
        );
        assert!(from_seen(&held.record, Some("other")).is_none());
    }
}
